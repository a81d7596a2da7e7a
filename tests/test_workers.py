"""pipeline.workers: the corpus reader and the shard writers beside the model, on threads or processes."""

import errno
import json
import threading
import time

import numpy as np
import pytest
from conftest import tiny_harvest_args

from pipeline.corpus import Cursor
from pipeline.store import ActivationStore
from pipeline.workers import ShardWriter


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


def test_process_reader_reports_corpus_errors(gsp, tiny_model, tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"text {i} " * 20}) for i in range(20)))
    r = gsp(*tiny_harvest_args(tiny_model, jsonl, tmp_path / "s", workers="processes"))
    assert r.exit_code == 1 and "no column 'text'" in r.output and "Traceback" not in r.output
