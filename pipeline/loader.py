"""Token-level shuffled batches from an activation store, read ahead in the background.

Each epoch takes the store's chunks (whole contexts, ≈4096 rows each) in a seeded random order and
deals them, round-robin, into `lanes` lanes. A lane cuts its chunks into windows (as many chunks as
its share of the memory budget holds); a window's non-special rows are read, concatenated and
permuted as one pool, and the lane's stream is the concatenation of its permuted windows, epoch
after epoch. Global batch k is the k-th B/L rows of lane 0, then of lane 1, ..., of lane L-1.

The guarantee: every batch is a stratified random sample of rows, B/L from one window (two at a
window boundary) of each lane, i.e. from `window_chunks` chunks drawn at random from the whole
store, which is `window_chunks × chunk_rows / C` contexts, from anywhere in the corpus. Rows of one
context are spread over their window's whole pool, never served together. Each epoch reshuffles.

Under torchrun, process r of W serves (and reads) only the lanes r·L/W ... (r+1)·L/W − 1: every
process reads a disjoint part of the store, and together they serve exactly the batches one
process serves with the same lanes. The stream depends on the lanes, never on the number of
processes, so one SAE trains the same on 1, 2, 4 or 8 GPUs (with the default 8 lanes).

The position is, per lane, (epoch, rows of that epoch's lane stream served): the stream is a pure
function of the seed, so a checkpoint only needs those numbers to resume exactly, at any world size
that divides the lanes. With one lane the stream is that of a single shuffle buffer.
"""

import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.console import warn
from pipeline.errors import GspError
from pipeline.store import ActivationStore
from pipeline.store.reader import same_rows


@dataclass
class LoaderState:
    """Per lane, [epoch, rows of that epoch's lane stream already served]; None: another process's lane."""

    lanes: list = field(default_factory=lambda: [[0, 0]])

    @staticmethod
    def from_json(d: dict) -> "LoaderState":
        if "lanes" in d:
            return LoaderState([list(p) if p is not None else None for p in d["lanes"]])
        return LoaderState([[d["epoch"], d["offset"]]])  # checkpoints written before lanes: one lane

    @staticmethod
    def merge(states: list["LoaderState"]) -> "LoaderState":
        """Every process's lanes in one state (for the checkpoint rank 0 writes)."""
        lanes = [
            next((s.lanes[i] for s in states if s.lanes[i] is not None), None) for i in range(len(states[0].lanes))
        ]
        if None in lanes:
            raise GspError("internal: a loader lane served by no process")
        return LoaderState(lanes)


def effective_lanes(lanes: int, n_chunks: int) -> int:
    """The most lanes that each get a chunk every epoch: the largest divisor of `lanes` ≤ the chunks
    (so a small store has fewer lanes, whatever the number of processes)."""
    return max(d for d in range(1, lanes + 1) if lanes % d == 0 and d <= n_chunks)


