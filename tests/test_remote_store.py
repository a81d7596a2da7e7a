"""Stores on fsspec URLs: memory:// stands in for s3:// and gs:// (same zarr FsspecStore code path)."""

import json

import numpy as np
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
