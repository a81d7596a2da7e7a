"""Metrics and the delta-loss rerun against independent computations (numpy; direct forward passes)."""

import numpy as np
import pytest
import torch

from pipeline.lm_loss import DeltaLoss, prediction_mask
from pipeline.metrics import Running, cosine, fvu, l0, mse
from pipeline.sae import SAE


def _batch(seed: int, n: int = 300, d: int = 6, f: int = 10, c: int = 8):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d)) * 3 + np.arange(d)  # offset mean: FVU must subtract it
    x_hat = x + g.standard_normal((n, d))
    acts = np.maximum(g.standard_normal((n, f)) - 0.5, 0)
    acts[:, 3] = 0  # latent 3 never fires
    acts[:, 7] = np.abs(acts[:, 7]) + 0.1  # latent 7 always fires: dense
    pos = g.integers(1, c, n)
    return x, x_hat, acts, pos


def test_running_metrics_equal_numpy_on_all_tokens():
    x, x_hat, acts, pos = _batch(0)
    run = Running(6, 10, 8)
    for s in np.array_split(np.arange(len(x)), 7):  # uneven batches
        run.update(*(torch.from_numpy(a[s]).float() for a in (x, x_hat, acts)), torch.from_numpy(pos[s]))
    r = run.result(top=3)
    xf, xhf = x.astype(np.float32).astype(np.float64), x_hat.astype(np.float32).astype(np.float64)
    err = ((xf - xhf) ** 2).sum(1)
    var = ((xf - xf.mean(0)) ** 2).sum()
    assert r["tokens"] == 300
    assert r["fvu"] == pytest.approx(err.sum() / var, rel=1e-9)
    assert r["explained_variance"] == pytest.approx(1 - err.sum() / var, rel=1e-9)
    assert r["mse"] == pytest.approx(((xf - xhf) ** 2).mean(), rel=1e-9)
    cos = (xf * xhf).sum(1) / np.linalg.norm(xf, axis=1) / np.linalg.norm(xhf, axis=1)
    assert r["cosine"] == pytest.approx(cos.mean(), rel=1e-9)
    l0s = (acts.astype(np.float32) != 0).sum(1)
    assert r["l0"] == pytest.approx(l0s.mean()) and r["l0_std"] == pytest.approx(l0s.std())
    assert r["l0_histogram"] == np.bincount(l0s).tolist()
    freq = (acts != 0).mean(0)
    assert r["dead_features"] == 1 and r["dense_features"] == int((freq > 0.1).sum())
    assert [t["feature"] for t in r["top_features"]] == list(np.argsort(-freq, kind="stable")[:3])
    assert r["top_features"][0]["frequency"] == pytest.approx(1.0)
    assert sum(r["frequency_histogram"]["counts"]) + r["frequency_histogram"]["dead"] == 10
    for p in range(8):
        at = pos == p
        expect = err[at].mean() / (var / len(x)) if at.any() else None
        assert r["position_fvu"][p] == (pytest.approx(expect) if expect is not None else None)
    # the batch functions fit's logs use agree with the streaming form
    X, XH = torch.from_numpy(x).float(), torch.from_numpy(x_hat).float()
    assert fvu(X, XH).item() == pytest.approx(r["fvu"], rel=1e-9)
    assert mse(X, XH).item() == pytest.approx(r["mse"], rel=1e-9)
    assert cosine(X, XH).item() == pytest.approx(r["cosine"], rel=1e-9)
    assert l0(torch.from_numpy(acts).float()).item() == pytest.approx(r["l0"])


def test_running_merge_equals_one_pass():
    a, b = _batch(1), _batch(2, n=120)
    whole, left, right = Running(6, 10, 8), Running(6, 10, 8), Running(6, 10, 8)
    for part, run in ((a, left), (b, right)):
        args = [torch.from_numpy(v) for v in part]
        run.update(args[0].float(), args[1].float(), args[2].float(), args[3])
        whole.update(args[0].float(), args[1].float(), args[2].float(), args[3])
    merged = left.merge(right).result()
    for key, value in whole.result().items():
        if isinstance(value, float):
            assert merged[key] == pytest.approx(value, rel=1e-9), key
        elif key.startswith("position_"):  # position 0 (BOS) has no rows: None
            assert [v is None for v in merged[key]] == [v is None for v in value]
            assert [v for v in merged[key] if v] == pytest.approx([v for v in value if v], rel=1e-9)
        else:
            assert merged[key] == value, key


# ------------------------------------------------------------------------------ delta loss
SPECIAL = [0, 1, 2]  # pad, eos, bos of the tiny tokenizer


