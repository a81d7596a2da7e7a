"""gsp harvest (stages/harvest.py) on a tiny random Gemma 3: exact activations, resume after kills and a
full disk, what a rerun keeps or refuses, and clear errors. The corpus, the hooks and the workers have
their own test files."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import zarr
from conftest import direct_site, gsp_subprocess, tiny_harvest_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.store import ActivationStore


def _arrays(path):
    """(activations of the store's one hook point, token ids, attributes), read with plain zarr."""
    g = zarr.open_group(str(path), mode="r")
    (hook,) = g.attrs["hooks"]
    return g[f"{hook['name']}/activations"][:], g["token_ids"][:], dict(g.attrs)


@pytest.mark.parametrize("site", ["resid_post", "mlp_out", "attn_out"])
def test_stored_activations_equal_direct_forward(gsp, tiny_model, corpus, tmp_path, site):
    store = tmp_path / "s"
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store, site=site, layer=2))
    assert r.exit_code == 0, r.output
    acts, toks, attrs = _arrays(store)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    C = attrs["context_size"]
    ids = toks.reshape(-1, C)
    ref = direct_site(model, ids, 2, site).reshape(len(toks), -1).numpy()
    assert acts.shape == ref.shape == (1024, 48 if site == "attn_out" else 64)
    np.testing.assert_allclose(acts, ref, rtol=1e-5, atol=1e-6)
    (hook,) = attrs["hooks"]
    assert hook["d_in"] == ref.shape[1] and attrs["rows_written"] == 1024 and attrs["complete"]
    assert (ids[:, 0] == 2).all(), "every context starts with BOS"
    assert hook["hook_point"].startswith("model.layers.2.") and hook["name"] == f"L2.{site}"
    # running statistics describe exactly the stored non-special rows
    keep = ~np.isin(toks, [0, 1, 2])
    np.testing.assert_allclose(hook["stats"]["mean"], acts[keep].astype(np.float64).mean(0), rtol=1e-9, atol=1e-12)


def test_bfloat16_store_is_torch_rounding_of_forward(gsp, tiny_model, corpus, tmp_path):
    store = tmp_path / "s"
    assert gsp(*tiny_harvest_args(tiny_model, corpus, store, **{"store-dtype": "bfloat16"})).exit_code == 0
    s = ActivationStore.open(store)
    toks = s.read_tokens(0, s.rows_written)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ref = direct_site(model, toks.reshape(-1, 32), 1, "resid_post").reshape(len(toks), -1)
    got = s.read(0, s.rows_written)
    # within one bfloat16 ulp of torch's rounding of the float32 reference (matmul order may differ)
    np.testing.assert_allclose(got, ref.to(torch.bfloat16).float().numpy(), rtol=2**-7, atol=1e-6)
    assert s.activations.dtype == np.uint16 and s.meta.dtype == "bfloat16"


def _assert_same_store(a, b):
    acts_a, toks_a, attrs_a = _arrays(a)
    acts_b, toks_b, attrs_b = _arrays(b)
    np.testing.assert_array_equal(acts_a, acts_b)
    np.testing.assert_array_equal(toks_a, toks_b)
    for k in ("created_at", "updated_at", "spec"):
        attrs_a.pop(k), attrs_b.pop(k)
    assert attrs_a == attrs_b


@pytest.mark.parametrize("fault", ["shard-committed:2", "shard-data-written:3"])
def test_sigkill_and_resume_gives_identical_store(tiny_model, corpus, tmp_path, fault):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert gsp_subprocess(*tiny_harvest_args(tiny_model, corpus, ref)).returncode == 0
    r = gsp_subprocess(*tiny_harvest_args(tiny_model, corpus, killed), env={"GSP_FAULT": fault})
    assert r.returncode == -9, r.stderr
    partial = json.loads((killed / "zarr.json").read_text())["attributes"]
    # whole shards of 8 × 32 rows only; the kill after the 2nd commit leaves exactly two
    assert not partial["complete"] and partial["rows_written"] % 256 == 0
    assert (
        partial["rows_written"] == 512 if fault.startswith("shard-committed") else 256 <= partial["rows_written"] <= 512
    )
    # the store claims only rows that are there: the first shard reads back
    s = ActivationStore.open(killed)
    assert s.read(0, s.rows_written).any()
    r = gsp_subprocess(*tiny_harvest_args(tiny_model, corpus, killed))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    _assert_same_store(ref, killed)


