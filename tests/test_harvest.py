"""gsp harvest on a tiny random Gemma 3: exact activations, early stop, resume after kills, errors."""

import collections
import json

import numpy as np
import pytest
import torch
import zarr
from conftest import gsp_subprocess, tiny_harvest_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.corpus import Cursor, documents, pack, pack_shared
from pipeline.hooks import activations
from pipeline.store import ActivationStore


def direct_site(model, ids, layer, site):
    """Independent reference: a full forward pass (LM head included) with a hook written here."""
    block = model.model.layers[layer]
    got = {}
    if site == "resid_post":
        h = block.register_forward_hook(lambda m, a, o: got.setdefault("x", o[0] if isinstance(o, tuple) else o))
    elif site == "mlp_out":
        h = block.post_feedforward_layernorm.register_forward_hook(lambda m, a, o: got.setdefault("x", o))
    else:
        h = block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(ids))
    h.remove()
    return got["x"]


def _arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return g["activations"][:], g["token_ids"][:], dict(g.attrs)


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
    assert attrs["d_in"] == ref.shape[1] and attrs["rows_written"] == 1024 and attrs["complete"]
    assert (ids[:, 0] == 2).all(), "every context starts with BOS"
    assert attrs["hook_point"].startswith("model.layers.2.")
    # running statistics describe exactly the stored non-special rows
    keep = ~np.isin(toks, [0, 1, 2])
    np.testing.assert_allclose(attrs["stats"]["mean"], acts[keep].astype(np.float64).mean(0), rtol=1e-9, atol=1e-12)


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
    assert s.activations.dtype == np.uint16 and s.attrs["dtype"] == "bfloat16"


