"""The store format: bfloat16 bit patterns, layout, round trips, statistics, corruption and damage."""

import json

import numpy as np
import pytest
import torch
import zarr

from pipeline.errors import GspError
from pipeline.store import ActivationStore, Layout, RowSums, bf16_bits_to_f32, f32_to_bf16_bits


def test_bf16_bits_match_torch_rounding():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * 10.0 ** rng.integers(-3, 6, 10_000)).astype(np.float32)
    x[:4] = [0.0, -0.0, 1e5, -9.3e4]  # magnitudes seen in Gemma's residual stream, beyond float16
    ours = f32_to_bf16_bits(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, ref)
    back = bf16_bits_to_f32(ours)
    np.testing.assert_array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.isfinite(back).all()


def test_layout_whole_contexts_and_shard_size():
    lay = Layout.plan(128, 640, 2, shard_mib=128)
    assert lay.chunk_rows % 128 == 0 and lay.shard_rows % lay.chunk_rows == 0
    assert lay.shard_rows * 640 * 2 <= 128 * 2**20
    small = Layout.plan(32, 64, 4, shard_mib=8 * 32 * 64 * 4 / 2**20)
    assert small.shard_rows == 8 * 32


def _store(tmp_path, n_contexts=10, C=4, D=3, dtype="float32", shard_mib=None):
    shard_mib = shard_mib or (2 * C * D * (2 if dtype == "bfloat16" else 4)) / 2**20  # 2 contexts/shard
    lay = Layout.plan(C, D, 2 if dtype == "bfloat16" else 4, shard_mib=shard_mib)
    attrs = {"tokenizer": {"bos_id": 2, "eos_id": 1, "pad_id": 0}}
    return ActivationStore.create(tmp_path / "s", n_contexts=n_contexts, d_in=D, layout=lay, dtype=dtype, attrs=attrs)


def _sums(_, stored, toks):
    x = (bf16_bits_to_f32(stored) if stored.dtype == np.uint16 else stored).astype(np.float64)[
        ~np.isin(toks, [0, 1, 2])
    ]
    return RowSums(x.sum(0), float((x * x).sum()), len(x))


def _fill(store, rng):
    rows = store.activations.shape[0]
    acts = rng.standard_normal((rows, store.d_in)).astype(np.float32) * 1000
    toks = rng.integers(0, 6, rows).astype(np.int32)
    bf16 = store.attrs["dtype"] == "bfloat16"
    for shard, start in enumerate(range(0, rows, store.shard_rows)):
        stop = min(start + store.shard_rows, rows)
        a = f32_to_bf16_bits(acts[start:stop]) if bf16 else acts[start:stop]
        store.write_shard(shard, a, toks[start:stop], {"doc": shard, "offset": 0}, _sums(None, a, toks[start:stop]))
    store.finish(rows)
    return acts, toks


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_and_statistics(tmp_path, dtype):
    rng = np.random.default_rng(1)
    store = _store(tmp_path, dtype=dtype)
    acts, toks = _fill(store, rng)
    again = ActivationStore.open(tmp_path / "s")
    expect = bf16_bits_to_f32(f32_to_bf16_bits(acts)) if dtype == "bfloat16" else acts
    np.testing.assert_array_equal(again.read(0, len(acts)), expect)
    np.testing.assert_array_equal(again.read_tokens(3, 17), toks[3:17])
    assert again.complete and again.rows_written == len(acts)
    # statistics over non-special rows (ids 0, 1, 2 are pad/eos/bos) merged shard by shard equal one pass
    keep = ~np.isin(toks, [0, 1, 2])
    x = expect[keep].astype(np.float64)
    st = again.attrs["stats"]
    assert st["count"] == keep.sum()
    np.testing.assert_allclose(st["mean"], x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st["mean_sq_norm"], (x**2).sum(1).mean(), rtol=1e-12)
    # plain zarr reads the same numbers
    raw = zarr.open_group(str(tmp_path / "s"), mode="r")["activations"][:]
    assert raw.dtype == (np.uint16 if dtype == "bfloat16" else np.float32)


def test_corrupt_chunk_is_named(tmp_path):
    store = _store(tmp_path)
    _fill(store, np.random.default_rng(3))
    shard_file = tmp_path / "s" / "activations" / "c" / "1" / "0"
    data = bytearray(shard_file.read_bytes())
    data[5] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    s = ActivationStore.open(tmp_path / "s")
    s.read(0, 8)  # shard 0 is intact
    with pytest.raises(GspError, match=r"crc32c.*activations/c/1"):
        s.read(8, 16)


def test_missing_shard_file_is_an_error(tmp_path):
    store = _store(tmp_path)
    _fill(store, np.random.default_rng(4))
    (tmp_path / "s" / "token_ids" / "c" / "2").unlink()
    with pytest.raises(GspError, match="missing the shard file token_ids/c/2"):
        ActivationStore.open(tmp_path / "s")


def test_not_a_store(tmp_path):
    with pytest.raises(GspError, match="no store at"):
        ActivationStore.open(tmp_path / "nope")
    zarr.open_group(str(tmp_path / "other"), mode="w", zarr_format=3)
    with pytest.raises(GspError, match="not a gsp activation store"):
        ActivationStore.open(tmp_path / "other")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "zarr.json").write_text("{ half written")
    with pytest.raises(GspError, match="not a readable Zarr"):
        ActivationStore.open(tmp_path / "broken")


def test_shard_written_out_of_order_is_refused(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(RuntimeError, match="starts at row"):
        store.write_shard(1, np.zeros((8, 3), np.float32), np.zeros(8, np.int32), {}, RowSums(np.zeros(3), 0.0, 0))
    assert json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]["rows_written"] == 0


def test_commit_is_one_atomic_metadata_write(tmp_path, monkeypatch):
    """rows_written, cursor and statistics change together: a kill can never separate them."""
    import zarr.storage._local as local

    store = _store(tmp_path)
    acts, toks = np.ones((8, 3), np.float32), np.full(8, 5, np.int32)
    store.write_shard_data(0, acts, toks)
    real_put, writes = local._put, []
    monkeypatch.setattr(
        local,
        "_put",
        lambda path, value, exclusive=False: (writes.append(path.name), real_put(path, value, exclusive))[1],
    )
    store.commit(0, 8, {"doc": 3, "offset": 1}, RowSums(np.full(3, 8.0), 24.0, 8))
    assert writes == ["zarr.json"]
    on_disk = json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]
    assert (on_disk["rows_written"], on_disk["cursor"], on_disk["stats"]["count"]) == (8, {"doc": 3, "offset": 1}, 8)
