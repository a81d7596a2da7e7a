"""A sweep of N SAEs from one read of the store against the same N SAEs fitted one after another.

    python benchmarks/sweep.py --store STORE [--widths 256,256,256,256] [--steps 200] [--batch-size 4096]

Both sides run `gsp fit`'s own code (stages.fit.run_sweep and run_fit) on the same store with the
same settings: TopK SAEs of the given widths (k 32 where the width allows), one per listed width,
each with its own lr so that no two are the same SAE. Prints the wall time of each side and their
ratio, and checks that every SAE of the sweep is byte-identical to the one fitted alone. Small
widths make the loader a large share of a fit, large ones the SAE step.
"""

import argparse
import dataclasses
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from stages.fit import FitConfig, run_fit, run_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--widths", default="256,256,256,256")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4096)
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    lrs = [1e-3 * (1 + i / 10) for i in range(len(widths))]  # one SAE per width: an lr each tells them apart
    root = Path(tempfile.mkdtemp(prefix="gsp-sweep-bench-"))
    cfgs = [
        FitConfig(
            store=args.store,
            arch="topk",
            width=w,
            k=min(32, w),
            lr=lr,
            steps=args.steps,
            batch_size=args.batch_size,
            checkpoint_every=0,
            log_every=50,
        )  # fmt: skip
        for w, lr in zip(widths, lrs, strict=True)
    ]
    try:
        run_fit(dataclasses.replace(cfgs[0], steps=1, out=str(root / "warm-up")))  # the store into the page cache
        t0 = time.perf_counter()
        alone = [run_fit(dataclasses.replace(c, out=str(root / "alone" / str(i)))) for i, c in enumerate(cfgs)]
        t_alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = run_sweep([dataclasses.replace(c, out=str(root / "sweep" / str(i))) for i, c in enumerate(cfgs)])
        t_sweep = time.perf_counter() - t0
        same = all(
            (a / "params.safetensors").read_bytes() == (b / "params.safetensors").read_bytes()
            for a, b in zip(alone, outs, strict=True)
        )
        rows = args.steps * args.batch_size
        t_stream = _stream_seconds(cfgs[0])
        print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
        print(f"{len(cfgs)} TopK SAEs of widths {args.widths}, {args.steps} steps of {args.batch_size} rows each")
        print(f"one after another: {t_alone:7.1f} s ({len(cfgs) * rows / t_alone:,.0f} SAE-rows/s)")
        print(f"one sweep:         {t_sweep:7.1f} s ({len(cfgs) * rows / t_sweep:,.0f} SAE-rows/s)")
        print(f"sweep / separate:  {t_sweep / t_alone:.2f}×   every SAE byte-identical to its separate fit: {same}")
        print(
            f"the data path alone (store read, shuffled, decoded; no SAE): {t_stream:.1f} s per stream of "
            f"{args.steps} batches, paid {len(cfgs)}× one after another and once by the sweep"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _stream_seconds(cfg: FitConfig) -> float:
    """The loader of `gsp fit` alone over the same stream (what a sweep pays once instead of N times)."""
    import math
    from contextlib import closing

    from pipeline.loader import ShuffledLoader
    from pipeline.store import ActivationStore

    store = ActivationStore.open(cfg.store)
    scale = 1.0 / math.sqrt(store.hook.stats.mean_sq_norm)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where gsp fit's "auto" trains
    loader = ShuffledLoader(store, cfg.batch_size, seed=cfg.seed, buffer_mib=cfg.buffer_mib, scales=(scale,),
                            lanes=cfg.lanes, device=device)  # fmt: skip
    with closing(iter(loader)) as batches:
        for _ in range(cfg.total_steps):
            next(batches)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
