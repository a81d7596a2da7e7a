"""gsp fit with lists: many SAEs from one read of the store, each the SAE it would be when fitted alone."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import error_line, gsp_subprocess
from safetensors.torch import load_file

from pipeline.config import build_config, build_values
from pipeline.errors import GspError
from pipeline.tiny import write_synthetic_store
from stages.fit import FitConfig, sweep


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Tokens made of ~3 of 48 directions in 24 dims, in a real store."""
    rng = np.random.default_rng(1)
    true = rng.standard_normal((48, 24))
    mags = rng.exponential(1.0, (12_000, 48)) * (rng.random((12_000, 48)) < 3 / 48)
    path = tmp_path_factory.mktemp("sweep") / "store"
    write_synthetic_store(path, (mags @ true * 5 + 1).astype(np.float32))
    return path


COMMON = ["--steps", "60", "--batch-size", "128", "--checkpoint-every", "20", "--log-every", "10"]


def _same(a, b) -> None:
    pa, pb = load_file(a / "params.safetensors"), load_file(b / "params.safetensors")
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0)


def _values(**flags) -> dict:
    return build_values(FitConfig, None, {"store": "s", **flags})


def test_lists_expand_to_every_combination_named_by_what_varies():
    cfgs = sweep(_values(width="64,128", target_l0="3,6"))
    assert [(c.width, c.target_l0) for c in cfgs] == [(64, 3.0), (64, 6.0), (128, 3.0), (128, 6.0)]
    assert [c.out_dir.name for c in cfgs] == [f"s_jumprelu_{w}_target_l0_{t}" for w in (64, 128) for t in (3, 6)]
    # with --out, the SAEs are folders inside it
    cfgs = sweep(_values(out="runs", lr="1e-3,0.00175"))
    assert [str(c.out_dir) for c in cfgs] == ["runs/jumprelu_4096_lr_0.001", "runs/jumprelu_4096_lr_0.00175"]
    # one value each: one SAE where it always went
    (one,) = sweep(_values(width="64", out="x"))
    assert one.width == 64 and one.out == "x"


def test_options_of_the_other_architecture_do_not_multiply_a_sweep():
    cfgs = sweep(_values(arch="jumprelu,topk", target_l0="20,60", k="20,60", width="256"))
    got = sorted((c.arch, c.target_l0, c.k) for c in cfgs)
    default_k = FitConfig.__dataclass_fields__["k"].default
    assert got == [("jumprelu", 20.0, default_k), ("jumprelu", 60.0, default_k), ("topk", None, 20), ("topk", None, 60)]
    names = sorted(c.out_dir.name for c in cfgs)
    assert names == ["s_jumprelu_256_target_l0_20", "s_jumprelu_256_target_l0_60", "s_topk_256_k_20", "s_topk_256_k_60"]


def test_both_architectures_sweep_the_frequency_penalty_and_topk_reads_the_bandwidth_only_with_it():
    cfgs = sweep(_values(arch="jumprelu,topk", freq_penalty="0,0.001", width="256"))
    assert sorted((c.arch, c.freq_penalty) for c in cfgs) == [(a, f) for a in ("jumprelu", "topk") for f in (0, 0.001)]
    # without the penalty a TopK SAE does not read --bandwidth: one SAE, at the default
    (one,) = sweep(_values(arch="topk", bandwidth="0.001,0.01", width="256"))
    assert one.bandwidth == FitConfig.__dataclass_fields__["bandwidth"].default
    cfgs = sweep(_values(arch="topk", bandwidth="0.001,0.01", freq_penalty="0.01", width="256"))
    assert [(c.bandwidth, c.out_dir.name) for c in cfgs] == [
        (0.001, "s_topk_256_bandwidth_0.001"), (0.01, "s_topk_256_bandwidth_0.01")
    ]  # fmt: skip


def test_a_yaml_list_sweeps_and_one_value_configs_refuse_lists(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("fit:\n  width: [64, 128]\n  k: 8\n")
    values = build_values(FitConfig, str(config), {"store": "s"})
    assert values["width"] == [64, 128] and [c.width for c in sweep(values)] == [64, 128]
    with pytest.raises(GspError, match="width takes one value here, got 64, 128"):
        build_config(FitConfig, str(config), {"store": "s"})
    assert build_config(FitConfig, None, {"store": "s", "width": "96"}).width == 96


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "64,abc"], "--width takes int values, or a list like 20,60,120; got 'abc'"),
        (["--width", "64,"], "--width takes a value, or a list like 20,60,120"),
        (["--arch", "jumprelu,relu"], "--arch is 'relu'; choose one of jumprelu, topk"),
        (["--width", "8,64", "--arch", "topk", "--k", "16"], "--k 16 is more than --width 8"),
        (["--width", "64,128", "--smoke-test"], "--smoke-test fits one SAE"),
    ],
)
def test_bad_lists_are_one_clear_line(gsp, store, tmp_path, args, message):
    r = gsp("fit", "--store", store, "--out", tmp_path / "s", *COMMON, *args)
    assert r.exit_code == 1 and message in error_line(r.output), r.output
    assert not (tmp_path / "s").exists()