class ShuffledLoader:
    """Iterates (B/W, D) float32 CPU tensors (pinned when `pin` is set) forever, epoch after epoch.

    With `part=(rank, world)` each batch is this process's share of the global batch (its lanes' rows).
    With `target` (a transcoder's: another hook point of the same rows) each row is the input's
    columns followed by the target's, (B/W, D + O), shuffled together.
    """

    def __init__(
        self,
        store: ActivationStore,
        batch_size: int,
        *,
        seed: int = 0,
        buffer_mib: float = 1024,
        mask_special: bool = True,
        pin: bool = False,
        state: LoaderState | None = None,
        part: tuple[int, int] = (0, 1),
        lanes: int = 1,
        target: ActivationStore | None = None,
    ):
        self.store, self.batch_size, self.seed, self.pin, self.target = store, batch_size, seed, pin, target
        if target is not None:
            same_rows(store, target)
        self.rows = store.rows_written
        if self.rows == 0:
            raise GspError(f"store {store.path} holds no rows yet; harvest into it first")
        if not store.complete:
            warn(f"store {store.path} is incomplete: training on its {self.rows:,} written rows")
        self.chunk_rows = store.chunk_rows
        self.n_chunks = math.ceil(self.rows / self.chunk_rows)
        self.lanes = effective_lanes(lanes, self.n_chunks)
        rank, world = part
        if self.lanes % world:
            small = f" (this store's {self.n_chunks} chunks allow {self.lanes})" if self.lanes < lanes else ""
            raise GspError(
                f"{world} processes cannot share {self.lanes} loader lanes{small}: "
                f"use a number of processes that divides {self.lanes}, or --lanes a multiple of {world}"
            )
        if batch_size % self.lanes:
            raise GspError(f"--batch-size {batch_size} must be a multiple of the loader's lanes ({self.lanes})")
        per = self.lanes // world
        self.served = range(rank * per, (rank + 1) * per)  # this process's lanes
        self.lane_rows = batch_size // self.lanes
        chunk_bytes = self.chunk_rows * (store.d_in + (target.d_in if target is not None else 0)) * 4
        # two windows of each lane live at once (one served, one read ahead)
        self.window_chunks = max(1, min(self.n_chunks, int(buffer_mib * 2**20 / 2 // chunk_bytes)))
        self.lane_window_chunks = max(1, self.window_chunks // self.lanes)
        self.special = store.special_ids if mask_special else []
        state = state or LoaderState([[0, 0]] * self.lanes)
        if len(state.lanes) != self.lanes:
            raise GspError(
                f"the saved loader position has {len(state.lanes)} lanes but this store and --lanes give "
                f"{self.lanes}; resume with the store and --lanes the run started with"
            )
        self.state = LoaderState([state.lanes[i] if i in self.served else None for i in range(self.lanes)])
        if any(self.state.lanes[i] is None for i in self.served):
            raise GspError("the saved loader position lacks some lanes; the checkpoint is damaged")

    # ------------------------------------------------------------------ the stream, as pure functions
    def chunk_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 0]).permutation(self.n_chunks)

    def windows(self, epoch: int, lane: int = 0) -> list[np.ndarray]:
        chunks = self.chunk_order(epoch)[lane :: self.lanes]
        w = self.lane_window_chunks
        return [chunks[i : i + w] for i in range(0, len(chunks), w)]

    def read_window(self, epoch: int, index: int, lane: int = 0) -> np.ndarray:
        """The lane window's non-special rows, permuted: (rows, D) float32."""
        parts = []
        for chunk in np.sort(self.windows(epoch, lane)[index]):  # read in store order; the permutation mixes
            start, stop = chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.rows)
            acts = self.store.read(start, stop)
            if self.target is not None:
                acts = np.concatenate([acts, self.target.read(start, stop)], axis=1)
            if self.special:
                acts = acts[~np.isin(self.store.read_tokens(start, stop), self.special)]
            parts.append(acts)
        pool = np.concatenate(parts)
        rng = np.random.default_rng([self.seed, epoch, 1 + index * self.lanes + lane])
        return pool[rng.permutation(len(pool))]

    # ------------------------------------------------------------------ serving
    def __iter__(self) -> Iterator[torch.Tensor]:
        stop = threading.Event()
        lanes = {}
        for lane in self.served:  # one reader thread per lane: the lanes' reads overlap
            ahead: queue.Queue = queue.Queue(maxsize=1)
            threading.Thread(
                target=self._read_ahead, args=(lane, ahead, stop), daemon=True, name=f"gsp-loader-{lane}"
            ).start()
            lanes[lane] = _Lane(ahead)
        try:
            while True:
                parts = [lanes[lane].take(self.lane_rows) for lane in self.served]
                batch = torch.from_numpy(np.concatenate(parts))
                self.state = LoaderState(
                    [lanes[i].position if i in lanes else None for i in range(self.lanes)]
                )  # the position after this batch
                yield batch.pin_memory() if self.pin else batch
        finally:
            stop.set()

    def _read_ahead(self, lane: int, out: queue.Queue, stop: threading.Event) -> None:
        """(epoch, offset of the first row, rows) of one lane from its position on, forever, in order."""
        epoch, skip = self.state.lanes[lane]
        try:
            while not stop.is_set():
                base = 0
                for index in range(len(self.windows(epoch, lane))):
                    pool = self.read_window(epoch, index, lane)
                    if skip < base + len(pool):
                        start = max(skip - base, 0)
                        while not stop.is_set():
                            try:
                                out.put((epoch, base + start, pool[start:]), timeout=0.1)
                                break
                            except queue.Full:
                                pass
                    base += len(pool)
                if base == 0:
                    raise GspError(f"store {self.store.path}: lane {lane} holds no rows but special tokens")
                epoch, skip = epoch + 1, 0
        except BaseException as e:  # handed to the training loop, which raises it
            out.put((None, None, e))


class _Lane:
    """The consuming end of one lane: rows in stream order, and the position after the last one taken."""

    def __init__(self, ahead: queue.Queue):
        self.ahead, self.pool, self.pos, self.position = ahead, None, 0, None

    def take(self, n: int) -> np.ndarray:
        pieces, have = [], 0
        while have < n:
            if self.pool is None or self.pos == len(self.pool):
                epoch, first, pool = self.ahead.get()
                if epoch is None:
                    raise pool
                self.epoch, self.first, self.pool, self.pos = epoch, first, pool, 0
            take = min(n - have, len(self.pool) - self.pos)
            pieces.append(self.pool[self.pos : self.pos + take])
            self.pos, have = self.pos + take, have + take
        self.position = [self.epoch, self.first + self.pos]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
