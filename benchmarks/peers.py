"""gsp's SAE training step against SAELens' on the same data and shapes, in one process.

    pip install -e ".[bench]"        # SAELens (optional; it brings transformer-lens)
    python benchmarks/peers.py [--store STORE] [--width 4096] [--batch-size 4096] [--steps 10]

Each trainer gets the same unit-scaled rows from the default store (already in memory, so the
loader is out of the picture), at the same width and batch, with Adam:
- bare: a plain dense PyTorch JumpReLU step (the floor, as in benchmarks/fit.py);
- gsp: pipeline.train.train_step, JumpReLU (sparse decoder on the CPU once < 5 % fire) and TopK k=60;
- SAELens: JumpReLUTrainingSAE / TopKTrainingSAE (k=60) `training_forward_pass` + backward + Adam,
  as its trainer runs them, with a dead-latent mask so TopK's auxiliary loss is active as in a run.
SAELens' activation caching is not compared: it needs TransformerLens to load Gemma 3 from the Hub,
which this project's machines cannot reach.
"""

import argparse
import itertools
import platform

import torch
from fit import bare_step, timed  # benchmarks/fit.py: the same floor and timer

from pipeline.loader import ShuffledLoader
from pipeline.sae import SAE, Objective
from pipeline.store import ActivationStore
from pipeline.train import train_step


def gsp_step(arch: str, d_in: int, width: int, x: torch.Tensor, sparse: bool):
    sae = SAE(d_in, width, arch=arch, k=60).init_gemma_scope(torch.Generator().manual_seed(0))
    with torch.no_grad():  # thresholds of a trained SAE: about 60 latents active per token
        sae.threshold.copy_(_sixty(x @ sae.w_enc))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.0, 0.999))
    since = torch.zeros(width, dtype=torch.int64)
    dead_tokens = 50_000  # gsp fit's default window
    since[: width // 10] = dead_tokens  # 10 % dead: TopK's auxiliary loss is active
    return lambda: train_step(sae, opt, x, Objective(), lam=1e-3, since_fired_F=since, dead_tokens=dead_tokens,
                              sparse=sparse)  # fmt: skip


def saelens_step(arch: str, d_in: int, width: int, x: torch.Tensor):
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    if arch == "jumprelu":
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=width))
        with torch.no_grad():  # the same sparsity as gsp's step
            sae.threshold.copy_(_sixty(x @ sae.W_enc + sae.b_enc))
        coefficients = {"l0": 1e-3}
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=width, k=60))
        coefficients = {}
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.0, 0.999))
    dead = torch.zeros(width, dtype=torch.bool)
    dead[: width // 10] = True

    def step():
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients=coefficients, dead_neuron_mask=dead, n_training_steps=100, is_logging_step=False
            )  # fmt: skip
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def _sixty(pre_BF: torch.Tensor) -> torch.Tensor:
    """Per-latent thresholds under which about 60 latents per token fire."""
    b, f = pre_BF.shape
    return pre_BF.kthvalue(b - 60 * b // f, dim=0).values


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", default="cache/stores/gemma-3-270m_L12_resid_post_train_491520")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    store = ActivationStore.open(args.store)
    scale = store.hook.stats.mean_sq_norm**-0.5
    x = next(itertools.islice(ShuffledLoader(store, args.batch_size, seed=0), 0, None)) * scale
    d, w, b, n = store.d_in, args.width, args.batch_size, args.steps
    rows = {"bare dense JumpReLU step": timed(bare_step(d, w, x), n, b)}
    rows["gsp JumpReLU (sparse decoder)"] = timed(gsp_step("jumprelu", d, w, x, sparse=True), n, b)
    rows["gsp TopK k=60"] = timed(gsp_step("topk", d, w, x, sparse=False), n, b)
    try:
        rows["SAELens JumpReLU"] = timed(saelens_step("jumprelu", d, w, x), n, b)
        rows["SAELens TopK k=60"] = timed(saelens_step("topk", d, w, x), n, b)
    except ImportError:
        print("SAELens is not installed (pip install -e '.[bench]'): its rows are left out")
    floor = rows["bare dense JumpReLU step"]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; d_in {d}, width {w}, batch {b}, {n} steps each")  # fmt: skip
    print("| trainer | tok/s | / bare step |")
    print("|---|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:,.0f} | {rate / floor:.2f} |")


if __name__ == "__main__":
    main()
