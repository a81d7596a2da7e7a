"""The data path of `gsp fit`: the loader against the raw read of the same files, and a fit whose step costs nothing.

    python benchmarks/loader.py [--store STORE] [--batch-size 4096] [--batches 400] [--fit-steps 400]

All measured in one process, one after another, on the same store (read once first, so that it is
in the page cache, as it is for every epoch after the first of a store that fits in memory):
- raw read: every activation shard file of the store read into one reused buffer (no checksum, no
  decoding): the floor of any loader that reads these files;
- loader alone: `ShuffledLoader` as `gsp fit` runs it (fit's default 8 lanes, specials masked,
  token-level shuffle, crc32c checked, rows decoded to float32 and unit-scaled, on --device),
  batches taken and dropped: over its first epoch (every chunk read, the buffers first touched) and
  after it; once holding the store in memory (what fit does when the store fits --buffer-mib), once
  reading it window by window (what it does for a store that does not);
- tiny fit: `gsp fit` itself (checkpoints off) with a 16-latent TopK SAE, where the step costs
  almost nothing and the data path is nearly the whole cost; and the same SAE's step on one batch
  already in memory, the floor of that fit.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from pipeline.loader import ShuffledLoader
from pipeline.sae import SAE
from pipeline.store import ActivationStore, local
from pipeline.train import train_step
from stages.fit import FitConfig, run_fit


def raw_read(store: ActivationStore) -> tuple[float, int]:
    """(seconds, bytes) to read every shard file of the store's activations."""
    files = sorted(Path(local(store.root), store.array_name, "c").rglob("*"))
    files = [f for f in files if f.is_file()]
    buf = bytearray(max(f.stat().st_size for f in files))
    total, t0 = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            total += fh.readinto(buf)
    return time.perf_counter() - t0, total


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="cache/stores/gemma-3-270m_L12_resid_post_train_491520")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--fit-steps", type=int, default=400)
    ap.add_argument("--device", default="cpu", help="where the loader delivers its float32 rows (cpu, cuda)")
    args = ap.parse_args()
    store = ActivationStore.open(args.store)
    b, d = args.batch_size, store.d_in
    scale = store.hook.stats.mean_sq_norm**-0.5
    raw_read(store)  # into the page cache
    seconds, nbytes = min(raw_read(store) for _ in range(3))
    raw_rows = nbytes / (d * store.stored_dtype.itemsize) / seconds

    epoch = store.hook.stats.count // b  # batches in one epoch
    loaders = {}
    for resident in (True, False):
        loader = iter(ShuffledLoader(store, b, seed=0, lanes=FitConfig.lanes, scales=(scale,), device=args.device,
                                     resident=resident))  # fmt: skip
        t0 = time.perf_counter()
        for _ in range(epoch):  # the first epoch: every chunk read once, the buffers touched for the first time
            next(loader)
        _sync(args.device)
        first = epoch * b / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(loader)
        _sync(args.device)
        loaders[resident] = (first, args.batches * b / (time.perf_counter() - t0))
        if resident:
            x = next(loader).cpu().clone()
        loader.close()
    sae = SAE(d, 16, arch="topk", k=8).init_gemma_scope(torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.0, 0.999))
    since = torch.zeros(16, dtype=torch.int64)
    cfg = FitConfig(store=args.store, arch="topk", width=16, k=8, batch_size=b, steps=args.fit_steps)
    step = lambda: train_step(sae, opt, x, cfg.objective, lam=0, since_fired_F=since,  # noqa: E731
                              dead_tokens=cfg.dead_tokens, sparse=False)  # fmt: skip
    step()
    t0 = time.perf_counter()
    for _ in range(50):
        step()
    step_rows = 50 * b / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        fit = FitConfig(store=args.store, arch="topk", width=16, k=8, batch_size=b, steps=args.fit_steps,
                        out=os.path.join(tmp, "sae"), checkpoint_every=0, log_every=50, device="cpu")  # fmt: skip
        t0 = time.perf_counter()
        run_fit(fit)
        wall = time.perf_counter() - t0
        final = json.loads(Path(tmp, "sae", "config.json").read_text())["final_train_metrics"]
    fit_rows = final["tok_s"]

    print(f"\nmachine: {platform.node()} · {platform.processor() or platform.machine()} · "
          f"{os.cpu_count()} CPUs · torch {torch.__version__}")  # fmt: skip
    print(f"store {args.store}: {store.rows_written:,} rows of {d} {store.meta.dtype}, "
          f"{nbytes / 2**20:,.0f} MiB; batch {b}")  # fmt: skip
    print("| measure | rows/s | × raw read |\n|---|---|---|")
    for name, rate in [
        ("raw read of the shard files (page cache)", raw_rows),
        (f"loader, store held in memory: first epoch ({epoch} batches; every chunk read once)", loaders[True][0]),
        (f"loader, store held in memory: after the first epoch ({args.batches} batches)", loaders[True][1]),
        ("loader, store read window by window into 3 reused buffers a lane: first epoch", loaders[False][0]),
        ("loader, store read window by window: after the first epoch", loaders[False][1]),
        ("16-latent TopK step on one batch in memory", step_rows),
        (f"`gsp fit`, 16-latent TopK, {args.fit_steps} steps (its own tok/s; {wall:.1f} s with start-up)", fit_rows),
    ]:
        print(f"| {name} | {rate:,.0f} | {rate / raw_rows:.2f} |")
    print(f"\nraw read {nbytes / seconds / 1e9:.2f} GB/s; loader {loaders[True][1] * d * 4 / 1e9:.2f} GB/s of float32; "
          f"gsp fit / its step in memory = {fit_rows / step_rows:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
