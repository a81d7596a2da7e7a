"""A sweep of N SAEs from one read of the store against the same N SAEs fitted by N separate commands.

    python benchmarks/sweep.py --store STORE [--width 256] [--n 4] [--steps 100] [--batch-size 4096]
        [--repeat 3]

What a researcher would otherwise run: N `gsp fit` commands, one per SAE, against one
`gsp fit --lr a,b,c,…` that trains all N from one loader stream. TopK SAEs (k 32 where the width
allows) of one width, told apart by their learning rates. Both sides are real `gsp fit` processes on
the same store with the same settings, so each side pays what it pays in use: a separate fit its own
process start, store open and read, and stream; the sweep those once. The two sides alternate
(separate, sweep; then sweep, separate; ...) `--repeat` times, so that a slow spell of the machine
falls on both; each side's every time is printed, and the ratio of the fastest of each and of the
medians. Checks that every SAE of the sweep is byte-identical to its separate fit, and times the
data path alone (the loader over the same stream, no SAE): the part a sweep pays once in-process.
"""

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import torch

from stages.fit import FitConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--n", type=int, default=4, help="SAEs in the sweep")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    lrs = [f"{1e-3 * (1 + i / 10):g}" for i in range(args.n)]  # an lr each tells the SAEs apart
    base = ["--store", args.store, "--arch", "topk", "--width", str(args.width), "--k", str(min(32, args.width)),
            "--batch-size", str(args.batch_size), "--checkpoint-every", "0"]  # fmt: skip
    common = [*base, "--steps", str(args.steps)]
    root = Path(tempfile.mkdtemp(prefix="gsp-sweep-bench-"))
    times: dict[str, list[float]] = {"separate": [], "sweep": []}
    try:
        _gsp("fit", *base, "--steps", "1", "--out", str(root / "warm-up"))  # the store into the page cache

        def separate(rep: int) -> list[Path]:
            outs = [root / f"separate{rep}" / lr for lr in lrs]
            for lr, out in zip(lrs, outs, strict=True):
                _gsp("fit", *common, "--lr", lr, "--out", str(out))
            return outs

        def sweep(rep: int) -> list[Path]:
            out = root / f"sweep{rep}"
            _gsp("fit", *common, "--lr", ",".join(lrs), "--out", str(out))
            by_lr = {json.loads((p / "config.json").read_text())["fit_config"]["lr"]: p for p in out.iterdir()
                     if (p / "config.json").is_file()}  # fmt: skip
            return [by_lr[float(lr)] for lr in lrs]

        outputs = {}
        for rep in range(args.repeat):
            for side in ("separate", "sweep") if rep % 2 == 0 else ("sweep", "separate"):
                t0 = time.perf_counter()
                outputs[side] = (separate if side == "separate" else sweep)(rep)
                times[side].append(time.perf_counter() - t0)
            same = all((a / "params.safetensors").read_bytes() == (b / "params.safetensors").read_bytes()
                       for a, b in zip(outputs["separate"], outputs["sweep"], strict=True))  # fmt: skip
            if not same:
                sys.exit(f"repetition {rep + 1}: a sweep's SAE differs from its separate fit")
            for side in times:
                shutil.rmtree(root / f"{side}{rep}", ignore_errors=True)
        stream = _stream_seconds(FitConfig(store=args.store, steps=args.steps, batch_size=args.batch_size))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = args.n * args.steps * args.batch_size
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{args.n} TopK SAEs of width {args.width}, {args.steps} steps of {args.batch_size} rows each; "
          f"{args.repeat} alternating repetitions")  # fmt: skip
    for side, label in (("separate", f"{args.n} separate gsp fit"), ("sweep", "one gsp fit sweep")):
        ts = times[side]
        print(
            f"{label:>22}: " + " · ".join(f"{t:.1f} s" for t in ts) + f"   (fastest {rows / min(ts):,.0f} SAE-rows/s)"
        )
    fast = min(times["sweep"]) / min(times["separate"])
    median = statistics.median(times["sweep"]) / statistics.median(times["separate"])
    print(
        f"sweep / separate: {fast:.2f}× (fastest of each), {median:.2f}× (medians); "
        "every SAE byte-identical to its separate fit: True"
    )
    print(
        f"the data path alone (store read, shuffled, decoded; no SAE): {stream:.1f} s per stream of "
        f"{args.steps} batches, paid {args.n}× by separate fits and once by the sweep"
    )


def _gsp(*argv: str) -> None:
    r = subprocess.run([sys.executable, "-m", "stages", *argv], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"gsp {' '.join(argv)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def _stream_seconds(cfg: FitConfig) -> float:
    """The loader of `gsp fit` alone over the same stream (what a sweep pays once instead of N times)."""
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
