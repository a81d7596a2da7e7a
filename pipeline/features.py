"""What features mean: per-latent statistics and top-activating tokens, streamed over a store.

`TopActivations` keeps, for every latent, its firing count, sum and max of activations, a histogram
of its non-zero activations on log-spaced bins, and the k largest activations with the store rows
they came from. Memory is O(F·k + F·bins), whatever the number of tokens; batches are dense
(B, F) latents, so the caller sizes B to the width. `logit_lens` ranks the tokens a decoder
direction promotes through the model's final norm and unembedding.
"""

import torch

from pipeline.models import final_norm

# activation histogram bins: log10(activation) from −3 to 6 in steps of 0.1 (raw residual units)
HIST_LOW, HIST_HIGH, HIST_STEP = -3.0, 6.0, 0.1
HIST_BINS = round((HIST_HIGH - HIST_LOW) / HIST_STEP)


class TopActivations:
    """Streaming per-latent statistics and top-k (activation, row) pairs."""

    def __init__(self, width: int, k: int, device: torch.device | str = "cpu"):
        self.k = k
        self.n = 0
        self.count_F = torch.zeros(width, dtype=torch.int64, device=device)
        self.sum_F = torch.zeros(width, dtype=torch.float64, device=device)
        self.max_F = torch.zeros(width, dtype=torch.float32, device=device)
        self.hist_FH = torch.zeros(width, HIST_BINS, dtype=torch.int32, device=device)
        self.top_val_KF = torch.zeros(k, width, dtype=torch.float32, device=device)
        self.top_row_KF = torch.full((k, width), -1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, f_BF: torch.Tensor, rows_B: torch.Tensor) -> None:
        """One batch of latents (B, F) for store rows `rows_B` (special rows already removed)."""
        self.n += len(f_BF)
        active = f_BF > 0
        self.count_F += active.float().sum(0).long()  # float32 batch sums: exact counts, ~10× faster
        self.sum_F += f_BF.float().sum(0).double()
        self.max_F = torch.maximum(self.max_F, f_BF.amax(0))
        b, feat = active.nonzero(as_tuple=True)
        vals = f_BF[b, feat]
        bins = ((vals.log10() - HIST_LOW) / HIST_STEP).long().clamp_(0, HIST_BINS - 1)
        self.hist_FH.view(-1).index_add_(0, feat * HIST_BINS + bins, torch.ones_like(bins, dtype=torch.int32))
        k = min(self.k, len(f_BF))
        val, idx = f_BF.topk(k, dim=0)  # (k, F)
        self._merge_top(val, rows_B[idx])

    def _merge_top(self, val_kF: torch.Tensor, row_kF: torch.Tensor) -> None:
        vals = torch.cat([self.top_val_KF, val_kF])
        rows = torch.cat([self.top_row_KF, row_kF])
        best, order = vals.topk(self.k, dim=0)
        self.top_val_KF, self.top_row_KF = best, rows.gather(0, order)

    def merge(self, other: "TopActivations") -> "TopActivations":
        self.n += other.n
        self.count_F += other.count_F
        self.sum_F += other.sum_F
        self.max_F = torch.maximum(self.max_F, other.max_F)
        self.hist_FH += other.hist_FH
        self._merge_top(other.top_val_KF, other.top_row_KF)
        return self

    def top(self, feature: int) -> list[tuple[float, int]]:
        """(activation, row) of the feature's top activations, largest first (fired ones only)."""
        vals, rows = self.top_val_KF[:, feature].tolist(), self.top_row_KF[:, feature].tolist()
        return [(v, r) for v, r in zip(vals, rows, strict=True) if v > 0 and r >= 0]

    def frequency(self) -> torch.Tensor:
        return self.count_F.double().cpu() / max(self.n, 1)

    def mean(self) -> torch.Tensor:
        """Mean activation when firing."""
        return (self.sum_F / self.count_F.clamp_min(1)).cpu()


@torch.no_grad()
def logit_lens(model: torch.nn.Module, w_dec_FD: torch.Tensor, k: int, chunk: int = 256) -> tuple:
    """(top token ids (F, k), their logits) of each decoder row through the final norm and unembedding.

    Uses the model's own modules (final norm, then the LM head), so it is right for Gemma's (1 + w)
    norm and Llama's alike; the norm's rescaling by 1/rms does not change the ranking.
    """
    norm = final_norm(model)
    head = model.get_output_embeddings()
    param = next(head.parameters())
    ids, vals = [], []
    for d in w_dec_FD.split(chunk):
        logits = head(norm(d.to(param.device, param.dtype)[:, None, :]))[:, 0].float()
        v, i = logits.topk(k, dim=-1)
        ids.append(i.cpu())
        vals.append(v.cpu())
    return torch.cat(ids), torch.cat(vals)