def test_disk_full_stops_cleanly_and_resumes(gsp, tiny_model, corpus, tmp_path, small_disk):
    """A real full disk (a small tmpfs): one line, whole shards claimed only, and after space is freed
    the same command finishes the store an uninterrupted run writes."""
    ref = tmp_path / "ref"
    assert gsp(*tiny_harvest_args(tiny_model, corpus, ref)).exit_code == 0
    disk = small_disk(256)  # room for about two of the four 64 KiB shards (and their temporary files)
    full = disk.path / "s"
    r = gsp(*tiny_harvest_args(tiny_model, corpus, full))
    assert r.exit_code == 1 and "disk full" in r.output and "Traceback" not in r.output, r.output
    claimed = ActivationStore.open(full).rows_written
    assert 0 < claimed < 1024 and claimed % 256 == 0
    disk.resize(4096)
    r = gsp(*tiny_harvest_args(tiny_model, corpus, full))
    assert r.exit_code == 0 and "resuming" in r.output, r.output
    _assert_same_store(ref, full)


def test_rerun_and_parameter_mismatch(gsp, tiny_model, corpus, tmp_path):
    store = tmp_path / "s"
    assert gsp(*tiny_harvest_args(tiny_model, corpus, store)).exit_code == 0
    before = (store / "zarr.json").read_text()
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store))
    assert r.exit_code == 0 and "already complete" in r.output
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store, layer=3, seed=5))
    assert r.exit_code == 1 and "layer: store has '1', asked '3'" in r.output and "seed" in r.output
    assert (store / "zarr.json").read_text() == before, "a refused run changes nothing"
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store, layer=3), "--overwrite")
    assert r.exit_code == 0 and ActivationStore.open(store).hook.layer == 3


def test_read_gains_are_recorded_and_added_to_a_store_from_before_them(gsp, tiny_model, corpus, tmp_path):
    """Each residual-stream hook point records the model's read gains (pipeline.hooks.read_gains, checked
    by hand in test_hooks); a complete store without them gets them from a rerun, its rows untouched."""
    from pipeline.hooks import read_gains
    from pipeline.store import StoreWriter

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():  # gains other than 1, so that recording them is seen
        for L, block in enumerate(model.model.layers):
            block.input_layernorm.weight.fill_(0.1 * L)
        model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "model")
    store = tmp_path / "s"
    args = tiny_harvest_args(tmp_path / "model", corpus, store, site="mlp_in,mlp_out,resid_post")
    assert gsp(*args).exit_code == 0
    hooks = {h.site: h for h in ActivationStore.open_all(store)[0].meta.hooks}
    assert hooks["mlp_in"].read_gains is None
    for site in ("mlp_out", "resid_post"):
        assert hooks[site].read_gains == pytest.approx(read_gains(model, 1, site), rel=1e-6)
        assert len(set(hooks[site].read_gains)) == 1 and hooks[site].read_gains[0] != pytest.approx(1.0)
    v = hooks["resid_post"].read_gains[0]
    assert f"read gains {v:.3g}..{v:.3g} (median {v:.3g})" in gsp("info", store / "L1.resid_post").output
    writer = StoreWriter.open(store)  # as a store harvested before gsp recorded them
    writer.update(hooks=tuple(dataclasses.replace(h, read_gains=None) for h in writer.meta.hooks))
    rows = [_arrays_of(store, h) for h in ("L1.mlp_out", "L1.resid_post")]
    r = gsp(*args)
    assert r.exit_code == 0 and "recorded the read gains of L1.mlp_out, L1.resid_post" in r.output
    again = {h.site: h for h in ActivationStore.open_all(store)[0].meta.hooks}
    assert again == hooks
    for before, h in zip(rows, ("L1.mlp_out", "L1.resid_post"), strict=True):
        np.testing.assert_array_equal(_arrays_of(store, h), before)
    r = gsp(*args)
    assert r.exit_code == 0 and "read gains" not in r.output


def _arrays_of(store, hook: str) -> np.ndarray:
    return zarr.open_group(str(store), mode="r")[f"{hook}/activations"][:]


