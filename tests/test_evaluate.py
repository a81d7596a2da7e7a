"""gsp evaluate end to end on a tiny Gemma 3: figures against independent computations, every SAE
format, reports, clear errors; and gsp run, the main job, on the same tiny setup."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import one_line_error
from safetensors.numpy import save_file
from safetensors.torch import load_file

from pipeline.store import ActivationStore


@pytest.fixture(scope="module")
def setup(tiny_fit):
    return tiny_fit


def _evaluate(gsp, setup, tmp_path, *extra):
    r = gsp("evaluate", "--store", setup / "store", "--reports", tmp_path / "reports", *extra)
    assert r.exit_code == 0, r.output
    (report,) = (tmp_path / "reports").glob("report_*.json")
    return json.loads(report.read_text()), r.output


def _numpy_figures(store_path, params) -> dict:
    """FVU, L0 and dead latents of a JumpReLU SAE on the store's ordinary rows, in numpy."""
    s = ActivationStore.open(store_path)
    x = s.read(0, s.rows_written).astype(np.float64)
    ids = s.read_tokens(0, s.rows_written)
    x = x[~np.isin(ids, s.special_ids)]
    w_enc, b_enc, w_dec, b_dec, th = (
        params[k].astype(np.float64) for k in ("w_enc", "b_enc", "w_dec", "b_dec", "threshold")
    )
    pre = x @ w_enc + b_enc
    f = np.maximum(pre, 0) * (pre > th)  # Gemma Scope 2's JumpReLU: ReLU(pre)·1[pre > θ]
    x_hat = f @ w_dec + b_dec
    return {
        "tokens": len(x),
        "fvu": ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(),
        "l0": (f != 0).sum(1).mean(),
        "dead_features": int(((f != 0).sum(0) == 0).sum()),
    }


def test_evaluate_matches_numpy_and_a_direct_forward_pass(gsp, setup, tiny_model, tmp_path):
    report, output = _evaluate(gsp, setup, tmp_path, "--sae", setup / "sae", "--delta-tokens", "256")
    params = {k: v.numpy() for k, v in load_file(setup / "sae" / "params.safetensors").items()}
    want = _numpy_figures(setup / "store", params)
    rec = report["reconstruction"]
    assert rec["tokens"] == want["tokens"] < 1024  # BOS/EOS rows left out
    assert rec["fvu"] == pytest.approx(want["fvu"], rel=1e-4)
    assert rec["l0"] == pytest.approx(want["l0"], rel=1e-6)
    assert rec["dead_features"] == want["dead_features"]

    # the clean CE is the model's own loss on the store's first 8 contexts, special tokens masked
    from transformers import AutoModelForCausalLM

    s = ActivationStore.open(setup / "store")
    ids = torch.from_numpy(s.read_tokens(0, 256).astype(np.int64)).view(8, 32)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    special = torch.isin(ids, torch.tensor(s.special_ids))
    keep = ~special[:, :-1] & ~special[:, 1:]
    d = report["delta_loss"]
    assert d["predictions"] == int(keep.sum()) and d["contexts"] == 8
    assert d["ce_clean"] == pytest.approx(ce[keep].double().mean().item(), rel=1e-5)
    assert d["ce_spliced"] > 0 and d["ce_zero_ablated"] > 0  # a random model: zero ablation may even help
    assert d["loss_recovered"] == pytest.approx(
        (d["ce_zero_ablated"] - d["ce_spliced"]) / (d["ce_zero_ablated"] - d["ce_clean"])
    )
    assert d["store_activation_mismatch"] < 1e-5  # float32 store, same model: the rerun sees the store's rows

    # the report names what was measured, in Markdown too, with the three plots
    assert report["sae"]["format"] == "gsp" and report["sae"]["layer"] == 1 and report["sae"]["width"] == 96
    assert report["store"]["path"] == str(setup / "store") and report["model"]["spec"] == str(tiny_model)
    md = (tmp_path / "reports" / report["files"]["markdown"]).read_text()
    assert f"{want['tokens']:,} (special tokens excluded)" in md and "gsp 0." in md
    for png in report["files"]["plots"]:
        assert (tmp_path / "reports" / png).read_bytes()[:4] == b"\x89PNG"
    assert len(report["files"]["plots"]) == 3
    assert "report:" in output and "loss recovered" in output


