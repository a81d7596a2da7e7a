"""pipeline.workers: the corpus reader and the shard writers beside the model, on threads or processes."""

import errno
import json
import re
import threading
import time
import traceback

import numpy as np
import pytest
from conftest import tiny_harvest_args

from pipeline.corpus import Cursor
from pipeline.errors import GspError
from pipeline.store import ActivationStore
from pipeline.workers import ContextReader, ReaderSpec, ShardWriter


class GatedStore:
    """Stands in for a store: each shard's write waits until the test opens its gate."""

    path = "gated"

    def __init__(self, shards: int, fail: int | None = None):
        self.gates = [threading.Event() for _ in range(shards)]
        self.written, self.fail = [], fail

    def write_shard_data(self, shard, acts, tokens):
        self.gates[shard].wait(timeout=30)
        if shard == self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written.append(shard)


def _wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def _put(writer, shard):
    writer.put(shard, np.zeros((4, 2), np.float32), np.zeros(4, np.int32), Cursor(shard, 0), None)


def test_a_shard_is_claimed_as_soon_as_its_files_are_written():
    """No later put is needed: a kill after a shard's files are complete loses nothing of it."""
    store, claims = GatedStore(3), []
    writer = ShardWriter(store, lambda shard, rows, cursor, sums: claims.append(shard), workers=2, process=False)
    try:
        _put(writer, 0)
        store.gates[0].set()
        assert _wait_for(lambda: claims == [0])
        _put(writer, 1)
        _put(writer, 2)
        store.gates[2].set()  # shard 2 is written before shard 1: it waits for shard 1's claim
        assert _wait_for(lambda: store.written == [0, 2])
        time.sleep(0.2)
        assert claims == [0]
        store.gates[1].set()
        writer.close()
        assert claims == [0, 1, 2]
    finally:
        writer.stop()


def test_after_a_failed_write_no_later_shard_is_claimed():
    store, claims = GatedStore(3, fail=1), []
    writer = ShardWriter(store, lambda shard, rows, cursor, sums: claims.append(shard), workers=3, process=False)
    try:
        for shard in range(3):
            _put(writer, shard)
        for gate in store.gates:
            gate.set()
        with pytest.raises(OSError, match="No space left"):
            writer.close()
    finally:
        writer.stop()
    assert claims == [0] and 2 in store.written  # shard 2's files exist, but the store never claims them


def _same_store(a, b):
    sa, sb = ActivationStore.open(a), ActivationStore.open(b)
    np.testing.assert_array_equal(sa.read(0, sa.rows_written), sb.read(0, sb.rows_written))
    np.testing.assert_array_equal(sa.read_tokens(0, sa.rows_written), sb.read_tokens(0, sb.rows_written))
    assert sa.meta.hooks == sb.meta.hooks and sa.meta.cursor == sb.meta.cursor


def test_process_workers_write_the_same_store(gsp, tiny_model, corpus, tmp_path):
    """The reader and writers in their own processes give the threads' store."""
    threads, procs = tmp_path / "threads", tmp_path / "procs"
    assert gsp(*tiny_harvest_args(tiny_model, corpus, threads, workers="threads")).exit_code == 0
    r = gsp(*tiny_harvest_args(tiny_model, corpus, procs, workers="processes"))
    assert r.exit_code == 0, r.output
    _same_store(threads, procs)


def test_process_reader_reports_corpus_errors(tiny_model, tmp_path):
    """(gsp harvest checks the corpus before it starts a reader: the reader is asked here directly.)"""
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"text {i} " * 20}) for i in range(20)))
    reader = ContextReader(ReaderSpec({"dataset": str(jsonl)}, 32, Cursor(), str(tiny_model)), process=True)
    try:
        with pytest.raises(GspError, match="has no column 'text'; use --text-column with one of: body"):
            reader.take(1)
    finally:
        reader.stop()


def _shown(error: BaseException) -> str:
    """What Python prints for an error that propagates (as `gsp` lets it with GSP_DEBUG=1)."""
    return "".join(traceback.format_exception(error))


@pytest.mark.parametrize("process", [False, True])
def test_a_reader_error_keeps_the_workers_traceback(tiny_model, corpus, process):
    """The error is raised in the harvest, but it happened in the reader: its traceback goes along."""
    bad = {"dataset": str(corpus), "start": "not a number"}  # fails inside pipeline.corpus.documents
    reader = ContextReader(ReaderSpec(bad, 32, Cursor(), str(tiny_model)), process=process)
    try:
        with pytest.raises(RuntimeError, match="corpus reader failed: ValueError") as e:
            reader.take(1)
    finally:
        reader.stop()
    assert re.search(r'pipeline/corpus\.py", line \d+, in documents\n', _shown(e.value)), _shown(e.value)


def test_a_writer_process_error_keeps_its_traceback(tmp_path):
    from pipeline.store import Layout, StoreWriter
    from pipeline.tiny import synthetic_meta

    store = StoreWriter.create(tmp_path / "s", synthetic_meta(4, 3, Layout.plan(4, 3, 4, shard_mib=0.0001)))
    writer = ShardWriter(store, lambda *claim: None, workers=1, process=True)
    try:
        writer.put(0, {"L9.elsewhere": np.zeros((8, 3), np.float32)}, np.zeros(8, np.int32), Cursor(), None)
        with pytest.raises(RuntimeError, match="holds hook points") as e:
            writer.close()
    finally:
        writer.stop()
    assert re.search(r'pipeline/store/writer\.py", line \d+, in write_shard_data\n', _shown(e.value)), _shown(e.value)


def test_with_gsp_debug_a_reader_error_shows_the_workers_traceback(gsp, tiny_model, corpus, tmp_path, monkeypatch):
    """Through the CLI: GSP_DEBUG=1 lets the error propagate, and what is shown reaches into the reader."""
    import pipeline.corpus

    def broken_tokenize(tokenizer, texts):
        raise KeyError("a bug in the reader")

    monkeypatch.setattr(pipeline.corpus, "_tokenize", broken_tokenize)
    monkeypatch.setenv("GSP_DEBUG", "1")
    with pytest.raises(RuntimeError, match="corpus reader failed: KeyError") as e:
        gsp(*tiny_harvest_args(tiny_model, corpus, tmp_path / "s"))
    assert re.search(r"line \d+, in broken_tokenize\n", _shown(e.value)), _shown(e.value)


def test_a_reader_process_that_dies_is_an_error_not_a_wait_for_ever(tiny_model, corpus):
    reader = ContextReader(ReaderSpec({"dataset": str(corpus)}, 32, Cursor(), str(tiny_model)), process=True)
    raised = []

    def take():
        with pytest.raises(RuntimeError, match="corpus reader ended without finishing") as e:
            reader.take(10**6)
        raised.append(e)

    try:
        reader._worker.kill()  # as the system's out-of-memory killer would
        waiting = threading.Thread(target=take, daemon=True)
        waiting.start()
        waiting.join(timeout=60)
        assert raised, "take() still waits for a reader that is gone"
    finally:
        reader.stop()
