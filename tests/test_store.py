"""The store format: bfloat16 bit patterns, layout, round trips, statistics, corruption and damage."""

import json

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore, WrapperStore

from pipeline.corpus import Cursor
from pipeline.errors import GspError
from pipeline.store import ActivationStore, Layout, RowSums, StoreMeta, StoreWriter, bf16_bits_to_f32, f32_to_bf16_bits
from pipeline.tiny import SYNTHETIC_HOOK as H
from pipeline.tiny import synthetic_meta


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


def _store(tmp_path, n_contexts=10, C=4, D=3, dtype="float32", store=None):
    shard_mib = (2 * C * D * (2 if dtype == "bfloat16" else 4)) / 2**20  # 2 contexts per shard
    lay = Layout.plan(C, D, 2 if dtype == "bfloat16" else 4, shard_mib=shard_mib)
    return StoreWriter.create(tmp_path / "s", synthetic_meta(n_contexts, D, lay, dtype=dtype))


def _sums(stored, toks):
    x = (bf16_bits_to_f32(stored) if stored.dtype == np.uint16 else stored).astype(np.float64)[
        ~np.isin(toks, [0, 1, 2])
    ]
    return RowSums(x.sum(0), float((x * x).sum()), len(x))


def _fill(store: StoreWriter, rng):
    rows = store.n_rows
    acts = rng.standard_normal((rows, store.meta.hooks[0].d_in)).astype(np.float32) * 1000
    toks = rng.integers(0, 6, rows).astype(np.int32)
    bf16 = store.meta.dtype == "bfloat16"
    for shard, start in enumerate(range(0, rows, store.meta.shard_rows)):
        stop = min(start + store.meta.shard_rows, rows)
        a = f32_to_bf16_bits(acts[start:stop]) if bf16 else acts[start:stop]
        store.write_shard(shard, {H: a}, toks[start:stop], Cursor(shard, 0), {H: _sums(a, toks[start:stop])})
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
    st = again.hook.stats
    assert st.count == keep.sum()
    np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.mean_sq_norm, (x**2).sum(1).mean(), rtol=1e-12)
    # plain zarr reads the same numbers, and the attributes hold the same statistics
    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert g[f"{H}/activations"][:].dtype == (np.uint16 if dtype == "bfloat16" else np.float32)
    np.testing.assert_allclose(g.attrs["hooks"][0]["stats"]["mean"], x.mean(0), rtol=1e-12)
    assert g.attrs["cursor"] == {"doc": 4, "offset": 0} and g.attrs["rows_written"] == len(acts)


def test_attributes_round_trip_through_the_record(tmp_path):
    store = _store(tmp_path)
    _fill(store, np.random.default_rng(2))
    attrs = dict(zarr.open_group(str(tmp_path / "s"), mode="r").attrs)
    meta = StoreMeta.from_attrs(attrs, "s")
    assert meta.to_attrs() == attrs
    assert meta == ActivationStore.open(tmp_path / "s").meta


def test_corrupt_chunk_is_named(tmp_path):
    store = _store(tmp_path)
    _fill(store, np.random.default_rng(3))
    shard_file = tmp_path / "s" / H / "activations" / "c" / "1" / "0"
    data = bytearray(shard_file.read_bytes())
    data[5] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    s = ActivationStore.open(tmp_path / "s")
    s.read(0, 8)  # shard 0 is intact
    with pytest.raises(GspError, match=rf"crc32c.*{H}/activations/c/1"):
        s.read(8, 16)


def test_missing_shard_file_is_an_error(tmp_path):
    store = _store(tmp_path)
    _fill(store, np.random.default_rng(4))
    (tmp_path / "s" / "token_ids" / "c" / "2").unlink()
    with pytest.raises(GspError, match="the shard file token_ids/c/2 .* is missing"):
        ActivationStore.open(tmp_path / "s")


@pytest.mark.parametrize("file", [f"{H}/activations/c/3/0", "token_ids/c/1"])
def test_a_shard_truncated_to_zero_bytes_is_an_error_not_zeros(tmp_path, file):
    """zarr reads an empty shard file as fill values (zeros, token ids −1): that must never pass."""
    store = _store(tmp_path)
    _fill(store, np.random.default_rng(5))
    (tmp_path / "s" / file).write_bytes(b"")
    with pytest.raises(GspError, match=f"the shard file {file} .* is empty"):
        ActivationStore.open(tmp_path / "s")


