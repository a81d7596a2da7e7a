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

`delta_losses` is the whole rerun over a store: its first contexts, in batches (each process of a
torchrun its share), scored for any number of `Splices` at once (the SAEs of one hook point share
the clean and the zero-ablated pass; a cross-layer transcoder replaces every MLP's output), after a
check that the model sees the activations the store holds (`activation_mismatch`).
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from pipeline import dist
from pipeline.console import progress, warn
from pipeline.errors import GspError
from pipeline.hooks import Point, activations, splice, splice_from
from pipeline.sae import SAE

MISMATCH_WARNING = 0.05  # ‖live − stored‖ / ‖stored‖ above this: another model, revision or dtype


class Splices(NamedTuple):
    """How the rerun alters the model. Each of `replaced` (one per SAE scored) and `zeroed` takes
    special_BS1 (True at special-token positions, which keep their activation) and returns a context
    manager under which the model runs with the reconstruction spliced in, or zero-ablated."""

    replaced: list[Callable]
    zeroed: Callable


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
        reads: Point | None = None,
    ) -> None:
        """Score one batch of contexts (token ids on the model's device). For a transcoder, `reads` is
        the point it reads (the MLP's input) and (layer, site) the one its prediction replaces."""
        score([self], model, ids_BS, special_ids, sae_splices(model, [sae], reads or (layer, site), (layer, site)))

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


def sae_splices(model: torch.nn.Module, saes: list[SAE], reads: Point, writes: Point) -> Splices:
    """The SAEs of one hook point spliced in: `writes` replaced by each SAE's output from `reads` (the
    same point for an SAE; a transcoder reads the MLP's input and replaces its output); and `writes`
    zero-ablated."""

    def spliced(sae: SAE) -> Callable:
        def replaced(special_BS1):
            def fn(src, acts):
                x_hat = sae(src.reshape(-1, src.shape[-1]).float()).x_hat_BD.reshape(acts.shape)
                return torch.where(special_BS1, acts, x_hat.to(acts.dtype))

            return splice_from(model, reads, writes, fn)

        return replaced

    def zeroed(special_BS1):
        return splice(model, *writes, lambda acts: torch.where(special_BS1, acts, torch.zeros_like(acts)))

    return Splices([spliced(sae) for sae in saes], zeroed)


@torch.no_grad()
def score(accs: list[DeltaLoss], model, ids_BS: torch.Tensor, special_ids: list[int], splices: Splices) -> None:
    """One batch of contexts: clean and zero-ablated once, then under each of `splices.replaced`,
    scored into the matching accumulator of `accs`."""
    special_BS1 = torch.isin(ids_BS, torch.tensor(special_ids, device=ids_BS.device))[..., None]
    mask = prediction_mask(ids_BS, special_ids)
    m = mask.double()
    targets = ids_BS[:, 1:]

    def ce(logp):
        return -logp.gather(-1, targets[..., None])[..., 0]

    with splices.zeroed(special_BS1):
        ce_zero = ce(_log_probs(model, ids_BS))
    logp_clean = _log_probs(model, ids_BS)
    ce_clean = ce(logp_clean)
    for acc, replace in zip(accs, splices.replaced, strict=True):
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


# ------------------------------------------------------------------------------ the rerun over a store
def contexts_to_rerun(store, tokens: int) -> int:
    """How many of the store's first contexts hold `tokens` tokens (all it has, if fewer); a store
    without one whole context is an error (checked before any work)."""
    C = store.context_size
    n_ctx = min(math.ceil(tokens / C), store.rows_written // C)
    if n_ctx == 0:
        raise GspError(f"store {store.path} holds no whole context to re-run")
    return n_ctx


def delta_losses(
    model: torch.nn.Module,
    store,
    splices: Splices,
    *,
    reads: Point,
    tokens: int,
    batch_tokens: int,
    group: dist.Group,
) -> list[dict]:
    """The delta loss of each of `splices.replaced` over the store's first contexts (`tokens` of
    them), re-run in batches of `batch_tokens`, each process of the group taking every world-th
    batch; the model's activations at `reads` are first compared with the store's. One result per
    replacement, each with the tokens re-run and that mismatch."""
    C = store.context_size
    n_ctx = contexts_to_rerun(store, tokens)
    per_batch = max(1, batch_tokens // C)
    device = next(model.parameters()).device
    ids_all = torch.from_numpy(store.read_tokens(0, n_ctx * C).astype(np.int64)).view(n_ctx, C)

    mismatch = activation_mismatch(model, store, ids_all[:per_batch].to(device), *reads)
    n = len(splices.replaced)
    accs = [DeltaLoss() for _ in range(n)]
    passes = f"{2 + n} passes" if n > 1 else "3 passes"
    with progress("tok", show=group.main) as bar:
        task = bar.add_task(f"delta loss ({passes})", total=n_ctx * C)
        for batch, first in enumerate(range(0, n_ctx, per_batch)):
            if batch % group.world != group.rank:
                continue
            ids = ids_all[first : first + per_batch].to(device)
            score(accs, model, ids, store.special_ids, splices)
            bar.advance(task, ids.numel() * group.world)
    shares = dist.gather(group, accs)  # a collective: every process takes part
    results = []
    for j in range(n):
        acc = shares[0][j]
        for other in shares[1:]:
            acc.merge(other[j])
        result = acc.result()
        result["tokens"] = n_ctx * C
        result["store_activation_mismatch"] = mismatch
        results.append(result)
    return results


def activation_mismatch(model: torch.nn.Module, store, ids_BS: torch.Tensor, layer: int, site: str) -> float:
    """‖live − stored‖ / ‖stored‖ over the ordinary tokens of the first contexts: the rerun must see
    what the harvest saw (bfloat16 storage alone gives ~0.2 %)."""
    live = activations(model, ids_BS, layer, site).float().reshape(-1, store.d_in).cpu()
    stored = torch.from_numpy(store.read(0, len(live)))
    ordinary = ~torch.isin(ids_BS.reshape(-1).cpu(), torch.tensor(store.special_ids))
    mismatch = ((live - stored)[ordinary].norm() / stored[ordinary].norm()).item()
    if mismatch > MISMATCH_WARNING:
        warn(f"the re-run model's activations differ from the store's by {100 * mismatch:.1f} % "
             "(another model, revision or dtype?); the delta loss refers to the re-run model")  # fmt: skip
    return mismatch