@pytest.mark.parametrize(
    "over, message",
    [
        ({"layer": 4}, "layer 4 is out of range: this model has 4 layers"),
        ({"layer": -1}, "--layer must be 0 or more"),
        ({"site": "resid_pre"}, "resid_pre"),
        ({"tokens": 0}, "--tokens must be positive"),
        ({"model": "/does/not/exist"}, "not a local folder nor a Hugging Face id"),
        ({"dataset": "/does/not/exist.txt"}, "could not open dataset"),
        ({"dataset": "BAD"}, "could not open dataset"),
    ],
)
def test_bad_input_is_one_clear_line(gsp, tiny_model, corpus, tmp_path, over, message):
    if over.get("dataset") == "BAD":
        bad = tmp_path / "notes.csv"
        bad.write_text("a,b\n")
        over = {"dataset": bad}
        message = "expected .txt, .jsonl or .parquet"
    r = gsp(*tiny_harvest_args(tiny_model, corpus, tmp_path / "s", **over))
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output, r.output


def test_missing_text_column(gsp, tiny_model, tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"text number {i} " * 20}) for i in range(50)))
    r = gsp(*tiny_harvest_args(tiny_model, jsonl, tmp_path / "s"))
    assert r.exit_code == 1 and "no column 'text'" in r.output and "body" in r.output
    r = gsp(*tiny_harvest_args(tiny_model, jsonl, tmp_path / "s2", **{"text-column": "body"}))
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("bad", ["missing file", "no text column"])
def test_a_bad_dataset_creates_no_store_and_the_corrected_rerun_runs(gsp, tiny_model, corpus, tmp_path, bad):
    """The corpus is checked before the store is made: a half-made store would refuse the corrected
    command as one with other parameters."""
    store = tmp_path / "s"
    if bad == "missing file":
        dataset, words = tmp_path / "no-such-corpus.txt", "could not open dataset"
    else:
        dataset, words = tmp_path / "d.jsonl", "has no column 'text'"
        dataset.write_text("\n".join(json.dumps({"body": f"text number {i} " * 20}) for i in range(50)))
    r = gsp(*tiny_harvest_args(tiny_model, dataset, store))
    assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
    assert not store.exists() or not any(store.iterdir())  # nothing made
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store))
    assert r.exit_code == 0, r.output
    assert ActivationStore.open(store).complete


def test_a_store_holding_no_rows_yet_starts_again_with_other_parameters(gsp, tiny_model, corpus, tmp_path):
    """A harvest killed before it claimed a shard leaves a store of no rows: a rerun with other
    parameters starts it again without --overwrite, unless the folder holds something gsp did not write."""
    import shutil

    store, mine = tmp_path / "s", tmp_path / "mine"
    r = gsp_subprocess(*tiny_harvest_args(tiny_model, corpus, store), env={"GSP_FAULT": "shard-data-written:1"})
    assert r.returncode == -9
    assert ActivationStore.open(store).rows_written == 0 and (store / "token_ids" / "c" / "0").is_file()
    shutil.copytree(store, mine)
    (mine / "notes.txt").write_text("keep me")

    r = gsp(*tiny_harvest_args(tiny_model, corpus, store, seed=5))
    assert r.exit_code == 0 and "holds no rows yet" in r.output, r.output
    s = ActivationStore.open(store)
    assert s.complete and s.rows_written == 1024 and s.meta.seed == 5

    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    r = gsp(*tiny_harvest_args(tiny_model, corpus, mine, seed=5))
    assert r.exit_code == 1 and "other parameters" in r.output
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before


