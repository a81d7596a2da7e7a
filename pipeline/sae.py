"""The SAE: JumpReLU (Gemma Scope) and TopK (Llama Scope) in Gemma Scope 2's parameter layout, their
training objectives, and gsp's own files. Read it against the papers; everything else calls it.

Parameters (float32): w_enc (D, F), b_enc (F,), w_dec (F, O), b_dec (O,), threshold (F,), and for a
skip transcoder w_skip (D, O) (`affine_skip_connection` in Gemma Scope 2's files).
    pre_BF = x_BD @ w_enc + b_enc
    jumprelu: f_BF = ReLU(pre_BF) · H(pre_BF − θ)      topk: f_BF = the k largest of ReLU(pre_BF)
    ŷ_BO = f_BF @ w_dec + b_dec  (+ x_BD @ w_skip)
on raw activations, no normalisation, no b_dec subtraction: exactly how a Gemma Scope 2 SAE is used
(the ReLU matters only for a loaded file with θ < 0; training keeps θ ≥ 0). An SAE reconstructs its
input (O = D, ŷ = x̂); a transcoder reads one hook point (an MLP's input) and predicts another (its
output), so O may differ from D and the prediction's target is another array of the same rows.

JumpReLU training follows the Gemma Scope report (arXiv 2408.05147): θ is learned through
straight-through pseudo-derivatives with a rectangle kernel K(u) = 1{|u| < ½} of bandwidth ε,
    ∂/∂θ JumpReLU_θ(z) = −(θ/ε)·K((z−θ)/ε)        ∂/∂θ H(z−θ) = −(1/ε)·K((z−θ)/ε)
while z gets the ordinary derivative H(z−θ) through JumpReLU and none through the step H.
Objectives (`SAE.loss`), on inputs scaled so that E‖x‖² = 1:
    jumprelu: ‖x − x̂‖² + λ·L0,  or Gemma Scope 2's  ‖x − x̂‖² + λ·(2/T)·(L0 − T)²  towards a target L0 T
    topk:     ‖x − x̂‖² + α·AuxK, AuxK = ‖e − ê‖² / ‖e‖² with e = x − x̂ and ê decoded from the aux_k
              largest pre-activations of dead latents (OpenAI's "Scaling and evaluating sparse autoencoders")
    Matryoshka (prefixes m_1 < ... < m_n < F, both architectures): ‖x − x̂‖² becomes
              Σ_{m ∈ (m_1, ..., m_n, F)} ‖x − (f[:, :m]·W_dec[:m] + b_dec)‖², each prefix weighted 1 (SAELens'
              form; Bussmann et al. 2025), the same active latents for every prefix
    frequency penalty: + λ_f · Σ_i ω_i² / ω₀, ω_i = the share of the (global) batch's rows on which
              latent i fires: the quadratic term of DeepMind's λ·Σ_i ω_i(1 + ω_i/ω₀) ("Removing High
              Frequency Latents from JumpReLU SAEs"), whose linear term is JumpReLU's L0 penalty;
              or, the "hinge" form, + λ_f · Σ_i max(0, ω_i − ω₀)² / ω₀: only latents firing on more
              than the share ω₀ of rows feel it. `gsp fit` warms λ_f up with λ (pipeline.train.Schedule).
              JumpReLU: ω_i through the same straight-through estimator as L0 (θ gets the gradient).
              TopK: a TopK SAE is a JumpReLU whose threshold τ is set per row (midway between the k-th
              and (k+1)-th pre-activation), so ω_i goes through the same estimator with τ held fixed,
              and the pre-activations get the gradient (1/ε)·K((pre − τ)/ε): a latent that fires too
              often is pushed below the rows' thresholds, and another takes its place
gsp's files: `params.safetensors` + `config.json` (an `SAEConfig`), Gemma Scope 2's format.
"""

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline import dist
from pipeline.errors import GspError
from pipeline.faults import fault
from pipeline.files import atomic_write_text, check_tensors, read_json, read_safetensors, save_tensors
from pipeline.sparse_jumprelu import sparse_jumprelu_sae

PARAMS = ("w_enc", "b_enc", "w_dec", "b_dec", "threshold")
FILE_KEYS = {"w_skip": "affine_skip_connection"}  # attribute -> Gemma Scope 2's key, where they differ
ARCHS = ("jumprelu", "topk")
FILE_ARCH = {"jumprelu": "jump_relu", "topk": "topk"}  # gsp's name -> Gemma Scope 2's "architecture"


