"""gsp fit: recovers known features, writes Gemma Scope 2's format, resumes exactly, never loads the LM."""

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line, gsp_subprocess
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pipeline.errors import GspError
from pipeline.tiny import SYNTHETIC_HOOK as H
from pipeline.tiny import write_synthetic_store
from stages.fit import FitConfig, fit_or_reuse, run_fit


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
        "b_dec": ((32,), torch.float32),
    }  # fmt: skip
    # (no threshold: a JumpReLU reader would apply it to a TopK SAE)
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
    ckpt = tmp_path / "run.partial" / "checkpoints"  # training works beside the output, which appears at the end
    assert r.returncode == -9 and json.loads((ckpt / "latest.json").read_text())["folder"] == "step-40"
    assert json.loads((ckpt / "step-40" / "state.json").read_text())["step"] == 40
    assert not (ckpt / "step-20").exists()  # the older checkpoint is gone once the newer is in place
    assert not (tmp_path / "run").exists()
    r = gsp_subprocess(*_fit_args(store, tmp_path / "run", *args, "--resume"))
    assert r.returncode == 0, r.stderr
    a, b = load_file(tmp_path / "ref" / "params.safetensors"), load_file(tmp_path / "run" / "params.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not (tmp_path / "run.partial").exists() and sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json", "params.safetensors"]  # fmt: skip


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
        (["--matmul", "tf32", "--device", "cpu"], "--matmul tf32 needs a CUDA device"),
        (["--matryoshka", "64,32", "--width", "128"], "--matryoshka sizes must increase"),
        (["--matryoshka", "32,128", "--width", "128"], "below --width 128"),
        (["--matryoshka", "a,b"], "--matryoshka takes prefix sizes like"),
        (["--arch", "topk", "--freq-penalty", "0.1", "--freq-scale", "0"], "--freq-scale above 0"),
        (["--freq-penalty", "-1"], "--freq-penalty must be a finite number"),
        (["--theta-lr", "0"], "--theta-lr must be positive"),
        (["--theta-lr", "nan"], "--theta-lr must be a finite number"),
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
    assert r.exit_code == 1 and "already holds an SAE" in r.output  # a finished SAE has nothing to resume
    r = gsp(*base[:4], tmp_path / "fresh", *base[5:], "--resume")
    assert r.exit_code == 1 and "no checkpoint" in r.output
    killed = _fit_args(store, tmp_path / "k")
    assert gsp_subprocess(*killed, env={"GSP_FAULT": "fit-checkpoint-saved:1"}).returncode == -9
    r = gsp(*killed, "--resume", "--lr", "1e-3")
    assert r.exit_code == 1 and "lr: checkpoint has 0.004, asked 0.001" in r.output


def test_schedule_warmups_and_decay():
    cfg = FitConfig(store="s", steps=100, lr=1.0, sparsity_coeff=2.0, lr_warmup_steps=10, lr_decay_steps=20,
                    sparsity_warmup_steps=50, freq_penalty=4.0)  # fmt: skip
    lr, lam, freq = zip(*[cfg.schedule.at(s) for s in range(100)], strict=True)
    assert lr[0] == pytest.approx(0.1) and lr[9] == 1.0 and lr[50] == 1.0 and lr[80] == 1.0
    assert lr[90] == pytest.approx(0.5) and lr[99] == pytest.approx(0.05)
    assert lam[24] == pytest.approx(1.0) and lam[49] == lam[99] == 2.0
    assert freq[0] == pytest.approx(4.0 / 50) and freq[24] == pytest.approx(2.0) and freq[49] == freq[99] == 4.0


def test_the_frequency_penalty_ramps_up_with_lambda_in_the_fit(synthetic, tmp_path, monkeypatch):
    """The objective each step of gsp fit trains with carries λ_f scaled like λ (the warm-up's share)."""
    import stages.fit

    seen = []

    def recording(sae, opt, x, objective, *, lam, **kw):
        seen.append((objective.freq_penalty, lam))
        return train_step(sae, opt, x, objective, lam=lam, **kw)

    from pipeline.train import train_step

    monkeypatch.setattr(stages.fit, "train_step", recording)
    store, _ = synthetic
    run_fit(FitConfig(store=str(store), out=str(tmp_path / "sae"), width=32, steps=12, batch_size=128,
                      target_l0=3, sparsity_coeff=0.5, sparsity_warmup_steps=8, freq_penalty=0.2,
                      checkpoint_every=0))  # fmt: skip
    ramp = [min(1.0, (s + 1) / 8) for s in range(12)]
    assert seen == [pytest.approx((0.2 * r, 0.5 * r)) for r in ramp]


