"""Delta LM loss: the model re-run with an SAE's reconstruction spliced in at its hook point.

Each batch of contexts runs three times: clean; with the site's activation replaced by the SAE's
reconstruction x̂ (for a transcoder: the MLP's output replaced by its prediction from the MLP's real
input in the same pass); with it replaced by zeros. Positions holding a special token (BOS, EOS, PAD)
keep their original activation in both altered runs. A prediction counts when both the token it
is made from and the token it predicts are ordinary tokens, so BOS and document separators never
enter the averages.

    delta loss     = CE_spliced − CE_clean
    loss recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean)
    KL             = mean over counted predictions of KL(p_clean ‖ p_spliced)
The standard error of the delta comes from its spread over contexts (tokens in one context are
correlated, contexts are independent draws).
"""

import math

import torch

from pipeline.hooks import splice, splice_from
from pipeline.sae import SAE


def prediction_mask(ids_BS: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """(B, S−1): True where the prediction of token t+1 from position t is counted."""
    ordinary = ~torch.isin(ids_BS, torch.tensor(special_ids, dtype=ids_BS.dtype, device=ids_BS.device))
    return ordinary[:, :-1] & ordinary[:, 1:]


class DeltaLoss:
    """Per-context sums over counted predictions, merged across batches (and processes)."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []  # per context: (n, Σce_clean, Σce_spliced, Σce_zero, Σkl)

    @torch.no_grad()
    def run(
        self,
        model: torch.nn.Module,
        sae: SAE,
        ids_BS: torch.Tensor,
        layer: int,
        site: str,
        special_ids: list[int],
        source: tuple[int, str] | None = None,
    ) -> None:
        """Score one batch of contexts (token ids on the model's device). For a transcoder, `source` is
        the point it reads (the MLP's input) and (layer, site) the one its prediction replaces."""
        run_many([self], model, [sae], ids_BS, layer, site, special_ids, source)

    @torch.no_grad()
    def run_with(self, model: torch.nn.Module, ids_BS: torch.Tensor, special_ids: list[int], replaced, zeroed) -> None:
        """Score one batch of contexts; `replaced(special_BS1)` and `zeroed(special_BS1)` are context
        managers under which the model runs with its activations replaced by the reconstruction, and
        zero-ablated (special-token positions, True in special_BS1, kept as they are)."""
        score([self], model, ids_BS, special_ids, [replaced], zeroed)

    def merge(self, other: "DeltaLoss") -> "DeltaLoss":
        self.rows += other.rows
        return self

    def result(self) -> dict:
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, 5, dtype=torch.float64)
        rows = rows[rows[:, 0] > 0]  # contexts with at least one counted prediction
        n, ce_c, ce_s, ce_z, kl = rows.sum(0).tolist() if len(rows) else [0.0] * 5
        if not n:
            return {"predictions": 0, "contexts": 0}
        per_context = (rows[:, 2] - rows[:, 1]) / rows[:, 0]
        se = per_context.std().item() / math.sqrt(len(rows)) if len(rows) > 1 else math.nan
        gap = ce_z - ce_c
        return {
            "predictions": int(n),
            "contexts": len(rows),
            "ce_clean": ce_c / n,
            "ce_spliced": ce_s / n,
            "ce_zero_ablated": ce_z / n,
            "delta_loss": (ce_s - ce_c) / n,
            "delta_loss_stderr": se,
            "loss_recovered": (ce_z - ce_s) / gap if gap else math.nan,
            "kl_clean_spliced": kl / n,
        }


@torch.no_grad()
def run_many(accs: list[DeltaLoss], model, saes: list[SAE], ids_BS, layer: int, site: str, special_ids, source=None):
    """DeltaLoss.run for several SAEs of one hook point: one clean and one zero-ablated pass for all of
    them, then one spliced pass each (`accs[i]` scores `saes[i]`)."""

    def spliced(sae):
        def replaced(special_BS1):
            def fn(src, acts):
                x_hat = sae(src.reshape(-1, src.shape[-1]).float()).x_hat_BD.reshape(acts.shape)
                return torch.where(special_BS1, acts, x_hat.to(acts.dtype))

            return splice_from(model, source or (layer, site), (layer, site), fn)

        return replaced

    def zeroed(special_BS1):
        return splice(model, layer, site, lambda acts: torch.where(special_BS1, acts, torch.zeros_like(acts)))

    score(accs, model, ids_BS, special_ids, [spliced(sae) for sae in saes], zeroed)


@torch.no_grad()
def score(accs: list[DeltaLoss], model, ids_BS: torch.Tensor, special_ids: list[int], replaced: list, zeroed) -> None:
    """One batch of contexts: clean and zero-ablated once, then under each of `replaced` (context
    managers, see DeltaLoss.run_with), scored into the matching accumulator of `accs`."""
    special_BS1 = torch.isin(ids_BS, torch.tensor(special_ids, device=ids_BS.device))[..., None]
    mask = prediction_mask(ids_BS, special_ids)
    m = mask.double()
    targets = ids_BS[:, 1:]

    def ce(logp):
        return -logp.gather(-1, targets[..., None])[..., 0]

    with zeroed(special_BS1):
        ce_zero = ce(_log_probs(model, ids_BS))
    logp_clean = _log_probs(model, ids_BS)
    ce_clean = ce(logp_clean)
    for acc, replace in zip(accs, replaced, strict=True):
        with replace(special_BS1):
            logp = _log_probs(model, ids_BS)
        ce_spliced = ce(logp)
        kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
        del logp
        sums = [m.sum(1)] + [(v.double() * m).sum(1) for v in (ce_clean, ce_spliced, ce_zero, kl)]
        acc.rows.append(torch.stack(sums, 1).cpu())


def _log_probs(model: torch.nn.Module, ids_BS: torch.Tensor) -> torch.Tensor:
    """(B, S−1, V) float32 next-token log-probabilities."""
    logits = model(input_ids=ids_BS, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)
