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

How rows travel (bound by reading, not by decoding): each lane's reader thread reads its window's
chunks straight from the shard files (pipeline.store.shards) into one of three reused buffers, in
the stored dtype (bfloat16 bits stay 2 bytes), checking every chunk's crc32c, and shuffles an array
of row indices, never the rows. When one process serves every lane and the whole store fits the
memory budget in its stored dtype, the store is instead read once, chunk by chunk as the windows
first need them, and held (`resident`): later epochs read nothing. Either way the stream is the
same. One assembler thread gathers each batch's rows by those indices into one of three reused
batch buffers. On CPU it also decodes them there to float32 and scales them; on CUDA the buffers
are pinned, the rows leave the host in the stored dtype and are decoded and scaled on the device,
and a buffer is refilled only once its copy to the device has finished. A yielded batch is valid
until the next one is taken (copy it to keep it).
"""

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.console import warn
from pipeline.errors import GspError
from pipeline.store import ActivationStore, bf16_bits_to_f32
from pipeline.store.reader import same_rows

SLOTS = 3  # buffers per lane and per batch: one being served, one queued, one being filled
BF16 = np.dtype(np.uint16)  # how a bfloat16 store holds its values


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
    """Iterates (B/W, D) float32 batches on `device` forever, epoch after epoch, each row times its
    store's scale (`scales`, one per store; default 1).

    With `share=(rank, world)` each batch is this process's share of the global batch (its lanes' rows).
    With `extra` (other hook points of the same rows: a transcoder's target, or every layer's input
    and output for a transcoder set) each row is `store`'s columns followed by each extra store's,
    shuffled together. The windows are sized for rows of `window_width` values (default: all the
    columns): a set's stream is then the stream one transcoder reads alone (its pair of hook points),
    each transcoder trains as it would alone, and the loader holds len(stores)/2 times the memory.
    """

    def __init__(
        self,
        store: ActivationStore,
        batch_size: int,
        *,
        seed: int = 0,
        buffer_mib: float = 1024,
        mask_special: bool = True,
        device: torch.device | str = "cpu",
        scales: tuple[float, ...] | None = None,
        state: LoaderState | None = None,
        share: tuple[int, int] = (0, 1),
        lanes: int = 1,
        extra: Sequence[ActivationStore] = (),
        window_width: int | None = None,
        resident: bool | None = None,
    ):
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.buffer_mib, self._resident = buffer_mib, resident
        for other in extra:
            same_rows(store, other)
        self.stores = [store, *extra]
        self.scales = tuple(scales) if scales is not None else (1.0,) * len(self.stores)
        if len(self.scales) != len(self.stores):
            raise ValueError(f"{len(self.stores)} stores but {len(self.scales)} scales")
        self.device = torch.device(device)
        self.rows = store.rows_written
        if self.rows == 0:
            raise GspError(f"store {store.path} holds no rows yet; harvest into it first")
        if not store.complete:
            warn(f"store {store.path} is incomplete: training on its {self.rows:,} written rows")
        self.chunk_rows = store.chunk_rows
        self.n_chunks = math.ceil(self.rows / self.chunk_rows)
        self.lanes = effective_lanes(lanes, self.n_chunks)
        rank, world = share
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
        self.widths = [s.d_in for s in self.stores]
        # The window's size is part of the stream's definition: counted at 4 bytes a value (float32
        # rows, as the loader once held them), two windows of every lane in the budget.
        chunk_bytes = self.chunk_rows * (window_width or sum(self.widths)) * 4
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
        """The lane window's non-special rows in stream order, unscaled: (rows, D [+ O]) float32."""
        buffers = self._window_buffers()
        order = self._fill_window(epoch, index, lane, buffers, np.empty(self.chunk_rows, np.int32))
        return np.concatenate([_decoded(b[order]) for b in buffers], axis=1)

    def _window_buffers(self) -> list[np.ndarray]:
        rows = self.lane_window_chunks * self.chunk_rows
        return [np.empty((rows, s.d_in), s.stored_dtype) for s in self.stores]

    def _fill_window(self, epoch: int, index: int, lane: int, buffers: list[np.ndarray], tokens: np.ndarray,
                     resident: "_Resident | None" = None):  # fmt: skip
        """Read the lane window's chunks into `buffers` (in the stored dtype; chunk i at rows
        i·chunk_rows ...), or make sure `resident` holds them; return the window's non-special rows'
        indices (into `buffers`, or into the resident copy) in stream order."""
        keep = []
        for i, chunk in enumerate(np.sort(self.windows(epoch, lane)[index])):  # store order; the shuffle mixes
            if resident is not None:
                keep.append(resident.load(int(chunk)))
                continue
            keep.append(i * self.chunk_rows + self._read_chunk(int(chunk), buffers, i * self.chunk_rows, tokens))
        kept = np.concatenate(keep)
        rng = np.random.default_rng([self.seed, epoch, 1 + index * self.lanes + lane])
        return kept[rng.permutation(len(kept))]

    def _read_chunk(self, chunk: int, buffers: list[np.ndarray], at: int, tokens: np.ndarray) -> np.ndarray:
        """Chunk `chunk` of every store into rows at ... of `buffers`; its non-special rows (0-based)."""
        for s, buffer in zip(self.stores, buffers, strict=True):
            rows = s.read_chunk(chunk, buffer[at : at + self.chunk_rows])
        if not self.special:
            return np.arange(rows)
        self.store.read_chunk(chunk, tokens, tokens=True)
        return np.flatnonzero(~np.isin(tokens[:rows], self.special))

    @property
    def resident(self) -> bool:
        """Whether the rows this process serves are held in memory after their first read: one process
        whose store (in the stored dtype) fits in the buffer budget, unless `resident` said otherwise.
        The stream is the same either way."""
        if self._resident is not None:
            return self._resident
        nbytes = self.n_chunks * self.chunk_rows * sum(s.d_in * s.stored_dtype.itemsize for s in self.stores)
        return len(self.served) == self.lanes and nbytes <= self.buffer_mib * 2**20

    # ------------------------------------------------------------------ serving
    def __iter__(self) -> Iterator[torch.Tensor]:
        stop = threading.Event()
        ends, threads = {}, []  # the consuming end of each lane this process serves
        resident = _Resident(self) if self.resident else None
        for lane in self.served:  # one reader thread per lane: the lanes' reads overlap
            ahead: queue.Queue = queue.Queue(maxsize=1)
            free: queue.Queue = queue.Queue()
            for slot in range(SLOTS):
                free.put(slot)
            slots = [resident.buffers if resident else self._window_buffers() for _ in range(SLOTS)]
            start = tuple(self.state.lanes[lane])  # read here, once: the consumer reassigns self.state
            args = (lane, start, ahead, free, slots, stop, resident)
            threads.append(threading.Thread(target=self._read_ahead, args=args, daemon=True, name=f"gsp-loader-{lane}"))
            ends[lane] = _Lane(ahead, free, slots, stop)
        batches = _Batches(self, ends, stop)
        threads.append(threading.Thread(target=batches.run, daemon=True, name="gsp-loader-batches"))
        for t in threads:
            t.start()
        try:
            while True:
                slot, positions = _get(batches.ready, stop)
                self.state = LoaderState([positions.get(i) for i in range(self.lanes)])  # after this batch
                yield batches.deliver(slot)
        finally:
            stop.set()  # every thread sees it within 0.1 s of its current read or copy
            for t in threads:
                t.join(timeout=10)

    def _read_ahead(self, lane: int, start: tuple[int, int], out: queue.Queue, free: queue.Queue, slots: list,
                    stop: threading.Event, resident: "_Resident | None" = None):  # fmt: skip
        """Windows (epoch, offset of the first row, slot, row indices) of one lane from `start` (epoch, rows
        of that epoch's lane stream already served) on, forever, in order, each read into a free one of
        the SLOTS buffers (the assembler frees it)."""
        epoch, skip = start
        tokens = np.empty(self.chunk_rows, np.int32)
        try:
            while not stop.is_set():
                base = 0
                for index in range(len(self.windows(epoch, lane))):
                    slot = _get(free, stop)
                    order = self._fill_window(epoch, index, lane, slots[slot], tokens, resident)
                    if skip < base + len(order):
                        start = max(skip - base, 0)
                        if not _put(out, (epoch, base + start, slot, order[start:]), stop):
                            return
                    else:
                        free.put(slot)  # before the resumed position: not served
                    base += len(order)
                if base == 0:
                    raise GspError(f"store {self.store.path}: lane {lane} holds no rows but special tokens")
                epoch, skip = epoch + 1, 0
        except _Stopped:
            return
        except BaseException as e:  # handed to the training loop, which raises it
            _put(out, e, stop)


