"""Stores on fsspec URLs: memory:// stands in for s3:// and gs:// (same zarr FsspecStore code path)."""

import json

import numpy as np
import pytest
from conftest import tiny_harvest_args

from pipeline.store import ActivationStore


def test_a_memory_store_holds_what_a_local_store_holds(gsp, tiny_model, corpus, tmp_path):
    url = "memory://gsp-tests/store-a"
    for store in (url, tmp_path / "local"):
        r = gsp(*tiny_harvest_args(tiny_model, corpus, store))
        assert r.exit_code == 0, r.output
    remote, here = ActivationStore.open(url), ActivationStore.open(tmp_path / "local")
    assert remote.complete and remote.rows_written == here.rows_written == 1024
    np.testing.assert_array_equal(remote.read(0, 1024), here.read(0, 1024))
    np.testing.assert_array_equal(remote.read_tokens(0, 1024), here.read_tokens(0, 1024))
    assert remote.hook.stats == here.hook.stats
    r = gsp("info", url, "--verify")
    assert r.exit_code == 0 and "checksums OK" in r.output and "1,024 of 1,024" in r.output
    # rerunning the same harvest finds the complete store on the URL
    r = gsp(*tiny_harvest_args(tiny_model, corpus, url))
    assert r.exit_code == 0 and "already complete" in r.output

    # fit and evaluate read it like a local store, with the same results
    for store, out in ((url, "sae-remote"), (tmp_path / "local", "sae-local")):
        r = gsp("fit", "--store", store, "--out", tmp_path / out, "--width", 32, "--steps", 20, "--batch-size", 128)
        assert r.exit_code == 0, r.output
    a, b = ((tmp_path / o / "params.safetensors").read_bytes() for o in ("sae-remote", "sae-local"))
    assert a == b  # the same rows in the same shuffled order: bit-identical SAEs
    r = gsp("evaluate", "--sae", tmp_path / "sae-local", "--store", url, "--no-delta-loss", "--reports", tmp_path / "r")
    assert r.exit_code == 0, r.output
    (report,) = (tmp_path / "r").glob("*.json")
    assert json.loads(report.read_text())["store"]["path"] == url


def test_file_urls_are_local_paths(gsp, tiny_model, corpus, tmp_path):
    r = gsp(*tiny_harvest_args(tiny_model, corpus, f"file://{tmp_path}/s"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s" / "zarr.json").is_file() and (tmp_path / "s.lock").is_file()
    assert ActivationStore.open(f"file://{tmp_path}/s").rows_written == 1024


def test_missing_and_foreign_urls_are_clear_errors(gsp, tiny_model, corpus):
    r = gsp("info", "memory://gsp-tests/nothing-here")
    assert r.exit_code == 1 and "no store at memory://gsp-tests/nothing-here" in r.output
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/gsp-tests/foreign/data.bin", b"not a store")
    r = gsp(*tiny_harvest_args(tiny_model, corpus, "memory://gsp-tests/foreign"))
    assert r.exit_code == 1 and "not a gsp store" in r.output and "Traceback" not in r.output
    assert fs.cat("/gsp-tests/foreign/data.bin") == b"not a store"  # nothing was changed


def _memory_store(name: str) -> tuple[str, np.ndarray]:
    """A store on memory:// of 40 rows: shards of 8 rows, each two chunks of 4."""
    from pipeline.corpus import Cursor
    from pipeline.store import Layout, RowSums, StoreWriter
    from pipeline.tiny import SYNTHETIC_HOOK, synthetic_meta

    url = f"memory://gsp-tests/{name}"
    lay = Layout.plan(4, 3, 4, chunk_rows=4, shard_mib=2 * 4 * 3 * 4 / 2**20)
    writer = StoreWriter.create(url, synthetic_meta(10, 3, lay))
    acts = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    for shard in range(5):
        rows = slice(8 * shard, 8 * shard + 8)
        writer.write_shard(shard, {SYNTHETIC_HOOK: acts[rows]}, np.full(8, 5, np.int32), Cursor(),
                           {SYNTHETIC_HOOK: RowSums(np.zeros(3), 0.0, 0)})  # fmt: skip
    writer.finish(40)
    return url, acts


def test_a_store_at_a_url_binds_each_chunk_to_its_place(gsp):
    """Read through byte ranges of the store's objects, a URL store gets the checks a local one does:
    swapped shard objects and a chunk its shard's index lacks are refused, not served."""
    import fsspec
    import zarr

    from pipeline.errors import GspError
    from pipeline.tiny import SYNTHETIC_HOOK as H

    fs = fsspec.filesystem("memory")
    url, acts = _memory_store("swapped")
    one, three = (f"/gsp-tests/swapped/{H}/activations/c/{i}/0" for i in (1, 3))
    data_one, data_three = fs.cat_file(one), fs.cat_file(three)
    fs.pipe_file(one, data_three)
    fs.pipe_file(three, data_one)
    s = ActivationStore.open(url)
    np.testing.assert_array_equal(s.read(0, 8), acts[:8])
    words = rf"rows 8..11 are not the rows written there \(shard file {H}/activations/c/1/0"
    with pytest.raises(GspError, match=words):
        s.read(0, 40)
    r = gsp("info", url, "--verify")
    assert r.exit_code == 1 and "not the rows written there" in r.output and "checksums OK" not in r.output

    url, acts = _memory_store("unwritten")
    plain = zarr.open_group(url, mode="r+")[f"{H}/activations"]
    plain[12:16] = np.zeros((4, 3), np.float32)  # zarr leaves this chunk of zeros out of shard 1
    s = ActivationStore.open(url)
    np.testing.assert_array_equal(s.read(8, 12), acts[8:12])
    with pytest.raises(GspError, match=rf"rows 12..15 were never written .*{H}/activations/c/1/0"):
        s.read(0, 40)
