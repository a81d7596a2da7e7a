"""The SAE math, in Gemma Scope 2's parameter layout: JumpReLU (Gemma Scope) and TopK (Llama Scope).

Parameters (float32): w_enc (D, F), b_enc (F,), w_dec (F, D), b_dec (D,), threshold (F,).
    pre_BF = x_BD @ w_enc + b_enc
    jumprelu: f_BF = pre_BF · H(pre_BF − θ)            topk: f_BF = the k largest of ReLU(pre_BF)
    x̂_BD = f_BF @ w_dec + b_dec
on raw activations, no normalisation, no b_dec subtraction: exactly how a Gemma Scope 2 SAE is used.

JumpReLU training follows the Gemma Scope report (arXiv 2408.05147): θ is learned through
straight-through pseudo-derivatives with a rectangle kernel K(u) = 1{|u| < ½} of bandwidth ε,
    ∂/∂θ JumpReLU_θ(z) = −(θ/ε)·K((z−θ)/ε)        ∂/∂θ H(z−θ) = −(1/ε)·K((z−θ)/ε)
while z gets the ordinary derivative H(z−θ) through JumpReLU and none through the step H.
"""

import warnings
from typing import NamedTuple

import torch

# torch's sparse CSR kernels work and are tested here (tests/test_sae.py); their "beta" notices are noise
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, bandwidth: float):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad_out):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad_out * (z > theta)
        grad_theta = (grad_out * -(theta / eps) * rectangle((z - theta) / eps)).sum(0)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, bandwidth: float):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (grad_out * -(1.0 / eps) * rectangle((z - theta) / eps)).sum(0)
        return None, grad_theta, None


