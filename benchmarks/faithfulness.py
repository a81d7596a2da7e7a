"""Where an SAE's error goes, and what it costs the model: the evidence behind docs/fit.md's account of
JumpReLU against TopK (issue 24).

    python benchmarks/faithfulness.py --store HELDOUT_STORE --sae JUMPRELU_SAE --sae TOPK_SAE
        [--delta-tokens 16384] [--no-rerun]

1. Without the model, over every ordinary row of the held-out store, for each SAE: per-token L0
   (spread and percentiles), per-token relative error r = ‖x − x̂‖²/‖x‖² (what the next layer's
   RMSNorm sees: it reads x/‖x‖), FVU, the error's mean (a bias shared by every token) as a share of
   its energy, the norm ratio ‖x̂‖/‖x‖, and the same by position in the context and by token-norm
   decile; the share of the error's energy in the top principal directions of x.
2. With the model (the store's own, re-run on the first `--delta-tokens` tokens of its contexts),
   delta loss of the SAE spliced in and of edits of its error e = x̂ − x that isolate one property:
       sae           x̂ itself (gsp evaluate's figure)
       random dir    x + ‖e‖·u       (u a random unit direction per token: the same magnitudes)
       scaled r      x + e·√(r̄/r)    (every token given the SAE's mean relative error, same direction)
       early clean   x at positions 1–3 (right after BOS), x̂ elsewhere
       band only     x + the part of e in one band of x's principal directions (by rank: 0–15, 16–63,
                     64–255, 256–)
   and, for every ordered pair of SAEs (a, b), "a's directions, b's magnitudes": x + ê_a·‖e_b‖, and
   "a, with b's error at positions 1–3".
   Controls with a known answer: x itself (delta 0 exactly) and "a's directions, a's magnitudes"
   (the SAE's own figure exactly).
Every figure is printed as a Markdown table; run it on ≥ 16,384 tokens (4,096 gives ±0.04 nats).
"""

import argparse
import platform
import re
from pathlib import Path

import numpy as np
import torch

from pipeline import dist
from pipeline.hooks import splice
from pipeline.lm_loss import Splices, delta_losses
from pipeline.metrics import DENSE_FREQUENCY
from pipeline.models import load_model, model_to_run
from pipeline.sae import Output, jumprelu_inference, topk
from pipeline.sae_formats import load_sae
from pipeline.store import ActivationStore

POSITIONS = [(1, 2), (2, 4), (4, 16), (16, 64), (64, 10**9)]  # position buckets [a, b) in the context
EARLY = 4  # "early" positions: 1..EARLY-1, right after BOS
BANDS = [(0, 16), (16, 64), (64, 256), (256, 10**6)]  # bands of principal directions of x, by rank


def rows_of(store: ActivationStore) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordinary row (N, D) float64 and its position in its context (N,)."""
    xs, pos = [], []
    for x, rows in store.ordinary_rows(store.rows_written, 8192):
        xs.append(torch.from_numpy(x).double())
        pos.append(torch.from_numpy(rows % store.context_size))
    return torch.cat(xs), torch.cat(pos)


def reconstruct(fn, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂ (N, D) float64, per-token L0 (N,)) of `fn` (x -> an SAE's Output), in batches."""
    outs, l0s = [], []
    with torch.no_grad():
        for chunk in x_ND.split(8192):
            out = fn(chunk.float())
            outs.append(out.x_hat_BD.double())
            l0s.append((out.f_BF != 0).sum(-1))
    return torch.cat(outs), torch.cat(l0s)


def dense_l0(fn, x_ND: torch.Tensor) -> float:
    """The mean per-token L0 spent on dense latents (firing on more than DENSE_FREQUENCY of the rows)."""
    with torch.no_grad():
        fired_F = sum((fn(c.float()).f_BF != 0).double().sum(0) for c in x_ND.split(8192)) / len(x_ND)
    return fired_F[fired_F > DENSE_FREQUENCY].sum().item()