def test_unwritten_token_ids_inside_written_rows_are_an_error(tmp_path):
    """A reader never hands out token id −1 (the fill value) for rows the store claims."""
    store = _store(tmp_path)
    _fill(store, np.random.default_rng(6))
    s = ActivationStore.open(tmp_path / "s")
    # behind the open store's back, a shard becomes unwritten (zarr drops a chunk of fill values)
    zarr.open_group(str(tmp_path / "s"), mode="r+")["token_ids"][8:16] = np.full(8, -1, np.int32)
    with pytest.raises(GspError, match="hold no token ids"):
        s.read_tokens(0, 40)
    with pytest.raises(GspError, match="hold no token ids"):
        list(s.ordinary_rows(1000, 16))


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


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda a: a["hooks"][0].pop("stats"), "attribute 'hooks[0].stats' (is missing)"),
        (lambda a: a.update(rows_written="40"), "attribute 'rows_written' (should be int"),
        (lambda a: a.update(rows_written=2.5), "attribute 'rows_written' (should be int"),
        (lambda a: a["hooks"][0]["stats"].update(sum=[1.0]), f"the statistics of {H} do not fit its d_in"),
        (lambda a: a.pop("hooks"), "attribute 'hooks' (is missing)"),
        (lambda a: a["tokenizer"].pop("name"), "attribute 'tokenizer.name' (is missing)"),
        (lambda a: a.update(dtype="float16"), "dtype 'float16'"),
        (lambda a: a.update(rows_written=10**9), "rows_written is 1000000000"),
        (lambda a: a.update(format_version=99), "newer gsp"),
    ],
)
def test_damaged_attributes_are_one_gsp_error(tmp_path, damage, words):
    store = _store(tmp_path)
    _fill(store, np.random.default_rng(7))
    path = tmp_path / "s" / "zarr.json"
    doc = json.loads(path.read_text())
    damage(doc["attributes"])
    path.write_text(json.dumps(doc))
    with pytest.raises(GspError) as e:
        ActivationStore.open(tmp_path / "s")
    assert words in str(e.value)


def test_a_damaged_array_description_is_one_gsp_error(tmp_path):
    store = _store(tmp_path)
    _fill(store, np.random.default_rng(8))
    (tmp_path / "s" / H / "activations" / "zarr.json").write_text("{ not json")
    with pytest.raises(GspError, match=f"{H}/activations/zarr.json is damaged"):
        ActivationStore.open(tmp_path / "s")


def test_shard_written_out_of_order_is_refused(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(RuntimeError, match="starts at row"):
        store.write_shard(1, {H: np.zeros((8, 3), np.float32)}, np.zeros(8, np.int32), Cursor(),
                          {H: RowSums(np.zeros(3), 0, 0)})  # fmt: skip
    assert json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]["rows_written"] == 0


class Recording(WrapperStore):
    """A zarr store that records which keys are set and deleted (zarr's public wrapper API)."""

    def __init__(self, store):
        super().__init__(store)
        self.sets, self.deletes = [], []

    async def set(self, key, value):
        self.sets.append(key)
        await super().set(key, value)

    async def delete(self, key):
        self.deletes.append(key)
        await super().delete(key)


def _recorded(path) -> tuple[StoreWriter, Recording]:
    recording = Recording(LocalStore(str(path)))
    group = zarr.open_group(recording, mode="r+")
    meta = StoreMeta.from_attrs(dict(group.attrs), str(path))
    return StoreWriter(group, str(path), meta), recording


def test_commit_is_one_atomic_metadata_write(tmp_path):
    """rows_written, cursor and statistics change together: a kill can never separate them."""
    _store(tmp_path)
    writer, recording = _recorded(tmp_path / "s")
    writer.write_shard_data(0, {H: np.ones((8, 3), np.float32)}, np.full(8, 5, np.int32))
    recording.sets.clear()
    writer.commit(0, 8, Cursor(3, 1), {H: RowSums(np.full(3, 8.0), 24.0, 8)})
    assert recording.sets == ["zarr.json"]
    on_disk = json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]
    assert (on_disk["rows_written"], on_disk["cursor"], on_disk["hooks"][0]["stats"]["count"]) == (
        8,
        {"doc": 3, "offset": 1},
        8,
    )


