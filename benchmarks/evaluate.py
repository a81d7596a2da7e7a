"""Evaluate's time per token against its floors, measured in one process on the same data.

    python benchmarks/evaluate.py [--store HELD_OUT_STORE] [--sae SAE] [--contexts 16] [--device auto]

- reconstruction: pipeline.metrics.reconstruction (store reads, special-row filter, streaming
  metrics) against the bare SAE forward on the same rows already in memory;
- delta loss: pipeline.lm_loss.DeltaLoss (three passes, log-softmax, CE, KL) against three bare
  full forward passes of the model (logits only) on the same contexts.
Defaults: the main job's held-out store and SAE (run `gsp run` first).
"""

import argparse
import platform
import time

import numpy as np
import torch

from pipeline.dist import Group
from pipeline.lm_loss import DeltaLoss
from pipeline.metrics import reconstruction
from pipeline.models import OFFLINE_DEFAULT, load_model, resolve_device
from pipeline.sae_formats import load_sae
from pipeline.store import ActivationStore

STORE = "cache/stores/gemma-3-270m_L12_resid_post_heldout_32768"
SAE_DIR = "cache/saes/gemma-3-270m_L12_resid_post_train_491520_jumprelu_4096"


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", default=STORE)
    p.add_argument("--sae", default=SAE_DIR)
    p.add_argument("--model", default=OFFLINE_DEFAULT)
    p.add_argument("--contexts", type=int, default=16)
    p.add_argument("--lm-batch", type=int, default=8, help="contexts per forward pass")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    store = ActivationStore.open(args.store)
    sae = load_sae(args.sae).sae.to(device)
    m = store.hook

    # reconstruction over the whole store, against the bare SAE forward on the same rows in memory
    rows = store.rows_written
    ids = store.read_tokens(0, rows)
    x = torch.from_numpy(store.read(0, rows)[~np.isin(ids, store.special_ids)]).to(device)
    with torch.no_grad():
        bare_recon = seconds(lambda: [sae(b) for b in x.split(4096)])
    ours_recon = seconds(lambda: reconstruction(sae, store, rows, 4096, Group(device=device)))

    # delta loss on the first contexts, against three bare forward passes with logits
    lm = load_model(args.model, device=args.device)
    C = store.context_size
    ctx = torch.from_numpy(ids[: args.contexts * C].astype(np.int64)).view(args.contexts, C).to(lm.device)
    batches = ctx.split(args.lm_batch)
    with torch.no_grad():
        lm.model(input_ids=batches[0], use_cache=False)  # warm-up
        bare_lm = seconds(lambda: [lm.model(input_ids=b, use_cache=False).logits for b in batches for _ in range(3)])
    acc = DeltaLoss()
    ours_lm = seconds(lambda: [acc.run(lm.model, sae, b, m.layer, m.site, store.special_ids) for b in batches])

    n_lm = ctx.numel()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}")  # fmt: skip
    print(f"store {args.store} ({len(x):,} ordinary rows), SAE width {sae.width}, model {lm.name} {lm.dtype}")
    print("| work | floor | gsp | floor tok/s | gsp tok/s | gsp / floor |")
    print("|---|---|---|---|---|---|")
    print(f"| reconstruction metrics | bare SAE forward in memory | pipeline.metrics.reconstruction | "
          f"{len(x) / bare_recon:,.0f} | {len(x) / ours_recon:,.0f} | {bare_recon / ours_recon:.2f} |")  # fmt: skip
    print(f"| delta loss ({n_lm:,} tokens) | 3 bare forward passes with logits | DeltaLoss (3 passes + CE, KL) | "
          f"{n_lm / bare_lm:,.1f} | {n_lm / ours_lm:,.1f} | {bare_lm / ours_lm:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