def token_figures(x: torch.Tensor, x_hat: torch.Tensor, l0_N: torch.Tensor, pos_N: torch.Tensor) -> dict:
    e = x_hat - x
    e2, x2 = e.square().sum(-1), x.square().sum(-1)
    r = e2 / x2
    centred = (x - x.mean(0)).square().sum(-1)
    q = lambda t, p: torch.quantile(t.double(), p).item()  # noqa: E731
    out = {
        "fvu": (e2.sum() / centred.sum()).item(),
        "mean r": r.mean().item(),
        "p50 r": q(r, 0.5),
        "p95 r": q(r, 0.95),
        "bias share": (e.mean(0).square().sum() / e2.mean()).item(),
        "norm ratio": (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(),
        "L0": l0_N.double().mean().item(),
        "L0 std": l0_N.double().std().item(),
        "L0 p5": q(l0_N, 0.05),
        "L0 p95": q(l0_N, 0.95),
        "L0 max": int(l0_N.max()),
        "L0<10": (l0_N < 10).double().mean().item(),
    }
    for a, b in POSITIONS:
        m = (pos_N >= a) & (pos_N < b)
        out[f"pos {a}-{b - 1 if b < 10**9 else 'end'}"] = (r[m].mean().item(), l0_N[m].double().mean().item())
    norms = x.norm(dim=-1)
    edges = torch.quantile(norms, torch.linspace(0, 1, 11, dtype=torch.float64))
    for i in (0, 4, 9):
        m = (norms >= edges[i]) & (norms <= edges[i + 1])
        out[f"norm decile {i + 1}"] = (r[m].mean().item(), l0_N[m].double().mean().item())
    return out


def principal_directions(x: torch.Tensor) -> torch.Tensor:
    """x's principal directions (D, D), rows by decreasing variance (from up to 20,000 rows)."""
    xc = x - x.mean(0)
    return torch.linalg.svd(xc[:: max(1, len(xc) // 20000)], full_matrices=False)[2]


def spectrum(x: torch.Tensor, errors: dict[str, torch.Tensor], v: torch.Tensor) -> dict[str, list[float]]:
    """Per band of principal directions `v` of x (BANDS): x's share of variance there, and each error's
    energy there over x's (1: as large as the signal it should reproduce)."""
    xc = x - x.mean(0)
    x_band = [(xc @ v[a:b].T).square().sum().item() for a, b in BANDS]
    out = {"x (share of variance)": [e / sum(x_band) for e in x_band]}
    for name, e in errors.items():
        out[name] = [(e @ v[a:b].T).square().sum().item() / xb for (a, b), xb in zip(BANDS, x_band, strict=True)]
    return out


def _size(v: torch.Tensor) -> torch.Tensor:
    return v.norm(dim=-1, keepdim=True)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / _size(v).clamp_min(1e-12)


def edits(names: list[str], mean_r: dict, bands_V: torch.Tensor, seed: int = 0) -> dict:
    """The rerun's edits (module docstring): name -> fn(x (N, D), {SAE: its error e (N, D)}, position (N, 1))
    -> what is spliced."""
    g = torch.Generator().manual_seed(seed)

    def rescaled(x, e, r):  # e scaled so that ‖e‖²/‖x‖² = r on every token
        return e * (r * x.square().sum(-1, keepdim=True) / e.square().sum(-1, keepdim=True).clamp_min(1e-12)).sqrt()

    out = {"x itself (control: 0)": lambda x, E, p: x}
    for n in names:
        out[f"{n}: sae"] = lambda x, E, p, n=n: x + E[n]
        out[f"{n}: random dir"] = lambda x, E, p, n=n: x + _unit(torch.randn(x.shape, generator=g)) * _size(E[n])
        out[f"{n}: scaled r"] = lambda x, E, p, n=n: x + rescaled(x, E[n], mean_r[n])
        out[f"{n}: positions 1-{EARLY - 1} clean"] = lambda x, E, p, n=n: x + E[n] * (p >= EARLY)
        for a, b in BANDS:  # the error's part in one band of principal directions of x, alone
            V = bands_V[a:b]
            out[f"{n}: error in PCs {a}-{min(b, len(bands_V)) - 1} only"] = lambda x, E, p, n=n, V=V: (
                x + (E[n] @ V.T) @ V
            )
    for a in names:
        for b in names:
            control = " (control: = sae)" if a == b else ""
            out[f"{a} dirs, {b} sizes{control}"] = lambda x, E, p, a=a, b=b: x + _unit(E[a]) * _size(E[b])
            if a != b:
                out[f"{a}, {b}'s error at positions 1-{EARLY - 1}"] = lambda x, E, p, a=a, b=b: (
                    x + torch.where(p >= EARLY, E[a], E[b])
                )
    return out


def rule_swaps(name: str, sae, x: torch.Tensor, l0_N: torch.Tensor) -> dict:
    """The SAE's dictionary under the other architecture's rule: name -> fn(x) -> Output. A JumpReLU
    SAE as TopK with k its mean L0; a TopK SAE as JumpReLU, each latent's threshold set so that it
    fires on the share of these rows it fires on under TopK."""
    if sae.arch == "jumprelu":
        k = round(l0_N.double().mean().item())

        def as_topk(x_):
            pre = sae.pre_activation(x_)
            f = topk(pre, k)
            return Output(sae.decode(f, x_), f, pre)

        return {f"{name} as topk k={k}": as_topk}
    with torch.no_grad():
        pre = torch.cat([sae.pre_activation(c.float()) for c in x.split(8192)])
        freq = torch.cat([(sae(c.float()).f_BF != 0) for c in x.split(8192)]).double().mean(0)
    theta = torch.stack([torch.quantile(pre[:, i].double(), 1 - f.item()) if f > 0 else pre[:, i].max().double()
                         for i, f in enumerate(freq)]).float()  # fmt: skip

    def as_jumprelu(x_):
        pre_ = sae.pre_activation(x_)
        f = jumprelu_inference(pre_, theta)
        return Output(sae.decode(f, x_), f, pre_)

    return {f"{name} as jumprelu": as_jumprelu}


def edit_splices(model, point, recons: dict, fns: dict) -> Splices:
    """Splices for pipeline.lm_loss.delta_losses: each edit applied at `point` to ordinary positions
    (`recons`: name -> fn(x) -> an SAE's Output, whose errors the edits take)."""

    def replaced_by(fn):
        def replaced(special_BS1):
            def edit(acts):
                x = acts.float().reshape(-1, acts.shape[-1])
                errors = {n: fn_(x).x_hat_BD - x for n, fn_ in recons.items()}
                pos = torch.arange(acts.shape[1]).repeat(acts.shape[0])[:, None]
                return torch.where(special_BS1, acts, fn(x, errors, pos).reshape(acts.shape).to(acts.dtype))

            return splice(model, *point, edit)

        return replaced

    def zeroed(special_BS1):
        return splice(model, *point, lambda acts: torch.where(special_BS1, acts, torch.zeros_like(acts)))

    return Splices([replaced_by(fn) for fn in fns.values()], zeroed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="held-out store of the SAEs' hook point")
    ap.add_argument("--sae", action="append", required=True, help="an SAE folder (repeat); named by its folder")
    ap.add_argument("--delta-tokens", type=int, default=16384)
    ap.add_argument("--rerun", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--edits", default="", help="rerun only the edits whose name matches this regular expression")
    ap.add_argument("--rule-swaps", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    store = ActivationStore.open(args.store)
    loaded = {Path(s).name: load_sae(s) for s in args.sae}
    x, pos = rows_of(store)
    print(f"# {store.path}: {len(x):,} ordinary rows · {platform.node()} · torch {torch.__version__}\n")
    recons = {}
    for name, s in loaded.items():
        recons[name] = s.sae
        if args.rule_swaps:
            recons.update(rule_swaps(name, s.sae, x, reconstruct(s.sae, x)[1]))
    figures, errors, mean_r = {}, {}, {}
    for name, fn in recons.items():
        x_hat, l0_N = reconstruct(fn, x)
        figures[name] = token_figures(x, x_hat, l0_N, pos)
        figures[name]["L0 on dense latents"] = dense_l0(fn, x)
        errors[name] = x_hat - x
        mean_r[name] = figures[name]["mean r"]
    keys = list(figures[next(iter(figures))])
    print("| figure | " + " | ".join(figures) + " |\n|---|" + "---|" * len(figures))
    for k in keys:
        cells = [figures[n][k] for n in figures]
        show = lambda v: f"{v[0]:.4f} (L0 {v[1]:.0f})" if isinstance(v, tuple) else f"{v:.4g}"  # noqa: E731
        print(f"| {k} | " + " | ".join(show(c) for c in cells) + " |")
    print(f"\nerror energy over x's, per band of principal directions of x {BANDS}:")
    v = principal_directions(x)
    for name, shares in spectrum(x, errors, v).items():
        print(f"- {name}: " + ", ".join(f"{s:.3f}" for s in shares))
    if not args.rerun:
        return
    first = next(iter(loaded.values()))
    spec, revision = model_to_run(None, None, harvested=store.meta.model)
    lm = load_model(spec, device="cpu", dtype="float32", revision=revision)
    fns = edits(list(loaded), mean_r, v.float())
    fns.update({f"{name}: sae": (lambda x_, E, p, n=name: x_ + E[n]) for name in recons if name not in loaded})
    fns = {k: fn for k, fn in fns.items() if re.search(args.edits, k)}
    splices = edit_splices(lm.model, (first.layer, first.site), recons, fns)
    results = delta_losses(lm.model, store, splices, reads=(first.layer, first.site), tokens=args.delta_tokens,
                           batch_tokens=1024, group=dist.Group())  # fmt: skip
    print(f"\ndelta loss over {results[0]['predictions']:,} predictions ({results[0]['contexts']} contexts), "
          f"clean CE {results[0]['ce_clean']:.4f}:\n")  # fmt: skip
    print("| edit | delta loss | ± | KL |\n|---|---|---|---|")
    for name, r in zip(fns, results, strict=True):
        print(f"| {name} | {r['delta_loss']:.4f} | {r['delta_loss_stderr']:.4f} | {r['kl_clean_spliced']:.4f} |")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