def test_store_path_that_is_not_a_store(gsp, tiny_model, corpus, tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("keep me")
    r = gsp(*tiny_harvest_args(tiny_model, corpus, a_file))
    assert r.exit_code == 1 and "is a file" in r.output
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("keep me")
    r = gsp(*tiny_harvest_args(tiny_model, corpus, folder), "--overwrite")
    assert r.exit_code == 1 and "not a gsp store" in r.output
    assert (folder / "thesis.tex").read_text() == "keep me" and a_file.read_text() == "keep me"


def test_a_llama_model_harvests_like_gemma(gsp, corpus, tmp_path):
    """The same harvest serves Llama (its hooks are checked against a direct forward in test_hooks.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.tiny import make_tokenizer

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=2, eos_token_id=1,
                      pad_token_id=0)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    r = gsp(*tiny_harvest_args(tmp_path / "llama", corpus, tmp_path / "s", site="mlp_out", **{"shard-mib": 1}))
    assert r.exit_code == 0, r.output
    s = ActivationStore.open(tmp_path / "s")
    ids = torch.from_numpy(s.read_tokens(0, 64).astype(np.int64)).view(2, 32)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    seen = {}
    model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: seen.setdefault("mlp", out))
    with torch.no_grad():
        model(input_ids=ids)
    assert s.d_in == 32 and s.hook.hook_point == "model.layers.1.post_feedforward_layernorm.output"
    np.testing.assert_allclose(s.read(0, 64), seen["mlp"].reshape(64, 32).numpy(), rtol=1e-5, atol=1e-6)


def test_info_and_verify(gsp, tiny_model, corpus, tmp_path):
    store = tmp_path / "s"
    assert gsp(*tiny_harvest_args(tiny_model, corpus, store)).exit_code == 0
    r = gsp("info", store)
    assert r.exit_code == 0 and "model.layers.1.output" in r.output and "1,024 of 1,024" in r.output
    r = gsp("info", store, "--verify")
    assert r.exit_code == 0 and "checksums OK" in r.output
    shard = store / "L1.resid_post" / "activations" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    r = gsp("info", store, "--verify")
    assert r.exit_code == 1 and "L1.resid_post/activations/c/2" in r.output and "Traceback" not in r.output


def test_config_file_precedence(gsp, tiny_model, corpus, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"hook_layer: 3\nharvest:\n  context_size: 16\n  model: {tiny_model}\n")
    args = tiny_harvest_args(tiny_model, corpus, tmp_path / "s")
    drop = {"--layer", "--context-size", "--model"}
    args = [a for i, a in enumerate(args) if a not in drop and args[i - 1] not in drop]
    r = gsp(*args, "--config", cfg)
    assert r.exit_code == 0, r.output
    s = ActivationStore.open(tmp_path / "s")
    assert s.hook.layer == 3 and s.context_size == 16  # from the file (flat alias, then section)
    r = gsp(*args, "--config", cfg, "--layer", "0", "--overwrite")
    assert ActivationStore.open(tmp_path / "s").hook.layer == 0  # the flag wins
    cfg.write_text("layr: 3\n")
    r = gsp(*args, "--config", cfg)
    assert r.exit_code == 1 and "unknown key 'layr'" in r.output


def test_smoke_test_writes_a_normal_store(gsp, tmp_path, monkeypatch):
    monkeypatch.setenv("GSP_CACHE", str(tmp_path / "cache"))
    r = gsp("harvest", "--smoke-test", "--store", tmp_path / "smoke")
    assert r.exit_code == 0, r.output
    s = ActivationStore.open(tmp_path / "smoke")
    assert s.complete and s.rows_written == 8192 and np.isfinite(s.read(0, 8192)).all()


def test_tokenizer_round_trip_of_stored_ids(tiny_model, corpus, gsp, tmp_path):
    """The stored token ids are the corpus text: decoding a context gives words of the documents."""
    store = tmp_path / "s"
    assert gsp(*tiny_harvest_args(tiny_model, corpus, store)).exit_code == 0
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = ActivationStore.open(store).read_tokens(0, 32)
    text = tok.decode(ids[1:], skip_special_tokens=True)
    assert text.split()[2] in corpus.read_text()


def test_token_is_never_written(gsp, tiny_model, corpus, tmp_path, monkeypatch):
    secret = "hf_SECRETtoken123456"
    monkeypatch.setenv("HF_TOKEN", "hf_ENVtoken987654")
    store = tmp_path / "s"
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store), "--token", secret)
    assert r.exit_code == 0
    written = "".join(p.read_text(errors="replace") for p in store.rglob("zarr.json")) + r.output
    assert secret not in written and "hf_ENVtoken987654" not in written
    assert "token" not in ActivationStore.open(store).meta.spec


def test_hub_id_loads_through_the_hub_cache(tiny_model, corpus, tmp_path):
    """`--model org/name` takes the real Hub path (from_pretrained with a repo id), here served
    offline from a Hub cache laid out as huggingface_hub writes it; the commit is recorded."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--gsp-test--tiny-gemma3"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = gsp_subprocess(*tiny_harvest_args("gsp-test/tiny-gemma3", corpus, tmp_path / "s"), env=env)
    assert r.returncode == 0, r.stderr
    meta = ActivationStore.open(tmp_path / "s").meta
    assert meta.model.name == "gsp-test/tiny-gemma3" and meta.model.revision == commit
    r = gsp_subprocess(*tiny_harvest_args("gsp-test/missing-model", corpus, tmp_path / "s2"), env=env)
    assert r.returncode == 1 and "could not load model 'gsp-test/missing-model'" in r.stderr
    assert "Traceback" not in r.stderr


def test_corpus_running_out_keeps_what_there_was(gsp, tiny_model, tmp_path):
    """A store planned for 10^12 tokens (about 4·10^9 shards) over a 30-document corpus: its end costs
    no more than any other harvest's (no walk over the planned shards, none listed)."""
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"Document {i} has a few words in it." for i in range(30)))
    r = gsp(*tiny_harvest_args(tiny_model, small, tmp_path / "s", tokens=10**12))
    assert r.exit_code == 0 and "corpus ran out" in r.output
    s = ActivationStore.open(tmp_path / "s")
    assert s.complete and 0 < s.rows_written < 100_000
    assert s.activations.shape[0] == s.token_ids.shape[0] == s.rows_written  # no unwritten tail
    assert s.rows_written % 32 == 0