class _Resident:
    """Every chunk of the stores in memory once read (the stored dtype, chunk c at rows c·chunk_rows ...),
    with its non-special rows: each chunk is read, and checked, once per loader iteration."""

    def __init__(self, loader: ShuffledLoader):
        self.loader = loader
        rows = loader.n_chunks * loader.chunk_rows
        self.buffers = [np.empty((rows, s.d_in), s.stored_dtype) for s in loader.stores]
        self.keep: dict[int, np.ndarray] = {}
        self.failed: dict[int, BaseException] = {}
        self.loading: dict[int, threading.Event] = {}
        self.lock = threading.Lock()
        self.tokens = threading.local()

    def load(self, chunk: int) -> np.ndarray:
        """The chunk's non-special rows (indices into the buffers), reading it on first use."""
        with self.lock:
            done = self.loading.get(chunk)
            mine = done is None
            if mine:
                done = self.loading[chunk] = threading.Event()
        if not mine:
            done.wait()
            if chunk in self.failed:
                raise self.failed[chunk]
            return self.keep[chunk]
        tokens = getattr(self.tokens, "buffer", None)
        if tokens is None:
            tokens = self.tokens.buffer = np.empty(self.loader.chunk_rows, np.int32)
        at = chunk * self.loader.chunk_rows
        try:
            self.keep[chunk] = at + self.loader._read_chunk(chunk, self.buffers, at, tokens)
        except BaseException as e:
            self.failed[chunk] = e  # whoever waits for this chunk raises the same error
            raise
        finally:
            done.set()
        return self.keep[chunk]


