"""The shuffled loader: every row once per epoch, specials masked, mixing, determinism, exact resume."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import zarr

from pipeline.corpus import Cursor
from pipeline.errors import GspError
from pipeline.loader import LoaderState, ShuffledLoader
from pipeline.store import ActivationStore, Layout, RowSums, StoreWriter
from pipeline.tiny import SYNTHETIC_HOOK as H
from pipeline.tiny import synthetic_meta

C, D, N_CTX = 16, 4, 64  # 1,024 rows; chunks of 4 contexts (64 rows), shards of 16 contexts


@pytest.fixture
def store(tmp_path):
    return _make(tmp_path, complete=True)


def _make(tmp_path, complete: bool, shards: int = 4):
    lay = Layout.plan(C, D, 4, chunk_rows=64, shard_mib=16 * C * D * 4 / 2**20)
    s = StoreWriter.create(tmp_path / "s", synthetic_meta(N_CTX, D, lay))
    rows = np.arange(N_CTX * C)
    acts = np.repeat(rows[:, None], D, axis=1).astype(np.float32)  # a row holds its own index
    toks = np.where(rows % C == 0, 2, 7).astype(np.int32)  # BOS first in every context
    toks[37] = 1  # one EOS
    for shard in range(shards):
        sl = slice(shard * lay.shard_rows, (shard + 1) * lay.shard_rows)
        s.write_shard(shard, {H: acts[sl]}, toks[sl], Cursor(), {H: RowSums(np.zeros(D), 0.0, 0)})
    if complete:
        s.finish(N_CTX * C)
    return ActivationStore.open(tmp_path / "s")


def _rows(batches):
    return [b[:, 0].numpy().astype(int) for b in batches]  # astype copies: the loader reuses its buffers


def _copies(batches):
    return [b.numpy().copy() for b in batches]


def test_one_epoch_serves_every_non_special_row_once(store):
    loader = ShuffledLoader(store, batch_size=50, seed=3, buffer_mib=0.01)  # windows of a few chunks
    assert 1 < len(loader.windows(0)) < loader.n_chunks
    expected = sorted(r for r in range(N_CTX * C) if r % C != 0 and r != 37)
    served = np.concatenate(_rows(itertools.islice(loader, len(expected) // 50)))
    tail = np.concatenate(_rows(itertools.islice(ShuffledLoader(store, 50, seed=3, buffer_mib=0.01,
                                                                state=loader.state), 1)))  # fmt: skip
    first_epoch = np.concatenate([served, tail])[: len(expected)]
    assert sorted(first_epoch.tolist()) == expected  # each once, no BOS (r % C == 0), no EOS (37)


def test_batches_mix_many_contexts(store):
    loader = ShuffledLoader(store, batch_size=32, seed=0)  # one window: the whole store
    for rows in _rows(itertools.islice(loader, 10)):
        contexts = rows // C
        assert len(set(contexts.tolist())) >= 20  # 32 rows from ≥ 20 of 64 contexts
        assert len(set((rows // 64).tolist())) >= 8  # from ≥ 8 of the 16 chunks


def test_deterministic_and_reshuffled_each_epoch(store):
    a = _rows(itertools.islice(ShuffledLoader(store, 64, seed=1), 30))
    b = _rows(itertools.islice(ShuffledLoader(store, 64, seed=1), 30))
    c = _rows(itertools.islice(ShuffledLoader(store, 64, seed=2), 30))
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert any((x != y).any() for x, y in zip(a, c, strict=True))
    per_epoch = (N_CTX * C - N_CTX - 1) // 64  # 15 full batches per epoch
    assert not (a[0] == a[per_epoch + 1]).all()  # epoch 2 is a new order


@pytest.mark.parametrize("stop_after", [1, 7, 15, 16, 23])
def test_resume_from_state_continues_exactly(store, stop_after):
    full = ShuffledLoader(store, 48, seed=5, buffer_mib=0.02)
    expected = _rows(itertools.islice(iter(full), stop_after + 6))
    first = ShuffledLoader(store, 48, seed=5, buffer_mib=0.02)
    _rows(itertools.islice(iter(first), stop_after))
    state = LoaderState(first.state.lanes)
    resumed = _rows(itertools.islice(ShuffledLoader(store, 48, seed=5, buffer_mib=0.02, state=state), 6))
    for x, y in zip(expected[stop_after:], resumed, strict=True):
        np.testing.assert_array_equal(x, y)


def test_incomplete_store_reads_written_rows_only(tmp_path):
    s = _make(tmp_path, complete=False, shards=2)
    loader = ShuffledLoader(s, 32, seed=0)
    rows = np.concatenate(_rows(itertools.islice(loader, 20)))
    assert rows.max() < 2 * 16 * C and not s.complete


def test_empty_store_is_an_error(tmp_path):
    s = _make(tmp_path, complete=False, shards=0)
    with pytest.raises(GspError, match="holds no rows"):
        ShuffledLoader(s, 32)


def test_process_shares_make_up_the_global_batch(tmp_path):
    """Under torchrun each process serves its lanes' rows; together they are one process's batch."""
    from pipeline.tiny import write_synthetic_store

    x = np.random.default_rng(0).standard_normal((4096, 8)).astype(np.float32)
    write_synthetic_store(tmp_path / "s", x)
    store = ActivationStore.open(tmp_path / "s")
    whole = _copies(itertools.islice(ShuffledLoader(store, 96, seed=3, lanes=6), 50))
    for world in (2, 3, 6):
        parts = [
            _copies(itertools.islice(ShuffledLoader(store, 96, seed=3, share=(r, world), lanes=6), 50))
            for r in range(world)
        ]
        for i in range(50):
            assert all(len(p[i]) == 96 // world for p in parts)
            np.testing.assert_array_equal(np.concatenate([p[i] for p in parts]), whole[i])


def _lane_streams(loader, epochs=2):
    """Each lane's rows in stream order, computed from the pure per-window functions."""
    return [
        np.concatenate(
            [loader.read_window(e, i, lane) for e in range(epochs) for i in range(len(loader.windows(e, lane)))]
        )
        for lane in range(loader.lanes)
    ]


