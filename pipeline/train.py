"""One SAE training step, the one `gsp fit` runs and the benchmarks time, and what it keeps on the device.

A step: the loss (pipeline.sae.SAE.loss) → backward → gradients averaged across processes → the
decoder gradient's component parallel to each decoder row removed → Adam → decoder rows
renormalised, θ clamped at 0 → dead-latent counters. Nothing here waits on the device: whether the
loss stayed finite is recorded on the device and read at log steps (`NonFinite`).
"""

import torch

from pipeline import dist
from pipeline.sae import SAE, Loss, Objective


def train_step(
    sae: SAE, opt: torch.optim.Optimizer, x_BD: torch.Tensor, objective: Objective, *, lam: float,
    since_fired_F: torch.Tensor, dead_tokens: int, sparse: bool, group: dist.Group = dist.Group(),
    target_BO: torch.Tensor | None = None, autocast: torch.dtype | None = None,
) -> Loss:  # fmt: skip
    """One optimisation step on a unit-scaled batch (this process's share under torchrun); a
    transcoder's `target_BO` holds the rows it predicts. With `autocast` (torch.bfloat16) the loss's
    matmuls run in that dtype; parameters, gradients and Adam stay float32.

    Under torchrun gradients are averaged across processes (one flat all-reduce) before the
    optimiser step, and latents count as fired when they fired in any process's share, so every
    process holds the same weights and dead-latent counters after every step.
    """
    dead = since_fired_F >= dead_tokens
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
        since_fired_F += len(x_BD) * group.world
        since_fired_F.masked_fill_(dist.any_(group, (loss.f_BF != 0).any(0)), 0)  # no sync, unlike a[mask] = 0
    return loss


class NonFinite:
    """The first step whose loss was NaN or infinite, tracked on the device without a sync."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, step: int, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()) & (self.first < 0)
        self.first = torch.where(bad, torch.full_like(self.first, step), self.first)

    def step(self) -> int | None:
        """The step number (1-based) of the first non-finite loss, or None (this syncs)."""
        first = int(self.first)
        return None if first < 0 else first
