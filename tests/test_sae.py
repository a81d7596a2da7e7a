"""The SAE math against hand computations: straight-through gradients, TopK, init, scale and weight folding."""

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.sae import SAE, heaviside, jumprelu


def test_jumprelu_and_step_gradients_match_the_formulas():
    eps = 0.001
    theta = torch.tensor([0.001, 0.002, 0.0005], requires_grad=True)
    # rows chosen so that some z fall inside the kernel window |z − θ| < ε/2 and some outside
    z = torch.tensor([[0.0012, 0.0019, 0.0100], [0.0004, 0.0030, 0.0007]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (jumprelu(z, theta, eps) * g).sum().backward()
    zn, tn, gn = z.detach().numpy(), theta.detach().numpy(), g.numpy()
    inside = np.abs((zn - tn) / eps) < 0.5
    np.testing.assert_allclose(z.grad.numpy(), gn * (zn > tn))
    np.testing.assert_allclose(theta.grad.numpy(), (gn * -(tn / eps) * inside).sum(0), rtol=1e-6)
    # by hand for column 0: only z=0.0012 is inside (|0.0002| < 0.0005): −(0.001/0.001)·1 = −1
    assert abs(theta.grad[0].item() + 1.0) < 1e-6

    theta.grad = None
    z.grad = None
    (heaviside(z, theta, eps) * g).sum().backward()
    assert z.grad is None or not z.grad.any()  # the L0 term moves θ only
    np.testing.assert_allclose(theta.grad.numpy(), (gn * -(1 / eps) * inside).sum(0), rtol=1e-6)
    np.testing.assert_array_equal(jumprelu(z, theta, eps).detach().numpy(), zn * (zn > tn))


def test_topk_keeps_exactly_k():
    sae = SAE(8, 32, arch="topk", k=5).init_gemma_scope(torch.Generator().manual_seed(0))
    sae.b_enc.data.fill_(10.0)  # all pre-activations positive: exactly k survive the ReLU
    f, pre = sae.encode(torch.randn(50, 8))
    assert ((f != 0).sum(1) == 5).all()
    kept = torch.where(f != 0, pre, torch.full_like(pre, float("inf"))).min(1).values
    dropped = torch.where(f == 0, pre, torch.full_like(pre, -float("inf"))).max(1).values
    assert (kept >= dropped).all()


def test_gemma_scope_init():
    sae = SAE(16, 64).init_gemma_scope(torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.w_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.w_enc, sae.w_dec.T)
    assert (sae.threshold == 0.001).all() and not sae.b_enc.any() and not sae.b_dec.any()


def _random_sae(arch: str, g: torch.Generator) -> SAE:
    """Gemma Scope's init with random biases and thresholds: 16 → 64, k 8."""
    sae = SAE(16, 64, arch=arch, k=8).init_gemma_scope(g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=g)
        sae.b_dec.normal_(0, 0.5, generator=g)
        sae.threshold.uniform_(0.0, 0.2, generator=g)
    return sae


def test_folding_the_scale_gives_the_same_sae_on_raw_inputs():
    for arch in ("jumprelu", "topk"):
        g = torch.Generator().manual_seed(1)
        sae = _random_sae(arch, g)
        x = torch.randn(40, 16, generator=g) * 300.0
        s = 1 / x.norm(dim=1).pow(2).mean().sqrt().item()
        scaled = sae(x * s)
        raw = sae.fold_input_scale(s)(x)
        torch.testing.assert_close(raw.x_hat_BD, scaled.x_hat_BD / s, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(raw.f_BF, scaled.f_BF / s, rtol=1e-4, atol=1e-4)
        assert (raw.f_BF != 0).sum() > 0
        torch.testing.assert_close(sae.w_dec.norm(dim=1), torch.ones(64))  # still unit rows


def test_folding_input_weights_gives_the_same_sae_on_raw_inputs():
    """An SAE trained on x∘w, folded, reconstructs raw x as x̂_w / w with the same latents firing; a
    JumpReLU's rows are unit again (its activations scaled by each row's norm), a TopK's keep their order."""
    for arch in ("jumprelu", "topk"):
        g = torch.Generator().manual_seed(2)
        sae = _random_sae(arch, g)
        x = torch.randn(40, 16, generator=g)
        w = torch.rand(16, generator=g) * 5 + 0.1
        weighted = sae(x * w)
        norms = (sae.w_dec / w).norm(dim=1)  # each row's norm in raw units, by hand
        raw = sae.fold_input_weights(w)(x)
        torch.testing.assert_close(raw.x_hat_BD, weighted.x_hat_BD / w, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(raw.f_BF != 0, weighted.f_BF != 0)
        if arch == "jumprelu":
            torch.testing.assert_close(sae.w_dec.norm(dim=1), torch.ones(64))
            torch.testing.assert_close(raw.f_BF, weighted.f_BF * norms, rtol=1e-4, atol=1e-5)
        else:  # one factor for every latent: the rows' RMS norm is 1
            torch.testing.assert_close(sae.w_dec.norm(dim=1).square().mean(), torch.tensor(1.0))
            torch.testing.assert_close(raw.f_BF, weighted.f_BF * norms.square().mean().sqrt(), rtol=1e-4, atol=1e-5)
    same = SAE(16, 64, arch="topk", k=8).init_gemma_scope(torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in same.state_dict().items()}
    same.fold_input_weights(torch.full((16,), 1.0))
    for k, v in same.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_sparse_jumprelu_path_has_the_dense_gradients():
    """The sparse decoder path gives the loss and every gradient of the dense autograd graph."""
    from pipeline.sparse_jumprelu import sparse_jumprelu_sae

    eps = 0.05  # wide enough that many entries sit inside θ's kernel window
    sae = SAE(64, 256).init_gemma_scope(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.threshold.uniform_(0.2, 0.4)
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))

    def dense():
        pre = x @ sae.w_enc + sae.b_enc
        x_hat = jumprelu(pre, sae.threshold, eps) @ sae.w_dec + sae.b_dec
        return (x_hat - x).square().sum(-1).mean() + 0.01 * heaviside(pre, sae.threshold, eps).sum(-1).mean()

    def sparse():
        x_hat, pre, _ = sparse_jumprelu_sae(x, sae.w_enc, sae.b_enc, sae.threshold, sae.w_dec, eps)
        penalty = 0.01 * heaviside(pre, sae.threshold, eps).sum(-1).mean()
        return (x_hat + sae.b_dec - x).square().sum(-1).mean() + penalty

    grads = []
    for fn in (dense, sparse):
        sae.zero_grad()
        loss = fn()
        loss.backward()
        grads.append((loss.detach(), {k: p.grad.clone() for k, p in sae.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for k, g in grads[0][1].items():
        assert g.abs().max() > 0, k
        torch.testing.assert_close(grads[1][1][k], g, rtol=1e-4, atol=1e-5)


def test_jumprelu_encode_is_gemma_scope_2s_on_negative_thresholds():
    """A loaded SAE may hold θ < 0 (training clamps θ at 0; files need not): Gemma Scope 2 computes
    f = ReLU(pre)·1[pre > θ], so pre-activations in (θ, 0) give 0, not a negative feature value."""
    g = torch.Generator().manual_seed(0)
    sae = SAE(8, 16).init_gemma_scope(g)
    with torch.no_grad():
        sae.threshold.copy_(-0.1 - 2.0 * torch.rand(16, generator=g))  # every θ negative
        sae.b_enc.normal_(0, 1.0, generator=g)
    x = torch.randn(64, 8, generator=g)
    f, _ = sae.encode(x)
    pre = x.numpy() @ sae.w_enc.detach().numpy() + sae.b_enc.detach().numpy()
    theta = sae.threshold.detach().numpy()
    expected = np.maximum(pre, 0) * (pre > theta)
    np.testing.assert_allclose(f.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sae(x).f_BF.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    without_relu = pre * (pre > theta)  # what θ ≥ 0 makes equivalent, and θ < 0 does not
    assert (np.abs(without_relu - expected) > 0.01).sum() > 10


# ------------------------------------------------------------------------------ transcoders
def _transcoder(arch="jumprelu", skip=True, d_in=12, d_out=20, width=48, seed=3):
    g = torch.Generator().manual_seed(seed)
    t = SAE(d_in, width, arch=arch, k=6, d_out=d_out, skip=skip).init_gemma_scope(g)
    with torch.no_grad():
        t.b_enc.normal_(0, 0.3, generator=g)
        t.b_dec.normal_(0, 0.5, generator=g)
        t.threshold.uniform_(0.05, 0.4, generator=g)
        if skip:
            t.w_skip.normal_(0, 0.2, generator=g)
    return t, g


@pytest.mark.parametrize("arch, skip", [("jumprelu", False), ("jumprelu", True), ("topk", True)])
def test_a_transcoder_predicts_as_gemma_scope_2_defines_it(arch, skip):
    """ŷ = JumpReLU/TopK(x W_enc + b_enc) W_dec + b_dec (+ x W_skip), written out in numpy."""
    t, g = _transcoder(arch, skip)
    x = torch.randn(30, 12, generator=g)
    p = {k: v.detach().double().numpy() for k, v in t.named_parameters()}
    pre = x.double().numpy() @ p["w_enc"] + p["b_enc"]
    if arch == "jumprelu":
        f = np.maximum(pre, 0) * (pre > p["threshold"])
    else:
        f = np.zeros_like(pre)
        top = np.argsort(-pre, axis=1)[:, :6]
        np.put_along_axis(f, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    y = f @ p["w_dec"] + p["b_dec"] + (x.double().numpy() @ p["w_skip"] if skip else 0)
    out = t(x)
    assert out.x_hat_BD.shape == (30, 20) and (out.f_BF != 0).any()
    np.testing.assert_allclose(out.x_hat_BD.detach().numpy(), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, sparse", [("jumprelu", False), ("jumprelu", True), ("topk", False)])
def test_transcoder_gradients_equal_an_independent_computation(arch, sparse):
    """The training loss against a target y and its gradients, against the same loss written with
    plain autograd here (the straight-through θ terms as formulas)."""
    from pipeline.sae import Objective

    eps = 0.05
    t, g = _transcoder(arch, True)
    x, y = torch.randn(64, 12, generator=g), torch.randn(64, 20, generator=g)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::5] = True  # TopK's auxiliary loss on these
    obj = Objective(bandwidth=eps, target_l0=None, aux_k=4, aux_coeff=0.25)
    loss = t.loss(x, obj, target_BO=y, lam=0.01, dead_F=dead, sparse=sparse)
    t.zero_grad()
    loss.total.backward()
    got = {k: p.grad.clone() for k, p in t.named_parameters() if p.grad is not None}

    ref = {k: p.detach().clone().requires_grad_(True) for k, p in t.named_parameters()}
    pre = x @ ref["w_enc"] + ref["b_enc"]
    if arch == "jumprelu":
        f = jumprelu(pre, ref["threshold"], eps)
        y_hat = f @ ref["w_dec"] + ref["b_dec"] + x @ ref["w_skip"]
        total = (y_hat - y).square().sum(-1).mean() + 0.01 * heaviside(pre, ref["threshold"], eps).sum(-1).mean()
    else:
        vals, idx = pre.topk(6, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        y_hat = f @ ref["w_dec"] + ref["b_dec"] + x @ ref["w_skip"]
        err = (y - y_hat).detach()
        av, ai = pre.masked_fill(~dead, -float("inf")).topk(4, dim=-1)
        err_hat = torch.zeros_like(pre).scatter(-1, ai, av.relu()) @ ref["w_dec"]
        aux = (err_hat - err).square().sum(-1).mean() / err.square().sum(-1).mean()
        total = (y_hat - y).square().sum(-1).mean() + 0.25 * aux
    total.backward()
    torch.testing.assert_close(loss.total.detach(), total.detach(), rtol=1e-5, atol=1e-6)
    for k, p in ref.items():
        if p.grad is None:
            assert k not in got or not got[k].any(), k
            continue
        assert p.grad.abs().max() > 0 or k == "threshold", k
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-5, msg=k)


def test_folding_two_scales_gives_the_same_transcoder_on_raw_activations():
    t, g = _transcoder("jumprelu", True)
    x = torch.randn(40, 12, generator=g) * 70.0
    s, u = 0.013, 0.21  # the input's and the target's scales differ
    scaled = t(x * s)
    raw = t.fold_input_scale(s, u)(x)
    torch.testing.assert_close(raw.x_hat_BD, scaled.x_hat_BD / u, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(raw.f_BF, scaled.f_BF / s, rtol=1e-4, atol=1e-4)
    assert (raw.f_BF != 0).sum() > 0


def test_a_skip_transcoder_round_trips_through_gemma_scope_2s_files(tmp_path):
    import json

    from safetensors.torch import load_file

    from pipeline.sae import SAEConfig

    t, g = _transcoder("jumprelu", True)
    t.save(tmp_path, SAEConfig(width=48, affine_connection=True, type="transcoder",
                                hf_hook_point_in="model.layers.3.pre_feedforward_layernorm.output",
                                hf_hook_point_out="model.layers.3.post_feedforward_layernorm.output"))  # fmt: skip
    keys = {k: tuple(v.shape) for k, v in load_file(tmp_path / "params.safetensors").items()}
    assert keys == {"w_enc": (12, 48), "b_enc": (48,), "w_dec": (48, 20), "b_dec": (20,), "threshold": (48,),
                    "affine_skip_connection": (12, 20)}  # fmt: skip
    assert json.loads((tmp_path / "config.json").read_text())["affine_connection"] is True
    back, config = SAE.load(tmp_path)
    x = torch.randn(9, 12, generator=g)
    assert back.skip and back.d_out == 20 and config.is_transcoder
    torch.testing.assert_close(back(x).x_hat_BD, t(x).x_hat_BD)


@pytest.mark.parametrize("n_dead", [0, 3, 10])
def test_topk_loss_without_a_device_sync_equals_the_host_path(n_dead):
    """On an accelerator the TopK loss never reads the dead-latent count back (sync_free): its loss
    and gradients equal the CPU path's, which takes exactly the dead latents, or none."""
    from pipeline.sae import Objective

    g = torch.Generator().manual_seed(3)
    sae = SAE(12, 48, arch="topk", k=6).init_gemma_scope(g)
    x = torch.randn(64, 12, generator=g)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[torch.randperm(48, generator=g)[:n_dead]] = True
    obj = Objective(aux_k=4, aux_coeff=0.25)
    results = []
    for sync_free in (False, True):
        sae.zero_grad()
        loss = sae.loss(x, obj, dead_F=dead, sync_free=sync_free)
        loss.total.backward()
        grads = {k: p.grad.clone() for k, p in sae.named_parameters() if p.grad is not None}
        results.append((loss.total.detach(), loss.penalty.detach(), grads))
    (t0, p0, g0), (t1, p1, g1) = results
    assert (p0 > 0) == (n_dead > 0) and float(p1) == float(p0)
    torch.testing.assert_close(t1, t0, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-7, msg=k)


def test_theta_lr_scales_the_thresholds_step_and_nothing_else():
    """--theta-lr c: after a step, θ has moved c times as far as with c = 1 (the same gradients and
    Adam state), and every other parameter is where it would be anyway."""
    from pipeline.sae import Objective
    from pipeline.train import train_step

    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 16, generator=g)
    moved = []
    for c in (1.0, 0.25):
        sae = SAE(16, 64).init_gemma_scope(torch.Generator().manual_seed(1))
        with torch.no_grad():
            sae.threshold.uniform_(0.2, 0.4, generator=torch.Generator().manual_seed(2))
        before = {k: v.detach().clone() for k, v in sae.named_parameters()}
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2, betas=(0.0, 0.999))
        train_step(sae, opt, x, Objective(bandwidth=0.2), lam=0.05, since_fired_F=torch.zeros(64, dtype=torch.int64),
                   dead_tokens=10**6, sparse=False, theta_lr=c)  # fmt: skip
        moved.append({k: v.detach() - before[k] for k, v in sae.named_parameters()})
    full, scaled = moved
    assert (full["threshold"].abs() > 1e-3).sum() > 32  # most thresholds moved (by about the lr)
    torch.testing.assert_close(scaled["threshold"], 0.25 * full["threshold"], rtol=1e-5, atol=1e-7)
    for k in full.keys() - {"threshold"}:
        torch.testing.assert_close(scaled[k], full[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_a_bf16_autocast_step_tracks_the_float32_step(arch):
    """--matmul bf16: the step's matmuls in bfloat16, parameters and Adam in float32; after a few
    steps the loss is the float32 step's to bfloat16's precision, and the weights stay float32."""
    from pipeline.sae import Objective
    from pipeline.train import train_step

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    losses = []
    for autocast in (None, torch.bfloat16):
        sae = SAE(32, 64, arch=arch, k=8).init_gemma_scope(torch.Generator().manual_seed(1))
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.0, 0.999))
        since = torch.zeros(64, dtype=torch.int64)
        for _ in range(5):
            loss = train_step(sae, opt, x, Objective(target_l0=8), lam=1e-3, since_fired_F=since, dead_tokens=10**6,
                              sparse=False, autocast=autocast)  # fmt: skip
        assert all(p.dtype == torch.float32 for p in sae.parameters())
        losses.append(float(loss.recon.detach()))
    assert losses[1] == pytest.approx(losses[0], rel=0.03)


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_matryoshka_loss_and_gradients_equal_each_prefix_written_out(arch):
    """Σ over the nested prefixes (the full width included) of each prefix's reconstruction error, with
    the same active latents, against each prefix decoded on its own here."""
    from pipeline.sae import Objective

    g = torch.Generator().manual_seed(5)
    sae = SAE(12, 48, arch=arch, k=6).init_gemma_scope(g)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(12, generator=g))
        sae.threshold.fill_(0.05)
    x = torch.randn(64, 12, generator=g)
    obj = Objective(bandwidth=0.05, prefixes=(8, 24))
    loss = sae.loss(x, obj, lam=0.01)
    sae.zero_grad()
    loss.total.backward()
    got = {k: p.grad.clone() for k, p in sae.named_parameters() if p.grad is not None}

    ref = {k: p.detach().clone().requires_grad_(True) for k, p in sae.named_parameters()}
    pre = x @ ref["w_enc"] + ref["b_enc"]
    if arch == "jumprelu":
        f = jumprelu(pre, ref["threshold"], 0.05)
        penalty = 0.01 * heaviside(pre, ref["threshold"], 0.05).sum(-1).mean()
    else:
        vals, idx = pre.topk(6, dim=-1)
        f, penalty = torch.zeros_like(pre).scatter(-1, idx, vals.relu()), 0.0
    recon = sum(((f[:, :m] @ ref["w_dec"][:m] + ref["b_dec"] - x) ** 2).sum(-1).mean() for m in (8, 24, 48))
    (recon + penalty).backward()
    torch.testing.assert_close(loss.recon.detach(), recon.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.x_hat_BD.detach(), (f @ ref["w_dec"] + ref["b_dec"]).detach(), rtol=1e-5, atol=1e-5)
    for k, p in ref.items():
        if p.grad is not None and p.grad.abs().max() > 0:
            torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("form", ["quadratic", "hinge"])
def test_the_frequency_penalty_is_its_formula_through_the_thresholds(form):
    """λ_f·Σ ω_i²/ω₀ (or the hinge λ_f·Σ max(0, ω_i − ω₀)²/ω₀) with ω_i the share of rows on which latent
    i fires; its gradient reaches θ only, dω_i/dθ_i = −mean over rows of (1/ε)·K((pre − θ_i)/ε),
    computed here in numpy."""
    from pipeline.sae import Objective

    g = torch.Generator().manual_seed(6)
    sae = SAE(16, 32).init_gemma_scope(g)
    x = torch.randn(200, 16, generator=g)
    with torch.no_grad():  # latent i fires on about a share 1 − q_i of the rows, q_i from 0.1 to 0.9
        q = torch.linspace(0.1, 0.9, 32)
        sae.threshold.copy_(torch.stack([(x @ sae.w_enc[:, i]).quantile(q[i]) for i in range(32)]))
    eps, c, w0 = 0.3, 0.5, 0.4
    grads, totals = [], []
    for coeff in (0.0, c):
        sae.zero_grad()
        loss = sae.loss(x, Objective(bandwidth=eps, freq_penalty=coeff, freq_scale=w0, freq_form=form), lam=0.0)
        loss.total.backward()
        totals.append(float(loss.total.detach()))
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None})
    pre = (x @ sae.w_enc + sae.b_enc).detach().double().numpy()
    theta = sae.threshold.detach().double().numpy()
    omega = (pre > theta).mean(0)
    over = omega if form == "quadratic" else np.maximum(omega - w0, 0)
    assert form == "quadratic" or 0 < (over > 0).sum() < 32  # the hinge: some latents above ω₀, some below
    assert totals[1] - totals[0] == pytest.approx(c * (over**2 / w0).sum(), rel=1e-5)
    d_omega = -((np.abs((pre - theta) / eps) < 0.5) / eps).mean(0)
    np.testing.assert_allclose((grads[1]["threshold"] - grads[0]["threshold"]).numpy(), c * 2 * over / w0 * d_omega,
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    for k in ("w_enc", "b_enc", "w_dec", "b_dec"):  # nothing but θ feels it
        torch.testing.assert_close(grads[1][k], grads[0][k])


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_a_pre_encoder_bias_folds_into_b_enc(arch):
    """Trained with --pre-encoder-bias the SAE encodes x − b_dec; folded, it encodes x to the same latents
    and reconstruction."""
    from pipeline.sae import Objective

    g = torch.Generator().manual_seed(8)
    sae = SAE(16, 64, arch=arch, k=8).init_gemma_scope(g)
    with torch.no_grad():
        sae.b_dec.normal_(0, 2.0, generator=g)
        sae.threshold.uniform_(0.0, 0.2, generator=g)
    x = torch.randn(40, 16, generator=g) + 1.0
    loss = sae.loss(x, Objective(bandwidth=0.01, pre_encoder_bias=True), lam=0.0)
    by_hand = sae(x - sae.b_dec)  # encode x − b_dec; x̂ = f·W_dec + b_dec either way
    torch.testing.assert_close(loss.x_hat_BD.detach(), by_hand.x_hat_BD, rtol=1e-5, atol=1e-5)
    folded = sae.fold_pre_encoder_bias()(x)
    torch.testing.assert_close(folded.f_BF, by_hand.f_BF, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.x_hat_BD, by_hand.x_hat_BD, rtol=1e-5, atol=1e-5)


def test_freq_penalty_equal_to_lambda_is_deepminds_penalty():
    """With --freq-penalty λ_f = λ and no target L0, the sparsity and frequency penalties together are
    DeepMind's λ·Σ_i ω_i(1 + ω_i/ω₀) ("Removing High Frequency Latents from JumpReLU SAEs"), ω_i the
    share of rows latent i fires on, counted here in numpy."""
    from pipeline.sae import Objective

    g = torch.Generator().manual_seed(7)
    sae = SAE(16, 32).init_gemma_scope(g)
    x = torch.randn(300, 16, generator=g)
    with torch.no_grad():
        sae.threshold.uniform_(0.0, 1.0, generator=g)
    lam, w0 = 0.02, 0.1
    loss = sae.loss(x, Objective(freq_penalty=lam, freq_scale=w0), lam=lam)
    pre = (x @ sae.w_enc + sae.b_enc).detach().double().numpy()
    omega = (pre > sae.threshold.detach().double().numpy()).mean(0)
    assert 0 < omega.min() < omega.max() < 1
    assert float(loss.penalty.detach()) == pytest.approx(lam * (omega * (1 + omega / w0)).sum(), rel=1e-5)


@pytest.mark.parametrize("form", ["quadratic", "hinge"])
@pytest.mark.parametrize("dead", ["none given", "some dead", "some dead, sync-free"])
@pytest.mark.parametrize("k", [6, 32])
def test_the_topk_frequency_penalty_is_its_formula_through_each_rows_threshold(form, dead, k):
    """TopK: λ_f·Σ ω_i²/ω₀ (or the hinge) with ω_i the share of rows whose k largest ReLU'd
    pre-activations include latent i; its gradient reaches the pre-activations through each row's
    threshold τ_r (midway between the row's k-th and (k+1)-th pre-activation, at least 0):
    dω_i/dpre_ri = (1/B)(1/ε)·K((pre_ri − τ_r)/ε); with k = width, τ_r = 0 (the ReLU). Computed here in
    numpy, with and without AuxK."""
    from pipeline.sae import Objective

    g = torch.Generator().manual_seed(7)
    eps, c, w0 = 0.3, 0.5, 0.25
    sae = SAE(16, 32, arch="topk", k=k).init_gemma_scope(g)
    x = torch.randn(300, 16, generator=g)
    with torch.no_grad():  # latents from rare to firing on most rows
        sae.b_enc.copy_(torch.linspace(-1.5, 2.0, 32))
    dead_F = None if dead == "none given" else torch.arange(32) < 5
    grads, totals = [], []
    for coeff in (0.0, c):
        sae.zero_grad()
        obj = Objective(bandwidth=eps, aux_k=4, freq_penalty=coeff, freq_scale=w0, freq_form=form)
        loss = sae.loss(x, obj, dead_F=dead_F, sync_free=dead.endswith("sync-free"))
        loss.total.backward()
        totals.append(float(loss.total.detach()))
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None})
    pre = (x @ sae.w_enc + sae.b_enc).detach().double().numpy()
    order = np.argsort(-pre, axis=1)
    fired = np.zeros_like(pre, dtype=bool)
    np.put_along_axis(fired, order[:, :k], True, axis=1)
    fired &= pre > 0
    omega = fired.mean(0)
    over = omega if form == "quadratic" else np.maximum(omega - w0, 0)
    assert form == "quadratic" or 0 < (over > 0).sum() < 32  # the hinge: some latents above ω₀, some below
    assert totals[1] - totals[0] == pytest.approx(c * (over**2 / w0).sum(), rel=1e-5)
    sorted_ = np.take_along_axis(pre, order, axis=1)
    tau = np.maximum((sorted_[:, k - 1] + sorted_[:, k]) / 2, 0)[:, None] if k < 32 else np.zeros((len(pre), 1))
    d_pre = (c * 2 * over / w0) * (np.abs((pre - tau) / eps) < 0.5) / eps / len(pre)  # d penalty / d pre
    np.testing.assert_allclose((grads[1]["b_enc"] - grads[0]["b_enc"]).numpy(), d_pre.sum(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose((grads[1]["w_enc"] - grads[0]["w_enc"]).numpy(), x.double().numpy().T @ d_pre,
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    for name in ("w_dec", "b_dec"):  # the decoder does not feel it
        torch.testing.assert_close(grads[1][name], grads[0][name])


def test_the_sparse_path_under_bf16_autocast_follows_the_dense_path():
    """--decoder sparse with --matmul bf16: the encoder GEMM in bfloat16 with the bias added in float32
    (the dense path's pre-activations, bit for bit), the sparse kernels in float32; the gradients are
    the dense float32 step's to bfloat16's precision."""
    from pipeline.sae import Objective

    torch.manual_seed(0)
    sae = SAE(32, 256).init_gemma_scope(torch.Generator().manual_seed(0), theta=0.05)
    x = torch.randn(512, 32) / 32**0.5
    obj = Objective(bandwidth=0.01, target_l0=8)

    def run(sparse: bool, autocast: bool):
        sae.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = sae.loss(x, obj, lam=1e-2, sparse=sparse)
        loss.total.backward()
        return loss, {n: p.grad.clone() for n, p in sae.named_parameters()}

    sparse, g_sparse = run(True, True)
    dense, g_dense = run(False, True)
    _, g_fp32 = run(False, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre_bf16 = x @ sae.w_enc + sae.b_enc
    torch.testing.assert_close(sparse.f_BF != 0, pre_bf16 > sae.threshold, rtol=0, atol=0)
    torch.testing.assert_close(sparse.f_BF, dense.f_BF, rtol=0, atol=0)  # the same pre-activations and active set
    assert sparse.x_hat_BD.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g_sparse.values())
    for reference in (g_dense, g_fp32):  # θ's gradient only against the same kernel window (the same pre)
        for name, g in reference.items():
            rel = ((g_sparse[name] - g).norm() / g.norm()).item()
            assert rel < 0.02 or (name == "threshold" and reference is g_fp32), (name, rel)


def test_the_config_reads_every_field_of_its_dataclass(tmp_path):
    """SAEConfig.from_json is derived from the dataclass: a field added to it is read back, typed."""
    from pipeline.errors import GspError
    from pipeline.sae import SAEConfig

    @dataclasses.dataclass(frozen=True)
    class Later(SAEConfig):
        new_field: int | None = None

    read = Later.from_json({**Later(new_field=7, width=16, l0=3).to_json()}, tmp_path)
    assert read == Later(new_field=7, width=16, l0=3)
    full = SAEConfig(**{f.name: _a_value(f.type) for f in dataclasses.fields(SAEConfig) if f.name != "architecture"})
    assert SAEConfig.from_json(full.to_json(), tmp_path) == full
    with pytest.raises(GspError, match="'new_field' should be int, not 'x'"):
        Later.from_json({"new_field": "x"}, tmp_path)


def _a_value(annotation):
    """A non-default value of a config field's type."""
    text = str(annotation)
    return {"bool": True, "int": 3, "float": 0.5, "dict": {"a": 1}}.get(
        next((k for k in ("bool", "float", "int", "dict") if k in text), "str"), "some text"
    )


def test_a_transposed_decoder_is_named_with_the_shape_it_should_have():
    from pipeline.errors import GspError

    params = {"w_enc": torch.zeros(8, 32), "b_enc": torch.zeros(32), "w_dec": torch.zeros(8, 32),
              "b_dec": torch.zeros(8), "threshold": torch.zeros(32)}  # fmt: skip
    with pytest.raises(GspError, match=r"w_dec has shape \(8, 32\), expected \(32, d_out\).*looks transposed"):
        SAE.from_params(params, "jumprelu", None, "file.safetensors")