def test_gsp_run_refuses_a_list_in_its_fit_section(gsp, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("fit:\n  width: [64, 128]\n")
    r = gsp("run", "--config", config)
    assert r.exit_code == 1 and "width takes one value here" in error_line(r.output), r.output


def test_each_sae_of_a_sweep_is_the_sae_fitted_alone(gsp, store, tmp_path):
    r = gsp("fit", "--store", store, "--out", tmp_path / "sweep", "--arch", "jumprelu,topk", "--width", "32,64",
            "--target-l0", "4", "--k", "4", *COMMON)  # fmt: skip
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())  # (beside their lock files)
    assert names == ["jumprelu_32", "jumprelu_64", "topk_32", "topk_64"]
    for arch, width in (("jumprelu", 64), ("topk", 32)):
        alone = tmp_path / f"alone_{arch}"
        r = gsp("fit", "--store", store, "--out", alone, "--arch", arch, "--width", width, "--target-l0", "4",
                "--k", "4", *COMMON)  # fmt: skip
        assert r.exit_code == 0, r.output
        _same(alone, tmp_path / "sweep" / f"{arch}_{width}")
        a = json.loads((alone / "config.json").read_text())
        b = json.loads((tmp_path / "sweep" / f"{arch}_{width}" / "config.json").read_text())
        assert a["final_train_metrics"] == {**b["final_train_metrics"], "tok_s": a["final_train_metrics"]["tok_s"]}


def test_a_killed_sweep_resumes_each_sae_from_its_own_checkpoint(store, tmp_path):
    """Killed at its second checkpoint (step 40); then one SAE's checkpoint is replaced by an older one
    (step 20, from that SAE fitted alone and killed): --resume reads the stream from step 20, the other
    SAE sits out the batches it has seen, and both end as fits never stopped."""
    sweep_args = ["fit", "--store", store, "--width", "32,48", "--target-l0", "4", *COMMON]
    assert gsp_subprocess(*sweep_args, "--out", tmp_path / "ref").returncode == 0
    killed = [*sweep_args, "--out", tmp_path / "run"]
    assert gsp_subprocess(*killed, env={"GSP_FAULT": "fit-checkpoint-saved:2"}).returncode == -9
    for w in (32, 48):
        latest = tmp_path / "run" / f"jumprelu_{w}.partial" / "checkpoints" / "latest.json"
        assert json.loads(latest.read_text())["folder"] == "step-40"
    behind = tmp_path / "run" / "jumprelu_48"
    shutil.rmtree(behind.with_name(behind.name + ".partial"))
    alone = ["fit", "--store", store, "--width", "48", "--target-l0", "4", *COMMON, "--out", behind]
    assert gsp_subprocess(*alone, env={"GSP_FAULT": "fit-checkpoint-saved:1"}).returncode == -9
    r = gsp_subprocess(*killed, "--resume")
    assert r.returncode == 0, r.stderr
    assert "jumprelu_32: resuming from step 40" in r.stderr and "jumprelu_48: resuming from step 20" in r.stderr
    for w in (32, 48):
        _same(tmp_path / "ref" / f"jumprelu_{w}", tmp_path / "run" / f"jumprelu_{w}")


def test_a_sweep_killed_while_publishing_is_finished_by_resume(gsp, store, tmp_path):
    args = ["fit", "--store", store, "--out", tmp_path / "s", "--width", "32,48", "--target-l0", "4", *COMMON]
    assert gsp_subprocess(*args, env={"GSP_FAULT": "fit-published:1"}).returncode == -9
    assert (tmp_path / "s" / "jumprelu_32" / "config.json").is_file()  # the first is out, the second not yet
    assert not (tmp_path / "s" / "jumprelu_48").exists()
    r = gsp(*args)
    assert r.exit_code == 1 and "already holds an SAE" in error_line(r.output)
    r = gsp(*args, "--resume")
    assert r.exit_code == 0 and "finished saving" in r.output, r.output
    assert (tmp_path / "s" / "jumprelu_48" / "params.safetensors").is_file()
    r = gsp(*args, "--resume")  # nothing left to do
    assert r.exit_code == 1 and "already holds an SAE" in error_line(r.output)


def test_a_diverging_sae_stops_alone_and_the_others_are_saved(gsp, store, tmp_path):
    out = tmp_path / "s"
    r = gsp("fit", "--store", store, "--out", out, "--width", "32", "--target-l0", "4", "--lr", "1e-3,1e30", *COMMON)
    line = error_line(r.output)
    assert r.exit_code == 1 and "1 of the sweep's 2 SAEs stopped early" in line and "lr_1e+30" in line, line
    assert (out / "jumprelu_32_lr_0.001" / "params.safetensors").is_file()
    assert not (out / "jumprelu_32_lr_1e+30").exists()


def test_saes_of_one_sweep_must_share_the_stream(store, tmp_path):
    from stages.fit import run_sweep

    a = FitConfig(store=str(store), out=str(tmp_path / "a"), width=32, steps=10, batch_size=128)
    with pytest.raises(GspError, match="must agree on seed"):
        run_sweep([a, FitConfig(**{**a.__dict__, "out": str(tmp_path / "b"), "seed": 1})])
    with pytest.raises(GspError, match="must agree on steps"):
        run_sweep([a, FitConfig(**{**a.__dict__, "out": str(tmp_path / "b"), "steps": 20})])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