# ------------------------------------------------------------------------------ activation functions
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


class _Heaviside(torch.autograd.Function):
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


class _RowHeaviside(torch.autograd.Function):
    """H(z − τ) given as `fired`, τ a threshold per row held fixed, with the straight-through
    derivative (1/ε)·K((z − τ)/ε) for z."""

    @staticmethod
    def forward(ctx, z, fired, tau, bandwidth: float):
        ctx.save_for_backward(z, tau)
        ctx.bandwidth = bandwidth
        return fired.to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, tau = ctx.saved_tensors
        return grad_out * (1.0 / ctx.bandwidth) * rectangle((z - tau) / ctx.bandwidth), None, None, None


def jumprelu(z_BF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """z·H(z−θ) with the straight-through gradient for θ (training, where θ ≥ 0)."""
    return _JumpReLU.apply(z_BF, theta_F, bandwidth)


def heaviside(z_BF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """H(z−θ), whose sum over F is the L0; its gradient reaches θ only."""
    return _Heaviside.apply(z_BF, theta_F, bandwidth)


def topk_fired(
    pre_BF: torch.Tensor, f_BF: torch.Tensor, top_BK: torch.Tensor, idx_BK: torch.Tensor, bandwidth: float
) -> torch.Tensor:
    """1 where a TopK latent fires (f > 0), with the straight-through gradient of H(pre − τ) for pre:
    (1/ε)·K((pre − τ)/ε), where τ, a row's threshold, lies midway between its k-th and (k+1)-th largest
    pre-activations (at least 0, for the ReLU; 0 when k is the width). `top_BK`, `idx_BK`: the row's k
    largest (before the ReLU) and their latents. A TopK SAE is a JumpReLU whose threshold is set per row."""
    with torch.no_grad():  # the (k+1)-th: the largest of the others (a second topk costs ~12× more)
        next_B1 = pre_BF.scatter(-1, idx_BK, -torch.inf).amax(-1, keepdim=True)
        tau_B1 = ((top_BK[:, -1:] + next_B1) / 2).clamp_min(0)
    return _RowHeaviside.apply(pre_BF, f_BF > 0, tau_B1, bandwidth)


def frequency_penalty(fired_BF: torch.Tensor, obj: "Objective", group: dist.Group) -> torch.Tensor:
    """λ_f·Σ_i ω_i²/ω₀ (or the hinge's max(0, ω_i − ω₀)²), ω_i the share of the global batch's rows on
    which latent i fires, differentiable through `fired_BF`'s straight-through estimator."""
    omega_F = dist.mean_differentiable(group, fired_BF.mean(0))
    over_F = omega_F if obj.freq_form == "quadratic" else (omega_F - obj.freq_scale).clamp_min(0)
    return obj.freq_penalty * (over_F.square() / obj.freq_scale).sum()


def jumprelu_inference(pre: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Gemma Scope 2's JumpReLU: ReLU(pre)·1[pre > θ]."""
    return pre.relu() * (pre > theta)


def topk(pre_BF: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest pre-activations of each row, ReLU'd; zeros elsewhere."""
    values, indices = pre_BF.topk(k, dim=-1)
    return torch.zeros_like(pre_BF).scatter_(-1, indices, values.relu())


# ------------------------------------------------------------------------------ results and settings
class Output(NamedTuple):
    x_hat_BD: torch.Tensor
    f_BF: torch.Tensor
    pre_BF: torch.Tensor


class Loss(NamedTuple):
    total: torch.Tensor  # what is minimised
    recon: torch.Tensor  # mean ‖x − x̂‖²
    penalty: torch.Tensor  # the sparsity penalty (jumprelu) or α·AuxK (topk), + the frequency penalty
    x_hat_BD: torch.Tensor
    f_BF: torch.Tensor  # for logs and dead-latent counts (no gradient path is needed through it)


@dataclass(frozen=True)
class Objective:
    """The training objective's settings beyond the SAE itself (see the module docstring)."""

    bandwidth: float = 0.001  # ε of the rectangle kernel: JumpReLU's, and TopK's frequency penalty's
    target_l0: float | None = None  # JumpReLU: T of the target-L0 penalty; None: λ·L0
    aux_k: int = 512  # TopK: dead latents in the auxiliary loss
    aux_coeff: float = 0.125  # TopK: α
    prefixes: tuple[int, ...] = ()  # Matryoshka: the nested prefix sizes m_1 < ... < F; () for a plain SAE
    freq_penalty: float = 0.0  # λ_f of the frequency penalty (0: none)
    freq_scale: float = 0.1  # ω₀ of the frequency penalty
    freq_form: str = "quadratic"  # "quadratic" (λ_f·Σ ω²/ω₀) or "hinge" (λ_f·Σ max(0, ω − ω₀)²/ω₀)
    pre_encoder_bias: bool = False  # encode x − b_dec (b_dec held fixed there), folded into b_enc on saving


# ------------------------------------------------------------------------------ the model
class SAE(torch.nn.Module):
    """A JumpReLU or TopK SAE or transcoder with Gemma Scope 2's parameter names, shapes and inference.

    `d_out` (default d_in) and `skip` make it a transcoder: its decoder predicts another activation of
    width d_out, plus, with `skip`, an affine map of its input (a skip transcoder)."""

    def __init__(self, d_in: int, width: int, *, arch: str = "jumprelu", k: int | None = None,
                 d_out: int | None = None, skip: bool = False):  # fmt: skip
        super().__init__()
        d_out = d_in if d_out is None else d_out
        if arch not in ARCHS:
            raise ValueError(f"unknown SAE architecture {arch!r}")
        if d_in <= 0 or width <= 0 or d_out <= 0:
            raise ValueError(f"an SAE needs d_in, d_out and width > 0, got d_in={d_in}, d_out={d_out}, width={width}")
        if arch == "topk" and not (k and 0 < k <= width):
            raise ValueError(f"topk needs 0 < k <= width, got k={k}")
        self.d_in, self.d_out, self.width, self.arch, self.k, self.skip = d_in, d_out, width, arch, k, skip
        self.w_enc = torch.nn.Parameter(torch.zeros(d_in, width))
        self.b_enc = torch.nn.Parameter(torch.zeros(width))
        self.w_dec = torch.nn.Parameter(torch.zeros(width, d_out))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_out))
        self.threshold = torch.nn.Parameter(torch.zeros(width))
        self.w_skip = torch.nn.Parameter(torch.zeros(d_in, d_out)) if skip else None

    @property
    def params(self) -> tuple[str, ...]:
        """Its parameters' attribute names (with w_skip for a skip transcoder)."""
        return PARAMS + ("w_skip",) * self.skip

    @property
    def is_transcoder(self) -> bool:
        return self.skip or self.d_out != self.d_in

    def pre_activation(self, x_BD: torch.Tensor) -> torch.Tensor:
        """x·W_enc + b_enc, (B, F)."""
        return x_BD @ self.w_enc + self.b_enc

    def add_skip(self, x_BD: torch.Tensor, out_BO: torch.Tensor) -> torch.Tensor:
        """out + x·W_skip for a skip transcoder (its affine path from the input); out otherwise."""
        return out_BO + x_BD @ self.w_skip if self.skip else out_BO

    def encode(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features f (B, F), pre-activations (B, F)) at inference (no surrogate gradients)."""
        pre = self.pre_activation(x_BD)
        if self.arch == "topk":
            return topk(pre, self.k), pre
        return jumprelu_inference(pre, self.threshold), pre

    def decode(self, f_BF: torch.Tensor, x_BD: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction from the latents; a skip transcoder also needs its input x."""
        return self.add_skip(x_BD, f_BF @ self.w_dec + self.b_dec)

    def forward(self, x_BD: torch.Tensor) -> Output:
        f, pre = self.encode(x_BD)
        return Output(self.decode(f, x_BD), f, pre)

    def activation_at(self, x_RD: torch.Tensor, rows_P: torch.Tensor, feats_P: torch.Tensor) -> torch.Tensor:
        """f[rows_P[i], feats_P[i]] for each pair: one feature's activation on one row of x_RD.

        JumpReLU needs one dot product per pair; TopK needs every latent of the row (its k-th value)."""
        if self.arch == "topk":
            return self.encode(x_RD)[0][rows_P, feats_P]
        pre = (x_RD[rows_P] * self.w_enc[:, feats_P].T).sum(-1) + self.b_enc[feats_P]
        return jumprelu_inference(pre, self.threshold[feats_P])

    @torch.no_grad()
    def init_gemma_scope(self, generator: torch.Generator | None = None, theta: float = 0.001) -> "SAE":
        """W_dec rows unit-norm (He-uniform, then normalised), W_enc = W_decᵀ (for a transcoder whose
        widths differ, its own unit-norm He-uniform columns), biases 0, θ = 0.001, w_skip 0."""
        bound = (6.0 / self.d_out) ** 0.5
        self.w_dec.uniform_(-bound, bound, generator=generator)
        self.w_dec /= self.w_dec.norm(dim=1, keepdim=True)
        if self.d_out == self.d_in:
            self.w_enc.copy_(self.w_dec.T)
        else:
            self.w_enc.uniform_(-((6.0 / self.d_in) ** 0.5), (6.0 / self.d_in) ** 0.5, generator=generator)
            self.w_enc /= self.w_enc.norm(dim=0, keepdim=True)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(theta)
        if self.skip:
            self.w_skip.zero_()
        return self

    @torch.no_grad()
    def fold_pre_encoder_bias(self) -> "SAE":
        """An SAE trained to encode x − b_dec, rewritten to encode x: b_enc ← b_enc − b_dec·W_enc (the same
        pre-activations, so the same features)."""
        self.b_enc -= self.b_dec @ self.w_enc
        return self

    @torch.no_grad()
    def fold_input_scale(self, scale: float, out_scale: float | None = None) -> "SAE":
        """An SAE trained on x·scale (predicting y·out_scale, for a transcoder), rewritten to take raw x
        and predict raw y with the same features.

        With s = scale, t = out_scale (= s for an SAE): pre_raw = x·W_enc + b_enc/s = pre/s, θ_raw = θ/s,
        so f_raw = f/s, and ŷ = ŷ_scaled/t = f_raw·(s/t)·W_dec + b_dec/t + x·(s/t)·W_skip. For an SAE
        the decoder rows keep their unit norm, and a feature's activation is in the residual stream's
        own units.
        """
        t = scale if out_scale is None else out_scale
        self.b_enc /= scale
        self.threshold /= scale
        self.b_dec /= t
        if t != scale:
            self.w_dec *= scale / t
        if self.skip:
            self.w_skip *= scale / t
        return self

    @torch.no_grad()
    def fold_input_weights(self, w: torch.Tensor) -> "SAE":
        """An SAE trained on x∘w (w > 0 per dimension, the error weighed by w²), rewritten to take raw x
        and reconstruct raw x: W_enc ← diag(w)·W_enc (the same pre-activations), W_dec ← W_dec·diag(1/w),
        b_dec ← b_dec/w. The decoder rows are then scaled back, each latent's activation (with b_enc and θ)
        by the same factor n: f·W_dec = (f·n)·(W_dec/n). For a JumpReLU n is each row's norm, so rows are
        unit again; for a TopK n is one number, the rows' RMS norm, since scaling latents apart would
        change which k are largest. A constant w is then the identity."""
        if self.skip or self.d_in != self.d_out:
            raise ValueError("input weights fold into SAEs only, not transcoders")
        self.w_enc *= w[:, None]
        self.w_dec /= w[None, :]
        self.b_dec /= w
        n = self.w_dec.norm(dim=1)
        if self.arch == "topk":
            n = n.square().mean().sqrt().expand_as(n)
        self.w_dec /= n[:, None]
        self.w_enc *= n[None, :]
        self.b_enc *= n
        self.threshold *= n
        return self

    # -------------------------------------------------------------------------- training
    def loss(
        self, x_BD: torch.Tensor, objective: Objective, *, target_BO: torch.Tensor | None = None, lam: float = 0.0,
        dead_F: torch.Tensor | None = None, sparse: bool = False, group: dist.Group = dist.Group(),
        sync_free: bool | None = None,
    ) -> Loss:  # fmt: skip
        """The training loss on a batch of unit-scaled inputs. `target_BO`: a transcoder's target rows
        (default: x itself); `lam`: JumpReLU's λ at this step; `dead_F`: TopK's dead latents (bool, F);
        `sparse`: JumpReLU's sparse decoder path; `sync_free` (default: off the CPU): never read a value
        back from the device (TopK's dead-latent count), at the price of a little more work.

        Under torchrun `x_BD` is this process's share of the global batch; terms that are not plain
        means over rows (the target-L0 penalty, the AuxK normaliser) use the global batch's values,
        so that the averaged gradients equal one process's on the whole batch.
        """
        y_BO = x_BD if target_BO is None else target_BO
        # the encoder's input: x, or x − b_dec (a pre-encoder bias, folded into b_enc on saving)
        xe_BD = x_BD - self.b_dec.detach() if objective.pre_encoder_bias else x_BD
        if self.arch == "jumprelu":
            return self._jumprelu_loss(x_BD, xe_BD, y_BO, objective, lam, sparse, group)
        if sync_free is None:
            sync_free = x_BD.device.type != "cpu"
        return self._topk_loss(x_BD, xe_BD, y_BO, objective, dead_F, group, sync_free)

    def _jumprelu_loss(self, x_BD, xe_BD, y_BO, obj: Objective, lam: float, sparse: bool, group) -> Loss:
        if sparse and not obj.prefixes:  # every GEMM but the encoder's sparse (Matryoshka decodes densely)
            x_hat, pre, active = sparse_jumprelu_sae(xe_BD, self.w_enc, self.b_enc, self.threshold, self.w_dec,
                                                     obj.bandwidth)  # fmt: skip
            x_hat, f = self.add_skip(x_BD, x_hat + self.b_dec), pre * active  # f for metrics: no gradient path
            recon = _mse(x_hat, y_BO)
        else:
            pre = self.pre_activation(xe_BD)
            f = jumprelu(pre, self.threshold, obj.bandwidth)
            recon, x_hat = self._reconstruction(f, x_BD, y_BO, obj.prefixes)
        penalty = self._sparsity_penalty(pre, obj, lam, group)
        return Loss(recon + penalty, recon, penalty, x_hat, f)

    def _sparsity_penalty(self, pre_BF, obj: Objective, lam: float, group) -> torch.Tensor:
        """λ·L0 or the target-L0 penalty, plus the frequency penalty: all through H(pre − θ), whose
        straight-through gradient reaches θ only."""
        fired_BF = heaviside(pre_BF, self.threshold, obj.bandwidth)
        l0_ = fired_BF.sum(-1).mean()
        if obj.target_l0 is None:
            penalty = lam * l0_
        else:
            l0_ = dist.mean_differentiable(group, l0_)  # the penalty is on the global batch's L0
            penalty = lam * (2 / obj.target_l0) * (l0_ - obj.target_l0).square()
        if obj.freq_penalty:  # each latent's firing frequency over the global batch, through the STE
            penalty = penalty + frequency_penalty(fired_BF, obj, group)
        return penalty

    def _reconstruction(self, f_BF, x_BD, y_BO, prefixes: tuple[int, ...]):
        """(the reconstruction loss, the prediction ŷ): mean ‖y − ŷ‖², or for Matryoshka the sum over
        the nested prefixes m of mean ‖y − (f[:, :m] W_dec[:m] + b_dec)‖², the full width included,
        each weighted 1 (a skip transcoder's x·W_skip is in every prefix)."""
        if not prefixes:
            x_hat = self.decode(f_BF, x_BD)
            return _mse(x_hat, y_BO), x_hat
        x_hat = self.add_skip(x_BD, self.b_dec)
        recon, start = 0, 0
        for end in (*prefixes, self.width):
            x_hat = x_hat + f_BF[:, start:end] @ self.w_dec[start:end]
            recon = recon + _mse(x_hat, y_BO)
            start = end
        return recon, x_hat

    def _topk_loss(self, x_BD, xe_BD, y_BO, obj: Objective, dead_F, group, sync_free: bool) -> Loss:
        # decode the k active latents only (an embedding bag), plus the auxiliary loss on dead ones
        pre = self.pre_activation(xe_BD)
        top, idx = pre.topk(self.k, dim=-1)
        values = top.relu()
        x_hat = torch.nn.functional.embedding_bag(idx, self.w_dec, per_sample_weights=values, mode="sum") + self.b_dec
        x_hat = self.add_skip(x_BD, x_hat)
        f = torch.zeros_like(pre).scatter_(-1, idx, values)
        if obj.prefixes:  # Matryoshka: the same k latents, every nested prefix reconstructing
            recon, x_hat = self._reconstruction(f, x_BD, y_BO, obj.prefixes)
        else:
            recon = _mse(x_hat, y_BO)
        freq = torch.zeros_like(recon)  # the frequency penalty, through each row's threshold (topk_fired)
        if obj.freq_penalty:
            freq = frequency_penalty(topk_fired(pre, f, top.detach(), idx, obj.bandwidth), obj, group)
        if dead_F is None:
            return Loss(recon + freq, recon, freq, x_hat, f)
        # On CPU, how many latents are dead is known at once: skip the auxiliary loss when none is and
        # take only the dead ones. On an accelerator, reading that count would wait for the device
        # every step (`sync_free`): take the aux_k largest of the dead latents' pre-activations among
        # all latents instead (a live latent's −∞ weighs 0, after the dead ones in the same order: the
        # same sums) and zero the penalty when none is dead.
        n_dead = dead_F.sum()
        on_host = not sync_free
        if on_host and int(n_dead) == 0:
            return Loss(recon + freq, recon, freq, x_hat, f)
        err = (y_BO - x_hat).detach()
        k_aux = min(obj.aux_k, int(n_dead)) if on_host else min(obj.aux_k, self.width)
        aux_vals, aux_idx = pre.masked_fill(~dead_F, -torch.inf).topk(k_aux, dim=-1)
        err_hat = torch.nn.functional.embedding_bag(aux_idx, self.w_dec, per_sample_weights=aux_vals.relu(), mode="sum")
        norm = err.square().sum(-1).mean()
        dist.mean_(group, [norm])  # the global batch's error, so that the ratio is the global one
        aux = _mse(err_hat, err) / norm.clamp_min(1e-12)
        penalty = (obj.aux_coeff * aux if on_host else obj.aux_coeff * aux * (n_dead > 0)) + freq
        return Loss(recon + penalty, recon, penalty, x_hat, f)

    # -------------------------------------------------------------------------- files
    @classmethod
    def from_params(cls, params: dict[str, torch.Tensor], arch: str, k, source: str | Path) -> "SAE":
        """An SAE or transcoder (eval mode, no gradients) from Gemma Scope 2-layout tensors, after
        checking names, shapes and values; every problem is a GspError naming `source`. The decoder's
        width is d_out, and an `affine_skip_connection` makes it a skip transcoder."""
        w_enc, w_dec = params.get("w_enc"), params.get("w_dec")
        if w_enc is None or w_enc.ndim != 2 or w_dec is None or w_dec.ndim != 2:
            raise GspError(f"{source} has no 2-D w_enc and w_dec (keys: {', '.join(sorted(params)) or 'none'})")
        (d, n), o = w_enc.shape, w_dec.shape[1]
        if d == 0 or n == 0 or o == 0:
            raise GspError(f"{source} holds an SAE with d_in {d}, d_out {o} and width {n}: it is empty")
        if w_dec.shape[0] != n:
            hint = " (it looks transposed)" if w_dec.shape[1] == n else ""
            raise GspError(f"{source}: w_dec has shape {tuple(w_dec.shape)}, expected ({n}, d_out): one row for each "
                           f"of the {n} latents of w_enc {tuple(w_enc.shape)}{hint}")  # fmt: skip
        skip = FILE_KEYS["w_skip"] in params
        shapes = {"w_enc": (d, n), "b_enc": (n,), "w_dec": (n, o), "b_dec": (o,), "threshold": (n,)}
        if skip:
            shapes[FILE_KEYS["w_skip"]] = (d, o)
        if arch == "topk":
            params = {"threshold": torch.zeros(n), **params}
            if not isinstance(k, int) or isinstance(k, bool):
                raise GspError(f"{source}: a topk SAE needs an integer k in its config, got {k!r}")
        check_tensors(params, shapes, source)
        try:
            with torch.device("meta"):  # no placeholder weights: a 1M-wide SAE is held in memory once
                sae = cls(d, n, arch=arch, k=k if arch == "topk" else None, d_out=o, skip=skip)
        except ValueError as e:
            raise GspError(f"{source}: {e}") from None
        for name in sae.params:
            tensor = params[FILE_KEYS.get(name, name)].float().contiguous()
            setattr(sae, name, torch.nn.Parameter(tensor, requires_grad=False))
        return sae.eval()

    def save(self, folder: Path, config: "SAEConfig") -> None:
        """params.safetensors (float32) then config.json into `folder`, each written atomically; the
        config last, so a folder with a config.json holds a whole SAE. A TopK SAE's file has no threshold."""
        folder.mkdir(parents=True, exist_ok=True)
        # a TopK SAE carries no threshold, which a JumpReLU reader of this format would apply
        names = [k for k in self.params if not (k == "threshold" and self.arch == "topk")]
        tensors = {FILE_KEYS.get(k, k): getattr(self, k).detach().float().cpu().contiguous() for k in names}
        save_tensors(tensors, folder / "params.safetensors")
        fault("sae-params-written")
        atomic_write_text(folder / "config.json", json.dumps(config.to_json(), indent=2))

    @classmethod
    def load(cls, folder: Path) -> tuple["SAE", "SAEConfig"]:
        """A gsp or Gemma Scope 2 folder, SAE or transcoder: config.json + params.safetensors."""
        config = SAEConfig.from_json(read_json(folder / "config.json"), folder)
        if config.type not in ("sae", "transcoder"):
            raise GspError(f"{folder} is a {config.type!r}, which gsp cannot read (it reads SAEs and transcoders)")
        sae = cls.from_params(read_safetensors(folder / "params.safetensors"), config.arch, config.k,
                              folder / "params.safetensors")  # fmt: skip
        for key, size in (("d_in", sae.d_in), ("width", sae.width)):
            if getattr(config, key) not in (None, size):
                raise GspError(f"{folder}: config.json says {key}={getattr(config, key)} but the weights have {size}")
        if config.affine_connection != sae.skip:
            has = "have" if sae.skip else "lack"
            raise GspError(f"{folder}: config.json says affine_connection={config.affine_connection} but the "
                           f"weights {has} affine_skip_connection")  # fmt: skip
        return sae, config


# ------------------------------------------------------------------------------ config.json
@dataclass(frozen=True)
class SAEConfig:
    """config.json of a Gemma Scope 2 folder, which gsp fit also writes, with gsp's own keys beside.

    Gemma Scope 2 files carry only the first group; every gsp key is optional when reading."""

    # Gemma Scope 2's keys
    architecture: str = "jump_relu"
    model_name: str | None = None
    hf_hook_point_in: str | None = None
    hf_hook_point_out: str | None = None
    width: int | None = None
    l0: float | None = None
    affine_connection: bool = False
    type: str = "sae"
    # gsp's keys
    k: int | None = None
    d_in: int | None = None
    layer: int | None = None
    site: str | None = None
    store: str | None = None  # the training store (a transcoder's input)
    target_store: str | None = None  # a transcoder's training target
    model_revision: str | None = None
    input_scale_folded: float | None = None
    output_scale_folded: float | None = None  # a transcoder's target scale (an SAE's is the input's)
    steps: int | None = None
    tokens_seen: int | None = None
    final_train_metrics: dict | None = None
    fit_config: dict | None = None
    gsp_version: str | None = None

    @property
    def arch(self) -> str:
        """gsp's name of the architecture."""
        return {"jump_relu": "jumprelu", "jumprelu": "jumprelu", "topk": "topk"}[self.architecture]

    @property
    def is_transcoder(self) -> bool:
        out = self.hf_hook_point_out
        return self.type == "transcoder" or self.affine_connection or bool(out and out != self.hf_hook_point_in)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict, folder: Path) -> "SAEConfig":
        """The config of `folder/config.json`, every field of the dataclass read and its type checked
        (a key the file lacks, or null, takes the field's default; keys gsp does not know are ignored)."""
        values: dict[str, Any] = {}
        for name, annotation in typing.get_type_hints(cls).items():
            v, kinds = d.get(name), _kinds(annotation)
            if v is None:
                continue
            if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
                wanted = " or ".join(k.__name__ for k in kinds)
                raise GspError(f"{folder / 'config.json'}: '{name}' should be {wanted}, not {v!r}")
            values[name] = v
        config = cls(**values)
        if config.architecture not in ("jump_relu", "jumprelu", "topk"):
            raise GspError(f"{folder}: unknown architecture {config.architecture!r}: gsp loads jump_relu and topk SAEs")
        return config


def _mse(y_hat_BO: torch.Tensor, y_BO: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ‖y − ŷ‖²."""
    return (y_hat_BO - y_BO).square().sum(-1).mean()


def _kinds(annotation) -> tuple[type, ...]:
    """The JSON value types a field of this annotation accepts (a float field takes an integer too)."""
    kinds = tuple(t for t in (typing.get_args(annotation) or (annotation,)) if t is not type(None))
    kinds = tuple(typing.get_origin(t) or t for t in kinds)
    return kinds + (int,) if float in kinds and int not in kinds else kinds
