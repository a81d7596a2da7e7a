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


def _loader_store(tmp_path):
    from pipeline.tiny import write_synthetic_store

    x = np.random.default_rng(0).standard_normal((8192, 48)).astype(np.float32) * 30
    write_synthetic_store(tmp_path / "s", x)  # bfloat16 bits on disk
    return ActivationStore.open(tmp_path / "s")


def test_cuda_loader_serves_the_cpu_loaders_batches(tmp_path):
    """On CUDA the rows leave the host as bfloat16 bits and are decoded and scaled on the device:
    the same float32 values as the CPU loader's, bit for bit, batch after batch (window reuse included)."""
    import itertools

    from pipeline.loader import ShuffledLoader

    store = _loader_store(tmp_path)
    kw = dict(seed=4, buffer_mib=0.5, lanes=4, scales=(0.37,))
    cpu = [b.clone() for b in itertools.islice(ShuffledLoader(store, 256, **kw), 60)]
    gpu = [b.cpu() for b in itertools.islice(ShuffledLoader(store, 256, device="cuda", **kw), 60)]
    for a, b in zip(cpu, gpu, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_the_steady_state_cuda_step_never_waits_for_the_device(arch):
    """No host sync in the fit step (dead-latent bookkeeping, the AuxK count, the finite check)."""
    from pipeline import dist
    from pipeline.sae import SAE, Objective
    from pipeline.train import NonFinite, train_step

    dev = torch.device("cuda")
    sae = SAE(64, 512, arch=arch, k=16).init_gemma_scope(torch.Generator().manual_seed(0)).to(dev)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.0, 0.999))
    since = torch.zeros(512, dtype=torch.int64, device=dev)
    since[::3] = 10**6  # some latents dead: TopK's auxiliary loss runs
    x = torch.randn(1024, 64, device=dev)
    finite = NonFinite(dev)
    kw = dict(lam=1e-3, since_fired_F=since, dead_tokens=50_000, sparse=False)
    train_step(sae, opt, x, Objective(target_l0=16), **kw)  # the first step creates Adam's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(5):
            loss = train_step(sae, opt, x, Objective(target_l0=16), **kw)
            finite.update(i + 1, loss.total)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert finite.first_bad(dist.Group(device=dev)) is None


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_a_cuda_fp32_step_matches_the_cpu_step(arch):
    from pipeline.sae import SAE, Objective
    from pipeline.train import train_step

    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(1))
    params = []
    for dev in ("cpu", "cuda"):
        torch.set_float32_matmul_precision("highest")
        sae = SAE(32, 128, arch=arch, k=8).init_gemma_scope(torch.Generator().manual_seed(0)).to(dev)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.0, 0.999))
        since = torch.zeros(128, dtype=torch.int64, device=dev)
        for _ in range(10):
            train_step(sae, opt, x.to(dev), Objective(target_l0=8), lam=1e-3, since_fired_F=since,
                       dead_tokens=2048, sparse=False)  # fmt: skip
        params.append({k: v.detach().cpu() for k, v in sae.named_parameters()})
    for k in params[0]:
        torch.testing.assert_close(params[1][k], params[0][k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("fused", [False, True])
def test_a_checkpoint_restores_adams_state_where_a_cuda_optimiser_keeps_it(tmp_path, fused):
    """Adam's step counters come back where this optimiser keeps them (on the CPU for plain Adam, on the
    GPU for fused), through its own load_state_dict, and the next step equals the uninterrupted one."""
    from pipeline import checkpoint
    from pipeline.loader import LoaderState
    from pipeline.sae import SAE, Objective
    from pipeline.train import TrainState, train_step

    dev = torch.device("cuda")

    def state():
        sae = SAE(16, 64).init_gemma_scope(torch.Generator().manual_seed(0)).to(dev)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.0, 0.999), fused=fused)
        return TrainState(sae, opt, torch.zeros(64, dtype=torch.int64, device=dev), loader=LoaderState())

    x = torch.randn(256, 16, device=dev)
    kw = dict(lam=1e-3, dead_tokens=10**6, sparse=False)
    a = state()
    for _ in range(3):
        train_step(a.sae, a.opt, x, Objective(target_l0=4), since_fired_F=a.since_fired_F, **kw)
    a.step = 3
    checkpoint.save(tmp_path, a, {})
    b = state()
    checkpoint.load(tmp_path, b, lambda saved: [])
    for i, per_param in a.opt.state_dict()["state"].items():
        for key, t in per_param.items():
            got = b.opt.state_dict()["state"][i][key]
            assert (got.device, got.dtype) == (t.device, t.dtype), key
    for s in (a, b):
        train_step(s.sae, s.opt, x, Objective(target_l0=4), since_fired_F=s.since_fired_F, **kw)
    torch.testing.assert_close(b.sae.w_dec, a.sae.w_dec, rtol=0, atol=0)
