"""Harvest throughput against the bare early-stopped forward pass, measured in one run.

    python benchmarks/harvest.py [--layer 12] [--tokens 32768] [--device auto]

The floor runs the same contexts, batch by batch, through a copy of the model truncated after the
hooked block (no hooks, no store, no threads): the least work any harvester must do. Then
`gsp harvest` writes a real store from the same corpus with the model already loaded. The floor is
measured before and after, and the ratio uses their mean.
"""

import argparse
import itertools
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.corpus import documents, pack
from pipeline.models import OFFLINE_DEFAULT, base_model, decoder_layers, load_model
from stages.harvest import HarvestConfig, run_harvest


def bare_floor(lm, contexts: np.ndarray, layer: int, batch: int) -> float:
    """tok/s of embedding + blocks 0..layer on the same batches, nothing else."""
    base = base_model(lm.model)
    layers = decoder_layers(lm.model)
    kept = torch.nn.ModuleList(layers[: layer + 1])
    full, base.layers = base.layers, kept
    try:
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(contexts), batch):
                base(input_ids=torch.from_numpy(contexts[i : i + batch]).to(lm.device), use_cache=False)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        return contexts.size / (time.perf_counter() - t0)
    finally:
        base.layers = full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=OFFLINE_DEFAULT)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32_768)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dataset", default="wiki", help="corpus for both measurements (as gsp harvest --dataset)")
    ap.add_argument("--store-dtype", default="bfloat16")
    ap.add_argument("--workers", default="threads", choices=["threads", "processes"])
    args = ap.parse_args()

    lm = load_model(args.model, device=args.device)
    n_contexts = args.tokens // args.context_size
    packed = pack(documents(args.dataset), lm.tokenizer, args.context_size)
    contexts = np.stack([ids for ids, _ in itertools.islice(packed, n_contexts)])
    bare_floor(lm, contexts[: args.batch_size * 2], args.layer, args.batch_size)  # warm-up

    floor_before = bare_floor(lm, contexts, args.layer, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(
            model=args.model,
            layer=args.layer,
            tokens=args.tokens,
            context_size=args.context_size,
            batch_size=args.batch_size,
            device=args.device,
            dataset=args.dataset,
            store=str(Path(tmp) / "bench"),
            store_dtype=args.store_dtype,
            workers=args.workers,
        )
        t0 = time.perf_counter()
        run_harvest(cfg, model=lm)
        ours = n_contexts * args.context_size / (time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in Path(cfg.store).rglob("*") if f.is_file())
    floor_after = bare_floor(lm, contexts, args.layer, args.batch_size)
    floor = (floor_before + floor_after) / 2

    device = torch.cuda.get_device_name() if lm.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nmachine: {platform.node()} · {device} · torch {torch.__version__} · {lm.name} layer {args.layer}")
    print(f"{args.tokens:,} tokens, context {args.context_size}, batch {args.batch_size}, {lm.dtype}, {args.workers}")
    print("| measure | value |\n|---|---|")
    print(f"| bare early-stopped forward (before / after) | {floor_before:,.0f} / {floor_after:,.0f} tok/s |")
    print(f"| gsp harvest, store included | {ours:,.0f} tok/s |")
    print(f"| ratio harvest / floor | {ours / floor:.2f} |")
    print(f"| bytes per token on disk ({args.store_dtype}) | {size / (n_contexts * args.context_size):,.0f} |")


if __name__ == "__main__":
    main()
