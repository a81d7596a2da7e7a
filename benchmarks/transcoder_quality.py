"""Transcoders on held-out documents: plain and skip JumpReLU transcoders against a least-squares linear map.

    python benchmarks/transcoder_quality.py [--layer 12] [--tokens 491520] [--steps N]

Harvests (or reuses) a train and a held-out store of one layer's MLP input and output (`--site
mlp_in,mlp_out`, one pass) from the offline 270M over offline Wikipedia, fits a plain and a skip
transcoder at target L0 60 with the main job's settings (width 4096, batch 1024, 1,474,560 tokens),
fits the linear map y ≈ x·A + b by least squares on the same training rows (float64 normal
equations), and measures all three on the held-out store: L0 and FVU of the MLP output's prediction.
"""

import argparse
import platform
import time

import numpy as np
import torch

from pipeline.metrics import reconstruction
from pipeline.sae_formats import load_sae
from pipeline.store import ActivationStore
from stages.fit import FitConfig, fit_or_reuse
from stages.harvest import HarvestConfig, run_harvest


def linear_map(x_store: ActivationStore, y_store: ActivationStore) -> np.ndarray:
    """[A; b] minimising Σ‖y − x·A − b‖² over every ordinary row (normal equations in float64)."""
    d = x_store.d_in + 1
    xtx, xty = np.zeros((d, d)), np.zeros((d, y_store.d_in))
    for x, y, _ in x_store.ordinary_rows(x_store.rows_written, 8192, target=y_store):
        x1 = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
        xtx += x1.T @ x1
        xty += x1.T @ y.astype(np.float64)
    # the minimum-norm solution of the normal equations: the MLP's input (a norm's output) can leave
    # directions with no variance, which makes XᵀX singular
    return np.linalg.lstsq(xtx, xty, rcond=None)[0]


def linear_fvu(ab: np.ndarray, x_store: ActivationStore, y_store: ActivationStore) -> float:
    err, total, n, s, ss = 0.0, 0.0, 0, 0.0, 0.0
    for x, y, _ in x_store.ordinary_rows(x_store.rows_written, 8192, target=y_store):
        y = y.astype(np.float64)
        y_hat = np.hstack([x.astype(np.float64), np.ones((len(x), 1))]) @ ab
        err += ((y - y_hat) ** 2).sum()
        n, s, ss = n + len(y), s + y.sum(0), ss + (y**2).sum(0)
    total = (ss - s**2 / n).sum()
    return err / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=491_520)
    ap.add_argument("--heldout-tokens", type=int, default=32_768)
    ap.add_argument("--steps", type=int, default=None, help="fit steps (default: the main job's 1,474,560 tokens)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base = HarvestConfig(layer=str(args.layer), site="mlp_in,mlp_out", tokens=args.tokens)
    train = run_harvest(base)
    held = run_harvest(HarvestConfig(layer=str(args.layer), site="mlp_in,mlp_out", tokens=args.heldout_tokens,
                                     part="heldout"))  # fmt: skip
    inp, out = f"L{args.layer}.mlp_in", f"L{args.layer}.mlp_out"
    rows = []
    for skip in (False, True):
        cfg = FitConfig(store=f"{train}/{inp}", target_store=f"{train}/{out}", skip=skip, target_l0=60,
                        steps=args.steps, seed=args.seed)  # fmt: skip
        t0 = time.perf_counter()
        folder = fit_or_reuse(cfg)
        seconds = time.perf_counter() - t0
        sae = load_sae(str(folder)).sae
        m = reconstruction(sae, ActivationStore.open(f"{held}/{inp}"), 10**9, 4096,
                           target=ActivationStore.open(f"{held}/{out}"))  # fmt: skip
        rows.append((f"{'skip' if skip else 'plain'} transcoder, target L0 60", m["l0"], m["fvu"],
                     100 * m["dead_fraction"], f"{seconds:.0f} s"))  # fmt: skip
    t0 = time.perf_counter()
    ab = linear_map(ActivationStore.open(f"{train}/{inp}"), ActivationStore.open(f"{train}/{out}"))
    fvu = linear_fvu(ab, ActivationStore.open(f"{held}/{inp}"), ActivationStore.open(f"{held}/{out}"))
    rows.append(("least-squares linear map x·A + b", float(ab.shape[0] - 1), fvu, 0.0,
                 f"{time.perf_counter() - t0:.0f} s"))  # fmt: skip

    print(f"\nmachine: {platform.node()} · CPU ({torch.get_num_threads()} threads) · torch {torch.__version__}")
    print(f"layer {args.layer}: MLP input → MLP output; train {train}, held-out {held}")
    print("| predictor | L0 | held-out FVU | dead % | wall time |\n|---|---|---|---|---|")
    for name, l0, fvu_, dead, wall in rows:
        print(f"| {name} | {l0:.1f} | {fvu_:.4f} | {dead:.1f} | {wall} |")
    print("(the linear map's 'L0' is its input width: it is dense)")


if __name__ == "__main__":
    main()
