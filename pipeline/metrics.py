"""Metrics as the field defines them, as pure functions shared by fit's logs and evaluate.

All take float tensors of shape (B, D) / (B, F) with special-token rows already removed.
"""

import torch


def l0(f_BF: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero latents per token."""
    return (f_BF != 0).sum(-1).float().mean()


def fvu(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the per-dimension mean of x."""
    x = x_BD.double()
    return (x - x_hat_BD.double()).square().sum() / (x - x.mean(0)).square().sum()


def dead_fraction(tokens_since_fired_F: torch.Tensor, window: int) -> float:
    """Share of latents that have not fired in the last `window` tokens."""
    return (tokens_since_fired_F >= window).float().mean().item()
