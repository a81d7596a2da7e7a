"""Gemma Scope 2's recipe on the main job: the frequency penalty and Matryoshka prefixes, on held-out rows.

    python benchmarks/recipe.py --train TRAIN_STORE --heldout HELDOUT_STORE [--out cache/recipe]
        [--freq-penalty 1e-3] [--matryoshka 128,512,2048]

Fits, with the main job's settings (JumpReLU, width 4096, target L0 60, 1,474,560 tokens, seed 0):
the plain SAE, the same with --freq-penalty, a Matryoshka SAE, and a plain SAE of the first prefix's
width (at the L0 that prefix reaches). Then, on every ordinary row of the held-out store (computed
here in float64 from each SAE's own forward pass): L0, FVU, dead latents (never fire) and dense
latents (fire on > 10 % of rows), and for the Matryoshka SAE the FVU of each prefix alone (its
first m latents, the rest zeroed).
"""

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.sae import SAE
from pipeline.store import ActivationStore
from stages.fit import FitConfig, run_fit


def heldout_rows(path: str) -> torch.Tensor:
    store = ActivationStore.open(path)
    parts = [x for x, _ in store.ordinary_rows(store.rows_written, 4096)]
    return torch.from_numpy(np.concatenate(parts))


def measure(sae: SAE, x: torch.Tensor, prefix: int | None = None) -> dict:
    with torch.no_grad():
        f, _ = sae.encode(x)
        if prefix is not None:
            f = f.clone()
            f[:, prefix:] = 0
        x_hat = sae.decode(f, x)
    xd = x.double()
    fvu = float((xd - x_hat.double()).square().sum() / (xd - xd.mean(0)).square().sum())
    share = (f != 0).double().mean(0)[:prefix]  # a prefix: its own latents only
    return {"l0": float((f != 0).sum(-1).double().mean()), "fvu": fvu, "dead": int((share == 0).sum()),
            "dense": int((share > 0.1).sum())}  # fmt: skip


def _folder_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--out", default="cache/recipe")
    ap.add_argument("--freq-penalty", type=float, default=1e-3)
    ap.add_argument("--matryoshka", default="128,512,2048")
    ap.add_argument("--plain", help="an SAE already fitted with the plain settings (the main job's), to reuse")
    args = ap.parse_args()
    out = Path(args.out)
    first = int(args.matryoshka.split(",")[0])
    runs = {
        "plain": {},
        f"--freq-penalty {args.freq_penalty:g}": {"freq_penalty": args.freq_penalty},
        f"--matryoshka {args.matryoshka}": {"matryoshka": args.matryoshka},
        f"plain, width {first}": {"width": first},  # its target L0: the Matryoshka first prefix's held-out L0
    }
    x = heldout_rows(args.heldout)
    rows, prefix_l0 = [], None
    for name, kw in runs.items():
        folder = Path(args.plain) if name == "plain" and args.plain else out / _folder_name(name)
        if "width" in kw:
            kw = {**kw, "target_l0": round(prefix_l0)}
            name += f", target L0 {round(prefix_l0)}"
        cfg = FitConfig(store=args.train, out=str(folder), **{"target_l0": 60, **kw}, checkpoint_every=0)
        t0 = time.perf_counter()
        if not (folder / "config.json").is_file():
            run_fit(cfg)
        wall = time.perf_counter() - t0
        sae, _ = SAE.load(folder)
        rows.append((name, measure(sae, x), wall))
        if "matryoshka" in kw:
            for m in cfg.prefixes:
                rows.append((f"  its first {m} latents alone", measure(sae, x, m), None))
            prefix_l0 = rows[-len(cfg.prefixes)][1]["l0"]
    print(f"\nmachine: {platform.node()} · {platform.processor() or platform.machine()} · torch {torch.__version__}")
    print(f"train {args.train}; held-out {args.heldout}: {len(x):,} ordinary rows")
    print("| SAE | L0 | held-out FVU | dead | dense (> 10 %) | fit wall |\n|---|---|---|---|---|---|")
    for name, m, wall in rows:
        w = "" if wall is None else f"{wall:.0f} s"
        print(f"| {name} | {m['l0']:.1f} | {m['fvu']:.4f} | {m['dead']} | {m['dense']} | {w} |")


if __name__ == "__main__":
    main()