def _as_formats(setup, root) -> dict:
    """The fitted SAE (thresholds made positive) in gsp's, Gemma Scope 2's, Gemma Scope 1's, Llama Scope's formats."""
    import shutil

    p = {k: v.numpy() for k, v in load_file(setup / "sae" / "params.safetensors").items()}
    p["threshold"] = np.maximum(p["threshold"], 1e-3)
    d, f = p["w_enc"].shape
    own = root / "gsp"
    own.mkdir(parents=True)
    shutil.copy(setup / "sae" / "config.json", own)
    save_file(p, own / "params.safetensors")
    gs2 = root / "resid_post" / "layer_1_width_96_l0_small"
    gs2.mkdir(parents=True)
    save_file(p, gs2 / "params.safetensors")
    hook = "model.layers.1.output"
    (gs2 / "config.json").write_text(json.dumps({
        "model_name": "tiny", "architecture": "jump_relu", "hf_hook_point_in": hook, "hf_hook_point_out": hook,
        "width": f, "l0": 12, "affine_connection": False, "type": "sae"}))  # fmt: skip
    gs1 = root / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_12"
    gs1.mkdir(parents=True)
    np.savez(gs1 / "params.npz", W_enc=p["w_enc"], W_dec=p["w_dec"], b_enc=p["b_enc"], b_dec=p["b_dec"],
             threshold=p["threshold"])  # fmt: skip
    # Llama Scope: x scaled by s_in = sqrt(d)/n_in in, x̂ by 1/s_out = n_out/sqrt(d) out, one scalar threshold θ.
    # Without the decoder norm in the gate, latent i scaled by a_i = θ/t_i reproduces its own threshold t_i.
    n_in, n_out, theta = 7.0, 11.0, 0.5
    s_in, s_out = math.sqrt(d) / n_in, math.sqrt(d) / n_out
    a = theta / p["threshold"].astype(np.float64)
    ls = root / "Llama3_1-8B-Base-L1R-8x"
    (ls / "checkpoints").mkdir(parents=True)
    tensors = {
        "encoder.weight": p["w_enc"].T * a[:, None] / s_in,
        "encoder.bias": p["b_enc"] * a,
        "decoder.weight": p["w_dec"].T * s_out / a[None, :],
        "decoder.bias": p["b_dec"] * s_out,
    }  # safetensors writes the buffer as laid out: make each array C-ordered
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, ls / "checkpoints" / "final.safetensors"
    )
    (ls / "hyperparams.json").write_text(json.dumps({
        "d_model": d, "d_sae": f, "hook_point_in": "blocks.1.hook_resid_post",
        "hook_point_out": "blocks.1.hook_resid_post", "act_fn": "jumprelu", "jump_relu_threshold": theta,
        "top_k": 50, "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": n_in, "out": n_out},
        "sparsity_include_decoder_norm": False}))  # fmt: skip
    return {"gsp": own, "gemma-scope-2": gs2, "gemma-scope": gs1, "llama-scope": ls}


def test_every_format_of_one_sae_gives_the_same_figures(gsp, setup, tmp_path):
    folders = _as_formats(setup, tmp_path / "saes")
    base, _ = _evaluate(gsp, setup, tmp_path / "base", "--sae", folders.pop("gsp"), "--no-delta-loss")
    assert base["delta_loss"] is None and base["model"] is None
    for fmt, folder in folders.items():
        report, _ = _evaluate(gsp, setup, tmp_path / fmt, "--sae", folder, "--no-delta-loss")
        assert report["sae"]["format"] == fmt and report["sae"]["layer"] == 1
        for key in ("tokens", "l0", "fvu", "mse", "cosine", "dead_features", "dense_features"):
            assert report["reconstruction"][key] == pytest.approx(base["reconstruction"][key], rel=1e-4), (fmt, key)