def test_finishing_a_huge_planned_store_touches_no_planned_shard(tmp_path):
    """A corpus that runs out early in a store planned for far more rows: the end rewrites the two
    arrays' shapes, and never walks the planned shard keys (millions for `--tokens 1e12`)."""
    lay = Layout.plan(4, 3, 4, shard_mib=2 * 4 * 3 * 4 / 2**20)  # 8-row shards
    StoreWriter.create(tmp_path / "s", synthetic_meta(400_000, 3, lay))  # 200,000 planned shards
    writer, recording = _recorded(tmp_path / "s")
    writer.write_shard(
        0, {H: np.ones((8, 3), np.float32)}, np.full(8, 5, np.int32), Cursor(), {H: RowSums(np.zeros(3), 0, 0)}
    )
    writer.finish(8)
    assert recording.deletes == []
    s = ActivationStore.open(tmp_path / "s")
    assert s.complete and s.n_rows == s.rows_written == 8 and s.token_ids.shape == (8,)


@pytest.mark.parametrize(
    "url, words",
    [("nosuchscheme://bucket/store", "unknown storage URL scheme 'nosuchscheme://'"),
     ("s3://bucket/store", 'pip install -e ".[s3]"')],
)  # fmt: skip
def test_unknown_or_uninstalled_url_schemes_are_one_line(url, words):
    if url.startswith("s3://"):
        pytest.importorskip("fsspec")
        try:
            import s3fs  # noqa: F401

            pytest.skip("s3fs is installed here: the missing-package message cannot be shown")
        except ImportError:
            pass
    with pytest.raises(GspError) as e:
        ActivationStore.open(url)
    assert words in str(e.value)


# ---------------------------------------------------------------- whole chunks straight from the shard files
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_whole_chunks_read_from_the_files_equal_zarrs_reading(tmp_path, dtype):
    """ActivationStore.read_chunk parses the shard files itself (the Zarr v3 sharding layout): it
    must take that path for gsp's stores and give exactly what zarr gives, in the stored dtype."""
    store = _store(tmp_path, dtype=dtype)
    _fill(store, np.random.default_rng(7))
    s = ActivationStore.open(tmp_path / "s")
    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    raw, ids = g[f"{H}/activations"][:], g["token_ids"][:]
    out = np.empty((s.chunk_rows, s.d_in), s.stored_dtype)
    tokens = np.empty(s.chunk_rows, np.int32)
    for chunk in range(-(-s.rows_written // s.chunk_rows)):
        rows = s.read_chunk(chunk, out)
        span = slice(chunk * s.chunk_rows, chunk * s.chunk_rows + rows)
        np.testing.assert_array_equal(out[:rows], raw[span])
        assert s.read_chunk(chunk, tokens, tokens=True) == rows
        np.testing.assert_array_equal(tokens[:rows], ids[span])
    assert all(r.folder is not None for r in s._chunk_readers.values())  # read from the files, not via zarr


@pytest.mark.parametrize("where", ["chunk", "index", "truncated"])
def test_whole_chunk_reads_catch_damage(tmp_path, where):
    store = _store(tmp_path)
    _fill(store, np.random.default_rng(8))
    shard_file = tmp_path / "s" / H / "activations" / "c" / "1" / "0"
    data = bytearray(shard_file.read_bytes())
    if where == "chunk":
        data[3] ^= 0x01  # one bit of the shard's first chunk
    elif where == "index":
        data[-10] ^= 0x01  # one bit of the shard index
    else:
        data = data[: len(data) // 2]
    shard_file.write_bytes(bytes(data))
    s = ActivationStore.open(tmp_path / "s")
    out = np.empty((s.chunk_rows, s.d_in), s.stored_dtype)
    s.read_chunk(0, out)  # shard 0 is intact
    chunk = s.shard_rows // s.chunk_rows  # the first chunk of shard 1
    with pytest.raises(GspError, match=rf"corrupt data in store .*crc32c.*{H}/activations/c/1"):
        s.read_chunk(chunk, out)
    shard_file.unlink()
    with pytest.raises(GspError, match=rf"shard file {H}/activations/c/1 is gone"):
        s.read_chunk(chunk, out)
