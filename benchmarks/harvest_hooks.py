"""Many hook points from one forward pass: the cost of harvesting several against the deepest alone.

    python benchmarks/harvest_hooks.py [--tokens 32768] [--device auto]

In one run, with the model loaded once and the same contexts: `gsp harvest` of the deepest layer
alone (before and after, the mean is the reference), of Gemma Scope 2's four 270M layers 5, 9, 12,
15 (`resid_post`), and of every layer × resid_post, mlp_out, attn_out. The forward pass is shared
(it stops after the deepest point either way), so what a ratio above 1 measures is the extra
copying, statistics and writing of more hook points. Bytes per token are measured on disk.
"""

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from pipeline.models import OFFLINE_DEFAULT, decoder_layers, load_model
from stages.harvest import HarvestConfig, run_harvest


def harvest(lm, args, layer: str, site: str, folder: str) -> tuple[float, float]:
    """(seconds, bytes per token) of one harvest into a fresh store."""
    cfg = HarvestConfig(model=args.model, layer=layer, site=site, tokens=args.tokens, context_size=args.context_size,
                        batch_size=args.batch_size, device=args.device, store=folder)  # fmt: skip
    t0 = time.perf_counter()
    run_harvest(cfg, model=lm)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    return seconds, size / args.tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=OFFLINE_DEFAULT)
    ap.add_argument("--layers", default="5,9,12,15", help="the several layers (resid_post)")
    ap.add_argument("--tokens", type=int, default=32_768)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    lm = load_model(args.model, device=args.device)
    n_layers = len(decoder_layers(lm.model))
    deepest = args.layers.split(",")[-1]
    runs = [
        (f"layer {deepest} alone", deepest, "resid_post"),
        (f"layers {args.layers}", args.layers, "resid_post"),
        (f"all {n_layers} layers × 3 sites", "all", "resid_post,mlp_out,attn_out"),
        (f"layer {n_layers - 1} alone", str(n_layers - 1), "resid_post"),
        (f"layer {deepest} alone (again)", deepest, "resid_post"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        harvest(lm, args, deepest, "resid_post", f"{tmp}/warm-up")  # caches, threads, the tokenizer's first call
        results = {name: harvest(lm, args, layer, site, f"{tmp}/{i}") for i, (name, layer, site) in enumerate(runs)}
    alone = (results[runs[0][0]][0] + results[runs[4][0]][0]) / 2  # the deepest of the several, alone
    last_alone = results[runs[3][0]][0]  # the model's last layer, alone: what `all` runs through
    reference = {runs[0][0]: alone, runs[1][0]: alone, runs[2][0]: last_alone, runs[3][0]: last_alone,
                 runs[4][0]: alone}  # fmt: skip
    device = torch.cuda.get_device_name() if lm.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nmachine: {platform.node()} · {device} · torch {torch.__version__} · {lm.name}")
    print(f"{args.tokens:,} tokens, context {args.context_size}, batch {args.batch_size}, {lm.dtype}, bfloat16 stores")
    print("| harvest | seconds | tok/s | × the same depth alone | bytes/token |\n|---|---|---|---|---|")
    for name, _, _ in runs:
        seconds, per_token = results[name]
        ratio = seconds / reference[name]
        print(f"| {name} | {seconds:.1f} | {args.tokens / seconds:,.0f} | {ratio:.2f} | {per_token:,.0f} |")


if __name__ == "__main__":
    main()