def test_mismatches_and_bad_input_are_one_line_errors(gsp, setup, tmp_path):
    formats = _as_formats(setup, tmp_path / "saes")
    gs2 = formats["gemma-scope-2"]
    config = json.loads((gs2 / "config.json").read_text())

    def fails(*args) -> str:
        r = gsp("evaluate", *map(str, args), "--reports", tmp_path / "r", "--no-delta-loss")
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert not (tmp_path / "r").exists()  # no half report
        return " ".join(r.output.split())

    for hook in ("model.layers.2.output", "model.layers.1.post_feedforward_layernorm.output"):
        config["hf_hook_point_in"] = config["hf_hook_point_out"] = hook
        (gs2 / "config.json").write_text(json.dumps(config))
        msg = fails("--sae", gs2, "--store", setup / "store")
        assert ("layer 2" in msg or "site mlp_out" in msg) and "harvest a store" in msg
    wide = tmp_path / "wide"
    wide.mkdir()
    save_file({"w_enc": np.zeros((48, 8), np.float32), "w_dec": np.zeros((8, 48), np.float32),
               "b_enc": np.zeros(8, np.float32), "b_dec": np.zeros(48, np.float32),
               "threshold": np.zeros(8, np.float32)}, wide / "params.safetensors")  # fmt: skip
    config["hf_hook_point_in"] = config["hf_hook_point_out"] = "model.layers.1.output"
    (wide / "config.json").write_text(json.dumps({**config, "width": 8}))
    assert "d_in=48" in fails("--sae", wide, "--store", setup / "store")
    assert "gsp harvest" in fails("--sae", gs2)  # a pretrained SAE names no store: say how to make one
    assert "SAE" in fails("--sae", tmp_path / "nothing-here", "--store", setup / "store")
    assert "no store at" in fails("--sae", gs2, "--store", tmp_path / "saes")
    assert "--tokens must be positive" in fails("--sae", gs2, "--store", setup / "store", "--tokens", "0")


def test_the_rerun_model_is_only_loaded_for_the_delta_loss(gsp, setup, tmp_path):
    report, _ = _evaluate(gsp, setup, tmp_path, "--sae", setup / "sae", "--no-delta-loss", "--model", "/no/such/model")
    assert report["delta_loss"] is None
    r = gsp("evaluate", "--sae", setup / "sae", "--store", setup / "store", "--model", "/no/such/model",
            "--reports", tmp_path / "r2")  # fmt: skip
    assert r.exit_code == 1 and "/no/such/model" in r.output and "Traceback" not in r.output


def test_smoke_test_runs_in_seconds(gsp, tmp_path, monkeypatch):
    monkeypatch.setenv("GSP_CACHE", str(tmp_path / "cache"))
    r = gsp("evaluate", "--smoke-test", "--reports", tmp_path / "reports")
    assert r.exit_code == 0, r.output
    (report,) = (tmp_path / "reports").glob("report_*.json")
    result = json.loads(report.read_text())
    assert result["delta_loss"]["predictions"] > 0 and result["reconstruction"]["tokens"] > 1000