def test_two_harvests_never_write_one_store(gsp, tiny_model, corpus, tmp_path):
    import fcntl
    import os

    store = tmp_path / "s"
    fd = os.open(f"{store}.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running harvest holds it
    try:
        r = gsp(*tiny_harvest_args(tiny_model, corpus, store))
        assert r.exit_code == 1 and "another gsp harvest is writing" in r.output
        assert not store.exists()
    finally:
        os.close(fd)


def test_an_empty_corpus_is_an_error_and_leaves_no_store(gsp, tiny_model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    r = gsp(*tiny_harvest_args(tiny_model, empty, tmp_path / "s"))
    assert r.exit_code == 1 and "the corpus gave no text" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
    held = tmp_path / "one.txt"  # documents exist, but none falls in the held-out part
    held.write_text("A single short document.")
    r = gsp(*tiny_harvest_args(tiny_model, held, tmp_path / "h"), "--part", "heldout", "--heldout-fraction", "0.001")
    assert r.exit_code == 1 and "part heldout" in r.output


def test_the_smoke_test_never_replaces_a_store(gsp, tiny_model, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("GSP_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "real"
    assert gsp(*tiny_harvest_args(tiny_model, corpus, store)).exit_code == 0
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    r = gsp("harvest", "--smoke-test", "--store", store)
    assert r.exit_code == 1 and "other parameters" in r.output
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    r = gsp("harvest", "--smoke-test", "--store", folder)
    assert r.exit_code == 1 and "not a gsp store" in r.output and (folder / "notes.txt").read_text() == "keep me"


def test_an_empty_shard_file_fails_info_and_verify(gsp, tiny_model, corpus, tmp_path):
    store = tmp_path / "s"
    assert gsp(*tiny_harvest_args(tiny_model, corpus, store)).exit_code == 0
    (store / "L1.resid_post" / "activations" / "c" / "1" / "0").write_bytes(b"")  # zarr alone would read zeros
    for args in (("info", store), ("info", store, "--verify")):
        r = gsp(*args)
        assert r.exit_code == 1 and "L1.resid_post/activations/c/1/0" in r.output and "empty" in r.output, r.output


# ------------------------------------------------------------------------------ many hook points in one pass
MULTI = {"layer": "0,2,3", "site": "resid_post,mlp_in,mlp_out,attn_out"}


def test_every_hook_point_of_a_multi_hook_harvest_equals_a_direct_forward(gsp, tiny_model, corpus, tmp_path):
    store = tmp_path / "s"
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store, **MULTI))
    assert r.exit_code == 0, r.output
    g = zarr.open_group(str(store), mode="r")  # plain zarr, as docs/store-format.md reads a store
    toks = g["token_ids"][:]
    ids = toks.reshape(-1, 32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    names = [h["name"] for h in g.attrs["hooks"]]
    assert names == [
        f"L{layer}.{site}" for layer in (0, 2, 3) for site in ("attn_out", "mlp_in", "mlp_out", "resid_post")
    ]
    keep = ~np.isin(toks, [0, 1, 2])
    for hook in g.attrs["hooks"]:
        acts = g[f"{hook['name']}/activations"][:]
        ref = direct_site(model, ids, hook["layer"], hook["site"]).reshape(len(toks), -1).numpy()
        np.testing.assert_allclose(acts, ref, rtol=1e-5, atol=1e-6, err_msg=hook["name"])
        assert hook["d_in"] == acts.shape[1] == (48 if hook["site"] == "attn_out" else 64)
        np.testing.assert_allclose(hook["stats"]["mean"], acts[keep].astype(np.float64).mean(0), rtol=1e-9, atol=1e-12)
        assert hook["stats"]["count"] == keep.sum()
    # each hook point is a store of its own to every reader: STORE/<name>
    s = ActivationStore.open(store / "L2.mlp_in")
    assert (s.hook.layer, s.hook.site, s.rows_written) == (2, "mlp_in", 1024)
    np.testing.assert_array_equal(s.read(0, 1024), g["L2.mlp_in/activations"][:])
    r = gsp("info", store)
    assert r.exit_code == 0 and "12 hook points" in r.output and "L3.resid_post" in " ".join(r.output.split())
    with pytest.raises(Exception, match="holds 12 hook points"):
        ActivationStore.open(store)


def test_one_hook_point_of_a_multi_hook_store_equals_its_own_harvest(gsp, tiny_model, corpus, tmp_path):
    """Sharing a forward pass changes nothing: layer 2's mlp_out from the multi-hook store equals a
    harvest of that point alone, rows and statistics."""
    assert gsp(*tiny_harvest_args(tiny_model, corpus, tmp_path / "multi", **MULTI)).exit_code == 0
    assert gsp(*tiny_harvest_args(tiny_model, corpus, tmp_path / "one", layer=2, site="mlp_out")).exit_code == 0
    a, b = ActivationStore.open(tmp_path / "multi" / "L2.mlp_out"), ActivationStore.open(tmp_path / "one")
    np.testing.assert_array_equal(a.read(0, 1024), b.read(0, 1024))
    np.testing.assert_array_equal(a.read_tokens(0, 1024), b.read_tokens(0, 1024))
    assert a.meta.cursor == b.meta.cursor and a.hook.hook_point == b.hook.hook_point and a.d_in == b.d_in
    # the same float64 sums, added shard by shard over shards of other sizes: equal to rounding
    assert a.hook.stats.count == b.hook.stats.count
    np.testing.assert_allclose(a.hook.stats.sum, b.hook.stats.sum, rtol=1e-12)


def _same_stores(ref, other):
    a, b = ActivationStore.open_all(ref), ActivationStore.open_all(other)
    assert [s.hook for s in a] == [s.hook for s in b]
    for sa, sb in zip(a, b, strict=True):
        np.testing.assert_array_equal(sa.read(0, sa.rows_written), sb.read(0, sb.rows_written))
        np.testing.assert_array_equal(sa.read_tokens(0, sa.rows_written), sb.read_tokens(0, sb.rows_written))
    assert a[0].meta.rows_written == b[0].meta.rows_written and a[0].meta.cursor == b[0].meta.cursor


@pytest.mark.parametrize("fault", ["shard-committed:2", "shard-data-written:3"])
def test_a_killed_multi_hook_harvest_resumes_to_identical_stores(tiny_model, corpus, tmp_path, fault):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    args = {"layer": "1,3", "site": "resid_post,mlp_in"}
    assert gsp_subprocess(*tiny_harvest_args(tiny_model, corpus, ref, **args)).returncode == 0
    r = gsp_subprocess(*tiny_harvest_args(tiny_model, corpus, killed, **args), env={"GSP_FAULT": fault})
    assert r.returncode == -9, r.stderr
    # one claim covers every hook point: each holds exactly the committed rows, whole shards
    stores = ActivationStore.open_all(killed)
    committed = stores[0].rows_written
    assert not stores[0].complete and 0 < committed < 1024 and committed % stores[0].shard_rows == 0
    for s in stores:
        assert s.rows_written == committed and s.read(0, committed).any()
    r = gsp_subprocess(*tiny_harvest_args(tiny_model, corpus, killed, **args))
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr
    _same_stores(ref, killed)


def test_a_shard_holds_shard_mib_of_all_hook_points_together(gsp, tiny_model, corpus, tmp_path):
    """Memory stays bounded: the shard size counts every hook point, so more hook points make
    shorter shards, not more memory in flight."""
    assert gsp(*tiny_harvest_args(tiny_model, corpus, tmp_path / "one")).exit_code == 0
    assert gsp(*tiny_harvest_args(tiny_model, corpus, tmp_path / "four", layer="0,1,2,3")).exit_code == 0
    one, four = ActivationStore.open(tmp_path / "one"), ActivationStore.open(tmp_path / "four" / "L3.resid_post")
    assert one.shard_rows == 4 * four.shard_rows


def _as_format_1(store):
    """Rewrite a one-hook store in format 1, the layout of gsp before hook points had groups of their
    own (docs/store-format.md): `activations` at the root, layer/site/d_in/stats at the top level."""
    import shutil

    doc = json.loads((store / "zarr.json").read_text())
    a = doc["attributes"]
    (hook,) = a.pop("hooks")
    shutil.move(store / hook["name"] / "activations", store / "activations")
    shutil.rmtree(store / hook["name"])
    a.update(format_version=1, layer=hook["layer"], site=hook["site"], hook_point=hook["hook_point"],
             d_in=hook["d_in"], stats=hook["stats"])  # fmt: skip
    a["spec"]["layer"] = int(a["spec"]["layer"])  # format 1 recorded one layer as a number
    (store / "zarr.json").write_text(json.dumps(doc))


def test_a_format_1_store_reads_and_resumes(gsp, tiny_model, corpus, tmp_path):
    ref, old, cut = tmp_path / "ref", tmp_path / "old", tmp_path / "cut"
    for store in (ref, old):
        assert gsp(*tiny_harvest_args(tiny_model, corpus, store)).exit_code == 0
    _as_format_1(old)
    s = ActivationStore.open(old)
    np.testing.assert_array_equal(s.read(0, 1024), ActivationStore.open(ref).read(0, 1024))
    ref_hook = ActivationStore.open(ref).hook
    assert s.hook == dataclasses.replace(ref_hook, read_gains=None) and s.meta.format_version == 1
    r = gsp(*tiny_harvest_args(tiny_model, corpus, old))  # the same command sees the same settings
    assert r.exit_code == 0 and "already complete" in r.output and "recorded the read gains" in r.output
    s = ActivationStore.open(old)  # and records the read gains, still in format 1
    assert s.hook == ref_hook and s.meta.format_version == 1
    # killed after its second shard, then read as format 1: the rerun finishes it, in format 1
    r = gsp_subprocess(*tiny_harvest_args(tiny_model, corpus, cut), env={"GSP_FAULT": "shard-committed:2"})
    assert r.returncode == -9
    _as_format_1(cut)
    r = gsp(*tiny_harvest_args(tiny_model, corpus, cut))
    assert r.exit_code == 0 and "resuming" in r.output, r.output
    s = ActivationStore.open(cut)
    assert s.complete and s.meta.format_version == 1 and (cut / "activations").is_dir()
    np.testing.assert_array_equal(s.read(0, 1024), ActivationStore.open(ref).read(0, 1024))
    np.testing.assert_allclose(s.hook.stats.sum, ActivationStore.open(ref).hook.stats.sum, rtol=1e-12)


@pytest.mark.parametrize(
    "over, message",
    [({"layer": "1,x"}, "--layer should be a block index"), ({"site": "resid_post,resid_pre"}, "resid_pre"),
     ({"layer": "1,9"}, "layer 9 is out of range")],
)  # fmt: skip
def test_bad_hook_point_lists_are_one_line(gsp, tiny_model, corpus, tmp_path, over, message):
    r = gsp(*tiny_harvest_args(tiny_model, corpus, tmp_path / "s", **over))
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s").exists()
