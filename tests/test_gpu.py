"""The CUDA path (skipped without CUDA; run by benchmarks/gpu_check.sh on a GPU machine)."""

import numpy as np
import pytest
import torch
from conftest import direct_site, tiny_harvest_args
from transformers import AutoModelForCausalLM

from pipeline.store import ActivationStore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("site, workers", [("resid_post", "threads"), ("attn_out", "processes")])
def test_cuda_harvest_matches_direct_cuda_forward(gsp, tiny_model, corpus, tmp_path, site, workers):
    store = tmp_path / "s"
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store, site=site, device="cuda", workers=workers))
    assert r.exit_code == 0, r.output
    s = ActivationStore.open(store)
    assert s.meta.compute.to_json() == {"device": "cuda", "dtype": "bfloat16"}
    ids = s.read_tokens(0, s.rows_written).reshape(-1, 32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).cuda().eval()
    ref = direct_site(model, torch.from_numpy(ids).cuda(), 1, site).float().cpu().numpy().reshape(s.rows_written, -1)
    np.testing.assert_allclose(s.read(0, s.rows_written), ref, rtol=1e-2, atol=1e-3)


def test_resuming_a_cuda_store_on_cpu_is_refused(gsp, tiny_model, corpus, tmp_path):
    import zarr

    store = tmp_path / "s"
    assert gsp(*tiny_harvest_args(tiny_model, corpus, store, device="cuda")).exit_code == 0
    zarr.open_group(str(store), mode="r+").attrs.update({"complete": False, "rows_written": 256})  # as if killed
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store, device="cpu"))
    assert r.exit_code == 1 and "computes with" in r.output


def test_cuda_fit_matches_the_format_and_learns(gsp, tmp_path):
    from pipeline.tiny import write_synthetic_store

    rng = np.random.default_rng(0)
    write_synthetic_store(tmp_path / "store", rng.standard_normal((16384, 32)).astype(np.float32))
    for arch in ("jumprelu", "topk"):
        out = tmp_path / arch
        r = gsp("fit", "--store", tmp_path / "store", "--out", out, "--arch", arch, "--width", 64, "--k", 8,
                "--steps", 100, "--batch-size", 256, "--device", "cuda")  # fmt: skip
        assert r.exit_code == 0, r.output
        from safetensors.torch import load_file

        p = load_file(out / "params.safetensors")
        assert p["w_enc"].shape == (32, 64) and p["w_enc"].dtype == torch.float32


def test_cuda_evaluate_agrees_with_cpu(gsp, tmp_path, monkeypatch):
    """The smoke setup evaluated on CUDA (bfloat16 model) and on the CPU (float32) gives the same figures."""
    import json

    monkeypatch.setenv("GSP_CACHE", str(tmp_path / "cache"))
    r = gsp("evaluate", "--smoke-test", "--device", "cuda", "--reports", tmp_path / "cuda")
    assert r.exit_code == 0, r.output
    r = gsp("evaluate", "--smoke-test", "--device", "cpu", "--reports", tmp_path / "cpu")
    assert r.exit_code == 0, r.output
    gpu, cpu = (json.loads(next((tmp_path / d).glob("*.json")).read_text()) for d in ("cuda", "cpu"))
    assert gpu["model"]["device"].startswith("cuda") and gpu["model"]["dtype"] == "bfloat16"
    assert gpu["reconstruction"]["fvu"] == pytest.approx(cpu["reconstruction"]["fvu"], rel=1e-3)
    assert gpu["delta_loss"]["ce_clean"] == pytest.approx(cpu["delta_loss"]["ce_clean"], rel=2e-2)
