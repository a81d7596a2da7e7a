"""gsp under torchrun: 2 gloo processes on the CPU give what one process gives with the same global batch."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, gsp_subprocess
from safetensors.torch import load_file

from pipeline.tiny import write_synthetic_store


def torchrun(n: int, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "stages"]
    return subprocess.run(
        [*cmd, *map(str, args)],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8192, 32)) * 20 + rng.standard_normal(32) * 5).astype(np.float32)
    path = tmp_path_factory.mktemp("dist") / "store"
    write_synthetic_store(path, x)
    return path


def _fit(store, out, *extra) -> list[str]:
    return ["fit", "--store", store, "--out", out, "--width", 64, "--steps", 30, "--batch-size", 256,
            "--log-every", 5, "--device", "cpu", *extra]  # fmt: skip


def _params(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "params.safetensors")


_TOPK_FREQ_MATRYOSHKA = (
    "--arch topk --k 6 --freq-penalty 0.05 --freq-scale 0.05 --freq-form hinge --bandwidth 0.05 --matryoshka 16"
).split()


@pytest.mark.parametrize(
    "arch",
    [
        ["--arch", "jumprelu", "--target-l0", "6", "--sparsity-coeff", "0.1"],
        ["--arch", "topk", "--k", "6"],
        _TOPK_FREQ_MATRYOSHKA,
    ],
    ids=["jumprelu-target-l0", "topk", "topk-frequency-penalty-matryoshka"],
)
def test_two_processes_fit_what_one_process_fits(store, tmp_path, arch):
    one = gsp_subprocess(*_fit(store, tmp_path / "one", *arch), env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *_fit(store, tmp_path / "two", *arch))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _params(tmp_path / "one"), _params(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=2e-3, atol=2e-4, msg=k)
    assert "2 processes, 128 rows each of every 256-row batch" in two.stderr


def test_a_two_process_checkpoint_resumes_in_one_process(store, tmp_path):
    args = _fit(store, tmp_path / "run", "--checkpoint-every", 10, "--arch", "topk", "--k", "6")
    killed = torchrun(2, *args, env={"GSP_FAULT": "fit-checkpoint-saved:2"})
    assert killed.returncode != 0  # rank 0 died right after its second checkpoint (step 20)
    resumed = gsp_subprocess(*args, "--resume", env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 20" in resumed.stderr
    straight = gsp_subprocess(*_fit(store, tmp_path / "straight", "--arch", "topk", "--k", "6"))
    assert straight.returncode == 0, straight.stderr
    a, b = _params(tmp_path / "straight"), _params(tmp_path / "run")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=2e-3, atol=2e-4, msg=k)


def test_the_batch_and_the_lanes_must_split_evenly(store, tmp_path):
    r = torchrun(2, "fit", "--store", store, "--out", tmp_path / "odd", "--batch-size", 252, "--steps", 2)
    assert r.returncode != 0 and "--batch-size 252 must be a multiple of the loader's lanes (8)" in r.stderr
    r = torchrun(2, "fit", "--store", store, "--out", tmp_path / "odd", "--lanes", 3, "--steps", 2)
    assert r.returncode != 0 and "2 processes cannot share 3 loader lanes" in r.stderr
    assert "loader.py" not in r.stderr  # a one-line error from gsp (torchrun adds its own traceback)


def test_two_processes_evaluate_what_one_process_evaluates(tiny_fit, tmp_path):
    import json

    args = ["evaluate", "--sae", tiny_fit / "sae", "--store", tiny_fit / "store", "--batch-size", 100,
            "--delta-tokens", 256, "--lm-batch-tokens", 64, "--device", "cpu"]  # fmt: skip
    one = gsp_subprocess(*args, "--reports", tmp_path / "one", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *args, "--reports", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(list((tmp_path / "two").glob("*.json"))) == 1  # one report, from rank 0
    a, b = (json.loads(next((tmp_path / d).glob("*.json")).read_text()) for d in ("one", "two"))
    assert b["timing"]["processes"] == 2 and a["timing"]["processes"] == 1
    for key in ("tokens", "l0", "fvu", "mse", "cosine", "dead_features", "dense_features", "l0_histogram"):
        assert b["reconstruction"][key] == pytest.approx(a["reconstruction"][key], rel=1e-9), key
    for key in (
        "predictions",
        "contexts",
        "ce_clean",
        "ce_spliced",
        "ce_zero_ablated",
        "delta_loss",
        "kl_clean_spliced",
    ):
        assert b["delta_loss"][key] == pytest.approx(a["delta_loss"][key], rel=1e-6), key


def _same_store(a_path, b_path):
    """Every hook point of the two stores holds the same rows and statistics; their row count."""
    from pipeline.store import ActivationStore

    hooks_a, hooks_b = ActivationStore.open_all(a_path), ActivationStore.open_all(b_path)
    assert [h.hook.name for h in hooks_a] == [h.hook.name for h in hooks_b]
    for a, b in zip(hooks_a, hooks_b, strict=True):
        assert a.complete and b.complete and a.rows_written == b.rows_written > 0
        np.testing.assert_array_equal(a.read(0, a.rows_written), b.read(0, b.rows_written))
        np.testing.assert_array_equal(a.read_tokens(0, a.rows_written), b.read_tokens(0, b.rows_written))
        assert a.hook.stats.count == b.hook.stats.count
        np.testing.assert_allclose(a.hook.stats.sum, b.hook.stats.sum, rtol=1e-12)
    return hooks_a[0].rows_written


def test_two_processes_harvest_the_store_one_process_harvests(tiny_model, corpus, tmp_path):
    """Several hook points (two layers × two sites) from one forward pass, in 2 processes."""
    from conftest import tiny_harvest_args

    hooks = {"layer": "1,2", "site": "resid_post,mlp_in"}
    one = gsp_subprocess(*tiny_harvest_args(tiny_model, corpus, tmp_path / "one", **hooks))
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "harvest", *tiny_harvest_args(tiny_model, corpus, tmp_path / "two", **hooks)[1:], "--device",
                   "cpu")  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes wrote 1,024 rows" in two.stderr + two.stdout
    assert _same_store(tmp_path / "one", tmp_path / "two") == 1024

    # killed: each process dies right after claiming its first shard; the rerun finishes the rest
    args = tiny_harvest_args(tiny_model, corpus, tmp_path / "killed", **hooks)[1:]
    killed = torchrun(2, "harvest", *args, "--device", "cpu", env={"GSP_FAULT": "shard-committed:1"})
    assert killed.returncode != 0
    alone = gsp_subprocess("harvest", *args)  # one process would redo the others' shards: refused
    assert (
        alone.returncode == 1 and "started by 2 processes; resume it with torchrun --nproc-per-node 2" in alone.stderr
    )
    resumed = torchrun(2, "harvest", *args, "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_store(tmp_path / "one", tmp_path / "killed")
    three = torchrun(3, "harvest", *args, "--device", "cpu")
    assert three.returncode == 0 and "already complete" in three.stderr + three.stdout


def test_two_processes_stop_where_the_corpus_ends(tiny_model, tmp_path):
    from conftest import tiny_harvest_args

    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"Document {i} has a few words in it, and then some more." for i in range(40)))
    one = gsp_subprocess(*tiny_harvest_args(tiny_model, small, tmp_path / "one", tokens=100_000))
    assert one.returncode == 0, one.stderr
    two = torchrun(
        2, "harvest", *tiny_harvest_args(tiny_model, small, tmp_path / "two", tokens=100_000)[1:], "--device", "cpu"
    )
    assert two.returncode == 0, two.stderr[-3000:]
    rows = _same_store(tmp_path / "one", tmp_path / "two")
    assert 0 < rows < 100_000


def test_process_workers_are_refused_under_torchrun(tiny_model, corpus, tmp_path):
    from conftest import tiny_harvest_args

    args = tiny_harvest_args(tiny_model, corpus, tmp_path / "s")[1:]
    r = torchrun(2, "harvest", *args, "--device", "cpu", "--workers", "processes")
    assert r.returncode != 0 and "--workers processes runs one process only" in r.stderr
    assert not (tmp_path / "s").exists()


def test_a_loss_that_goes_non_finite_in_one_process_stops_the_sae_in_all(tmp_path):
    """One row too large for float32 once scaled reaches one process's share of one batch first: the
    processes decide together, so each SAE of the sweep stops at one step, said once, and none is
    reported saved (before, each process stopped it at its own step and the all-reduces went astray)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8192, 32)) * 20).astype(np.float32)
    write_synthetic_store(tmp_path / "plain", x)
    x[1000] = 1e30  # its square overflows float32
    write_synthetic_store(tmp_path / "huge", x)
    # the statistics of the plain rows (as if the harvest's had missed the huge one): the row stays huge once scaled
    shutil.copy(tmp_path / "plain" / "zarr.json", tmp_path / "huge" / "zarr.json")
    r = torchrun(2, *_fit(tmp_path / "huge", tmp_path / "sweep", "--arch", "topk", "--k", "8,16", "--steps", "40"))
    assert r.returncode != 0
    out = r.stdout + r.stderr
    stops = re.findall(r"(topk_64_k_\d+): the loss became NaN or infinite at step ([\d,]+)", out)
    named = sorted({name for name, _ in stops})
    assert named == ["topk_64_k_16", "topk_64_k_8"], out[-3000:]
    for name in named:  # each stop said once (warned by rank 0, then in the final error of each process)
        steps = {step for n, step in stops if n == name}
        assert len(steps) == 1, (name, stops)
    assert out.count("warning: topk_64_k_8:") == 1
    assert "2 of the sweep's 2 SAEs stopped early, none was saved" in out
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").glob("*/params.safetensors"))