def test_run_chains_the_stages_and_reuses_its_work(gsp, tiny_model, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("GSP_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"harvest:\n  model: {tiny_model}\n  dataset: {corpus}\n  layer: 1\n  tokens: 2048\n  context_size: 32\n"
        "  batch_size: 8\n  store_dtype: float32\n"
        "fit:\n  width: 64\n  steps: 30\n  batch_size: 128\n  target_l0: 8\n"
        f"evaluate:\n  delta_tokens: 128\n  reports: {tmp_path / 'reports'}\n"
        "run:\n  heldout_tokens: 512\n"
    )
    r = gsp("run", "-c", cfg)
    assert r.exit_code == 0, r.output
    (report,) = (tmp_path / "reports").glob("report_*.json")
    result = json.loads(report.read_text())
    held = ActivationStore.open(result["store"]["path"])
    assert held.meta.dataset.part == "heldout" and held.rows_written == 512
    assert result["sae"]["path"].endswith("_train_2048_jumprelu_64")
    assert str(report.with_suffix(".md").name) in " ".join(r.output.split()).replace(" ", "")
    r = gsp("run", "-c", cfg)  # everything is there: nothing is redone but the evaluation
    assert r.exit_code == 0 and "already complete" in r.output and "keeping it" in r.output
    assert len(list((tmp_path / "reports").glob("report_*.json"))) == 2


def test_download_fetches_the_model_and_only_one_saes_files(gsp, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, **kw):
        calls.append((repo_id, kw))
        folder = tmp_path / repo_id.replace("/", "--")
        for pattern in kw["allow_patterns"]:
            if "/" in pattern:  # the SAE's files, each under its subfolder
                (folder / pattern).parent.mkdir(parents=True, exist_ok=True)
                (folder / pattern).write_text("{}")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_from_env")
    sub = "resid_post/layer_12_width_16k_l0_medium"
    r = gsp("download", "--model", "google/gemma-3-270m", "--sae", f"google/gemma-scope-2-270m-pt/{sub}",
            "--token", "hf_secret_flag")  # fmt: skip
    assert r.exit_code == 0, r.output
    (model_repo, model_kw), (sae_repo, sae_kw) = calls
    assert model_repo == "google/gemma-3-270m" and "*.safetensors" in model_kw["allow_patterns"]
    assert not any(p.endswith((".bin", ".gguf", ".pth")) for p in model_kw["allow_patterns"])
    assert sae_repo == "google/gemma-scope-2-270m-pt"
    assert sae_kw["allow_patterns"] and all(p.startswith(f"{sub}/") for p in sae_kw["allow_patterns"])
    assert model_kw["token"] == sae_kw["token"] == "hf_secret_flag"  # the flag wins over $HF_TOKEN
    assert "hf_secret" not in r.output and sub in r.output
    r = gsp("download")
    assert r.exit_code == 1 and "nothing to download" in r.output


def test_evaluate_an_sae_from_the_fit_smoke_test(gsp, tmp_path, monkeypatch):
    """fit --smoke-test trains on a synthetic store (no model): evaluate measures it there with the
    store's full attributes (the store used to lack them: KeyError 'dataset')."""
    monkeypatch.setenv("GSP_CACHE", str(tmp_path / "cache"))
    r = gsp("fit", "--smoke-test")
    assert r.exit_code == 0, r.output
    sae = tmp_path / "cache" / "smoke" / "fit-sae"
    r = gsp("evaluate", "--sae", sae, "--no-delta-loss", "--reports", tmp_path / "reports")
    assert r.exit_code == 0, r.output
    (path,) = (tmp_path / "reports").glob("report_*.json")
    report = json.loads(path.read_text())
    store = report["store"]["path"]
    assert store == str(tmp_path / "cache" / "smoke" / "fit-store") and report["store"]["model"] == "synthetic"
    assert report["store"]["dataset"]["dataset"] == "synthetic" and report["delta_loss"] is None
    params = {k: v.numpy() for k, v in load_file(sae / "params.safetensors").items()}
    want = _numpy_figures(store, params)
    rec = report["reconstruction"]
    assert rec["tokens"] == want["tokens"] == 8192 - 8192 // 16  # every row but each context's BOS
    assert rec["l0"] == pytest.approx(want["l0"], rel=1e-6) and 0 < rec["l0"] < 128
    assert rec["fvu"] == pytest.approx(want["fvu"], rel=1e-4) and 0 < rec["fvu"] < 2
    assert rec["dead_features"] == want["dead_features"]


def test_an_sae_of_width_zero_is_one_line(gsp, setup, tmp_path):
    folder = tmp_path / "resid_post" / "layer_1_width_0"
    folder.mkdir(parents=True)
    save_file({"w_enc": np.zeros((64, 0), np.float32), "w_dec": np.zeros((0, 64), np.float32),
               "b_enc": np.zeros(0, np.float32), "b_dec": np.zeros(64, np.float32),
               "threshold": np.zeros(0, np.float32)}, folder / "params.safetensors")  # fmt: skip
    hook = "model.layers.1.output"
    (folder / "config.json").write_text(json.dumps({"architecture": "jump_relu", "hf_hook_point_in": hook,
                                                    "hf_hook_point_out": hook, "width": 0}))  # fmt: skip
    r = gsp("evaluate", "--sae", folder, "--store", setup / "store", "--no-delta-loss", "--reports", tmp_path / "r")
    one_line_error(r, "width 0", "empty", "params.safetensors")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ under torchrun: shares of a store
@pytest.fixture
def split_store(tmp_path):
    """A synthetic store of 2048 rows (contexts of 16, BOS first) in spans of 256 rows, and its raw rows."""
    from pipeline.tiny import write_synthetic_store

    x = np.random.default_rng(11).standard_normal((2048, 8)).astype(np.float32)
    store = write_synthetic_store(tmp_path / "store", x)
    assert (store.chunk_rows, store.rows_written) == (256, 2048)
    raw = x.copy()
    raw[::16] = 1e4  # BOS rows, as write_synthetic_store marks them
    return store, raw


def _spy_reads(monkeypatch) -> list:
    """Every ActivationStore.read(start, stop) from now on, in order."""
    calls = []
    read = ActivationStore.read

    def spy(self, start, stop):
        calls.append((start, stop))
        return read(self, start, stop)

    monkeypatch.setattr(ActivationStore, "read", spy)
    return calls


def _rows(spans) -> set:
    return {r for start, stop in spans for r in range(start, stop)}


@pytest.mark.parametrize("limit", [1500, 10**6])  # stops inside the 7th span; all 1920 ordinary rows
def test_each_process_reads_only_its_share_of_the_activations(split_store, monkeypatch, limit):
    store, raw = split_store
    calls = _spy_reads(monkeypatch)
    served, reads = {}, {}
    for part in [(0, 1), (0, 2), (1, 2)]:
        calls.clear()
        served[part] = list(store.ordinary_rows(limit, 100, share=part))
        reads[part] = list(calls)
    one, r0, r1 = reads[(0, 1)], reads[(0, 2)], reads[(1, 2)]
    assert one == [(s, min(s + 256, 2048)) for s in range(0, 256 * (7 if limit == 1500 else 8), 256)]
    assert r0 == one[0::2] and r1 == one[1::2]  # spans 0, 2, 4… and 1, 3, 5…
    assert not _rows(r0) & _rows(r1) and _rows(r0) | _rows(r1) == _rows(one)

    def rows_and_x(batches):
        rows = np.concatenate([rows for _, rows in batches])
        return rows, np.concatenate([x for x, _ in batches])

    rows_one, x_one = rows_and_x(served[(0, 1)])
    rows_0, x_0 = rows_and_x(served[(0, 2)])
    rows_1, x_1 = rows_and_x(served[(1, 2)])
    ordinary = np.flatnonzero(np.arange(2048) % 16 != 0)[:limit]
    np.testing.assert_array_equal(rows_one, ordinary)  # the first `limit` ordinary rows, in order, BOS left out
    assert not set(rows_0) & set(rows_1) and set(rows_0) | set(rows_1) == set(rows_one)
    assert len(rows_0) + len(rows_1) == len(rows_one)  # each row served once
    np.testing.assert_array_equal(x_one, raw[rows_one])
    np.testing.assert_array_equal(x_0, raw[rows_0])
    np.testing.assert_array_equal(x_1, raw[rows_1])
    assert all(len(x) <= 100 for x, _ in served[(0, 2)] + served[(1, 2)])


def test_the_shares_of_two_processes_merge_to_the_one_process_figures(split_store, monkeypatch):
    """evaluate's reconstruction with world 2: each rank reads only its spans; the gathered sums give
    world 1's figures. all_gather is replaced by handing rank 1's share to rank 0 here."""
    from pipeline import dist
    from pipeline.metrics import reconstruction
    from pipeline.sae import SAE

    store, _ = split_store
    sae = SAE(8, 24).init_gemma_scope(torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    whole = reconstruction(sae, store, 1500, 100, dist.Group(0, 1))
    shares = {}

    def gather(group, obj, pg=None):
        shares[group.rank] = obj
        return [shares[r] for r in range(group.world)] if group.rank == 0 else [obj]

    monkeypatch.setattr(dist, "gather", gather)
    calls = _spy_reads(monkeypatch)
    reconstruction(sae, store, 1500, 100, dist.Group(1, 2))
    assert calls == [(256, 512), (768, 1024), (1280, 1536)]
    calls.clear()
    merged = reconstruction(sae, store, 1500, 100, dist.Group(0, 2))
    assert calls == [(0, 256), (512, 768), (1024, 1280), (1536, 1792)]
    assert merged["tokens"] == whole["tokens"] == 1500 and shares[1].n == 3 * 240
    for key in ("l0", "fvu", "mse", "cosine", "relative_norm"):
        assert merged[key] == pytest.approx(whole[key], rel=1e-9), key
    for key in ("dead_features", "dense_features", "l0_histogram", "frequency_histogram"):
        assert merged[key] == whole[key], key
    assert 0 < whole["l0"] < 24 and 0 < whole["fvu"]


# ------------------------------------------------------------------------------ transcoders
def _transcoder_numpy(root):
    """The transcoder's prediction of the MLP's output from its input on every ordinary row, in numpy."""
    s_in = ActivationStore.open(root / "store" / "L1.mlp_in")
    s_out = ActivationStore.open(root / "store" / "L1.mlp_out")
    keep = ~np.isin(s_in.read_tokens(0, s_in.rows_written), s_in.special_ids)
    x = s_in.read(0, s_in.rows_written).astype(np.float64)[keep]
    y = s_out.read(0, s_out.rows_written).astype(np.float64)[keep]
    p = {k: v.double().numpy() for k, v in load_file(root / "t" / "params.safetensors").items()}
    pre = x @ p["w_enc"] + p["b_enc"]
    f = np.maximum(pre, 0) * (pre > p["threshold"])
    return x, y, f, f @ p["w_dec"] + p["b_dec"] + x @ p["affine_skip_connection"], p


def test_a_transcoder_is_measured_on_the_output_it_predicts(gsp, transcoder, tiny_model, tmp_path):
    """FVU and L0 of its prediction of the MLP's output against numpy; delta loss with the MLP's output
    replaced by its prediction from the MLP's real input, against a direct forward with hooks written here."""
    r = gsp("evaluate", "--sae", transcoder / "t", "--store", transcoder / "store", "--delta-tokens", 256,
            "--reports", tmp_path / "r")  # fmt: skip
    assert r.exit_code == 0, r.output
    (report,) = (tmp_path / "r").glob("report_*.json")
    result = json.loads(report.read_text())
    x, y, f, y_hat, p = _transcoder_numpy(transcoder)
    rec = result["reconstruction"]
    assert rec["tokens"] == len(y)
    assert rec["fvu"] == pytest.approx(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), rel=1e-4)
    assert rec["l0"] == pytest.approx((f != 0).sum(1).mean(), rel=1e-6)
    assert result["sae"]["transcoder"] and result["target_store"]["path"].endswith("L1.mlp_out")

    from transformers import AutoModelForCausalLM

    s = ActivationStore.open(transcoder / "store" / "L1.mlp_in")
    ids = torch.from_numpy(s.read_tokens(0, 256).astype(np.int64)).view(8, 32)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    block, seen = lm.model.layers[1], {}
    special = torch.isin(ids, torch.tensor(s.special_ids))[..., None]
    w = {k: torch.from_numpy(v).float() for k, v in p.items()}

    def predict(module, args, out):  # the post-MLP norm's output, replaced
        x_in = seen["mlp_in"]
        pre = x_in @ w["w_enc"] + w["b_enc"]
        y_hat = (pre.relu() * (pre > w["threshold"])) @ w["w_dec"] + w["b_dec"] + x_in @ w["affine_skip_connection"]
        return torch.where(special, out, y_hat)

    hooks = [block.mlp.register_forward_pre_hook(lambda m, a: seen.update(mlp_in=a[0])),
             block.post_feedforward_layernorm.register_forward_hook(predict)]  # fmt: skip
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[:, :-1]
    for h in hooks:
        h.remove()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    keep = ~special[:, :-1, 0] & ~special[:, 1:, 0]
    assert result["delta_loss"]["ce_spliced"] == pytest.approx(ce[keep].double().mean().item(), rel=1e-4)
    assert result["delta_loss"]["contexts"] == 8


def test_a_gemma_scope_2_transcoder_folder_is_evaluated_on_a_store_of_both_points(gsp, transcoder, tmp_path):
    """The fitted transcoder written as Gemma Scope 2 publishes one (`transcoder/layer_1_…_affine`, no
    gsp keys): the same figures, the target found in the same store."""
    import shutil

    folder = tmp_path / "gemma-scope-2-270m-pt" / "transcoder" / "layer_1_width_16k_l0_small_affine"
    folder.mkdir(parents=True)
    shutil.copy(transcoder / "t" / "params.safetensors", folder)
    config = json.loads((transcoder / "t" / "config.json").read_text())
    keep = ("model_name", "architecture", "hf_hook_point_in", "hf_hook_point_out", "width", "l0",
            "affine_connection", "type")  # fmt: skip
    (folder / "config.json").write_text(json.dumps({k: config[k] for k in keep}))
    base, _ = _evaluate(gsp, transcoder, tmp_path / "a", "--sae", transcoder / "t", "--no-delta-loss")
    gs2, _ = _evaluate(gsp, transcoder, tmp_path / "b", "--sae", folder, "--no-delta-loss")
    assert gs2["sae"]["format"] == "gemma-scope-2" and gs2["sae"]["transcoder"]
    for key in ("tokens", "l0", "fvu", "mse", "dead_features"):
        assert gs2["reconstruction"][key] == pytest.approx(base["reconstruction"][key], rel=1e-6), key
    r = gsp("evaluate", "--sae", folder, "--store", transcoder / "store" / "L1.mlp_in", "--target-store",
            transcoder / "store" / "L1.mlp_in", "--no-delta-loss", "--reports", tmp_path / "c")  # fmt: skip
    assert r.exit_code == 1 and "predicts layer 1 mlp_out" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------------------ checked first, nothing left behind
def _spy_rows(monkeypatch) -> list:
    """Every read of a store's rows for the reconstruction pass, from now on."""
    calls = []
    rows = ActivationStore.ordinary_rows

    def spy(self, *args, **kwargs):
        calls.append(self.path)
        return rows(self, *args, **kwargs)

    monkeypatch.setattr(ActivationStore, "ordinary_rows", spy)
    return calls


@pytest.mark.parametrize("model", ["ev/nosuch_model", "./missing"])
def test_a_missing_rerun_model_fails_before_the_reconstruction_pass(gsp, setup, tmp_path, monkeypatch, model):
    """`ev/nosuch_model` beside an `ev/` folder is a local path (it used to go to the Hub: 10 retries over
    ~51 s), and either fails at once, not after the whole reconstruction pass."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the code before this fix asked the Hub: fail fast there
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ev").mkdir()
    reads = _spy_rows(monkeypatch)
    r = gsp("evaluate", "--sae", setup / "sae", "--store", setup / "store", "--model", model,
            "--reports", tmp_path / "r")  # fmt: skip
    one_line_error(r, model, "not a local folder")
    assert reads == [] and not (tmp_path / "r").exists()


def test_a_full_disk_leaves_no_part_of_a_report(gsp, setup, tmp_path, small_disk):
    """64 KiB hold the first two plots (~45 KiB) but not the third (~53 KiB): the report is written
    whole or not at all, and no truncated PNG is left behind."""
    disk = small_disk(64)
    reports = disk.path / "reports"
    r = gsp("evaluate", "--sae", setup / "sae", "--store", setup / "store", "--no-delta-loss", "--reports", reports)
    one_line_error(r, "disk full")
    assert list(reports.iterdir()) == []
    disk.resize(1024)  # space freed: the same command writes the whole report
    r = gsp("evaluate", "--sae", setup / "sae", "--store", setup / "store", "--no-delta-loss", "--reports", reports)
    assert r.exit_code == 0, r.output
    (report,) = reports.glob("report_*.json")
    for png in json.loads(report.read_text())["files"]["plots"]:
        assert (reports / png).read_bytes()[-8:] == b"IEND\xaeB`\x82"  # each PNG whole, to its last chunk
    assert not list(reports.glob("*.partial"))


def test_a_failure_inside_evaluate_tears_the_process_group_down(gsp, setup, tmp_path, monkeypatch):
    """Under torchrun a failing evaluate used to leave its process group up; here a real one-process
    gloo group stands in for torchrun's, and the reconstruction pass fails."""
    import torch.distributed as tdist

    from pipeline import dist
    from pipeline.errors import GspError

    def setup_group(device):
        tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
        return dist.Group(0, 2, torch.device("cpu"))

    def failing_rows(self, *args, **kwargs):
        raise GspError("shard 3 of the store is damaged")
        yield

    monkeypatch.setattr(dist, "setup", setup_group)
    monkeypatch.setattr(ActivationStore, "ordinary_rows", failing_rows)
    try:
        r = gsp("evaluate", "--sae", setup / "sae", "--store", setup / "store", "--no-delta-loss",
                "--reports", tmp_path / "r")  # fmt: skip
        one_line_error(r, "shard 3 of the store is damaged")
        assert not tdist.is_initialized()
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
