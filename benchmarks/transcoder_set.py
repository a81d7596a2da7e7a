"""A transcoder set (every layer from one read of the store) against the same transcoders fitted by
one `gsp fit` per layer, and what the store costs on disk.

    python benchmarks/transcoder_set.py --store STORE [--layers all] [--width 4096] [--tokens 65536]
        [--target-l0 60] [--batch-size 1024]

STORE is a store of every layer's `mlp_in` and `mlp_out` (`gsp harvest --layer all --site
mlp_in,mlp_out`). Both sides are real `gsp fit` processes with the same settings: the set is one
`gsp fit --transcoders mlp_in:mlp_out`, the other side one `gsp fit --store STORE/L<l>.mlp_in
--target-store STORE/L<l>.mlp_out` per layer, each paying its own process start, store open and
read. Prints the store's bytes per token (every array's files, token ids included), each side's wall
time and their ratio, and checks that every transcoder of the set is byte-identical to its lone fit.
"""

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.store import ActivationStore
from pipeline.transcoder_set import layers_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--layers", default="all")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--target-l0", type=float, default=60)
    ap.add_argument("--batch-size", type=int, default=1024)
    args = ap.parse_args()
    store = args.store.rstrip("/")
    layers = layers_of(store, "mlp_in", "mlp_out", args.layers)
    first = ActivationStore.open(f"{store}/L{layers[0]}.mlp_in")
    disk = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())
    common = ["--width", str(args.width), "--tokens", str(args.tokens), "--target-l0", f"{args.target_l0:g}",
              "--batch-size", str(args.batch_size), "--checkpoint-every", "0"]  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="gsp-set-bench-"))
    try:
        t0 = time.perf_counter()
        _gsp("fit", "--store", store, "--transcoders", "mlp_in:mlp_out", "--layers", ",".join(map(str, layers)),
             "--out", str(root / "set"), *common)  # fmt: skip
        t_set = time.perf_counter() - t0
        t0 = time.perf_counter()
        for layer in layers:
            _gsp("fit", "--store", f"{store}/L{layer}.mlp_in", "--target-store", f"{store}/L{layer}.mlp_out",
                 "--out", str(root / f"alone_{layer}"), *common)  # fmt: skip
        t_alone = time.perf_counter() - t0
        same = all(
            (root / "set" / f"layer_{layer}" / "params.safetensors").read_bytes()
            == (root / f"alone_{layer}" / "params.safetensors").read_bytes()
            for layer in layers
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n# {store} · {platform.node()} · torch {torch.__version__} · {torch.get_num_threads()} threads\n")
    print(f"store: {first.rows_written:,} rows, {len(first.meta.hooks)} hook points, {first.meta.dtype}: "
          f"{disk / first.rows_written:,.0f} bytes per token on disk\n")  # fmt: skip
    print(
        f"| {len(layers)} transcoders, width {args.width:,}, {args.tokens:,} tokens each | wall s | tok/s (per layer) |"
    )
    print("|---|---|---|")
    print(f"| one set (`--transcoders mlp_in:mlp_out`) | {t_set:.0f} | {args.tokens / t_set:,.0f} |")
    print(f"| {len(layers)} separate fits | {t_alone:.0f} | {args.tokens / t_alone:,.0f} |")
    print(f"\nset / separate: {t_set / t_alone:.2f} of the time; every transcoder byte-identical: {same}")


def _gsp(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "stages", *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"gsp {' '.join(args[:3])} … failed: {r.stderr.strip().splitlines()[-1:]}")


if __name__ == "__main__":
    main()
