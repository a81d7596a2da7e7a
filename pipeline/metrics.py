"""Metrics as the field defines them: pure functions for one batch (fit's logs) and their streaming form.

All take float tensors of shape (B, D) / (B, F) with special-token rows already removed.
- L0: mean number of non-zero latents per token.
- FVU: Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the per-dimension mean over the evaluated tokens;
  explained variance = 1 − FVU.
- MSE: mean of (x − x̂)² over tokens and dimensions.
- cosine: mean over tokens of cos(x, x̂).
- dead: a latent that never fired on the evaluated tokens; dense: one that fired on more than
  DENSE_FREQUENCY of them.
`Running` accumulates the same quantities batch by batch (in float64, exact to rounding) so that
evaluate can stream millions of tokens, and merges with another `Running` (one per process).
"""

import math

import torch

DENSE_FREQUENCY = 0.1  # a latent firing on more than 10 % of tokens is "dense"


def l0(f_BF: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero latents per token."""
    return (f_BF != 0).sum(-1).float().mean()


def fvu(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the per-dimension mean of x."""
    x = x_BD.double()
    return (x - x_hat_BD.double()).square().sum() / (x - x.mean(0)).square().sum()


def mse(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Mean squared error per element."""
    return (x_BD.double() - x_hat_BD.double()).square().mean()


def cosine(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the cosine similarity between x and x̂ (0 where x̂ is 0)."""
    return torch.nn.functional.cosine_similarity(x_BD.double(), x_hat_BD.double(), dim=-1).mean()


def dead_fraction(tokens_since_fired_F: torch.Tensor, window: int) -> float:
    """Share of latents that have not fired in the last `window` tokens."""
    return (tokens_since_fired_F >= window).float().mean().item()


class Running:
    """Streaming sums for the metrics above over many batches, plus per-latent and per-position detail.

    update() takes one batch; merge() adds another Running (another process's share); result()
    gives the figures. Variance uses Chan's pairwise update of per-dimension means and M2.
    """

    def __init__(self, d_in: int, width: int, context_size: int, device: torch.device | str = "cpu"):
        f64 = dict(dtype=torch.float64, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.n = 0
        self.mean_D = torch.zeros(d_in, **f64)
        self.m2_D = torch.zeros(d_in, **f64)
        self.err_sq = torch.zeros((), **f64)  # Σ‖x − x̂‖²
        self.cos_sum = torch.zeros((), **f64)
        self.norm_ratio_sum = torch.zeros((), **f64)  # Σ ‖x̂‖/‖x‖: below 1 means shrinkage
        self.l0_counts = torch.zeros(width + 1, **i64)  # tokens with each L0
        self.fired_F = torch.zeros(width, **i64)
        self.act_sum_F = torch.zeros(width, **f64)
        self.act_max_F = torch.zeros(width, **f64)
        self.pos_err_S = torch.zeros(context_size, **f64)
        self.pos_l0_S = torch.zeros(context_size, **f64)
        self.pos_n_S = torch.zeros(context_size, **i64)

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, f_BF: torch.Tensor, pos_B: torch.Tensor) -> None:
        """One batch of non-special rows: activations, reconstructions, latents, positions in context."""
        x, x_hat = x_BD.double(), x_hat_BD.double()
        b = len(x)
        if b == 0:
            return
        mean_b = x.mean(0)
        m2_b = (x - mean_b).square().sum(0)
        delta, n = mean_b - self.mean_D, self.n + b
        self.mean_D += delta * (b / n)
        self.m2_D += m2_b + delta.square() * (self.n * b / n)
        self.n = n
        err_B = (x - x_hat).square().sum(-1)
        self.err_sq += err_B.sum()
        self.cos_sum += torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum()
        self.norm_ratio_sum += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)).sum()
        # float32 sums over one batch are exact for counts (< 2^24) and accurate for activations; the
        # running totals are int64/float64 (integer and float64 reductions of (B, F) are ~10× slower)
        active = (f_BF != 0).float()
        l0_B = active.sum(-1).long()
        self.l0_counts += torch.bincount(l0_B, minlength=len(self.l0_counts))
        self.fired_F += active.sum(0).long()
        self.act_sum_F += f_BF.float().sum(0).double()
        self.act_max_F = torch.maximum(self.act_max_F, f_BF.amax(0).double())
        self.pos_err_S.index_add_(0, pos_B, err_B)
        self.pos_l0_S.index_add_(0, pos_B, l0_B.double())
        self.pos_n_S.index_add_(0, pos_B, torch.ones_like(pos_B))

    def to(self, device: torch.device | str) -> "Running":
        """The same sums on another device (e.g. the CPU, to send to another process)."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    @torch.no_grad()
    def merge(self, other: "Running") -> "Running":
        if other.n:
            delta, n = other.mean_D - self.mean_D, self.n + other.n
            self.mean_D += delta * (other.n / n)
            self.m2_D += other.m2_D + delta.square() * (self.n * other.n / n)
            self.n = n
        for name in ("err_sq", "cos_sum", "norm_ratio_sum", "l0_counts", "fired_F", "act_sum_F"):
            getattr(self, name).add_(getattr(other, name))
        for name in ("pos_err_S", "pos_l0_S", "pos_n_S"):
            getattr(self, name).add_(getattr(other, name))
        self.act_max_F = torch.maximum(self.act_max_F, other.act_max_F)
        return self

    def frequencies(self) -> torch.Tensor:
        """(F,) share of evaluated tokens on which each latent fired."""
        return self.fired_F.double().cpu() / max(self.n, 1)

    def result(self, top: int = 10) -> dict:
        """The figures, as plain Python numbers and lists (JSON-ready)."""
        n = self.n
        total_var = self.m2_D.sum().item()
        fvu_ = self.err_sq.item() / total_var if total_var > 0 else math.nan
        freq = self.frequencies()
        mean_act = (self.act_sum_F / self.fired_F.clamp_min(1)).cpu()
        order = torch.argsort(freq, descending=True, stable=True)[:top]
        l0_counts = self.l0_counts.cpu()
        levels = torch.arange(len(l0_counts), dtype=torch.float64)
        l0_mean = (l0_counts * levels).sum().item() / max(n, 1)
        pos_n = self.pos_n_S.cpu()
        per_pos = total_var / n if n else math.nan
        return {
            "tokens": n,
            "l0": l0_mean,
            "l0_std": math.sqrt(max((l0_counts * (levels - l0_mean) ** 2).sum().item() / max(n, 1), 0.0)),
            "fvu": fvu_,
            "explained_variance": 1 - fvu_,
            "mse": self.err_sq.item() / max(n * len(self.mean_D), 1),
            "mse_per_token": self.err_sq.item() / max(n, 1),
            "cosine": self.cos_sum.item() / max(n, 1),
            "relative_norm": self.norm_ratio_sum.item() / max(n, 1),
            "dead_features": int((self.fired_F == 0).sum()),
            "dead_fraction": (self.fired_F == 0).double().mean().item(),
            "dense_features": int((freq > DENSE_FREQUENCY).sum()),
            "top_features": [
                {
                    "feature": int(i),
                    "frequency": freq[i].item(),
                    "mean_activation": mean_act[i].item(),
                    "max_activation": self.act_max_F[i].item(),
                }
                for i in order
            ],  # fmt: skip
            "frequency_histogram": _log_histogram(freq),
            "l0_histogram": _trim(l0_counts.tolist()),
            "position_fvu": [
                (e / c / per_pos if c else None) for e, c in zip(self.pos_err_S.tolist(), pos_n.tolist(), strict=True)
            ],
            "position_l0": [
                (v / c if c else None) for v, c in zip(self.pos_l0_S.tolist(), pos_n.tolist(), strict=True)
            ],
        }


def _log_histogram(freq_F: torch.Tensor, step: float = 0.1) -> dict:
    """Latents by log10 of their firing frequency (the dead ones, frequency 0, counted apart)."""
    alive = freq_F[freq_F > 0].log10()
    lowest = min(math.floor(alive.min().item() / step), -1) if len(alive) else -1
    edges = torch.arange(lowest, 1, dtype=torch.float64) * step  # up to log10(1) = 0 exactly, right edge included
    counts = torch.histogram(alive, bins=edges).hist if len(alive) else torch.zeros(len(edges) - 1)
    return {"log10_edges": [round(e, 6) for e in edges.tolist()], "counts": [int(c) for c in counts.tolist()],
            "dead": int((freq_F == 0).sum())}  # fmt: skip


def _trim(counts: list[int]) -> list[int]:
    """A histogram without its trailing empty bins."""
    last = max((i for i, c in enumerate(counts) if c), default=0)
    return counts[: last + 1]


# ------------------------------------------------------------------------------ over a store
@torch.no_grad()
def reconstruction(sae, store, tokens: int, batch_size: int, group=None, target=None) -> dict:
    """`Running` metrics of an SAE over the first `tokens` ordinary rows of a store (all, if fewer);
    for a transcoder, of its prediction of `target` (the same rows at its output hook point)."""
    return reconstructions([sae], store, tokens, batch_size, group, target)[0]


@torch.no_grad()
def reconstructions(saes: list, store, tokens: int, batch_size: int, group=None, target=None) -> list[dict]:
    """`reconstruction` of several SAEs of one hook point from one read of the store: each batch of
    rows goes through every SAE.

    Under torchrun each process reads and measures only its share of the rows (pipeline.store's
    `ordinary_rows` with a share); the sums are then merged, giving the one-process figures."""
    from pipeline import dist
    from pipeline.console import progress
    from pipeline.errors import GspError

    group = group or dist.Group()
    C, device = store.context_size, group.device
    runs = [Running((target or store).d_in, sae.width, C, device) for sae in saes]
    with progress("tok", show=group.main) as bar:
        what = "reconstruction" + (f" ({len(saes)} SAEs)" if len(saes) > 1 else "")
        total = min(tokens, store.rows_written)  # an upper bound: special-token rows are not served
        task = bar.add_task(what, total=total)
        for rows in store.ordinary_rows(tokens, batch_size, share=(group.rank, group.world), target=target):
            x = torch.from_numpy(rows[0]).to(device)
            truth = x if target is None else torch.from_numpy(rows[1]).to(device)
            pos = torch.from_numpy(rows[-1] % C).to(device)
            for sae, run in zip(saes, runs, strict=True):
                out = sae(x)
                run.update(truth, out.x_hat_BD, out.f_BF, pos)
            bar.update(task, completed=runs[0].n * group.world)
        bar.update(task, completed=total)  # every row wanted was served
    results = []
    for run in runs:
        shares = dist.gather(group, run.to("cpu"))
        run = shares[0]
        for other in shares[1:]:
            run.merge(other)
        if run.n < 2:
            raise GspError(f"store {store.path} has fewer than 2 ordinary tokens to measure on")
        result = run.result()
        result["_frequency"] = run.frequencies()
        result["dense_threshold"] = DENSE_FREQUENCY
        results.append(result)
    return results


@torch.no_grad()
def clt_reconstruction(clt, inputs: list, targets: list, tokens: int, batch_size: int, group=None) -> dict:
    """`Running` metrics of a cross-layer transcoder's prediction of every layer's MLP output from every
    layer's MLP input (the stores of one harvest, `inputs[l]` and `targets[l]` for layer l), taken over
    all layers together (L0 counts every layer's latents; FVU pools every layer's dimensions), plus
    each layer's own FVU (`layer_fvu`)."""
    from pipeline import dist
    from pipeline.console import progress
    from pipeline.errors import GspError
    from pipeline.store.reader import ordinary_rows_of

    group = group or dist.Group()
    first, device, L, D = inputs[0], group.device, clt.n_layers, clt.d_model
    run = Running(L * D, clt.width, first.context_size, device)
    err_L = torch.zeros(L, dtype=torch.float64, device=device)
    with progress("tok", show=group.main) as bar:
        total = min(tokens, first.rows_written)  # an upper bound: special-token rows are not served
        task = bar.add_task("reconstruction (every layer)", total=total)
        for arrays, rows in ordinary_rows_of(inputs + targets, tokens, batch_size, (group.rank, group.world)):
            xs = [torch.from_numpy(a).to(device) for a in arrays[:L]]
            ys = [torch.from_numpy(a).to(device) for a in arrays[L:]]
            preds, latents = clt(xs)
            err_L += torch.stack([(y.double() - p.double()).square().sum() for y, p in zip(ys, preds, strict=True)])
            run.update(torch.cat(ys, 1), torch.cat(preds, 1), torch.cat(latents, 1),
                       torch.from_numpy(rows % first.context_size).to(device))  # fmt: skip
            bar.update(task, completed=run.n * group.world)
        bar.update(task, completed=total)  # every row wanted was served
    shares = dist.gather(group, (run.to("cpu"), err_L.cpu()))
    run, err_L = shares[0]
    for other, err in shares[1:]:
        run.merge(other)
        err_L += err
    if run.n < 2:
        raise GspError(f"store {first.path} has fewer than 2 ordinary tokens to measure on")
    result = run.result()
    var_L = run.m2_D.cpu().view(L, D).sum(1)
    result["layer_fvu"] = (err_L / var_L).tolist()
    result["layers"] = list(clt.layers)  # the model layer of each entry of layer_fvu
    result["_frequency"] = run.frequencies()
    result["dense_threshold"] = DENSE_FREQUENCY
    return result
