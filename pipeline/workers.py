"""The harvest's helpers around the model: a corpus reader ahead of it and a shard writer behind it.

Each runs on threads (the default) or in processes of its own (`--workers processes`). Processes
are meant for GPUs, where a model step takes milliseconds and the reader, the writers and the
model's Python launch loop queue for one interpreter lock; they are started with `spawn`, and
contexts and shards cross in pipes. On an H200 a 1M-token harvest was slower with processes than
with threads (their start-up dominated such a short run); benchmarks/RESULTS.md has the figures.
"""

import collections
import multiprocessing as mp
import queue
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline.corpus import Cursor, documents, pack, pack_shared
from pipeline.errors import GspError
from pipeline.faults import fault

_MESSAGE = 64  # contexts per message from the reader


@dataclass(frozen=True)
class Share:
    """Under torchrun: the tokenizing is shared and this process's reader keeps only its own contexts."""

    rank: int
    world: int
    wanted: object  # context number -> bool
    limit: int  # contexts in the store
    gather: object  # an all-gather of a small object across the processes (pipeline.corpus.pack_shared)


@dataclass(frozen=True)
class ReaderSpec:
    """Everything a reader needs to rebuild the context stream (picklable for a child process)."""

    documents: dict  # keyword arguments of pipeline.corpus.documents
    context_size: int
    start: Cursor
    tokenizer: object  # a tokenizer, or the folder of one saved for a child process
    share: Share | None = None  # threads only


def _produce(spec: ReaderSpec, put, stopped) -> None:
    """Pack contexts and `put` them in messages of _MESSAGE: (ids (n, C) int32, [cursor, ...]); then None."""
    try:
        tok = spec.tokenizer
        if isinstance(tok, str):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tok)
        docs, C, share = documents(**spec.documents), spec.context_size, spec.share
        if share is None:
            contexts = pack(docs, tok, C, start=spec.start)
        else:
            kw = {"rank": share.rank, "world": share.world, "wanted": share.wanted, "limit": share.limit}
            contexts = ((ids, cursor) for _, ids, cursor in pack_shared(docs, tok, C, gather=share.gather, **kw))
        ids, cursors = [], []
        for context, cursor in contexts:
            ids.append(context)
            cursors.append(cursor)
            if len(ids) == _MESSAGE:
                if not put((np.stack(ids), cursors), stopped):
                    return
                ids, cursors = [], []
        if ids and not put((np.stack(ids), cursors), stopped):
            return
        put(None, stopped)
    except GspError as e:
        put(("gsp-error", str(e), ""), stopped)
    except Exception as e:  # handed to the harvest, which raises it, with this traceback
        put(("error", f"{type(e).__name__}: {e}", traceback.format_exc()), stopped)


def _put_until_stopped(q, item, stopped, discard=None) -> bool:
    """Put `item`, giving up when `stopped` is set (False) or `discard` is (True: the item is dropped)."""
    while not stopped.is_set() and not (discard and discard.is_set()):
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return bool(discard and discard.is_set())


def _reader_process(spec: ReaderSpec, q, stopped) -> None:
    _produce(spec, lambda item, s: _put_until_stopped(q, item, s), stopped)
    # The last items (the end, or an error) are still in the queue's buffer: exiting waits until they
    # are in the pipe, unless the harvest stopped, which reads no more.
    if stopped.is_set():
        q.cancel_join_thread()


class ContextReader:
    """Contexts from a background thread or process, `take(n)` at a time."""

    def __init__(self, spec: ReaderSpec, *, process: bool):
        if process:
            if spec.share is not None:
                raise GspError("internal: a shared reader runs on a thread")
            ctx = mp.get_context("spawn")
            self._q, self._stopped = ctx.Queue(maxsize=32), ctx.Event()
            self._worker = ctx.Process(target=_reader_process, args=(spec, self._q, self._stopped), daemon=True)
        else:
            self._q, self._stopped, self._discard = queue.Queue(maxsize=32), threading.Event(), threading.Event()
            self._worker = threading.Thread(target=_produce, args=(spec, self._put, self._stopped), daemon=True)
        self._worker.start()
        self._ready: collections.deque = collections.deque()
        self._ended, self._error = False, None

    def take(self, n: int) -> list[tuple[np.ndarray, Cursor]]:
        """Up to n (ids (C,), cursor) pairs; fewer only when the corpus has ended."""
        while len(self._ready) < n and not self._ended:
            item = self._next()
            if item is None:
                self._ended = True
            elif isinstance(item[0], str):
                _raise_reader_error(*item)
            else:
                self._ready.extend(zip(item[0], item[1], strict=True))
        return [self._ready.popleft() for _ in range(min(n, len(self._ready)))]

    def _next(self):
        """The reader's next message; a reader that ended without its last word (a killed process) is an
        error, not a wait for ever."""
        while True:
            alive = self._worker.is_alive()
            try:
                return self._q.get(timeout=0.5)
            except queue.Empty:
                if not alive:  # it had ended before this wait, and nothing came
                    raise RuntimeError("the corpus reader ended without finishing (killed?); rerun the same "
                                       "command to resume") from None  # fmt: skip

    def _put(self, item, stopped) -> bool:
        if item is not None and isinstance(item[0], str):
            self._error = item  # kept for finish(), which may be discarding
        return _put_until_stopped(self._q, item, stopped, self._discard)  # discarding: the reader goes on

    def finish(self) -> None:
        """Wait for a shared reader to reach the stream's end (the other processes need its share)."""
        self._discard.set()
        self._worker.join()
        if self._error:
            _raise_reader_error(*self._error)

    def stop(self) -> None:
        self._stopped.set()
        if isinstance(self._worker, mp.process.BaseProcess):
            self._worker.join(timeout=5)
            if self._worker.is_alive():
                self._worker.terminate()


