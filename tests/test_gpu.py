"""The CUDA path (skipped without CUDA; run by benchmarks/gpu_check.sh on a GPU machine)."""

import numpy as np
import pytest
import torch
from conftest import tiny_harvest_args
from test_harvest import direct_site
from transformers import AutoModelForCausalLM

from pipeline.store import ActivationStore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("site, workers", [("resid_post", "threads"), ("attn_out", "processes")])
def test_cuda_harvest_matches_direct_cuda_forward(gsp, tiny_model, corpus, tmp_path, site, workers):
    store = tmp_path / "s"
    r = gsp(*tiny_harvest_args(tiny_model, corpus, store, site=site, device="cuda", workers=workers))
    assert r.exit_code == 0, r.output
    s = ActivationStore.open(store)
    assert s.attrs["compute"] == {"device": "cuda", "dtype": "bfloat16"}
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