def test_lanes_deal_the_chunks_and_batches_take_from_every_lane(store):
    loader = ShuffledLoader(store, 48, seed=2, buffer_mib=0.02, lanes=4)
    assert loader.lanes == 4 and len(loader.windows(0, 0)) > 1
    chunks = [np.concatenate(loader.windows(0, lane)) for lane in range(4)]
    assert sorted(np.concatenate(chunks).tolist()) == list(range(16))  # each chunk in exactly one lane
    streams = _lane_streams(loader)
    expected = sorted(r for r in range(N_CTX * C) if r % C != 0 and r != 37)
    first_epoch = [np.concatenate([loader.read_window(0, i, lane)[:, 0] for i in range(len(loader.windows(0, lane)))])
                   for lane in range(4)]  # fmt: skip
    assert sorted(np.concatenate(first_epoch).astype(int).tolist()) == expected
    for lane, rows in enumerate(first_epoch):  # a lane holds its own chunks' rows only
        assert set((rows // 64).astype(int).tolist()) == set(chunks[lane].tolist())
    batches = _copies(itertools.islice(loader, 30))  # 30 × 12 rows per lane: into epoch 2
    for k, batch in enumerate(batches):
        want = np.concatenate([s[12 * k : 12 * (k + 1)] for s in streams])
        np.testing.assert_array_equal(batch, want)


def test_each_process_reads_only_its_lanes_chunks(store, monkeypatch):
    read = {}
    original = ActivationStore.read_chunk

    def spy(self, chunk, out, **kw):
        read.setdefault(threading.current_thread().name, set()).add(chunk)
        return original(self, chunk, out, **kw)

    import threading

    monkeypatch.setattr(ActivationStore, "read_chunk", spy)
    for rank in range(2):
        loader = ShuffledLoader(store, 48, seed=2, buffer_mib=0.02, lanes=4, share=(rank, 2))
        list(itertools.islice(loader, 3))

    def lane_chunks(lane, epochs=(0, 1)):  # the reader may already be one window into epoch 2
        return {int(c) for e in epochs for w in loader.windows(e, lane) for c in w}

    for epoch in (0, 1):  # the two processes' chunks are disjoint in every epoch
        mine = [set().union(*(lane_chunks(lane, [epoch]) for lane in (2 * r, 2 * r + 1))) for r in range(2)]
        assert mine[0].isdisjoint(mine[1]) and len(mine[0] | mine[1]) == 16
    assert sorted(read) == [f"gsp-loader-{lane}" for lane in range(4)]
    for name, chunks in read.items():
        assert chunks <= lane_chunks(int(name.rsplit("-", 1)[1])), name


@pytest.mark.parametrize("first_world,then_world", [(2, 1), (1, 4), (4, 2)])
def test_a_position_saved_at_one_world_size_resumes_at_another(store, first_world, then_world):
    kw = dict(seed=7, buffer_mib=0.02, lanes=4)
    whole = _copies(itertools.islice(ShuffledLoader(store, 48, **kw), 26))
    loaders = [ShuffledLoader(store, 48, share=(r, first_world), **kw) for r in range(first_world)]
    for loader in loaders:
        list(itertools.islice(loader, 20))
    saved = LoaderState.merge([ld.state for ld in loaders])
    saved = LoaderState.from_json(json.loads(json.dumps(dataclasses.asdict(saved))))  # as a checkpoint holds it
    parts = [
        _copies(itertools.islice(ShuffledLoader(store, 48, share=(r, then_world), state=saved, **kw), 6))
        for r in range(then_world)
    ]
    for i in range(6):
        np.testing.assert_array_equal(np.concatenate([p[i] for p in parts]), whole[20 + i])


def test_lanes_follow_the_store_not_the_processes(tmp_path, store):
    from pipeline.loader import effective_lanes

    assert [effective_lanes(8, n) for n in (1, 2, 3, 5, 7, 8, 100)] == [1, 2, 2, 4, 4, 8, 8]
    assert effective_lanes(6, 5) == 3
    with pytest.raises(GspError, match="3 processes cannot share 4 loader lanes"):
        ShuffledLoader(store, 48, lanes=4, share=(0, 3))
    with pytest.raises(GspError, match="multiple of the loader's lanes"):
        ShuffledLoader(store, 50, lanes=4)
    with pytest.raises(GspError, match="has 1 lanes"):
        ShuffledLoader(store, 48, lanes=4, state=LoaderState([[0, 5]]))
    assert LoaderState.from_json({"epoch": 3, "offset": 9}).lanes == [[3, 9]]  # a checkpoint from before lanes


@pytest.mark.parametrize("lanes", [1, 4])
def test_held_in_memory_or_read_window_by_window_the_stream_is_the_same(store, lanes):
    """A store that fits the budget is read once and held (resident); a bigger one is read window by
    window into reused buffers. Both serve the same batches, and the reused buffers never leak rows of
    one window into another (every row once per epoch, as the expected set)."""
    kw = dict(seed=9, buffer_mib=0.005, lanes=lanes)
    held, streamed = (ShuffledLoader(store, 48, resident=r, **kw) for r in (True, False))
    assert held.resident and not streamed.resident and len(streamed.windows(0, 0)) > 3  # reuse of the 3 slots
    a, b = (_copies(itertools.islice(ld, 60)) for ld in (held, streamed))  # 60 × 48 rows: into epoch 3
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    if lanes == 1:  # (with lanes, each lane's epoch ends at its own batch)
        expected = sorted(r for r in range(N_CTX * C) if r % C != 0 and r != 37)
        epoch = np.concatenate([x[:, 0] for x in a])[: len(expected)].astype(int)
        assert sorted(epoch.tolist()) == expected
    assert ShuffledLoader(store, 48, seed=9, lanes=lanes).resident  # the default budget holds this store


def test_the_loader_scales_each_store_and_a_transcoders_batch_is_both(tmp_path):
    from pipeline.tiny import write_synthetic_store

    rng = np.random.default_rng(2)
    x = rng.standard_normal((4096, 8)).astype(np.float32)
    write_synthetic_store(tmp_path / "a", x)
    write_synthetic_store(tmp_path / "b", x[:, :6] * 3)
    a, b = ActivationStore.open(tmp_path / "a"), ActivationStore.open(tmp_path / "b")
    plain = _copies(itertools.islice(ShuffledLoader(a, 64, seed=1, extra=[b]), 5))
    scaled = _copies(itertools.islice(ShuffledLoader(a, 64, seed=1, extra=[b], scales=(0.5, 0.25)), 5))
    for p, s in zip(plain, scaled, strict=True):
        assert s.shape == (64, 14) and s.dtype == np.float32
        np.testing.assert_array_equal(s[:, :8], p[:, :8] * np.float32(0.5))
        np.testing.assert_array_equal(s[:, 8:], p[:, 8:] * np.float32(0.25))
        # the target's columns are the input's rows, as stored in bfloat16
        np.testing.assert_allclose(p[:, 8:], p[:, :6] * 3, rtol=2e-2)


def test_more_stores_in_windows_sized_for_fewer_serve_the_same_stream(tmp_path):
    """A transcoder set's stream: every hook point's columns, in windows sized as for one pair (here:
    for `a` alone), so each store's columns are the rows a loader of fewer stores serves."""
    from pipeline.tiny import write_synthetic_store

    x = np.random.default_rng(3).standard_normal((4096, 8)).astype(np.float32)
    for name, cols in (("a", x), ("b", x[:, :5] * 2), ("c", -x[:, 2:])):
        write_synthetic_store(tmp_path / name, cols)
    a, b, c = (ActivationStore.open(tmp_path / n) for n in "abc")
    kw = dict(seed=4, buffer_mib=2 * a.chunk_rows * 8 * 4 * 2 / 2**20, lanes=1)  # windows of 2 chunks of `a`
    alone = _copies(itertools.islice(ShuffledLoader(a, 64, **kw), 40))
    all3 = _copies(itertools.islice(ShuffledLoader(a, 64, extra=[b, c], window_width=8, **kw), 40))
    wide = _copies(itertools.islice(ShuffledLoader(a, 64, extra=[b, c], **kw), 40))  # windows for all 19 columns
    assert all3[0].shape == (64, 19)
    for one, three in zip(alone, all3, strict=True):
        np.testing.assert_array_equal(three[:, :8], one)
        np.testing.assert_allclose(three[:, 8:13], one[:, :5] * 2, rtol=2e-2)
        np.testing.assert_allclose(three[:, 13:], -one[:, 2:], rtol=2e-2)
    assert not all(np.array_equal(w[:, :8], one) for w, one in zip(wide, alone, strict=True))


@pytest.mark.parametrize("resident", [True, False])
def test_a_corrupt_chunk_stops_the_loader_with_one_clear_error(store, resident):
    shard_file = store.group.store.root / store.array_name / "c" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[7] ^= 0x10
    shard_file.write_bytes(bytes(data))
    loader = ShuffledLoader(store, 48, seed=0, buffer_mib=0.02, lanes=4, resident=resident)
    with pytest.raises(GspError, match="failed their crc32c checksum"):
        list(itertools.islice(loader, 200))


def test_a_reader_starts_where_the_iteration_began(store, monkeypatch):
    """A lane's reader thread takes its start position from the iteration that made it, not from
    `loader.state` when the thread first runs: the consumer reassigns that after every batch."""
    kw = dict(seed=4, buffer_mib=0.02, lanes=2)
    expected = _copies(itertools.islice(ShuffledLoader(store, 48, **kw), 4))
    original = ShuffledLoader._read_ahead

    def late(self, *args):
        self.state = LoaderState([[3, 100]] * self.lanes)  # the consumer moved on before this thread ran
        return original(self, *args)

    monkeypatch.setattr(ShuffledLoader, "_read_ahead", late)
    got = _copies(itertools.islice(ShuffledLoader(store, 48, **kw), 4))
    for x, y in zip(expected, got, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("resident", [True, False])
def test_swapped_shard_files_stop_the_loader(store, resident):
    """Two intact shard files exchanged: zarr's per-chunk checksums pass, and without the checksum
    table the loader would serve their rows in each other's places."""
    folder = store.group.store.root / store.array_name / "c"
    one, two = (folder / str(i) / "0" for i in (1, 2))
    data_one, data_two = one.read_bytes(), two.read_bytes()
    one.write_bytes(data_two)
    two.write_bytes(data_one)
    loader = ShuffledLoader(store, 48, seed=0, buffer_mib=0.02, lanes=4, resident=resident)
    with pytest.raises(GspError, match=rf"are not the rows written there \(shard file {store.array_name}/c/[12]/0"):
        list(itertools.islice(loader, 200))


def _transcoder_store(tmp_path) -> tuple[ActivationStore, ActivationStore]:
    """A store of two hook points of the same rows (a transcoder's input and target), laid out as `store`."""
    lay = Layout.plan(C, 2 * D, 4, chunk_rows=64, shard_mib=16 * C * 2 * D * 4 / 2**20)
    s = StoreWriter.create(tmp_path / "t", synthetic_meta(N_CTX, D, lay, sites={"mlp_in": D, "mlp_out": D}))
    rows = np.arange(N_CTX * C)
    acts = np.repeat(rows[:, None], D, axis=1).astype(np.float32)
    toks = np.where(rows % C == 0, 2, 7).astype(np.int32)
    for shard in range(4):
        sl = slice(shard * lay.shard_rows, (shard + 1) * lay.shard_rows)
        sums = {h: RowSums(np.zeros(D), 0.0, 0) for h in ("L0.mlp_in", "L0.mlp_out")}
        s.write_shard(shard, {"L0.mlp_in": acts[sl], "L0.mlp_out": -acts[sl]}, toks[sl], Cursor(), sums)
    s.finish(N_CTX * C)
    return ActivationStore.open(tmp_path / "t" / "L0.mlp_in"), ActivationStore.open(tmp_path / "t" / "L0.mlp_out")


@pytest.mark.parametrize("case", ["no special ids", "a transcoder's target"])
def test_a_chunk_never_written_stops_the_loader(tmp_path, store, case):
    """Where the loader reads activations without their token ids, a chunk missing from its shard's
    index (zarr leaves a chunk of zeros out) would be served as zeros."""
    if case == "no special ids":
        broken, loader_of = store, lambda: ShuffledLoader(store, 48, seed=0, mask_special=False)
    else:
        inp, broken = _transcoder_store(tmp_path)
        loader_of = lambda: ShuffledLoader(inp, 48, seed=0, extra=[broken])  # noqa: E731
    plain = zarr.open_group(str(broken.group.store.root), mode="r+")[broken.array_name]
    plain[128:192] = np.zeros((64, D), np.float32)  # one whole chunk of zeros: left out of its shard
    with pytest.raises(GspError, match=rf"rows 128..191 were never written .*{broken.array_name}/c/0/0"):
        list(itertools.islice(loader_of(), 200))
