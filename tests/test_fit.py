"""gsp fit: recovers known features, writes Gemma Scope 2's format, resumes exactly, never loads the LM."""

import json
import sys

import numpy as np
import pytest
import torch
from conftest import gsp_subprocess
from safetensors.torch import load_file

from pipeline.tiny import write_synthetic_store
from stages.fit import FitConfig, run_fit


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Tokens made of ~3 of 64 known unit directions in 32 dims (plus an offset), in a real store."""
    rng = np.random.default_rng(0)
    true = rng.standard_normal((64, 32))
    true /= np.linalg.norm(true, axis=1, keepdims=True)
    mags = rng.exponential(1.0, (40_000, 64)) * (rng.random((40_000, 64)) < 3 / 64)
    x = (mags @ true * 10 + 3).astype(np.float32)
    path = tmp_path_factory.mktemp("synthetic") / "store"
    write_synthetic_store(path, x)
    return path, true


def _recovery(out, true) -> np.ndarray:
    w = load_file(out / "params.safetensors")["w_dec"].numpy()
    return (true @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T).max(1)


def test_topk_recovers_the_true_features(synthetic, tmp_path):
    store, true = synthetic
    cfg = FitConfig(store=str(store), out=str(tmp_path / "sae"), arch="topk", k=3, width=128, steps=1500,
                    batch_size=256, lr=2e-3, dead_tokens=20_000)  # fmt: skip
    run_fit(cfg)
    cos = _recovery(tmp_path / "sae", true)
    assert cos.mean() > 0.95 and (cos > 0.9).mean() > 0.9, cos


def test_jumprelu_reaches_its_target_l0_and_recovers_features(synthetic, tmp_path):
    store, true = synthetic
    cfg = FitConfig(store=str(store), out=str(tmp_path / "sae"), arch="jumprelu", target_l0=3.0,
                    sparsity_coeff=0.1, width=128, steps=2500, batch_size=256, lr=5e-3)  # fmt: skip
    run_fit(cfg)
    config = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert 2.4 <= config["final_train_metrics"]["l0"] <= 3.6
    cos = _recovery(tmp_path / "sae", true)
    assert cos.mean() > 0.9, cos


def test_saved_sae_is_gemma_scope_2_format_on_raw_inputs(synthetic, tmp_path):
    store, _ = synthetic
    cfg = FitConfig(store=str(store), out=str(tmp_path / "sae"), arch="topk", k=3, width=96, steps=300,
                    batch_size=256, lr=2e-3)  # fmt: skip
    run_fit(cfg)
    p = load_file(tmp_path / "sae" / "params.safetensors")
    assert {k: (tuple(v.shape), v.dtype) for k, v in p.items()} == {
        "w_enc": ((32, 96), torch.float32), "w_dec": ((96, 32), torch.float32), "b_enc": ((96,), torch.float32),
        "b_dec": ((32,), torch.float32), "threshold": ((96,), torch.float32),
    }  # fmt: skip
    torch.testing.assert_close(p["w_dec"].norm(dim=1), torch.ones(96))
    config = json.loads((tmp_path / "sae" / "config.json").read_text())
    for key in ("model_name", "architecture", "hf_hook_point_in", "hf_hook_point_out", "width", "l0", "type"):
        assert key in config
    assert config["architecture"] == "topk" and config["k"] == 3 and config["width"] == 96
    # Gemma Scope 2 inference, written here in numpy, on RAW activations (no scaling anywhere)
    from pipeline.store import ActivationStore

    s = ActivationStore.open(store)
    raw = s.read(0, 4096)[s.read_tokens(0, 4096) != 2]
    pre = raw @ p["w_enc"].numpy() + p["b_enc"].numpy()
    top = np.argsort(-pre, axis=1)[:, :3]
    f = np.zeros_like(pre)
    np.put_along_axis(f, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    x_hat = f @ p["w_dec"].numpy() + p["b_dec"].numpy()
    fvu = ((raw - x_hat) ** 2).sum() / ((raw - raw.mean(0)) ** 2).sum()
    assert fvu < 0.3 and abs(fvu - config["final_train_metrics"]["fvu"]) < 0.1


def _fit_args(store, out, *extra):
    return ["fit", "--store", store, "--out", out, "--arch", "jumprelu", "--width", "64", "--steps", "60",
            "--batch-size", "128", "--checkpoint-every", "20", "--target-l0", "4", *extra]  # fmt: skip


@pytest.mark.parametrize("decoder", ["dense", "sparse"])
def test_resume_after_kill_gives_the_same_weights(synthetic, tmp_path, decoder):
    store, _ = synthetic
    args = ["--decoder", decoder, "--log-every", "5"]
    assert gsp_subprocess(*_fit_args(store, tmp_path / "ref", *args)).returncode == 0
    r = gsp_subprocess(*_fit_args(store, tmp_path / "run", *args), env={"GSP_FAULT": "fit-checkpoint-saved:2"})
    ckpt = tmp_path / "run" / "checkpoints"
    assert r.returncode == -9 and json.loads((ckpt / "latest.json").read_text()) == {"folder": "step-40"}
    assert json.loads((ckpt / "step-40" / "state.json").read_text())["step"] == 40
    assert not (ckpt / "step-20").exists()  # the older checkpoint is gone once the newer is in place
    r = gsp_subprocess(*_fit_args(store, tmp_path / "run", *args, "--resume"))
    assert r.returncode == 0, r.stderr
    a, b = load_file(tmp_path / "ref" / "params.safetensors"), load_file(tmp_path / "run" / "params.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not ckpt.exists()


def test_fit_never_imports_the_language_model(tmp_path):
    blocker = tmp_path / "block" / "transformers"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('fit must not import transformers')\n")
    env = {"PYTHONPATH": f"{blocker.parent}:{':'.join(sys.path)}", "GSP_CACHE": str(tmp_path / "cache")}
    r = gsp_subprocess("fit", "--smoke-test", env=env)
    assert r.returncode == 0, r.stderr
    r = gsp_subprocess("harvest", "--smoke-test", env=env)  # the blocker really blocks
    assert r.returncode != 0 and "must not import transformers" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--store", "/no/such/store"], "no store at /no/such/store"),
        (["--arch", "topk", "--k", "500", "--width", "64"], "--k 500 is more than --width 64"),
        (["--width", "0"], "--width must be positive"),
    ],
)
def test_bad_input_is_one_clear_line(gsp, synthetic, tmp_path, args, message):
    store, _ = synthetic
    r = gsp("fit", "--store", store, "--out", tmp_path / "o", "--steps", 5, *args)
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output


def test_existing_output_and_mismatched_resume(gsp, synthetic, tmp_path):
    store, _ = synthetic
    base = ["fit", "--store", store, "--out", tmp_path / "o", "--steps", 30, "--width", 32, "--batch-size", 64]
    assert gsp(*base).exit_code == 0
    r = gsp(*base)
    assert r.exit_code == 1 and "already holds an SAE" in r.output
    r = gsp(*base, "--resume")
    assert r.exit_code == 1 and "no checkpoint" in r.output
    killed = _fit_args(store, tmp_path / "k")
    assert gsp_subprocess(*killed, env={"GSP_FAULT": "fit-checkpoint-saved:1"}).returncode == -9
    r = gsp(*killed, "--resume", "--lr", "1e-3")
    assert r.exit_code == 1 and "lr: checkpoint has 0.00175, asked 0.001" in r.output


def test_schedule_warmups_and_decay():
    from stages.fit import _schedule

    cfg = FitConfig(store="s", steps=100, lr=1.0, sparsity_coeff=2.0, lr_warmup_steps=10, lr_decay_steps=20,
                    sparsity_warmup_steps=50)  # fmt: skip
    lr = [_schedule(cfg, s)[0] for s in range(100)]
    lam = [_schedule(cfg, s)[1] for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == 1.0 and lr[50] == 1.0 and lr[80] == 1.0
    assert lr[90] == pytest.approx(0.5) and lr[99] == pytest.approx(0.05)
    assert lam[24] == pytest.approx(1.0) and lam[49] == lam[99] == 2.0


def test_corrupt_chunk_stops_fit_with_its_name(gsp, tmp_path):
    rng = np.random.default_rng(3)
    store = tmp_path / "store"
    write_synthetic_store(store, rng.standard_normal((8192, 16)).astype(np.float32))
    shard = next(p for p in sorted((store / "activations" / "c").rglob("*")) if p.is_file())
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = gsp("fit", "--store", store, "--out", tmp_path / "o", "--steps", 50, "--width", 32, "--batch-size", 256)
    assert r.exit_code == 1 and "crc32c" in r.output and "activations/c/" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "o" / "params.safetensors").exists()
