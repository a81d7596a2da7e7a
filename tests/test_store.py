"""The store format: bfloat16 bit patterns, layout, round trips, statistics, corruption and damage."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import zarr
from conftest import one_line_error
from zarr.storage import LocalStore, WrapperStore

from pipeline.corpus import Cursor
from pipeline.errors import GspError
from pipeline.store import ActivationStore, Layout, RowSums, StoreMeta, StoreWriter, bf16_bits_to_f32, f32_to_bf16_bits
from pipeline.store.checksums import TABLE, crc32c
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


def _store(tmp_path, n_contexts=10, C=4, D=3, dtype="float32", store=None, chunk_rows=4096):
    shard_mib = (2 * C * D * (2 if dtype == "bfloat16" else 4)) / 2**20  # 2 contexts per shard
    lay = Layout.plan(C, D, 2 if dtype == "bfloat16" else 4, shard_mib=shard_mib, chunk_rows=chunk_rows)
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


@pytest.mark.parametrize("table", [True, False])
def test_unwritten_token_ids_inside_written_rows_are_an_error(tmp_path, table):
    """A reader never hands out token id −1 (the fill value) for rows the store claims: a store with
    the checksum table sees other data than was written there; one without sees the fill value."""
    store = _store(tmp_path)
    _fill(store, np.random.default_rng(6))
    if not table:
        _as_written_before_the_table(tmp_path / "s")
    s = ActivationStore.open(tmp_path / "s")
    # behind the open store's back, a shard's token ids become the fill value (its file stays)
    ids = zarr.open_group(str(tmp_path / "s"), mode="r+")["token_ids"].with_config({"write_empty_chunks": True})
    ids[8:16] = np.full(8, -1, np.int32)
    words = "are not the rows written there" if table else "hold no token ids"
    with pytest.raises(GspError, match=words):
        s.read_tokens(0, 40)
    with pytest.raises(GspError, match=words):
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
    with pytest.raises(GspError, match=rf"shard file {H}/activations/c/1/0 is gone"):
        s.read_chunk(chunk, out)


# ---------------------------------------------------------------- every chunk bound to its place
def _as_written_before_the_table(path) -> None:
    """A store as gsp wrote it before the checksum table: no `chunk_crc32c` array nor attribute."""
    shutil.rmtree(path / TABLE, ignore_errors=True)
    _edit(path / "zarr.json", lambda a: a.pop("chunk_crc32c", None))


def _edit(zarr_json, change) -> None:
    doc = json.loads(zarr_json.read_text())
    change(doc["attributes"])
    zarr_json.write_text(json.dumps(doc))


def _swap(a, b) -> None:
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


@pytest.mark.parametrize("array", [f"{H}/activations", "token_ids"])
def test_swapped_shard_files_are_refused_on_every_read_path(tmp_path, gsp, array):
    """Two intact shard files exchanged: each chunk still matches the crc32c stored beside it, so zarr
    serves the rows in the wrong place. The checksum table binds each chunk to its place."""
    store = _store(tmp_path)  # 5 shards of 8 rows, one chunk each
    acts, toks = _fill(store, np.random.default_rng(11))
    path = tmp_path / "s"
    one, three = (path / (f"{array}/c/{i}/0" if array != "token_ids" else f"{array}/c/{i}") for i in (1, 3))
    _swap(one, three)
    plain = zarr.open_group(str(path), mode="r")[array]
    np.testing.assert_array_equal(plain[8:16], (acts if array != "token_ids" else toks)[24:32])  # zarr: no error

    s = ActivationStore.open(path)
    read = s.read_tokens if array == "token_ids" else s.read
    read(0, 8)  # shard 0 is in its place
    words = rf"rows 8..15 are not the rows written there \(shard file {re.escape(array)}/c/1\b"
    with pytest.raises(GspError, match=words):
        read(0, 40)  # what evaluate, features and info --verify read through
    out = np.empty(s.chunk_rows, np.int32) if array == "token_ids" else np.empty((s.chunk_rows, 3), np.float32)
    with pytest.raises(GspError, match=words):
        s.read_chunk(1, out, tokens=array == "token_ids")  # what fit's loader reads through
    line = one_line_error(gsp("info", path, "--verify"), "not the rows written there", f"{array}/c/1")
    assert "checksums OK" not in line


def test_chunks_exchanged_inside_a_shard_are_refused(tmp_path):
    """The shard index's entries of two chunks swapped (its own checksum recomputed): every chunk and
    the index pass zarr's checks, and zarr reads the two chunks' rows exchanged."""
    store = _store(tmp_path, chunk_rows=4)  # shards of two 4-row chunks
    acts, _ = _fill(store, np.random.default_rng(12))
    shard = tmp_path / "s" / H / "activations" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    entries = np.frombuffer(bytes(data[-36:-4]), "<u8").reshape(2, 2)[::-1].copy()
    data[-36:] = entries.tobytes() + crc32c(entries).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    plain = zarr.open_group(str(tmp_path / "s"), mode="r")[f"{H}/activations"]
    np.testing.assert_array_equal(plain[16:24], np.concatenate([acts[20:24], acts[16:20]]))
    s = ActivationStore.open(tmp_path / "s")
    np.testing.assert_array_equal(s.read(0, 16), acts[:16])
    with pytest.raises(GspError, match=rf"rows 16..19 are not the rows written there .*{H}/activations/c/2/0"):
        s.read(0, 40)


def test_a_moved_checksum_file_is_refused(tmp_path):
    """The table's own files carry their chunks' numbers: swapped along with the data, they are caught."""
    store = _store(tmp_path)
    _fill(store, np.random.default_rng(13))
    path = tmp_path / "s"
    _swap(path / H / "activations" / "c" / "1" / "0", path / H / "activations" / "c" / "3" / "0")
    _swap(path / TABLE / "c" / "1" / "0", path / TABLE / "c" / "3" / "0")
    with pytest.raises(GspError, match=rf"{TABLE}/c/1/0 holds chunk 3's row where chunk 1's should be"):
        ActivationStore.open(path).read(0, 40)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_store_written_before_the_checksum_table_still_reads(tmp_path, dtype):
    """Older stores read with the checks they were written with: each chunk against its own crc32c."""
    store = _store(tmp_path, dtype=dtype)
    acts, toks = _fill(store, np.random.default_rng(14))
    _as_written_before_the_table(tmp_path / "s")
    s = ActivationStore.open(tmp_path / "s")
    assert s.table is None and not s.meta.chunk_crc32c
    expect = bf16_bits_to_f32(f32_to_bf16_bits(acts)) if dtype == "bfloat16" else acts
    np.testing.assert_array_equal(s.read(0, 40), expect)
    np.testing.assert_array_equal(s.read_tokens(0, 40), toks)
    s.verify()
    shard = tmp_path / "s" / H / "activations" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0x04
    shard.write_bytes(bytes(data))
    with pytest.raises(GspError, match=rf"failed their crc32c checksum .*{H}/activations/c/2/0"):
        s.read(0, 40)


@pytest.mark.parametrize("table", [True, False])
def test_a_chunk_never_written_is_refused_not_read_as_zeros(tmp_path, table):
    """Plain zarr rewrites shard 2 with its second chunk all zeros: zarr leaves a chunk of fill values
    out of the shard (its index entry says never written) and reads it back as zeros. Activations are
    read without their token ids (a transcoder's target, a store without special ids): the index must
    decide, on every read path."""
    store = _store(tmp_path, chunk_rows=4)
    acts, _ = _fill(store, np.random.default_rng(15))
    if not table:
        _as_written_before_the_table(tmp_path / "s")
    plain = zarr.open_group(str(tmp_path / "s"), mode="r+")[f"{H}/activations"]
    rows = acts[16:24].copy()
    rows[4:] = 0
    plain[16:24] = rows
    index = np.frombuffer((tmp_path / "s" / H / "activations" / "c" / "2" / "0").read_bytes()[-36:-4], "<u8")
    assert (index[2:] == 2**64 - 1).all()  # chunk 5 is not in its shard
    np.testing.assert_array_equal(plain[20:24], 0)  # and zarr serves zeros for it

    s = ActivationStore.open(tmp_path / "s")
    np.testing.assert_array_equal(s.read(16, 20), acts[16:20])  # its neighbour is intact
    words = rf"rows 20..23 were never written .*{H}/activations/c/2/0"
    out = np.empty((4, 3), np.float32)
    for read in (lambda: s.read(0, 40), lambda: s.read_chunk(5, out), s.verify):
        with pytest.raises(GspError, match=words):
            read()


def test_chunks_past_the_written_rows_read_as_unwritten(tmp_path):
    """An incomplete store: the rows it does not claim yet read as the fill values, unchecked."""
    store = _store(tmp_path)
    store.write_shard(0, {H: np.ones((8, 3), np.float32)}, np.full(8, 5, np.int32), Cursor(),
                      {H: RowSums(np.zeros(3), 0, 0)})  # fmt: skip
    s = ActivationStore.open(tmp_path / "s")
    assert s.rows_written == 8 and not s.complete
    np.testing.assert_array_equal(s.read(0, 16), np.concatenate([np.ones((8, 3)), np.zeros((8, 3))]))
    np.testing.assert_array_equal(s.read_tokens(4, 12), [5] * 4 + [-1] * 4)


@pytest.mark.parametrize(
    "stored, said",
    [("float32", {"root": "bfloat16"}), ("bfloat16", {"root": "float32"}), ("float32", {"array": "bfloat16"})],
)
def test_an_array_whose_dtype_is_not_the_one_its_attributes_say_is_refused(tmp_path, gsp, stored, said):
    """A float32 array read as bfloat16 bit patterns (or the reverse) is garbage: refused at open, and
    `gsp info` never shows a dtype the array does not hold."""
    store = _store(tmp_path, dtype=stored)
    _fill(store, np.random.default_rng(16))
    path = tmp_path / "s"
    if "root" in said:
        _edit(path / "zarr.json", lambda a: a.update(dtype=said["root"]))
    else:
        _edit(path / H / "activations" / "zarr.json", lambda a: a.update(dtype=said["array"]))
    wrong = said.get("root") or said["array"]
    with pytest.raises(GspError, match=rf"{H}/activations holds {stored} values .*{wrong}"):
        ActivationStore.open(path)
    for args in (("info", path), ("info", path, "--verify")):
        one_line_error(gsp(*args), f"holds {stored} values", wrong, "harvest it again")


def test_one_corrupt_shard_is_the_only_one_named(tmp_path):
    """Reads spanning every shard (evaluate's and features' ordinary_rows, features' windows) name
    the one shard file whose chunk failed, not every file the read touched."""
    store = _store(tmp_path)
    _fill(store, np.random.default_rng(17))
    shard = tmp_path / "s" / H / "activations" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[9] ^= 0x20
    shard.write_bytes(bytes(data))
    s = ActivationStore.open(tmp_path / "s")
    for read in (lambda: s.read(0, 40), lambda: list(s.ordinary_rows(10_000, 4096)), s.verify):
        with pytest.raises(GspError) as e:
            read()
        assert re.findall(rf"{H}/activations/c/(\d+)", str(e.value)) == ["2"], str(e.value)
        assert "rows 16..23 failed their crc32c checksum" in str(e.value)


def test_evaluate_and_features_name_the_one_corrupt_shard(gsp, tiny_fit, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_fit / "store", store)
    shard = store / "L1.resid_post" / "activations" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    sae = tiny_fit / "sae"
    for args in (
        ("evaluate", "--sae", sae, "--store", store, "--no-delta-loss", "--reports", tmp_path / "reports"),
        ("features", "--sae", sae, "--store", store, "--no-logit-lens", "--out", tmp_path / "features"),
    ):
        line = one_line_error(gsp(*args), "crc32c", "L1.resid_post/activations/c/2/0")
        assert re.findall(r"activations/c/(\d+)", line) == ["2"], line