def test_early_stop_skips_later_layers_and_head(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    fired = []
    later = [*model.model.layers[2:], model.model.norm, model.lm_head]
    handles = [m.register_forward_hook(lambda m, a, o, i=i: fired.append(i)) for i, m in enumerate(later)]
    ran = []
    handles.append(model.model.layers[1].register_forward_hook(lambda m, a, o: ran.append(1)))
    for site in ("resid_post", "mlp_out", "attn_out"):
        activations(model, torch.full((2, 8), 5), 1, site)
    assert fired == [] and len(ran) == 1  # block 1 completes only for resid_post (its own output)
    for h in handles:
        h.remove()


def test_packing_by_hand():
    class Tok:
        bos_token_id, eos_token_id = 2, 1

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[int(w) for w in t.split()] for t in texts]}

    docs = [(0, "10 11 12"), (1, "20 21"), (3, "30 31 32 33 34 35")]
    out = list(pack(iter(docs), Tok(), 4))
    # stream: 10 11 12 EOS 20 21 EOS 30 31 32 33 34 35 EOS
    assert [c.tolist() for c, _ in out] == [[2, 10, 11, 12], [2, 1, 20, 21], [2, 1, 30, 31], [2, 32, 33, 34]]
    assert [cur for _, cur in out] == [Cursor(0, 3), Cursor(1, 2), Cursor(3, 2), Cursor(3, 5)]
    # starting from a cursor continues exactly where the earlier run stopped
    resumed = list(pack(iter(docs[2:]), Tok(), 4, start=Cursor(3, 2)))
    assert [c.tolist() for c, _ in resumed] == [[2, 32, 33, 34]]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shared_tokenizing_packs_what_one_process_packs(world):
    """Processes (threads here) that share the tokenizing each get exactly their contexts of pack()'s
    stream, and each tokenizes about 2/world of the documents, not all of them."""
    import threading

    rng = np.random.default_rng(world)
    docs = [(i, " ".join(str(w) for w in rng.integers(10, 99, rng.integers(1, 40)))) for i in range(0, 600, 2)]
    counted = collections.Counter()

    class Tok:
        bos_token_id, eos_token_id = 2, 1

        def __call__(self, texts, add_special_tokens):
            counted[threading.current_thread().name] += len(texts)
            return {"input_ids": [[int(w) for w in t.split()] for t in texts]}

    C, S, limit = 8, 5, 700  # contexts of 8, "shards" of 5 contexts, 700 contexts (the corpus has ~780)
    whole = list(pack(iter(docs), Tok(), C))
    assert len(whole) > limit
    slots, barrier = [None] * world, threading.Barrier(world)

    def gather(rank, obj):
        slots[rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    got = {}

    def run(rank):
        wanted = lambda k: (k // S) % world == rank and k % 3 != 1  # noqa: E731  (any predicate works)
        got[rank] = list(pack_shared(iter(docs), Tok(), C, rank=rank, world=world, wanted=wanted, limit=limit,
                                     gather=lambda obj: gather(rank, obj), block=16))  # fmt: skip

    threads = [threading.Thread(target=run, args=(r,), name=f"rank{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in range(world):
        want = [k for k in range(limit) if (k // S) % world == rank and k % 3 != 1]
        assert [k for k, _, _ in got[rank]] == want
        for k, ids, cursor in got[rank]:
            assert ids.tolist() == whole[k][0].tolist() and cursor == whole[k][1]
    # which documents each process had to tokenize, from the stream positions (token counts + EOS)
    lengths = np.array([len(t.split()) + 1 for _, t in docs])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    last_doc = int(np.searchsorted(starts + lengths, limit * (C - 1), side="left"))  # completes context limit-1
    blocks_read = (last_doc // 16 + 1) * 16
    for rank in range(world):
        need = {j for j in range(min(blocks_read, len(docs))) if (j % 16) % world == rank}
        for j in range(min(blocks_read, len(docs))):
            first, last = starts[j] // (C - 1), (starts[j] + lengths[j] - 1) // (C - 1)
            if any((k // S) % world == rank and k % 3 != 1 for k in range(first, min(last, limit - 1) + 1)):
                need.add(j)
        assert counted[f"rank{rank}"] == len(need)
        assert len(need) < (2 / world if world > 1 else 1) * len(docs)


def test_heldout_documents_are_disjoint_and_complete(corpus):
    train = dict(documents(str(corpus), part="train", heldout_fraction=0.2))
    held = dict(documents(str(corpus), part="heldout", heldout_fraction=0.2))
    every = [t for t in corpus.read_text().split("\n\n") if t.strip()]
    assert held and not set(train.values()) & set(held.values())
    assert sorted([*train.values(), *held.values()]) == sorted(t.strip() for t in every)
    assert 0.1 < len(held) / len(every) < 0.3


def test_seed_changes_order_reproducibly(corpus):
    a = [i for i, _ in documents(str(corpus), seed=1)]
    b = [i for i, _ in documents(str(corpus), seed=1)]
    texts_1 = [t for _, t in documents(str(corpus), seed=1)]
    texts_2 = [t for _, t in documents(str(corpus), seed=2)]
    assert a == b and texts_1 != texts_2 and sorted(texts_1) == sorted(texts_2)


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


def test_disk_full_stops_cleanly_and_resumes(gsp, tiny_model, corpus, tmp_path, monkeypatch):
    import errno

    import zarr.storage._local as local

    ref, full = tmp_path / "ref", tmp_path / "full"
    assert gsp(*tiny_harvest_args(tiny_model, corpus, ref)).exit_code == 0
    real_put = local._put

    def put(path, value, exclusive=False):
        parts = path.parts
        if "c" in parts and parts[parts.index("c") + 1] == "2":  # the third shard's files
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_suffix(".partial"), "wb") as f:
                f.write(b"x" * 10)  # a half-written temporary file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    r = gsp(*tiny_harvest_args(tiny_model, corpus, full))
    assert r.exit_code == 1 and "disk full" in r.output and "Traceback" not in r.output
    assert ActivationStore.open(full).rows_written == 2 * 256
    monkeypatch.setattr(local, "_put", real_put)
    assert gsp(*tiny_harvest_args(tiny_model, corpus, full)).exit_code == 0
    _assert_same_store(ref, full)


def test_rerun_and_parameter_mismatch(gsp, tiny_model, corpus, tmp_path):
    store = tmp_path / "s"
    assert gsp(*tiny_harvest_args(tiny_model, corpus, store)).exit_code == 0
    before = (store / "zarr.json").read_text()
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store))
    assert r.exit_code == 0 and "already complete" in r.output
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store, layer=3, seed=5))
    assert r.exit_code == 1 and "layer: store has 1, asked 3" in r.output and "seed" in r.output
    assert (store / "zarr.json").read_text() == before, "a refused run changes nothing"
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store, layer=3), "--overwrite")
    assert r.exit_code == 0 and ActivationStore.open(store).attrs["layer"] == 3


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


def test_llama_blocks_serve_resid_post_and_mlp_out(gsp, corpus, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.tiny import make_tokenizer

    tok = make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    # the same hook code serves Llama's resid_post
    r = gsp(*tiny_harvest_args(tmp_path / "llama", corpus, tmp_path / "s2", **{"shard-mib": 1}))
    assert r.exit_code == 0, r.output
    assert ActivationStore.open(tmp_path / "s2").d_in == 32
    # Llama has no post_feedforward_layernorm: its mlp_out is the MLP's own output (what the block adds)
    r = gsp(*tiny_harvest_args(tmp_path / "llama", corpus, tmp_path / "s", site="mlp_out", **{"shard-mib": 1}))
    assert r.exit_code == 0, r.output
    s = ActivationStore.open(tmp_path / "s")
    ids = torch.from_numpy(s.read_tokens(0, 64).astype(np.int64)).view(2, 32)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    seen = {}
    model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: seen.setdefault("mlp", out))
    with torch.no_grad():
        model(input_ids=ids)
    np.testing.assert_allclose(s.read(0, 64), seen["mlp"].reshape(64, 32).numpy(), rtol=1e-5, atol=1e-6)


def test_info_and_verify(gsp, tiny_model, corpus, tmp_path):
    store = tmp_path / "s"
    assert gsp(*tiny_harvest_args(tiny_model, corpus, store)).exit_code == 0
    r = gsp("info", store)
    assert r.exit_code == 0 and "model.layers.1.output" in r.output and "1,024 of 1,024" in r.output
    r = gsp("info", store, "--verify")
    assert r.exit_code == 0 and "checksums OK" in r.output
    shard = store / "activations" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    r = gsp("info", store, "--verify")
    assert r.exit_code == 1 and "activations/c/2" in r.output and "Traceback" not in r.output


def test_config_file_precedence(gsp, tiny_model, corpus, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"hook_layer: 3\nharvest:\n  context_size: 16\n  model: {tiny_model}\n")
    args = tiny_harvest_args(tiny_model, corpus, tmp_path / "s")
    drop = {"--layer", "--context-size", "--model"}
    args = [a for i, a in enumerate(args) if a not in drop and args[i - 1] not in drop]
    r = gsp(*args, "--config", cfg)
    assert r.exit_code == 0, r.output
    attrs = ActivationStore.open(tmp_path / "s").attrs
    assert attrs["layer"] == 3 and attrs["context_size"] == 16  # from the file (flat alias, then section)
    r = gsp(*args, "--config", cfg, "--layer", "0", "--overwrite")
    assert ActivationStore.open(tmp_path / "s").attrs["layer"] == 0  # the flag wins
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


def test_multimodal_gemma3_blocks_are_found():
    """Gemma 3 4B and larger load as Gemma3ForConditionalGeneration; the same hooks must find the blocks."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision)).eval()
    ids = torch.full((1, 6), 7)
    got = activations(model, ids, 1, "resid_post")
    ref = direct_site_multimodal(model, ids, 1)
    torch.testing.assert_close(got, ref)


def direct_site_multimodal(model, ids, layer):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]


def test_token_is_never_written(gsp, tiny_model, corpus, tmp_path, monkeypatch):
    secret = "hf_SECRETtoken123456"
    monkeypatch.setenv("HF_TOKEN", "hf_ENVtoken987654")
    store = tmp_path / "s"
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store), "--token", secret)
    assert r.exit_code == 0
    written = "".join(p.read_text(errors="replace") for p in store.rglob("zarr.json")) + r.output
    assert secret not in written and "hf_ENVtoken987654" not in written
    assert "token" not in ActivationStore.open(store).attrs["spec"]


def test_process_workers_write_the_same_store(gsp, tiny_model, corpus, tmp_path):
    """The reader and writers in their own processes (the CUDA default) give the threads' store."""
    threads, procs = tmp_path / "threads", tmp_path / "procs"
    assert gsp(*tiny_harvest_args(tiny_model, corpus, threads, workers="threads")).exit_code == 0
    r = gsp(*tiny_harvest_args(tiny_model, corpus, procs, workers="processes"))
    assert r.exit_code == 0, r.output
    _assert_same_store(threads, procs)


def test_process_reader_reports_corpus_errors(gsp, tiny_model, tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"text {i} " * 20}) for i in range(20)))
    r = gsp(*tiny_harvest_args(tiny_model, jsonl, tmp_path / "s", workers="processes"))
    assert r.exit_code == 1 and "no column 'text'" in r.output and "Traceback" not in r.output


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
    attrs = ActivationStore.open(tmp_path / "s").attrs
    assert attrs["model"]["name"] == "gsp-test/tiny-gemma3" and attrs["model"]["revision"] == commit
    r = gsp_subprocess(*tiny_harvest_args("gsp-test/missing-model", corpus, tmp_path / "s2"), env=env)
    assert r.returncode == 1 and "could not load model 'gsp-test/missing-model'" in r.stderr
    assert "Traceback" not in r.stderr


def test_corpus_running_out_keeps_what_there_was(gsp, tiny_model, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"Document {i} has a few words in it." for i in range(30)))
    r = gsp(*tiny_harvest_args(tiny_model, small, tmp_path / "s", tokens=100_000))
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