def test_corrupt_chunk_stops_fit_with_its_name(gsp, tmp_path):
    rng = np.random.default_rng(3)
    store = tmp_path / "store"
    write_synthetic_store(store, rng.standard_normal((8192, 16)).astype(np.float32))
    shard = next(p for p in sorted((store / H / "activations" / "c").rglob("*")) if p.is_file())
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = gsp("fit", "--store", store, "--out", tmp_path / "o", "--steps", 50, "--width", 32, "--batch-size", 256)
    assert r.exit_code == 1 and "crc32c" in r.output and "activations/c/" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ crash safety and clear failures
def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_params(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) == ["b_dec", "b_enc", "threshold", "w_dec", "w_enc"]
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit


def _gsp_in(cwd: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m stages ARGS...` run from `cwd` (relative paths are relative to it)."""
    return subprocess.run([sys.executable, "-m", "stages", *map(str, args)], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(synthetic, tmp_path_factory):
    """`uninterrupted(*extra)`: the params of an uninterrupted `_fit_args(store, out, *extra)` fit (fitted once)."""
    from stages.cli import app

    store, _ = synthetic
    root = tmp_path_factory.mktemp("uninterrupted")
    done = {}

    def params(*extra: str) -> dict:
        if extra not in done:
            out = root / f"sae{len(done)}"
            r = CliRunner().invoke(app, [str(a) for a in _fit_args(store, out, *extra)], catch_exceptions=False)
            assert r.exit_code == 0, r.output
            done[extra] = load_file(out / "params.safetensors")
        return done[extra]

    return params


def test_kill_between_params_and_config_leaves_no_output_and_fit_or_reuse_finishes(synthetic, tmp_path, uninterrupted):
    store, _ = synthetic
    out, work = tmp_path / "sae", tmp_path / "sae.partial"
    r = gsp_subprocess(*_fit_args(store, out), env={"GSP_FAULT": "sae-params-written:1"})
    assert r.returncode == -9, r.stderr
    assert not out.exists()  # a folder with params but no config.json is never at the output
    assert (work / "params.safetensors").is_file() and not (work / "config.json").exists()
    cfg = FitConfig(store=str(store), out=str(out), width=64, steps=60, batch_size=128, checkpoint_every=20,
                    target_l0=4.0)  # the settings of _fit_args  # fmt: skip
    assert fit_or_reuse(cfg) == out  # resumes from the checkpoint at step 40, which is still there
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params.safetensors"] and not work.exists()
    _assert_same_params(uninterrupted(), load_file(out / "params.safetensors"))


def test_kill_after_the_sae_is_written_is_finished_by_the_same_command(gsp, synthetic, tmp_path, uninterrupted):
    store, _ = synthetic
    out, work = tmp_path / "sae", tmp_path / "sae.partial"
    r = gsp_subprocess(*_fit_args(store, out), env={"GSP_FAULT": "fit-saved:1"})
    assert r.returncode == -9, r.stderr
    assert not out.exists() and sorted(p.name for p in work.iterdir()) == ["config.json", "params.safetensors"]
    written = (work / "params.safetensors").read_bytes()
    r = gsp(*_fit_args(store, out))  # the same command, no --resume: nothing is left to train
    assert r.exit_code == 0 and "finished saving" in r.output, r.output
    assert (out / "params.safetensors").read_bytes() == written and not work.exists()
    _assert_same_params(uninterrupted(), load_file(out / "params.safetensors"))


def test_default_lr_follows_the_architecture():
    jumprelu = FitConfig(store="s")
    topk = dataclasses.replace(jumprelu, arch="topk")  # lr is resolved where used, not frozen at construction
    assert jumprelu.lr is None and topk.lr is None
    assert jumprelu.resolved().lr == 4e-3 and topk.resolved().lr == 1e-3
    assert dataclasses.replace(topk, steps=100).schedule.at(50)[0] == 1e-3  # past warm-up, before decay
    assert dataclasses.replace(topk, lr=5e-4).resolved().lr == 5e-4


def test_an_sae_fitted_before_theta_lr_counts_as_theta_at_the_full_lr():
    """A record without theta_lr (an SAE from before the option) is θ at the full lr, the default: reused
    as it is, and never taken for an SAE asked with another --theta-lr."""
    cfg = FitConfig(store="s", weighting="none")
    old = {k: v for k, v in cfg.resolved().record().items() if k != "theta_lr"}
    assert cfg.differences(old, "the SAE") == []
    slow = dataclasses.replace(cfg, theta_lr=0.05)
    assert [d.split(":")[0] for d in slow.differences(old, "the SAE")] == ["theta_lr"]
    assert slow.differences(slow.resolved().record(), "the SAE") == []


def test_importing_the_sae_installs_no_warning_filters():
    code = (
        "import warnings, json, numpy, torch, safetensors.torch\n"  # third-party imports may add their own
        "before = list(warnings.filters)\n"
        "import pipeline.sae\n"
        "print(json.dumps([len(before), len(warnings.filters)]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    before, after = json.loads(r.stdout.strip().splitlines()[-1])
    assert before > 0 and after == before


def test_resume_with_absolute_paths_after_relative_ones(gsp, synthetic, tmp_path, uninterrupted):
    store, _ = synthetic
    rel_store = os.path.relpath(store, tmp_path)
    r = _gsp_in(tmp_path, *_fit_args(rel_store, "sae"), env={"GSP_FAULT": "fit-checkpoint-saved:2"})
    assert r.returncode == -9, r.stderr
    ckpt = tmp_path / "sae.partial" / "checkpoints"
    # the checkpoint names the store by its absolute path, which means the same folder from any directory
    assert json.loads((ckpt / "step-40" / "state.json").read_text())["config"]["store"] == str(store.resolve())
    r = gsp(*_fit_args(store.resolve(), (tmp_path / "sae").resolve(), "--resume"))  # run from the repo's folder
    assert r.exit_code == 0, r.output
    _assert_same_params(uninterrupted(), load_file(tmp_path / "sae" / "params.safetensors"))
    assert json.loads((tmp_path / "sae" / "config.json").read_text())["store"] == str(store.resolve())


@pytest.mark.parametrize("where", ["--out", "default"])
def test_smoke_test_never_replaces_a_users_folder(gsp, tmp_path, monkeypatch, where):
    monkeypatch.setenv("GSP_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "mine" if where == "--out" else tmp_path / "cache" / "smoke" / "fit-sae"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("a user's notes\n")
    before = _snapshot(mine)
    r = gsp("fit", "--smoke-test", *(["--out", mine] if where == "--out" else []))
    line = error_line(r.output)
    assert r.exit_code == 1 and str(mine) in line
    assert ("is not a gsp SAE folder" if where == "--out" else "holds files gsp did not write") in line
    assert _snapshot(mine) == before and not mine.with_name(mine.name + ".partial").exists()


def test_fit_refuses_a_folder_that_is_not_a_gsp_sae(gsp, synthetic, tmp_path):
    store, _ = synthetic
    model = tmp_path / "model"  # a model's folder, say: a config.json that is not an SAE's, and weights
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "hidden_size": 640}))
    (model / "model.safetensors").write_bytes(bytes(range(256)))
    (model / "tokenizer.json").write_text("{}")
    before = _snapshot(model)
    r = gsp(*_fit_args(store, model))
    line = error_line(r.output)
    assert r.exit_code == 1 and "is not a gsp SAE folder" in line and str(model) in line
    assert not any(x.startswith("fit: ") for x in r.output.splitlines())  # stopped before training: no progress
    assert _snapshot(model) == before and not (tmp_path / "model.partial").exists()


def test_a_second_fit_on_one_output_is_refused(gsp, synthetic, tmp_path):
    store, _ = synthetic
    out = tmp_path / "sae"
    args = _fit_args(store, out, "--width", "32", "--steps", "20", "--batch-size", "64")
    fd = os.open(tmp_path / "sae.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running `gsp fit --out sae` holds it
    try:
        r = gsp(*args)
    finally:
        os.close(fd)
    line = error_line(r.output)
    assert r.exit_code == 1 and "another gsp fit is writing" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae.lock"]
    assert gsp(*args).exit_code == 0 and (out / "config.json").is_file()  # once the other fit is done, it runs


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_a_diverging_loss_stops_the_fit_naming_the_step(gsp, synthetic, tmp_path, arch):
    store, _ = synthetic
    out = tmp_path / "sae"
    r = gsp("fit", "--store", store, "--out", out, "--arch", arch, "--k", 4, "--width", 32, "--steps", 40,
            "--batch-size", 64, "--lr", "1e30", "--log-every", 20)  # fmt: skip
    line = error_line(r.output)
    # step 1's loss is on the initial weights (finite); Adam's first update moves every weight by about
    # lr·(warm-up share) ≈ 1e29, so step 2's reconstruction overflows float32. The loss is only read
    # at step 20 (the first log step): the message must name step 2, not the step it was noticed at.
    assert r.exit_code == 1 and re.search(r"NaN or infinite at step (\d+) ", line).group(1) == "2", line
    assert not out.exists() and not (tmp_path / "sae.partial").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr-warmup-steps", "-1"], "--lr-warmup-steps must not be negative, got -1"),
        (["--lr-decay-steps", "-5"], "--lr-decay-steps must not be negative, got -5"),
        (["--sparsity-warmup-steps", "-2"], "--sparsity-warmup-steps must not be negative, got -2"),
        (["--steps", "0"], "--steps must be positive, got 0"),
        (["--steps", "-1"], "--steps must be positive, got -1"),
        (["--target-l0", "100"], "--target-l0 must be above 0 and at most --width 32, got 100"),
    ],
)
def test_bad_steps_and_schedules_are_one_clear_line(gsp, synthetic, tmp_path, args, message):
    store, _ = synthetic
    base = ["--width", 32, "--batch-size", 64, "--tokens", 1280]  # 20 steps where --steps is not set
    r = gsp("fit", "--store", store, "--out", tmp_path / "o", *base, *args)
    assert r.exit_code == 1 and message in error_line(r.output)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def killed_at_step_20(synthetic, tmp_path_factory) -> Path:
    """The work folder of a `_fit_args` fit killed just after its checkpoint at step 20."""
    store, _ = synthetic
    root = tmp_path_factory.mktemp("killed")
    r = gsp_subprocess(*_fit_args(store, root / "sae"), env={"GSP_FAULT": "fit-checkpoint-saved:1"})
    assert r.returncode == -9, r.stderr
    return root / "sae.partial"


def _flip_a_bit(ckpt: Path) -> str:
    data = bytearray((ckpt / "step-20" / "state.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x10
    (ckpt / "step-20" / "state.safetensors").write_bytes(bytes(data))
    return "state.safetensors does not match its checksum"


def _corrupt_latest(ckpt: Path) -> str:
    (ckpt / "latest.json").write_text('{"folder": "step-2')
    return "JSONDecodeError"


def _truncate_state(ckpt: Path) -> str:
    path = ckpt / "step-20" / "state.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "state.safetensors does not match its checksum"


def _drop_since_fired(ckpt: Path) -> str:
    """A checkpoint whose checksums all hold but that lacks the dead-latent counters."""
    folder = ckpt / "step-20"
    tensors = load_file(folder / "state.safetensors")
    del tensors["since_fired"]
    save_file(tensors, folder / "state.safetensors")
    state = json.loads((folder / "state.json").read_text())
    state["state_sha256"] = hashlib.sha256((folder / "state.safetensors").read_bytes()).hexdigest()
    text = json.dumps(state, indent=1)
    (folder / "state.json").write_text(text)
    latest = {"folder": "step-20", "json_sha256": hashlib.sha256(text.encode()).hexdigest()}
    (ckpt / "latest.json").write_text(json.dumps(latest))
    return "since_fired"


@pytest.mark.parametrize("damage", [_flip_a_bit, _corrupt_latest, _truncate_state, _drop_since_fired])
def test_a_damaged_checkpoint_is_one_clear_line(gsp, synthetic, tmp_path, killed_at_step_20, damage):
    store, _ = synthetic
    work = tmp_path / "sae.partial"
    shutil.copytree(killed_at_step_20, work)
    why = damage(work / "checkpoints")
    before = _snapshot(work)
    r = gsp(*_fit_args(store, tmp_path / "sae", "--resume"))
    line = error_line(r.output)
    assert r.exit_code == 1 and re.search(r"the checkpoint in \S+ is damaged", line) and why in line, line
    assert "cannot be resumed" in line
    assert not (tmp_path / "sae").exists() and _snapshot(work) == before


def test_disk_full_at_a_checkpoint_keeps_the_one_before(gsp, synthetic, small_disk, uninterrupted):
    store, _ = synthetic
    disk = small_disk(100)  # one checkpoint (~60 KiB) fits; a second beside it (before the first goes) does not
    out = disk.path / "sae"
    r = gsp(*_fit_args(store, out))
    line = error_line(r.output)
    assert r.exit_code == 1 and "disk full" in line and "checkpoint at step 40" in line, line
    assert "--resume" in line and "continues from step 20" in line, line
    ckpt = disk.path / "sae.partial" / "checkpoints"
    assert not out.exists() and sorted(p.name for p in ckpt.iterdir()) == ["latest.json", "step-20"]
    disk.resize(4096)  # the user frees some space
    r = gsp(*_fit_args(store, out, "--resume"))
    assert r.exit_code == 0, r.output
    _assert_same_params(uninterrupted(), load_file(out / "params.safetensors"))


def test_disk_full_while_saving_the_sae_publishes_nothing(gsp, synthetic, small_disk, uninterrupted):
    store, _ = synthetic
    disk = small_disk(72)  # the checkpoint at step 20 (~60 KiB) fits; the SAE's files (~20 KiB) beside it do not
    out = disk.path / "sae"
    args = _fit_args(store, out, "--steps", "40")
    r = gsp(*args)
    line = error_line(r.output)
    assert r.exit_code == 1 and "disk full while saving the SAE" in line and "continues from step 20" in line, line
    assert not out.exists()
    disk.resize(4096)
    r = gsp(*args, "--resume")
    assert r.exit_code == 0, r.output
    _assert_same_params(uninterrupted("--steps", "40"), load_file(out / "params.safetensors"))


def _edit_attrs(store: Path, edit) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    edit(meta["attributes"])
    (store / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda a: a["hooks"][0].pop("stats"), "hooks[0].stats"),
        (lambda a: a.update(rows_written=str(a["rows_written"])), "rows_written"),
    ],  # fmt: skip
    ids=["no-stats", "rows_written-a-string"],
)
def test_damaged_store_attributes_are_one_clear_line(gsp, synthetic, tmp_path, edit, key):
    store = tmp_path / "store"
    shutil.copytree(synthetic[0], store)  # never damage the shared store
    _edit_attrs(store, edit)
    r = gsp(*_fit_args(store, tmp_path / "sae"))
    line = error_line(r.output)
    assert r.exit_code == 1 and f"damaged attribute '{key}'" in line and "zarr.json" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


@pytest.mark.parametrize("shard", [f"{H}/activations/c/1/0", "token_ids/c/3"])
def test_an_empty_shard_file_stops_fit_with_its_name(gsp, synthetic, tmp_path, shard):
    store = tmp_path / "store"
    shutil.copytree(synthetic[0], store)
    assert (store / shard).stat().st_size > 0
    (store / shard).write_bytes(b"")
    r = gsp(*_fit_args(store, tmp_path / "sae"))
    line = error_line(r.output)
    assert r.exit_code == 1 and f"shard file {shard} " in line and "is empty (0 bytes)" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


# ------------------------------------------------------------------------------ transcoders
@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """x = sparse codes · E + noise (the MLP's input), y = the same codes · D + x·A (its output): a
    transcoder can learn D from x, a skip transcoder also A. Both stored as hook points of one store."""
    rng = np.random.default_rng(1)
    E, D = rng.standard_normal((48, 32)), rng.standard_normal((48, 40))
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    A = rng.standard_normal((32, 40)) * 0.3
    codes = rng.exponential(1.0, (30_000, 48)) * (rng.random((30_000, 48)) < 3 / 48)
    x = codes @ E * 8 + rng.standard_normal((30_000, 32)) * 0.05
    y = codes @ D * 8 + x @ A
    path = tmp_path_factory.mktemp("paired") / "store"
    write_synthetic_store(path, x, more={"mlp_in": x, "mlp_out": y})
    return path, D + E @ A  # what each code adds to y, through the map and the affine part together


def _transcoder_args(store, out, *extra):
    return ["fit", "--store", store / "L0.mlp_in", "--target-store", store / "L0.mlp_out", "--out", out,
            "--width", 96, "--batch-size", 256, "--steps", 1200, "--lr", "5e-3", "--target-l0", 3,
            "--sparsity-coeff", "0.1", "--log-every", 50, *extra]  # fmt: skip


def _held_out_fvu(store, out):
    """FVU of the saved transcoder's prediction of y from x, on raw rows, computed here in numpy."""
    from pipeline.store import ActivationStore

    s_in, s_out = ActivationStore.open(store / "L0.mlp_in"), ActivationStore.open(store / "L0.mlp_out")
    keep = s_in.read_tokens(0, 4096) != 2
    x, y = s_in.read(0, 4096)[keep].astype(np.float64), s_out.read(0, 4096)[keep].astype(np.float64)
    p = {k: v.double().numpy() for k, v in load_file(out / "params.safetensors").items()}
    pre = x @ p["w_enc"] + p["b_enc"]
    f = np.maximum(pre, 0) * (pre > p["threshold"])
    y_hat = f @ p["w_dec"] + p["b_dec"] + (x @ p["affine_skip_connection"] if "affine_skip_connection" in p else 0)
    return ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), (f != 0).sum(1).mean()


def test_transcoders_learn_the_map_and_the_skip_connection_helps(gsp, paired, tmp_path):
    store, D = paired
    for name, extra in (("plain", ()), ("skip", ("--skip",))):
        r = gsp(*_transcoder_args(store, tmp_path / name, *extra))
        assert r.exit_code == 0, r.output
    plain, l0_plain = _held_out_fvu(store, tmp_path / "plain")
    skip, l0_skip = _held_out_fvu(store, tmp_path / "skip")
    assert 2 <= l0_plain <= 4.5 and 2 <= l0_skip <= 4.5, (l0_plain, l0_skip)
    assert plain < 0.1 and skip < 0.5 * plain, (skip, plain)
    # the plain transcoder's decoder rows point along what each code adds to the output (the best of
    # 96 random directions would reach a median cosine of about 0.36 here)
    w = load_file(tmp_path / "plain" / "params.safetensors")["w_dec"].double().numpy()
    d = D / np.linalg.norm(D, axis=1, keepdims=True)
    cos = (d @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T).max(1)
    assert np.median(cos) > 0.9, cos


def test_a_transcoder_is_saved_in_gemma_scope_2s_transcoder_layout(gsp, paired, tmp_path):
    from pipeline.sae_formats import load_sae

    store, _ = paired
    r = gsp(*_transcoder_args(store, tmp_path / "t", "--skip", "--steps", 50))
    assert r.exit_code == 0, r.output
    p = load_file(tmp_path / "t" / "params.safetensors")
    assert {k: tuple(v.shape) for k, v in p.items()} == {
        "w_enc": (32, 96), "b_enc": (96,), "w_dec": (96, 40), "b_dec": (40,), "threshold": (96,),
        "affine_skip_connection": (32, 40)}  # fmt: skip
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["type"] == "transcoder" and config["affine_connection"] is True
    assert config["architecture"] == "jump_relu"
    assert config["hf_hook_point_in"] == "model.layers.0.pre_feedforward_layernorm.output"
    assert config["hf_hook_point_out"] == "model.layers.0.post_feedforward_layernorm.output"
    loaded = load_sae(str(tmp_path / "t"))
    assert loaded.is_transcoder and (loaded.site, loaded.site_out) == ("mlp_in", "mlp_out")
    assert loaded.training_store.endswith("L0.mlp_in") and loaded.training_target.endswith("L0.mlp_out")


def test_a_killed_transcoder_fit_resumes_to_the_same_weights(paired, tmp_path):
    store, _ = paired
    args = _transcoder_args(store, tmp_path / "ref", "--skip", "--steps", 60, "--checkpoint-every", 20)
    assert gsp_subprocess(*args).returncode == 0
    args = _transcoder_args(store, tmp_path / "run", "--skip", "--steps", 60, "--checkpoint-every", 20)
    assert gsp_subprocess(*args, env={"GSP_FAULT": "fit-checkpoint-saved:2"}).returncode == -9
    r = gsp_subprocess(*args, "--resume")
    assert r.returncode == 0, r.stderr
    a, b = load_file(tmp_path / "ref" / "params.safetensors"), load_file(tmp_path / "run" / "params.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_input_and_target_must_be_the_same_rows(gsp, paired, synthetic, tmp_path):
    store, _ = paired
    r = gsp("fit", "--store", store / "L0.mlp_in", "--target-store", synthetic[0], "--out", tmp_path / "t",
            "--steps", 5)  # fmt: skip
    line = error_line(r.output, "do not hold the same rows")
    assert r.exit_code == 1 and "rows written differ" in line and not (tmp_path / "t").exists()
    r = gsp("fit", "--store", store / "L0.mlp_in", "--skip", "--out", tmp_path / "t", "--steps", 5)
    assert r.exit_code == 1 and "--skip makes a skip transcoder" in error_line(r.output)


def test_a_plain_transcoder_of_equal_widths_reads_input_and_target_apart(gsp, paired, tmp_path):
    """No skip, input and target of one width: nothing in the SAE's shapes tells it from an SAE, so the
    batches must still be split into input and target (here the target is x itself, from another
    hook point, which the transcoder learns to predict)."""
    store, _ = paired
    r = gsp("fit", "--store", store / "L0.mlp_in", "--target-store", store / "L0.resid_post", "--out",
            tmp_path / "t", "--width", 96, "--batch-size", 256, "--steps", 300, "--lr", "5e-3", "--target-l0", 6,
            "--sparsity-coeff", "0.1")  # fmt: skip
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["type"] == "transcoder" and config["hf_hook_point_out"] == "model.layers.0.output"
    assert config["final_train_metrics"]["fvu"] < 0.3


@pytest.mark.parametrize("arch", [["--target-l0", "4"], ["--arch", "topk", "--k", "4"]], ids=["jumprelu", "topk"])
def test_a_matryoshka_fit_with_a_frequency_penalty_resumes_exactly(synthetic, tmp_path, arch):
    """--matryoshka and --freq-penalty through gsp fit: recorded with the SAE, and a fit killed after a
    checkpoint resumes to the same weights as one never stopped."""
    store, _ = synthetic
    common = ["--width", "64", "--steps", "60", "--batch-size", "128", "--checkpoint-every", "20", *arch,
              "--freq-penalty", "0.01"]  # fmt: skip
    whole = ["fit", "--store", store, "--out", tmp_path / "whole", "--matryoshka", "16,32", *common]
    assert gsp_subprocess(*whole).returncode == 0
    killed = ["fit", "--store", store, "--out", tmp_path / "k", "--matryoshka", "16,32", *common]
    assert gsp_subprocess(*killed, env={"GSP_FAULT": "fit-checkpoint-saved:1"}).returncode == -9
    assert gsp_subprocess(*killed, "--resume").returncode == 0
    a, b = load_file(tmp_path / "whole" / "params.safetensors"), load_file(tmp_path / "k" / "params.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["fit_config"]["matryoshka"] == "16,32" and config["fit_config"]["freq_penalty"] == 0.01


def test_a_resumed_fit_keeps_the_default_lr_it_started_with(synthetic, tmp_path, monkeypatch):
    """The default lr is recorded resolved: a resumed fit continues with it even if gsp's default changed."""
    import stages.fit
    from pipeline.train import train_step

    store, _ = synthetic
    args = _fit_args(store, tmp_path / "sae")
    assert gsp_subprocess(*args, env={"GSP_FAULT": "fit-checkpoint-saved:1"}).returncode == -9
    seen = []

    def recording(sae, opt, x, objective, **kw):
        seen.append(opt.param_groups[0]["lr"])
        return train_step(sae, opt, x, objective, **kw)

    monkeypatch.setattr(stages.fit, "train_step", recording)
    first = stages.fit.DEFAULT_LR["jumprelu"]  # the default the killed run started with
    monkeypatch.setattr(stages.fit, "DEFAULT_LR", {"jumprelu": 9e-3, "topk": 9e-3})
    cfg = FitConfig(store=str(store), out=str(tmp_path / "sae"), arch="jumprelu", width=64, steps=60, batch_size=128,
                    checkpoint_every=20, target_l0=4)  # fmt: skip
    run_fit(cfg, resume=True)
    started = dataclasses.replace(cfg, lr=first).schedule
    assert seen == [pytest.approx(started.at(s)[0]) for s in range(20, 60)]
    saved = json.loads((tmp_path / "sae" / "config.json").read_text())["fit_config"]
    assert saved["lr"] == first and saved["lr_warmup_steps"] == 3 and saved["sparsity_warmup_steps"] == 12


def test_a_checkpoint_gives_back_the_state_it_saved(tmp_path):
    """Weights, Adam's state (its step counters' dtype and device included), counters and position,
    through Adam's own load_state_dict."""
    from pipeline import checkpoint
    from pipeline.loader import LoaderState
    from pipeline.sae import SAE, Objective
    from pipeline.train import TrainState, train_step

    def state(seed):
        return TrainState.fresh(SAE(16, 32, skip=True).init_gemma_scope(torch.Generator().manual_seed(seed)), 1e-3)

    a = state(0)
    x = torch.randn(64, 16)
    for _ in range(3):
        train_step(a.sae, a.opt, x, Objective(target_l0=4), lam=1e-3, since_fired_F=a.since_fired_F,
                   dead_tokens=100, sparse=False)  # fmt: skip
    a.step, a.loader, a.density = 3, LoaderState([[1, 96], [0, 32]]), 0.25
    checkpoint.save(tmp_path, a, {"width": 32})
    b = state(1)
    checkpoint.load(tmp_path, b, lambda saved: [] if saved == {"width": 32} else ["other"])
    assert (b.step, b.loader, b.density) == (3, a.loader, 0.25)
    torch.testing.assert_close(b.since_fired_F, a.since_fired_F, rtol=0, atol=0)
    for name in a.sae.params:
        torch.testing.assert_close(getattr(b.sae, name), getattr(a.sae, name), rtol=0, atol=0)
    sa, sb = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key, t in sa[i].items():
            assert (sb[i][key].dtype, sb[i][key].device) == (t.dtype, t.device), key
            torch.testing.assert_close(sb[i][key], t, rtol=0, atol=0)
    with pytest.raises(GspError, match="trained with other parameters"):
        checkpoint.load(tmp_path, state(2), lambda saved: ["width: checkpoint has 32, asked 64"])


def test_a_failure_inside_fit_tears_the_process_group_down(gsp, synthetic, tmp_path, monkeypatch):
    """Under torchrun a failing fit used to leave its process group up: a real one-process gloo group
    stands in for torchrun's, and the loader fails."""
    import torch.distributed as tdist

    from pipeline import dist
    from pipeline.loader import ShuffledLoader

    def setup_group(device):
        tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
        return dist.Group(0, 2, torch.device("cpu"))  # as torchrun's rank 0 of two sees it

    def failing_batches(self):
        raise GspError("shard 3 of the store is damaged")
        yield

    monkeypatch.setattr(dist, "setup", setup_group)
    monkeypatch.setattr(ShuffledLoader, "__iter__", failing_batches)
    store, _ = synthetic
    try:
        r = gsp(*_fit_args(store, tmp_path / "sae"))
        assert r.exit_code == 1 and "shard 3 of the store is damaged" in error_line(r.output)
        assert not tdist.is_initialized()
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def _record_read_gains(path, gains) -> None:
    from pipeline.store import StoreWriter

    w = StoreWriter.open(path)
    w.update(hooks=tuple(dataclasses.replace(h, read_gains=tuple(float(v) for v in gains)) for h in w.meta.hooks))


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_weighting_reads_is_a_plain_fit_on_the_weighted_activations(synthetic, tmp_path, arch):
    """A fit on a store with read gains g (the default there: --weighting reads) is a plain fit on a store
    holding x∘g, with g folded into the saved SAE: by hand, that SAE with SAE.fold_input_weights(g)."""
    from pipeline.sae_formats import load_sae
    from pipeline.store import ActivationStore

    x = np.concatenate([rows for rows, _ in ActivationStore.open(synthetic[0]).ordinary_rows(10**9, 8192)])
    g = np.random.default_rng(1).uniform(0.2, 3.0, x.shape[1])
    write_synthetic_store(tmp_path / "a", x)
    _record_read_gains(tmp_path / "a", g)
    write_synthetic_store(tmp_path / "b", (x * g).astype(np.float32))
    common = dict(arch=arch, width=64, steps=30, batch_size=128, target_l0=4, k=4)
    run_fit(FitConfig(store=str(tmp_path / "a"), out=str(tmp_path / "sa"), **common))
    run_fit(FitConfig(store=str(tmp_path / "b"), out=str(tmp_path / "sb"), **common))
    assert json.loads((tmp_path / "sa" / "config.json").read_text())["fit_config"]["weighting"] == "reads"
    assert json.loads((tmp_path / "sb" / "config.json").read_text())["fit_config"]["weighting"] == "none"
    a = load_sae(str(tmp_path / "sa")).sae
    b = load_sae(str(tmp_path / "sb")).sae.fold_input_weights(torch.tensor(g, dtype=torch.float32))
    for name in ("w_enc", "b_enc", "w_dec", "b_dec", "threshold"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-3, atol=1e-5, msg=name)


def test_weighting_reads_needs_an_sae_and_read_gains(gsp, synthetic, paired, tmp_path):
    r = gsp("fit", "--store", str(synthetic[0]), "--weighting", "reads", "--steps", "5", "--out", str(tmp_path / "s"))
    assert "records no read gains" in error_line(r.output) and r.exit_code != 0
    assert not (tmp_path / "s").exists()
    store, _ = paired
    r = gsp("fit", "--store", str(store / "L0.mlp_in"), "--target-store", str(store / "L0.mlp_out"),
            "--weighting", "reads", "--steps", "5")  # fmt: skip
    assert "--weighting reads is for SAEs" in error_line(r.output) and r.exit_code != 0
