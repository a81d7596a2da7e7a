"""The fit quality target: train on the default store, measure on held-out documents.

    python benchmarks/fit_quality.py --train STORE --heldout STORE [--arch jumprelu topk] [fit options]

Prints L0, FVU, dead % (never fired over the held-out tokens) and wall time per SAE, as a
Markdown table. The SAE is read back from its saved folder and applied to raw activations
with Gemma Scope 2's inference (pipeline.sae.SAE), so the figures are those of the artifact.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.metrics import fvu, l0
from pipeline.sae import SAE
from pipeline.store import ActivationStore
from stages.fit import FitConfig, run_fit


def heldout_metrics(sae_dir: Path, store: ActivationStore, arch: str, k: int) -> dict:
    params = load_file(sae_dir / "params.safetensors")
    d_in, width = params["w_enc"].shape
    sae = SAE(d_in, width, arch=arch, k=k)
    sae.load_state_dict(params)
    x = torch.from_numpy(store.read(0, store.rows_written))
    x = x[~torch.from_numpy(np.isin(store.read_tokens(0, store.rows_written), store.special_ids))]
    with torch.no_grad():
        out = sae(x)
    fired = (out.f_BF != 0).any(0)
    return {"l0": l0(out.f_BF).item(), "fvu": fvu(x, out.x_hat_BD).item(), "dead": 1 - fired.float().mean().item(),
            "tokens": len(x)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--arch", nargs="+", default=["jumprelu", "topk"])
    ap.add_argument("--target-l0", type=float, default=60)
    ap.add_argument("--sparsity-coeff", type=float, default=None)
    ap.add_argument("--k", type=int, default=60)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=1_474_560)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--dead-tokens", type=int, default=None)
    ap.add_argument("--aux-coeff", type=float, default=None)
    ap.add_argument("--keep", default=None, help="folder to keep the SAEs in")
    args = ap.parse_args()
    heldout = ActivationStore.open(args.heldout)
    rows = []
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp())
    for arch in args.arch:
        given = {"lr": args.lr, "dead_tokens": args.dead_tokens, "aux_coeff": args.aux_coeff}
        extra = {k: v for k, v in given.items() if v}
        if arch == "jumprelu":
            extra["target_l0"] = args.target_l0
            if args.sparsity_coeff is not None:
                extra["sparsity_coeff"] = args.sparsity_coeff
        out = root / arch
        shutil.rmtree(out, ignore_errors=True)
        cfg = FitConfig(store=args.train, out=str(out), arch=arch, width=args.width, k=args.k,
                        batch_size=args.batch_size, tokens=args.tokens, checkpoint_every=0, **extra)  # fmt: skip
        t0 = time.perf_counter()
        run_fit(cfg)
        wall = time.perf_counter() - t0
        m = heldout_metrics(out, heldout, arch, args.k)
        rows.append((arch, m, wall, cfg))
    print(f"\nheld-out: {args.heldout} ({rows[0][1]['tokens']:,} non-special tokens)")
    print("| SAE | L0 | FVU | dead % | wall time | settings |\n|---|---|---|---|---|---|")
    for arch, m, wall, cfg in rows:
        what = (f"k={cfg.k}, aux {cfg.aux_coeff:.3g}, dead window {cfg.dead_tokens:,}" if arch == "topk"
                else f"target L0 {cfg.target_l0}, λ {cfg.sparsity_coeff}")  # fmt: skip
        settings = f"{what}, lr {cfg.resolved().lr}, width {cfg.width}, batch {cfg.batch_size}, {cfg.tokens:,} tokens"
        print(f"| {arch} | {m['l0']:.1f} | {m['fvu']:.4f} | {100 * m['dead']:.1f} | {wall:.0f} s | {settings} |")


if __name__ == "__main__":
    main()