def _decoded(rows: np.ndarray) -> np.ndarray:
    return bf16_bits_to_f32(rows) if rows.dtype == BF16 else rows


def _torch(a: np.ndarray) -> torch.Tensor:
    """A numpy buffer as a tensor of the same memory: bfloat16 bits as torch.bfloat16."""
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == BF16 else torch.from_numpy(a)


def _decode(rows: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out = float32(rows) · scale: a widening copy (bfloat16 widens exactly), then the float32 product.
    (One mixed-dtype multiply would be a single pass, but runs at half the speed of these two on CPU.)"""
    out.copy_(rows)
    if scale != 1.0:
        out.mul_(scale)


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _get(q: queue.Queue, stop: threading.Event):
    """The next item of `q`; an exception a producer thread put there is raised here, in the consumer."""
    while True:
        try:
            item = q.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                raise _Stopped from None
            continue
        if isinstance(item, BaseException):
            raise item
        return item


class _Stopped(Exception):
    """The loader was closed while a thread waited on it."""


class _Batches:
    """The assembler: gathers each batch's rows from the lanes' windows into the next of SLOTS reused
    buffers (float32, decoded and scaled, on CPU; pinned, in the stored dtype, for CUDA)."""

    def __init__(self, loader: ShuffledLoader, ends: dict, stop: threading.Event):
        self.loader, self.ends, self.stop = loader, ends, stop
        self.ready: queue.Queue = queue.Queue(maxsize=1)
        rows = loader.lane_rows * len(loader.served)
        self.cuda = loader.device.type == "cuda"
        dtypes = [torch.bfloat16 if s.stored_dtype == BF16 else torch.float32 for s in loader.stores]
        self.raw = [
            [torch.empty(rows, w, dtype=dt, pin_memory=self.cuda) for w, dt in zip(loader.widths, dtypes, strict=True)]
            for _ in range(SLOTS)
        ]
        self.out = None if self.cuda else [torch.empty(rows, sum(loader.widths)) for _ in range(SLOTS)]
        self.copied = [None] * SLOTS  # CUDA: the event after which a pinned slot may be refilled
        edges = np.cumsum([0, *loader.widths])
        self.columns = [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                slot = n % SLOTS
                if self.copied[slot] is not None:
                    self.copied[slot].synchronize()  # the device has its copy of this buffer's last batch
                positions = self.fill(slot)
                if not _put(self.ready, (slot, positions), self.stop):
                    return
                n += 1
        except _Stopped:
            return
        except BaseException as e:  # handed to the consumer, which raises it
            _put(self.ready, e, self.stop)

    def fill(self, slot: int) -> dict:
        """This process's share of the next global batch into `slot`; each lane's position after it."""
        lane_rows, raw = self.loader.lane_rows, self.raw[slot]
        positions = {}
        for j, lane in enumerate(self.loader.served):
            self.ends[lane].take_into(raw, j * lane_rows, lane_rows)
            positions[lane] = self.ends[lane].position
        if not self.cuda:
            out = self.out[slot]
            for piece, cols, scale in zip(raw, self.columns, self.loader.scales, strict=True):
                _decode(piece, scale, out[:, cols] if len(raw) > 1 else out)
        return positions

    def deliver(self, slot: int) -> torch.Tensor:
        """The batch in `slot` as float32 on the device (on CUDA: copied in the stored dtype, then decoded)."""
        if not self.cuda:
            return self.out[slot]
        device = self.loader.device
        out = torch.empty(len(self.raw[slot][0]), sum(self.loader.widths), device=device)
        for piece, cols, scale in zip(self.raw[slot], self.columns, self.loader.scales, strict=True):
            _decode(piece.to(device, non_blocking=True), scale, out[:, cols])
        event = torch.cuda.Event()
        event.record()
        self.copied[slot] = event
        return out


class _Lane:
    """The consuming end of one lane: its rows in stream order, gathered into batches; a window's
    buffers go back to the reader as soon as its last row is gathered; the position after the last
    row taken."""

    def __init__(self, ahead: queue.Queue, free: queue.Queue, slots: list, stop: threading.Event):
        self.ahead, self.free, self.slots, self.stop = ahead, free, slots, stop
        self.window, self.pos, self.position = None, 0, None

    def take_into(self, dests: list[torch.Tensor], at: int, n: int) -> None:
        """The lane's next n rows into rows at ... at + n of each store's batch buffer."""
        have = 0
        while have < n:
            if self.window is None:
                self.window, self.pos = _get(self.ahead, self.stop), 0
            epoch, first, slot, order = self.window
            take = min(n - have, len(order) - self.pos)
            index = torch.from_numpy(order[self.pos : self.pos + take])
            for buffer, dest in zip(self.slots[slot], dests, strict=True):
                torch.index_select(_torch(buffer), 0, index, out=dest[at + have : at + have + take])
            self.pos, have = self.pos + take, have + take
            self.position = [epoch, first + self.pos]
            if self.pos == len(order):
                self.window = None
                self.free.put(slot)
