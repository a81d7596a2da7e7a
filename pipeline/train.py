"""One SAE training step, the one `gsp fit` runs and the benchmarks time, and what it needs beside it:
the training state, the schedule of lr and penalties, the matmul precision, and the finiteness check.

A step: the loss (pipeline.sae.SAE.loss) → backward → gradients averaged across processes → the
decoder gradient's component parallel to each decoder row removed → Adam → decoder rows
renormalised, θ clamped at 0 → dead-latent counters. Nothing here waits on the device: whether the
loss stayed finite is recorded on the device and read at log steps (`NonFinite`), and decided by
every process together.
"""

import contextlib
from dataclasses import dataclass

import torch

from pipeline import dist
from pipeline.errors import GspError
from pipeline.loader import LoaderState
from pipeline.sae import SAE, Loss, Objective


@dataclass
class TrainState:
    """Everything a fit carries from step to step, and all a checkpoint holds (pipeline/checkpoint.py)."""

    sae: SAE
    opt: torch.optim.Optimizer
    since_fired_F: torch.Tensor  # tokens since each latent last fired (int64, on the device)
    step: int = 0  # steps done
    loader: LoaderState | None = None  # the loader's position after `step` batches (None: the start)
    density: float = 1.0  # share of latents active at the last log step; picks JumpReLU's decoder path

    @staticmethod
    def fresh(sae: SAE, lr: float) -> "TrainState":
        """A new state: Adam with Gemma Scope's betas (0, 0.999), no latent yet counted as idle."""
        opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.0, 0.999))
        return TrainState(sae, opt, torch.zeros(sae.width, dtype=torch.int64, device=sae.w_enc.device))


def train_step(
    sae: SAE, opt: torch.optim.Optimizer, x_BD: torch.Tensor, objective: Objective, *, lam: float,
    since_fired_F: torch.Tensor, dead_tokens: int, sparse: bool, group: dist.Group = dist.Group(),
    target_BO: torch.Tensor | None = None, autocast: torch.dtype | None = None, theta_lr: float = 1.0,
) -> Loss:  # fmt: skip
    """One optimisation step on a unit-scaled batch (this process's share under torchrun); a
    transcoder's `target_BO` holds the rows it predicts. With `autocast` (torch.bfloat16) the loss's
    matmuls run in that dtype; parameters, gradients and Adam stay float32. `theta_lr` scales JumpReLU's
    threshold step (clamped at 0) by that share: θ's own learning rate.

    Under torchrun gradients are averaged across processes (one flat all-reduce) before the
    optimiser step, and latents count as fired when they fired in any process's share, so every
    process holds the same weights and dead-latent counters after every step.
    """
    dead = since_fired_F >= dead_tokens
    theta0 = sae.threshold.detach().clone() if theta_lr != 1.0 and sae.arch == "jumprelu" else None
    with torch.autocast(x_BD.device.type, dtype=autocast, enabled=autocast is not None):
        loss = sae.loss(x_BD, objective, target_BO=target_BO, lam=lam, dead_F=dead, sparse=sparse, group=group)
    opt.zero_grad(set_to_none=True)
    loss.total.backward()
    dist.mean_(group, [p.grad for p in sae.parameters() if p.grad is not None])
    with torch.no_grad():
        w, g = sae.w_dec, sae.w_dec.grad  # keep rows on the unit sphere: drop the radial part
        g -= (g * w).sum(-1, keepdim=True) * w
    opt.step()
    with torch.no_grad():
        sae.w_dec /= sae.w_dec.norm(dim=-1, keepdim=True)
        sae.threshold.clamp_(min=0.0)  # a negative θ would let negative pre-activations through
        if theta0 is not None:
            sae.threshold.copy_((theta0 + theta_lr * (sae.threshold - theta0)).clamp_(min=0.0))
        since_fired_F += len(x_BD) * group.world
        since_fired_F.masked_fill_(dist.any_(group, (loss.f_BF != 0).any(0)), 0)  # no sync, unlike a[mask] = 0
    return loss


@dataclass(frozen=True)
class Schedule:
    """lr, λ and λ_f at each step: linear warm-ups from 0, lr constant, then decaying linearly to 0
    over the last `lr_decay` steps. λ_f (the frequency penalty's) ramps up with λ: at the first steps
    every latent fires on about half the rows, and an unramped penalty would meet them at full
    strength before the L0 term had acted."""

    steps: int
    lr: float
    lr_warmup: int
    lr_decay: int
    sparsity_coeff: float  # λ
    sparsity_warmup: int
    freq_penalty: float  # λ_f

    def at(self, step: int) -> tuple[float, float, float]:
        """(lr, λ, λ_f) for step `step` (0-based)."""
        lr = self.lr * min(1.0, (step + 1) / self.lr_warmup) if self.lr_warmup else self.lr
        lr *= min(1.0, (self.steps - step) / self.lr_decay) if self.lr_decay else 1.0
        ramp = min(1.0, (step + 1) / self.sparsity_warmup) if self.sparsity_warmup else 1.0
        return lr, self.sparsity_coeff * ramp, self.freq_penalty * ramp


def precision(matmul: str, device: torch.device) -> str:
    """--matmul resolved on this device: fp32, tf32 or bf16."""
    if matmul == "tf32" and device.type != "cuda":
        raise GspError("--matmul tf32 needs a CUDA device; on CPU use fp32 (the default) or bf16")
    return ("tf32" if device.type == "cuda" else "fp32") if matmul == "auto" else matmul


@contextlib.contextmanager
def matmul_precision(matmul: str, device: torch.device):
    """Set float32 matmul precision for the fit (restored after); yields the autocast dtype (or None)."""
    resolved = precision(matmul, device)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if resolved == "tf32" else "highest")
    try:
        yield torch.bfloat16 if resolved == "bf16" else None
    finally:
        torch.set_float32_matmul_precision(before)


class NonFinite:
    """The first step whose loss was NaN or infinite, tracked on the device without a sync."""

    NONE = torch.iinfo(torch.int64).max

    def __init__(self, device: torch.device):
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def update(self, step: int, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first = torch.where(bad, self.first.clamp(max=step), self.first)

    def first_bad(self, group: dist.Group) -> int | None:
        """The step number (1-based) of the first non-finite loss in any process, or None (this syncs,
        and is a collective: every process calls it at the same step and gets the same answer, so
        all of them stop an SAE together)."""
        first = self.first.clone()
        dist.min_(group, first)
        return None if int(first) == self.NONE else int(first)
