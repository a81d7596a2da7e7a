"""Fit throughput: the loader alone, gsp's step against a bare dense JumpReLU step, and the loop from a store.

    python benchmarks/fit.py [--store STORE] [--width 4096] [--batch-size 4096] [--steps 20] [--device cuda]

All measured in one process on the same shapes:
- bare step: a plain dense PyTorch JumpReLU SAE step (forward, MSE + L0 surrogate, backward, Adam)
  on a tensor already in memory: the floor any trainer pays;
- gsp step: pipeline.train.train_step (loss, decoder-gradient projection, Adam, renormalisation,
  dead-latent tracking), the step `gsp fit` runs, on the same in-memory tensor;
- gsp from the store: the same step fed by the shuffled loader (its cost is the difference);
- loader alone: rows/s the loader serves with no training (benchmarks/loader.py measures it fully).
On CUDA (--device cuda) every step runs there, under --matmul's precision (as gsp fit's).
"""

import argparse
import itertools
import platform
import time

import torch

from pipeline.loader import ShuffledLoader
from pipeline.sae import SAE, heaviside, jumprelu
from pipeline.store import ActivationStore
from pipeline.train import precision, train_step
from stages.fit import FitConfig


def timed(fn, steps: int, batch: int, device: torch.device) -> float:
    fn()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_step(d_in: int, width: int, x: torch.Tensor, autocast):
    dev = x.device
    w_enc = torch.nn.Parameter(torch.randn(d_in, width, device=dev) / d_in**0.5)
    w_dec = torch.nn.Parameter(torch.randn(width, d_in, device=dev) / width**0.5)
    b_enc, b_dec, theta = (torch.nn.Parameter(torch.zeros(n, device=dev)) for n in (width, d_in, width))
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_dec, theta], lr=1e-4, betas=(0.0, 0.999))

    with torch.no_grad():  # the same sparsity as gsp's step below: about 60 active latents per token
        theta.copy_((x @ w_enc).kthvalue(len(x) - 60 * len(x) // width, dim=0).values)

    def run():
        with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
            pre = x @ w_enc + b_enc
            f = jumprelu(pre, theta, 0.001)
            loss = (f @ w_dec + b_dec - x).square().sum(-1).mean() + 1e-3 * heaviside(pre, theta, 0.001).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def gsp_step(cfg: FitConfig, d_in: int, batches, device: torch.device, autocast):
    sae = SAE(d_in, cfg.width, arch=cfg.arch, k=cfg.k).init_gemma_scope(torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():  # thresholds of a trained SAE: about 60 latents active per token, as in training
        sample = next(batches)
        sae.threshold.copy_((sample @ sae.w_enc).kthvalue(len(sample) - 60 * len(sample) // cfg.width, dim=0).values)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.resolved().lr, betas=(0.0, 0.999))
    since = torch.zeros(cfg.width, dtype=torch.int64, device=device)
    sparse = cfg.arch == "jumprelu" and device.type == "cpu"  # as gsp fit's decoder "auto" chooses

    def run():
        train_step(sae, opt, next(batches), cfg.objective, lam=1e-3, since_fired_F=since, dead_tokens=cfg.dead_tokens,
                   sparse=sparse, autocast=autocast)  # fmt: skip

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="cache/stores/gemma-3-270m_L12_resid_post_train_491520")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--matmul", default="auto", choices=["auto", "fp32", "tf32", "bf16"],
                    help="as gsp fit's --matmul, for every step measured")  # fmt: skip
    args = ap.parse_args()
    device = torch.device(args.device)
    resolved = precision(args.matmul, device)
    torch.set_float32_matmul_precision("high" if resolved == "tf32" else "highest")
    autocast = torch.bfloat16 if resolved == "bf16" else None
    store = ActivationStore.open(args.store)
    d, b = store.d_in, args.batch_size
    scale = store.hook.stats.mean_sq_norm**-0.5
    # as gsp fit reads it: unit-scaled float32 rows on the device
    it = iter(ShuffledLoader(store, b, seed=0, lanes=FitConfig.lanes, scales=(scale,), device=device))
    x = next(it).clone()
    loader_rows = timed(lambda: next(it), args.steps * 4, b, device)

    rows = [("loader alone (store held in memory)", loader_rows, None)]
    floor = timed(bare_step(d, args.width, x, autocast), args.steps, b, device)
    rows.append(("bare dense JumpReLU step (in memory)", floor, 1.0))
    for arch in ("jumprelu", "topk"):
        cfg = FitConfig(store=args.store, arch=arch, width=args.width, k=60, batch_size=b, target_l0=60)
        mem = timed(gsp_step(cfg, d, itertools.repeat(x), device, autocast), args.steps, b, device)
        fed = timed(gsp_step(cfg, d, it, device, autocast), args.steps, b, device)
        rows.append((f"gsp {arch} step (in memory)", mem, mem / floor))
        rows.append((f"gsp {arch} fed by the loader (loader cost {100 * (1 - fed / mem):.0f} %)", fed, fed / floor))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nmachine: {platform.node()} · {where} · torch {torch.__version__} · matmul {resolved}")
    print(f"d_in {d}, width {args.width}, batch {b}, {args.steps} timed steps each, store {args.store}")
    print("| measure | tok/s | × bare step |\n|---|---|---|")
    for name, rate, ratio in rows:
        print(f"| {name} | {rate:,.0f} | {'' if ratio is None else f'{ratio:.2f}'} |")


if __name__ == "__main__":
    main()
