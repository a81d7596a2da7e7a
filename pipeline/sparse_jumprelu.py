"""JumpReLU's sparse decoder path: the training step's gradients with every GEMM but the encoder's
made sparse, a speed-up on the CPU once few latents fire (`gsp fit --decoder`). It computes exactly
what the dense autograd graph of `pipeline.sae.jumprelu` computes (tests/test_sae.py checks it)."""

import contextlib
import warnings

import torch


class _SparseJumpReLUSAE(torch.autograd.Function):
    """x̂ − b_dec = JumpReLU_θ(x·W_enc + b_enc)·W_dec with every GEMM but the encoder's made sparse.

    With ~60 of 4096 latents active, the decoder's forward, both decoder gradients and the
    encoder's weight gradient only touch active entries (and, for θ, entries inside the kernel
    window): the same gradients as the dense autograd graph of `jumprelu`, at a fraction of the cost.
    """

    @staticmethod
    def forward(ctx, x_BD, w_enc, b_enc, theta, w_dec, bandwidth: float):
        pre = _encoder(x_BD, w_enc, b_enc)  # (B, F): the one dense GEMM
        active = pre > theta
        with _float32(x_BD), _quiet_sparse():
            x_hat = _csr(active, pre) @ w_dec
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
        with _float32(x_BD), _quiet_sparse():
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
        with _float32(x_BD), _quiet_sparse():
            f_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), torch.where(on, z, 0.0), shape_t)
            g_w_dec = torch.sparse.mm(f_t, g_BD)  # fᵀ·g, (F, D)
            gz_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), g_z, shape_t)
            g_w_enc = torch.sparse.mm(gz_t, x_BD).T  # xᵀ·∂L/∂pre, (D, F)
        g_b_enc = torch.zeros_like(theta).index_add_(0, cols, g_z)
        return None, g_w_enc, g_b_enc, g_theta, g_w_dec, None


def _encoder(x_BD, w_enc, b_enc) -> torch.Tensor:
    """x·W_enc + b_enc in float32. Under autocast (`gsp fit --matmul bf16`) the GEMM runs in its dtype
    and the bias is added in float32, exactly as in the dense path; everything after it, the sparse
    kernels included (which have no bfloat16 CPU kernels), stays float32."""
    device = x_BD.device.type
    if not torch.is_autocast_enabled(device):
        return torch.addmm(b_enc, x_BD, w_enc)
    low = torch.get_autocast_dtype(device)
    with _float32(x_BD):
        return (x_BD.to(low) @ w_enc.to(low)).float() + b_enc


def _float32(x: torch.Tensor):
    """No autocast: the sparse kernels run in float32."""
    return torch.autocast(x.device.type, enabled=False)


@contextlib.contextmanager
def _quiet_sparse():
    """torch's sparse CSR kernels are tested here (tests/test_sae.py); their "beta" notices are noise.
    Silenced around these calls only, never process-wide."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        yield


def _crow(mask_BF: torch.Tensor) -> torch.Tensor:
    counts = mask_BF.sum(1)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _csr(mask_BF: torch.Tensor, values_BF: torch.Tensor) -> torch.Tensor:
    rows, cols = mask_BF.nonzero(as_tuple=True)
    return torch.sparse_csr_tensor(_crow(mask_BF), cols, values_BF[rows, cols], mask_BF.shape)


def sparse_jumprelu_sae(x_BD, w_enc, b_enc, theta, w_dec, bandwidth: float):
    """(x̂ − b_dec, pre-activations, active mask) with sparse decoder work; see _SparseJumpReLUSAE."""
    return _SparseJumpReLUSAE.apply(x_BD, w_enc, b_enc, theta, w_dec, bandwidth)