def _contexts(n=3, s=24, seed=0) -> torch.Tensor:
    ids = torch.randint(4, 300, (n, s), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 2  # BOS
    ids[0, 10] = 1  # a document boundary inside a context
    return ids


def _reference_ce(model, ids, layer, replace=None) -> torch.Tensor:
    """Per-prediction CE computed directly: the test's own hook, its own mask (not gsp's splice)."""
    block = model.model.layers[layer]
    special = torch.isin(ids, torch.tensor(SPECIAL))

    def hook(m, args, out):
        h = out[0] if isinstance(out, tuple) else out
        new = torch.where(special[..., None], h, replace(h))
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = block.register_forward_hook(hook) if replace else None
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        if handle:
            handle.remove()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    keep = ~special[:, :-1] & ~special[:, 1:]
    return ce[keep].double()


@pytest.fixture(scope="module")
def lm(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def _score(lm, sae, ids, layer=1):
    acc = DeltaLoss()
    acc.run(lm, sae, ids[:2], layer, "resid_post", SPECIAL)
    acc.run(lm, sae, ids[2:], layer, "resid_post", SPECIAL)  # two batches merge
    return acc.result()


def test_prediction_mask_skips_special_sources_and_targets():
    ids = torch.tensor([[2, 5, 6, 1, 7, 8]])
    assert prediction_mask(ids, SPECIAL).tolist() == [[False, True, False, False, True]]


def test_exact_reconstruction_gives_zero_delta(lm):
    d = 64
    sae = SAE(d, d)
    with torch.no_grad():  # x̂ = (x + c) − c: exact wherever x + c > 0
        sae.w_enc.copy_(torch.eye(d))
        sae.w_dec.copy_(torch.eye(d))
        sae.b_enc.fill_(1e3)
        sae.b_dec.fill_(-1e3)
    ids = _contexts()
    r = _score(lm, sae, ids)
    clean = _reference_ce(lm, ids, 1)
    assert r["predictions"] == len(clean) == 3 * 23 - 2 - 3  # BOS sources, EOS as target and as source
    assert r["ce_clean"] == pytest.approx(clean.mean().item(), rel=1e-6)
    assert abs(r["delta_loss"]) < 1e-4 and r["kl_clean_spliced"] < 1e-6
    assert r["loss_recovered"] == pytest.approx(1.0, abs=1e-3)


def test_zero_sae_gives_the_zero_ablation_loss(lm):
    sae = SAE(64, 32)  # all parameters 0: x̂ = 0
    ids = _contexts(seed=1)
    r = _score(lm, sae, ids)
    zero = _reference_ce(lm, ids, 1, replace=torch.zeros_like)
    assert r["ce_spliced"] == pytest.approx(r["ce_zero_ablated"], rel=1e-7)
    assert r["ce_zero_ablated"] == pytest.approx(zero.mean().item(), rel=1e-6)
    assert r["loss_recovered"] == pytest.approx(0.0, abs=1e-6)


def test_spliced_loss_and_kl_match_a_direct_computation(lm):
    sae = SAE(64, 96).init_gemma_scope(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.threshold.fill_(0.5)
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(1))
    ids = _contexts(seed=2)
    r = _score(lm, sae, ids)

    def recon(h):  # JumpReLU written out, not gsp's SAE.forward
        pre = h @ sae.w_enc.detach() + sae.b_enc.detach()
        return (pre * (pre > 0.5)) @ sae.w_dec.detach() + sae.b_dec.detach()

    spliced = _reference_ce(lm, ids, 1, replace=recon)
    clean = _reference_ce(lm, ids, 1)
    assert r["ce_spliced"] == pytest.approx(spliced.mean().item(), rel=1e-5)
    assert r["delta_loss"] == pytest.approx((spliced - clean).mean().item(), rel=1e-4, abs=1e-6)
    assert r["delta_loss"] > 0.01  # a poor SAE must cost loss: the comparison above is not vacuous
    per_ctx = []
    for c in range(3):  # standard error over contexts, recomputed by hand
        one = ids[c : c + 1]
        per_ctx.append((_reference_ce(lm, one, 1, replace=recon) - _reference_ce(lm, one, 1)).mean().item())
    assert r["delta_loss_stderr"] == pytest.approx(np.std(per_ctx, ddof=1) / np.sqrt(3), rel=1e-3)
    # KL(clean ‖ spliced) over the counted predictions, from the two sets of logits
    special = torch.isin(ids, torch.tensor(SPECIAL))
    keep = ~special[:, :-1] & ~special[:, 1:]
    with torch.no_grad():
        lp_clean = torch.log_softmax(lm(input_ids=ids).logits[:, :-1], -1)
        handle = lm.model.layers[1].register_forward_hook(
            lambda m, a, out: (
                (torch.where(special[..., None], out[0], recon(out[0])), *out[1:])
                if isinstance(out, tuple)
                else torch.where(special[..., None], out, recon(out))
            )
        )
        try:
            lp_spliced = torch.log_softmax(lm(input_ids=ids).logits[:, :-1], -1)
        finally:
            handle.remove()
    kl = (lp_clean.exp() * (lp_clean - lp_spliced)).sum(-1)[keep]
    assert r["kl_clean_spliced"] == pytest.approx(kl.mean().item(), rel=1e-4)
