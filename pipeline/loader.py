"""Token-level shuffled batches from an activation store, read ahead in the background.

Each epoch takes the store's chunks (whole contexts, ≈4096 rows each) in a seeded random order and
cuts that order into windows of `window_chunks` chunks (as many as the memory budget holds). A
window's non-special rows are read, concatenated and permuted as one pool, and the epoch's batches
are cut from the concatenation of the permuted windows.

The guarantee: every batch is a uniform random sample of rows from one window (two at a window
boundary), i.e. from `window_chunks` chunks drawn at random from the whole store, which is
`window_chunks × chunk_rows / C` contexts, from anywhere in the corpus. Rows of one context are
spread over the window's whole pool, never served together. A new epoch reshuffles both orders.

The position is (epoch, row offset in the epoch's stream): the stream is a pure function of the
seed, so a checkpoint only needs those two numbers to resume exactly.
"""

import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.console import warn
from pipeline.errors import GspError
from pipeline.store import ActivationStore


@dataclass
class LoaderState:
    epoch: int = 0
    offset: int = 0  # rows of this epoch's stream already served


class ShuffledLoader:
    """Iterates (B, D) float32 CPU tensors (pinned when `pin` is set) forever, epoch after epoch.

    With `part=(rank, world)` each batch is this process's 1/world slice of the global batch.
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
    ):
        self.store, self.batch_size, self.seed, self.pin = store, batch_size, seed, pin
        rank, world = part
        if batch_size % world:
            raise GspError(f"--batch-size {batch_size} must be a multiple of the number of processes ({world})")
        # under torchrun, this process serves rows [lo, hi) of every global batch: the union over
        # processes is exactly the batch one process would serve
        self.lo, self.hi = rank * batch_size // world, (rank + 1) * batch_size // world
        self.rows = store.rows_written
        if self.rows == 0:
            raise GspError(f"store {store.path} holds no rows yet; harvest into it first")
        if not store.complete:
            warn(f"store {store.path} is incomplete: training on its {self.rows:,} written rows")
        self.chunk_rows = store.chunk_rows
        self.n_chunks = math.ceil(self.rows / self.chunk_rows)
        chunk_bytes = self.chunk_rows * store.d_in * 4
        # two windows live at once (one served, one read ahead)
        self.window_chunks = max(1, min(self.n_chunks, int(buffer_mib * 2**20 / 2 // chunk_bytes)))
        self.special = store.special_ids if mask_special else []
        self.state = state or LoaderState()

    # ------------------------------------------------------------------ the stream, as pure functions
    def chunk_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 0]).permutation(self.n_chunks)

    def windows(self, epoch: int) -> list[np.ndarray]:
        order = self.chunk_order(epoch)
        return [order[i : i + self.window_chunks] for i in range(0, self.n_chunks, self.window_chunks)]

    def read_window(self, epoch: int, index: int) -> np.ndarray:
        """The window's non-special rows, permuted: (rows, D) float32."""
        parts = []
        for chunk in np.sort(self.windows(epoch)[index]):  # read in store order; the permutation mixes
            start, stop = chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.rows)
            acts = self.store.read(start, stop)
            if self.special:
                acts = acts[~np.isin(self.store.read_tokens(start, stop), self.special)]
            parts.append(acts)
        pool = np.concatenate(parts)
        return pool[np.random.default_rng([self.seed, epoch, 1 + index]).permutation(len(pool))]

    # ------------------------------------------------------------------ serving
    def __iter__(self) -> Iterator[torch.Tensor]:
        ahead: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        thread = threading.Thread(target=self._read_ahead, args=(ahead, stop), daemon=True, name="gsp-loader")
        thread.start()
        try:
            yield from self._batches(ahead)
        finally:
            stop.set()

    def _read_ahead(self, out: queue.Queue, stop: threading.Event) -> None:
        """(epoch, offset of the first row, rows) from the current position on, forever, in order."""
        epoch, skip = self.state.epoch, self.state.offset
        try:
            while not stop.is_set():
                base = 0
                for index in range(len(self.windows(epoch))):
                    pool = self.read_window(epoch, index)
                    if skip < base + len(pool):
                        start = max(skip - base, 0)
                        while not stop.is_set():
                            try:
                                out.put((epoch, base + start, pool[start:]), timeout=0.1)
                                break
                            except queue.Full:
                                pass
                    base += len(pool)
                epoch, skip = epoch + 1, 0
        except BaseException as e:  # handed to the training loop, which raises it
            out.put((None, None, e))

    def _batches(self, ahead: queue.Queue) -> Iterator[torch.Tensor]:
        pieces, have = [], 0
        while True:
            epoch, first, pool = ahead.get()
            if epoch is None:
                raise pool
            pos = 0
            while pos < len(pool):
                take = min(self.batch_size - have, len(pool) - pos)
                pieces.append(pool[pos : pos + take])
                pos, have = pos + take, have + take
                if have == self.batch_size:
                    batch = torch.from_numpy(np.concatenate(pieces)[self.lo : self.hi])
                    self.state = LoaderState(epoch, first + pos)  # the position after this batch
                    yield batch.pin_memory() if self.pin else batch
                    pieces, have = [], 0