def jumprelu(z_BF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """z·H(z−θ) with the straight-through gradient for θ."""
    return _JumpReLU.apply(z_BF, theta_F, bandwidth)


def step(z_BF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """H(z−θ), whose sum over F is the L0; its gradient reaches θ only."""
    return _Step.apply(z_BF, theta_F, bandwidth)


def topk(pre_BF: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest pre-activations of each row, ReLU'd; zeros elsewhere."""
    values, indices = pre_BF.topk(k, dim=-1)
    return torch.zeros_like(pre_BF).scatter_(-1, indices, values.relu())


class Output(NamedTuple):
    x_hat_BD: torch.Tensor
    f_BF: torch.Tensor
    pre_BF: torch.Tensor


class SAE(torch.nn.Module):
    """A JumpReLU or TopK SAE with Gemma Scope 2's parameter names, shapes and inference."""

    def __init__(self, d_in: int, width: int, *, arch: str = "jumprelu", k: int | None = None):
        super().__init__()
        if arch not in ("jumprelu", "topk"):
            raise ValueError(f"unknown SAE architecture {arch!r}")
        if arch == "topk" and not (k and 0 < k <= width):
            raise ValueError(f"topk needs 0 < k <= width, got k={k}")
        self.d_in, self.width, self.arch, self.k = d_in, width, arch, k
        self.w_enc = torch.nn.Parameter(torch.zeros(d_in, width))
        self.b_enc = torch.nn.Parameter(torch.zeros(width))
        self.w_dec = torch.nn.Parameter(torch.zeros(width, d_in))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.threshold = torch.nn.Parameter(torch.zeros(width))

    def encode(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features f (B, F), pre-activations (B, F)) at inference (no surrogate gradients)."""
        pre = x_BD @ self.w_enc + self.b_enc
        if self.arch == "topk":
            return topk(pre, self.k), pre
        return pre * (pre > self.threshold), pre

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        return f_BF @ self.w_dec + self.b_dec

    def forward(self, x_BD: torch.Tensor) -> Output:
        f, pre = self.encode(x_BD)
        return Output(self.decode(f), f, pre)

    @torch.no_grad()
    def init_gemma_scope(self, generator: torch.Generator | None = None, theta: float = 0.001) -> "SAE":
        """W_dec rows unit-norm (He-uniform, then normalised), W_enc = W_decᵀ, biases 0, θ = 0.001."""
        bound = (6.0 / self.d_in) ** 0.5
        self.w_dec.uniform_(-bound, bound, generator=generator)
        self.w_dec /= self.w_dec.norm(dim=1, keepdim=True)
        self.w_enc.copy_(self.w_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(theta)
        return self

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> "SAE":
        """An SAE trained on x·scale, rewritten to take and return raw x with the same features.

        With s = scale: pre_raw = x·W_enc + b_enc/s = pre/s, θ_raw = θ/s, so f_raw = f/s, and
        x̂ = f_raw·W_dec + b_dec/s = x̂_scaled/s. The decoder rows keep their unit norm, and a
        feature's activation is in the residual stream's own units.
        """
        self.b_enc /= scale
        self.threshold /= scale
        self.b_dec /= scale
        return self


class _SparseJumpReLUSAE(torch.autograd.Function):
    """x̂ − b_dec = JumpReLU_θ(x·W_enc + b_enc)·W_dec with every GEMM but the encoder's made sparse.

    With ~60 of 4096 latents active, the decoder's forward, both decoder gradients and the
    encoder's weight gradient only touch active entries (and, for θ, entries inside the kernel
    window): the same gradients as the dense autograd graph of `jumprelu`, at a fraction of the cost.
    """

    @staticmethod
    def forward(ctx, x_BD, w_enc, b_enc, theta, w_dec, bandwidth: float):
        pre = torch.addmm(b_enc, x_BD, w_enc)  # (B, F): the one dense GEMM
        active = pre > theta
        f_csr = _csr(active, pre)
        x_hat = f_csr @ w_dec
        # entries whose gradient matters: active ones (for z) and those in θ's kernel window
        need = active | ((pre - theta).abs() < bandwidth / 2)
        ctx.save_for_backward(x_BD, w_dec, theta, pre, active, need)
        ctx.bandwidth = bandwidth
        ctx.mark_non_differentiable(pre, active)  # gradients reach θ and the weights through x̂ only
        return x_hat, pre, active

    @staticmethod
    def backward(ctx, g_BD, _g_pre, _g_active):
        x_BD, w_dec, theta, pre, active, need = ctx.saved_tensors
        eps = ctx.bandwidth
        rows, cols = need.nonzero(as_tuple=True)
        pattern = torch.sparse_csr_tensor(
            _crow(need), cols, torch.zeros(len(cols), dtype=g_BD.dtype, device=g_BD.device), need.shape
        )
        g_f = torch.sparse.sampled_addmm(pattern, g_BD, w_dec.T).values()  # ∂L/∂f at `need` entries
        z, th = pre[rows, cols], theta[cols]
        on = active[rows, cols]
        g_z = torch.where(on, g_f, 0.0)  # ∂JumpReLU/∂z = H(z − θ)
        g_theta = torch.zeros_like(theta).index_add_(
            0, cols, g_f * -(th / eps) * ((z - th).abs() < eps / 2).to(g_f.dtype)
        )
        shape_t = (need.shape[1], need.shape[0])
        f_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), torch.where(on, z, 0.0), shape_t)
        g_w_dec = torch.sparse.mm(f_t, g_BD)  # fᵀ·g, (F, D)
        gz_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), g_z, shape_t)
        g_w_enc = torch.sparse.mm(gz_t, x_BD).T  # xᵀ·∂L/∂pre, (D, F)
        g_b_enc = torch.zeros_like(theta).index_add_(0, cols, g_z)
        return None, g_w_enc, g_b_enc, g_theta, g_w_dec, None


def _crow(mask_BF: torch.Tensor) -> torch.Tensor:
    counts = mask_BF.sum(1)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _csr(mask_BF: torch.Tensor, values_BF: torch.Tensor) -> torch.Tensor:
    rows, cols = mask_BF.nonzero(as_tuple=True)
    return torch.sparse_csr_tensor(_crow(mask_BF), cols, values_BF[rows, cols], mask_BF.shape)


def sparse_jumprelu_sae(x_BD, w_enc, b_enc, theta, w_dec, bandwidth: float):
    """(x̂ − b_dec, pre-activations, active mask) with sparse decoder work; see _SparseJumpReLUSAE."""
    return _SparseJumpReLUSAE.apply(x_BD, w_enc, b_enc, theta, w_dec, bandwidth)
