"""The shuffled loader: every row once per epoch, specials masked, mixing, determinism, exact resume."""

import itertools

import numpy as np
import pytest

from pipeline.errors import GspError
from pipeline.loader import LoaderState, ShuffledLoader
from pipeline.store import ActivationStore, Layout, RowSums

C, D, N_CTX = 16, 4, 64  # 1,024 rows; chunks of 4 contexts (64 rows), shards of 16 contexts


@pytest.fixture
def store(tmp_path):
    return _make(tmp_path, complete=True)


def _make(tmp_path, complete: bool, shards: int = 4):
    lay = Layout.plan(C, D, 4, chunk_rows=64, shard_mib=16 * C * D * 4 / 2**20)
    s = ActivationStore.create(
        tmp_path / "s", n_contexts=N_CTX, d_in=D, layout=lay, dtype="float32",
        attrs={"tokenizer": {"bos_id": 2, "eos_id": 1, "pad_id": 0}},
    )  # fmt: skip
    rows = np.arange(N_CTX * C)
    acts = np.repeat(rows[:, None], D, axis=1).astype(np.float32)  # a row holds its own index
    toks = np.where(rows % C == 0, 2, 7).astype(np.int32)  # BOS first in every context
    toks[37] = 1  # one EOS
    for shard in range(shards):
        sl = slice(shard * lay.shard_rows, (shard + 1) * lay.shard_rows)
        s.write_shard(shard, acts[sl], toks[sl], {"doc": 0, "offset": 0}, RowSums(np.zeros(D), 0.0, 0))
    if complete:
        s.finish(N_CTX * C)
    return ActivationStore.open(tmp_path / "s")


def _rows(batches):
    return [b[:, 0].numpy().astype(int) for b in batches]


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
    state = LoaderState(first.state.epoch, first.state.offset)
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
    """Under torchrun each process serves a disjoint slice; together they are one process's batch."""
    import itertools

    from pipeline.tiny import write_synthetic_store

    x = np.random.default_rng(0).standard_normal((4096, 8)).astype(np.float32)
    write_synthetic_store(tmp_path / "s", x)
    store = ActivationStore.open(tmp_path / "s")
    whole = [b.numpy() for b in itertools.islice(ShuffledLoader(store, 96, seed=3), 50)]
    parts = [
        [b.numpy() for b in itertools.islice(ShuffledLoader(store, 96, seed=3, part=(r, 3)), 50)] for r in range(3)
    ]
    for i in range(50):
        assert all(len(p[i]) == 32 for p in parts)
        np.testing.assert_array_equal(np.concatenate([p[i] for p in parts]), whole[i])
