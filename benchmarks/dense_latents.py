"""What an SAE's dense latents (firing on more than 10 % of held-out tokens) carry.

    python benchmarks/dense_latents.py --heldout HELDOUT_STORE SAE [SAE ...]

For each SAE, on every ordinary row of the held-out store (float64): the dense latents; how many
have an opposite partner among them (decoder cosine below −0.5, the "pairs" Sun, Engels & Tegmark
report for high-frequency latents, "High Frequency Latents Are Features, Not Bugs", 2025); the share
of the held-out variance inside the span of their decoder rows, against the span of as many latents
drawn at random from the others; and the FVU of the SAE with them zeroed (the sparse latents and
b_dec alone) next to its whole FVU. A dense subspace that holds most of the variance is one a
frequency penalty can only take from the SAE by making the sparse latents carry it.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from recipe import heldout_rows

from pipeline.sae import SAE


def dense_latents(sae: SAE, x: torch.Tensor, seed: int = 0) -> dict:
    with torch.no_grad():
        f, _ = sae.encode(x)
    share = (f != 0).double().mean(0).numpy()
    dense = np.flatnonzero(share > 0.1)
    xd = x.double().numpy()
    xc = xd - xd.mean(0)
    total = (xc**2).sum()
    w = sae.w_dec.detach().double().numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)

    def span_share(rows: np.ndarray) -> float:
        if len(rows) == 0:
            return 0.0
        _, s, vt = np.linalg.svd(w[rows], full_matrices=False)
        basis = vt[s > 1e-6 * s[0]]
        return float(((xc @ basis.T) ** 2).sum() / total)

    cos = w[dense] @ w[dense].T
    np.fill_diagonal(cos, 0)
    others = np.flatnonzero((share > 0) & (share <= 0.1))
    drawn = np.random.default_rng(seed).choice(others, min(len(dense), len(others)), replace=False)
    with torch.no_grad():
        kept = f.clone()
        kept[:, torch.from_numpy(dense)] = 0
        sparse_only = sae.decode(kept, x).double().numpy()
        whole = sae.decode(f, x).double().numpy()
    return {
        "l0": float((f != 0).sum(-1).double().mean()),
        "dense": len(dense),
        "paired": int((cos.min(1) < -0.5).sum()) if len(dense) else 0,
        "span": span_share(dense),
        "span_random": span_share(drawn),
        "fvu": float(((xd - whole) ** 2).sum() / total),
        "fvu_without": float(((xd - sparse_only) ** 2).sum() / total),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heldout", required=True)
    ap.add_argument("saes", nargs="+")
    args = ap.parse_args()
    x = heldout_rows(args.heldout)
    print(f"{len(x):,} held-out rows")
    print("| SAE | L0 | dense | with an opposite partner | variance in their span (random latents') "
          "| FVU | FVU without them |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for folder in args.saes:
        sae, _ = SAE.load(Path(folder))
        r = dense_latents(sae, x)
        print(f"| {Path(folder).name} | {r['l0']:.1f} | {r['dense']} | {r['paired']} | {r['span']:.3f} "
              f"({r['span_random']:.3f}) | {r['fvu']:.4f} | {r['fvu_without']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