class WorkerTraceback(Exception):
    """A worker's traceback, as text carried to the harvest: the cause of the error raised there, so
    that a traceback shown with GSP_DEBUG=1 goes on into the worker, where the error happened."""

    def __str__(self) -> str:
        return "\n" + self.args[0].rstrip()


def _raise_reader_error(kind: str, message: str, trace: str):
    if kind == "gsp-error":
        raise GspError(message)
    raise RuntimeError(f"corpus reader failed: {message}") from WorkerTraceback(trace)


def _writer_process(path: str, conn) -> None:
    """Receive shards over a pipe and write their files; answer None or the error."""
    from pipeline.store import StoreWriter

    store = StoreWriter.open(path)
    while (header := conn.recv()) is not None:
        shard, rows, arrays = header  # arrays: [(hook name, dtype, d_in), ...]
        acts = {name: np.empty((rows, d_in), dtype=dtype) for name, dtype, d_in in arrays}
        tokens = np.empty(rows, dtype=np.int32)
        for a in acts.values():
            conn.recv_bytes_into(a.reshape(-1))  # 1-D views: recv_bytes_into sizes buffers by len()
        conn.recv_bytes_into(tokens)
        try:
            store.write_shard_data(shard, acts, tokens)
            conn.send(None)
        except Exception as e:
            trace = traceback.format_exc()
            try:
                conn.send((e, trace))
            except Exception:  # an error that does not pickle: its text
                conn.send((RuntimeError(f"{type(e).__name__}: {e}"), trace))


class ShardWriter:
    """Writes shard files several at once and claims each as soon as its files are complete, in order.

    A shard's rows are claimed (`commit`: rows_written, cursor and statistics, or a process's own
    record under torchrun) by one committer thread, right after its files and those of every earlier
    shard are written: a kill loses at most the shards still being written, and never leaves a claim
    on a missing or partial shard.
    """

    def __init__(self, store, commit, *, workers: int, process: bool):
        self.store, self.commit, self.workers = store, commit, workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gsp-writer")
        self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gsp-commit")  # in submission order
        self.pending: collections.deque = collections.deque()  # claims not yet known to be done
        self.failed = threading.Event()
        self.procs, self.conns = [], queue.Queue()
        if process:
            ctx = mp.get_context("spawn")
            for _ in range(workers):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=_writer_process, args=(store.path, theirs), daemon=True)
                proc.start()
                self.procs.append(proc)
                self.conns.put(mine)

    def put(self, shard: int, acts: dict[str, np.ndarray], tokens: np.ndarray, cursor: Cursor, sums) -> None:
        # bounded memory: at most `workers` shards in flight besides the one being filled
        while len(self.pending) >= self.workers:
            self.pending.popleft().result()  # re-raises a write or claim error in the main thread
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()
        write = self._write_in_process if self.procs else self.store.write_shard_data
        written = self.pool.submit(write, shard, acts, tokens)
        self.pending.append(self.committer.submit(self._claim, written, shard, len(tokens), cursor, sums))

    def _claim(self, written, shard: int, rows: int, cursor: Cursor, sums) -> None:
        try:
            written.result()
            if self.failed.is_set():
                return  # an earlier shard failed: later ones are never claimed
            self.commit(shard, rows, cursor, sums)
        except BaseException:
            self.failed.set()
            raise
        fault("shard-committed")

    def _write_in_process(self, shard: int, acts: dict[str, np.ndarray], tokens: np.ndarray) -> None:
        conn = self.conns.get()
        try:
            conn.send((shard, len(tokens), [(name, a.dtype.str, a.shape[1]) for name, a in acts.items()]))
            for a in acts.values():
                conn.send_bytes(np.ascontiguousarray(a).reshape(-1))  # pipe writes release the interpreter lock
            conn.send_bytes(np.ascontiguousarray(tokens))
            failed = conn.recv()
        except (EOFError, OSError):
            raise RuntimeError("a shard writer process died; rerun the same command to resume") from None
        self.conns.put(conn)
        if failed is not None:
            error, trace = failed
            raise error from WorkerTraceback(trace)

    def close(self) -> None:
        """Wait until everything in flight is written and claimed, raising the first error."""
        while self.pending:
            self.pending.popleft().result()

    def stop(self) -> None:
        """Stop the workers (after close(), or after an error: unclaimed shards are simply not claimed)."""
        self.failed.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.committer.shutdown(wait=True, cancel_futures=True)
        while not self.conns.empty():
            try:
                self.conns.get_nowait().send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
