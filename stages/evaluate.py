"""gsp evaluate: measure any SAE on a store's activations and, by re-running the model, on LM loss.

Two measurements, both over ordinary tokens only (BOS, EOS and PAD rows excluded):
1. Reconstruction, from the store without the language model: L0, FVU, MSE, explained variance,
   cosine, dead and dense latents, feature frequencies, error by position (pipeline/metrics.py).
2. Delta LM loss (pipeline/lm_loss.py): the model named in the store runs the store's own contexts
   clean, with the SAE's reconstruction spliced in at the hook, and zero-ablated there.
Then a terminal table and reports/report_<timestamp>.{md,json} with plots (pipeline/report.py).
"""

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline import __version__, dist
from pipeline.clt import is_clt_folder
from pipeline.config import opt, stage_config
from pipeline.console import info, progress, warn
from pipeline.errors import GspError
from pipeline.lm_loss import DeltaLoss
from pipeline.metrics import clt_reconstruction, reconstruction, reconstructions
from pipeline.models import rerun_model
from pipeline.paths import cache_dir
from pipeline.saes import LoadedSAE, check_against_store, load_sae, open_input_store, sae_folder, sae_sources
from pipeline.store import ActivationStore
from pipeline.store.reader import same_rows


@stage_config("evaluate")
@dataclass
class EvaluateConfig:
    sae: list[str] | None = opt(
        None,
        "SAE: a gsp fit folder, a Gemma Scope 2, Gemma Scope or Llama Scope folder, or a Hub path "
        "owner/repo/sub/folder (e.g. google/gemma-scope-2-270m-pt/resid_post/layer_12_width_16k_l0_medium). "
        "Repeat it, or give a folder of SAE folders (a sweep's), to compare SAEs of one hook point on one "
        "pass: one report with the L0–FVU and L0–delta-loss frontier.",
    )
    sae_revision: str | None = opt(None, "Hub revision of a Hub --sae.")
    store: str | None = opt(
        None, "Store to measure on (default: the store a gsp fit SAE was trained on; a held-out store is honest)."
    )
    target_store: str | None = opt(
        None, "Transcoder: the store of the hook point it predicts (default: a gsp transcoder's training target, "
        "else that hook point of --store's store).",
    )  # fmt: skip
    tokens: int = opt(262_144, "Ordinary tokens (store rows) for the reconstruction metrics; all if fewer.")
    batch_size: int = opt(4096, "Rows per SAE batch.")
    delta_loss: bool = opt(True, "Re-run the model with the reconstruction spliced in (--no-delta-loss skips it).")
    delta_tokens: int = opt(4096, "Tokens of the store's contexts the model re-runs (three passes each).")
    lm_batch_tokens: int = opt(1024, "Tokens per forward pass of the rerun (memory ≈ 4 × this × vocab × 4 bytes).")
    model: str | None = opt(None, "Model for the rerun (default: the one the store was harvested from).")
    revision: str | None = opt(None, "Hub revision of --model (default: the store's).")
    device: str = opt("auto", "auto (CUDA if present), cpu, cuda or cuda:N.", run_only=True)
    dtype: Literal["auto", "float32", "bfloat16"] = opt("auto", "Model dtype for the rerun (auto: bf16 on CUDA).")
    reports: str = opt("reports", "Folder for report_<timestamp>.md, .json and the plots.", run_only=True)

    def __post_init__(self):
        if isinstance(self.sae, str):
            self.sae = [self.sae]
        for name in ("tokens", "batch_size", "delta_tokens", "lm_batch_tokens"):
            if getattr(self, name) <= 0:
                raise GspError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def smoke_config(cfg: EvaluateConfig) -> EvaluateConfig:
    """--smoke-test: a tiny random Gemma 3, a store harvested from it and an SAE fitted on it in a few
    steps (under cache/smoke, kept and reused like any harvest and fit with the same settings)."""
    from stages.fit import FitConfig, fit_or_reuse
    from stages.harvest import HarvestConfig, run_harvest
    from stages.harvest import smoke_config as smoke_harvest

    root = cache_dir() / "smoke"
    store = run_harvest(smoke_harvest(HarvestConfig(store=str(root / "eval-store"))))
    sae = fit_or_reuse(FitConfig(store=store, out=str(root / "eval-sae"), width=128, steps=60, batch_size=256,
                                 target_l0=16))  # fmt: skip
    return dataclasses.replace(cfg, sae=[str(sae)], store=store, delta_tokens=1024, model=None)


def run_evaluate(cfg: EvaluateConfig, *, token: str | None = None) -> Path:
    """Measure, print the table, write the report; returns the Markdown report's path."""
    if not cfg.sae:
        raise GspError("--sae is required: a gsp fit folder, a pretrained SAE folder, or a Hub path")
    sources = sae_sources(cfg.sae)
    if len(sources) > 1:
        return _evaluate_many(cfg, sources, token)
    folder = sae_folder(sources[0], revision=cfg.sae_revision, token=token)
    if is_clt_folder(folder):
        return _evaluate_clt(cfg, sources[0], folder, token)
    loaded = load_sae(sources[0], revision=cfg.sae_revision, token=token)
    store, target = _open_stores(cfg, loaded)
    layer, site = check_against_store(loaded, store, target)
    group = dist.setup(cfg.device)  # under torchrun, each process measures its share of the tokens
    sae = loaded.sae.to(group.device)

    dest = (loaded.layer_out, loaded.site_out) if loaded.is_transcoder else (layer, site)
    return _measure(
        cfg, group, _sae_info(loaded), store, target,
        lambda: reconstruction(sae, store, cfg.tokens, cfg.batch_size, group, target),
        lambda: _first(_delta_loss(cfg, [sae], store, (layer, site), dest, token, group)),
    )  # fmt: skip


def _measure(cfg: EvaluateConfig, group, sae_info: dict, store, target, recon_fn, delta_fn) -> Path:
    """The reconstruction metrics and (unless --no-delta-loss) the delta loss, timed; the report."""
    from pipeline import report

    t0 = time.perf_counter()
    recon = recon_fn()
    _note_tokens(cfg, group, recon["tokens"])
    t_recon = time.perf_counter() - t0
    delta, lm_info, t_delta = None, None, 0.0
    if cfg.delta_loss:
        t0 = time.perf_counter()
        delta, lm_info = delta_fn()
        t_delta = time.perf_counter() - t0
    results = _results(cfg, group, sae_info, store, target, recon, (delta, lm_info), (t_recon, t_delta))
    path = report.write(results, recon["_frequency"], Path(cfg.reports)) if group.main else None
    dist.teardown(group)
    return path


def _note_tokens(cfg: EvaluateConfig, group, measured: int) -> None:
    if measured < cfg.tokens and group.main:
        info(f"the store holds {measured:,} ordinary tokens; all were used (asked for {cfg.tokens:,})")


def _results(cfg: EvaluateConfig, group, sae_info: dict, store, target, recon: dict, lm, seconds) -> dict:
    """One SAE's figures as the report's JSON holds them."""
    (delta, lm_info), (t_recon, t_delta) = lm, seconds
    return {
        "gsp_version": __version__,
        "sae": sae_info,
        "store": _store_info(store),
        "target_store": _store_info(target) if target is not None else None,
        "model": lm_info,
        "settings": dataclasses.asdict(cfg),
        "reconstruction": {k: v for k, v in recon.items() if not k.startswith("_")},
        "delta_loss": delta,
        "timing": {
            "device": str(group.device),
            "processes": group.world,
            "reconstruction_s": t_recon,
            "reconstruction_tokens_per_s": recon["tokens"] / t_recon if t_recon else None,
            "delta_loss_s": t_delta,
            "delta_loss_tokens_per_s": (delta["tokens"] / t_delta) if delta and t_delta else None,
        },
    }


def _evaluate_many(cfg: EvaluateConfig, sources: list[str], token) -> Path:
    """Several SAEs of one hook point from one pass: each batch of store rows through every SAE, and
    for the delta loss one clean and one zero-ablated forward per batch of contexts, then one spliced
    forward per SAE. One report: a row per SAE, and the L0–FVU and L0–delta-loss frontier."""
    from pipeline import report

    loaded = []
    for spec in sources:
        if is_clt_folder(sae_folder(spec, revision=cfg.sae_revision, token=token)):
            raise GspError(f"{spec} is a cross-layer transcoder: evaluate it on its own (--sae {spec})")
        loaded.append(load_sae(spec, revision=cfg.sae_revision, token=token))
    points = {(s.layer, s.site, s.layer_out, s.site_out, s.is_transcoder) for s in loaded}
    if len(points) > 1:
        shown = "; ".join(f"{s.source}: layer {s.layer} {s.site}" for s in loaded[:4])
        raise GspError(f"these SAEs are of different hook points ({shown}): compare SAEs of one hook point, "
                       "or evaluate each on its own")  # fmt: skip
    store, target = _open_stores(cfg, loaded[0])
    layer, site = [check_against_store(s, store, target) for s in loaded][0]
    group = dist.setup(cfg.device)
    saes = [s.sae.to(group.device) for s in loaded]
    t0 = time.perf_counter()
    recons = reconstructions(saes, store, cfg.tokens, cfg.batch_size, group, target)
    _note_tokens(cfg, group, recons[0]["tokens"])
    t_recon = (time.perf_counter() - t0) / len(saes)
    deltas, t_delta = [(None, None)] * len(saes), 0.0
    if cfg.delta_loss:
        t0 = time.perf_counter()
        dest = (loaded[0].layer_out, loaded[0].site_out) if loaded[0].is_transcoder else (layer, site)
        results, lm_info = _delta_loss(cfg, saes, store, (layer, site), dest, token, group)
        deltas = [(r, lm_info) for r in results]
        t_delta = (time.perf_counter() - t0) / len(saes)
    results = [
        _results(cfg, group, _sae_info(s), store, target, r, d, (t_recon, t_delta))
        for s, r, d in zip(loaded, recons, deltas, strict=True)
    ]
    path = report.write_many(results, [r["_frequency"] for r in recons], Path(cfg.reports)) if group.main else None
    dist.teardown(group)
    return path


def _evaluate_clt(cfg: EvaluateConfig, source: str, folder: Path, token) -> Path:
    """A cross-layer transcoder on a store of every layer's MLP input and output (one harvest): its
    prediction of every MLP output; the delta loss with every MLP's output replaced at once."""
    from pipeline.clt import CrossLayerTranscoder, replace_mlps, zero_mlps

    clt = CrossLayerTranscoder.load(folder)
    L = clt.n_layers
    how = f"gsp harvest --layer all --site mlp_in,mlp_out (a store of all {L} layers' MLP inputs and outputs)"
    if not cfg.store:
        raise GspError(f"--store is required for a cross-layer transcoder: {how}")
    hooks = {h.hook.name: h for h in ActivationStore.open_some(cfg.store)}
    missing = [f"L{layer}.{site}" for site in ("mlp_in", "mlp_out") for layer in range(L)]
    missing = [name for name in missing if name not in hooks]
    if missing:
        raise GspError(f"store {cfg.store} lacks {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}, "
                       f"which this {L}-layer CLT reads or predicts: {how}")  # fmt: skip
    inputs = [hooks[f"L{layer}.mlp_in"] for layer in range(L)]
    targets = [hooks[f"L{layer}.mlp_out"] for layer in range(L)]
    if inputs[0].d_in != clt.d_model:
        raise GspError(f"the CLT has d_model {clt.d_model} but store {cfg.store} holds d_in {inputs[0].d_in}")
    group = dist.setup(cfg.device)
    clt.to(group.device)

    def check(lm) -> None:
        from pipeline.models import decoder_layers

        if len(decoder_layers(lm.model)) != L:
            raise GspError(f"model {lm.spec} has {len(decoder_layers(lm.model))} layers, the CLT {L}")

    def score(accs, model, ids) -> None:
        accs[0].run_with(model, ids, inputs[0].special_ids, lambda sp: replace_mlps(model, clt, sp),
                         lambda sp: zero_mlps(model, L, sp))  # fmt: skip

    info_ = {"source": source, "format": "gemma-scope-2-clt", "path": str(folder), "model_name": None,
             "layer": 0, "site": "mlp_in", "d_in": clt.d_model, "width": clt.width, "architecture": "jumprelu",
             "k": None, "transcoder": True, "layer_out": L - 1, "site_out": "mlp_out", "d_out": clt.d_model,
             "skip": clt.skip, "clt_layers": L}  # fmt: skip
    return _measure(
        cfg, group, info_, inputs[0], targets[0],
        lambda: clt_reconstruction(clt, inputs, targets, cfg.tokens, cfg.batch_size, group),
        lambda: _first(rerun(cfg, inputs[0], (0, "mlp_in"), token, group, check, score)),
    )  # fmt: skip


def _open_stores(cfg: EvaluateConfig, loaded: LoadedSAE) -> tuple[ActivationStore, ActivationStore | None]:
    """The store of the SAE's hook point; for a transcoder also the store of the point it predicts
    (--target-store, its training target, or that point of the same store)."""
    store = _open_store(cfg, loaded)
    if not loaded.is_transcoder:
        if cfg.target_store:
            raise GspError("--target-store is for transcoders; this SAE reconstructs its own input")
        return store, None
    path = cfg.target_store or (loaded.training_target if not cfg.store else None)
    path = path or f"{store.root.rstrip('/')}/L{loaded.layer_out}.{loaded.site_out}"
    try:
        target = ActivationStore.open(path)
    except GspError as e:
        raise GspError(f"this transcoder predicts layer {loaded.layer_out} {loaded.site_out}: pass --target-store, "
                       f"or a --store that holds both hook points ({e})") from None  # fmt: skip
    same_rows(store, target)
    return store, target


def _open_store(cfg: EvaluateConfig, loaded: LoadedSAE) -> ActivationStore:
    path = cfg.store or loaded.training_store
    if not path:
        layer = loaded.layer if loaded.layer is not None else "L"
        site = loaded.site or "resid_post"
        model = loaded.model_name or "MODEL"
        raise GspError(
            f"--store is required for this SAE: harvest one first, e.g. gsp harvest --model {model} "
            f"--layer {layer} --site {site} --part heldout --tokens 65536"
        )
    if not cfg.store:
        warn(f"no --store given: measuring on {path}, the store this SAE was trained on; a held-out store "
             "(gsp harvest --part heldout) gives figures on unseen documents")  # fmt: skip
    store = open_input_store(loaded, path)
    if not store.complete:
        warn(f"store {path} is incomplete; using its {store.rows_written:,} written rows")
    return store


# ------------------------------------------------------------------------------ delta loss
def _delta_loss(cfg: EvaluateConfig, saes: list, store: ActivationStore, source, dest, token, group) -> tuple:
    """The model re-run on the store's contexts with `dest` replaced by each SAE's output from `source`
    (the same point for an SAE; a transcoder's input and output): ([result per SAE], model info)."""
    from pipeline.hooks import site_width
    from pipeline.lm_loss import run_many

    def check(lm) -> None:
        for (lay, s), width in ((source, saes[0].d_in), (dest, saes[0].d_out)):
            if site_width(lm.model, lay, s) != width:
                raise GspError(f"model {lm.spec} has width {site_width(lm.model, lay, s)} at layer {lay} {s}, the "
                               f"SAE {width}: pass the --model the store was harvested from")  # fmt: skip

    def score(accs: list[DeltaLoss], model, ids) -> None:
        run_many(accs, model, saes, ids, *dest, store.special_ids, source=source)

    return rerun(cfg, store, source, token, group, check, score, n=len(saes))


def _first(results_and_info: tuple) -> tuple:
    results, lm_info = results_and_info
    return results[0], lm_info


def rerun(cfg: EvaluateConfig, store: ActivationStore, point, token, group, check, score, n: int = 1) -> tuple:
    """Delta LM loss over the store's first contexts: the model (checked by `check(lm)`) re-runs them in
    batches, `score(accs, model, ids)` running one batch into `n` accumulators (one per SAE); the
    activations at `point` are compared with the store's first. ([result per accumulator], model info)."""
    from pipeline.models import load_model

    spec, revision = rerun_model(store.meta.model, cfg.model, cfg.revision)
    lm = load_model(spec, device=str(group.device), dtype=cfg.dtype, revision=revision, token=token)
    check(lm)
    C = store.context_size
    n_ctx = min(math.ceil(cfg.delta_tokens / C), store.rows_written // C)
    if n_ctx == 0:
        raise GspError(f"store {store.path} holds no whole context to re-run")
    per_batch = max(1, cfg.lm_batch_tokens // C)
    ids_all = torch.from_numpy(store.read_tokens(0, n_ctx * C).astype(np.int64)).view(n_ctx, C)

    mismatch = _rerun_mismatch(lm.model, store, ids_all[:per_batch].to(lm.device), *point)
    accs = [DeltaLoss() for _ in range(n)]
    passes = f"{2 + n} passes" if n > 1 else "3 passes"
    with progress("tok", show=group.main) as bar:
        task = bar.add_task(f"delta loss ({passes})", total=n_ctx * C)
        for b, i in enumerate(range(0, n_ctx, per_batch)):
            if b % group.world != group.rank:
                continue
            ids = ids_all[i : i + per_batch].to(lm.device)
            score(accs, lm.model, ids)
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
    lm_info = {"spec": lm.spec, "name": lm.name, "revision": lm.revision, "device": str(lm.device),
               "dtype": str(lm.dtype).removeprefix("torch.")}  # fmt: skip
    return results, lm_info


def _rerun_mismatch(model, store: ActivationStore, ids_BS: torch.Tensor, layer: int, site: str) -> float:
    """‖live − stored‖ / ‖stored‖ over the ordinary tokens of the first contexts: the rerun must see
    what the harvest saw (bfloat16 storage alone gives ~0.2 %)."""
    from pipeline.hooks import activations

    live = activations(model, ids_BS, layer, site).float().reshape(-1, store.d_in).cpu()
    stored = torch.from_numpy(store.read(0, len(live)))
    ordinary = ~torch.isin(ids_BS.reshape(-1).cpu(), torch.tensor(store.special_ids))
    mismatch = ((live - stored)[ordinary].norm() / stored[ordinary].norm()).item()
    if mismatch > 0.05:
        warn(f"the re-run model's activations differ from the store's by {100 * mismatch:.1f} % "
             "(another model, revision or dtype?); the delta loss refers to the re-run model")  # fmt: skip
    return mismatch


# ------------------------------------------------------------------------------ what was measured
def _sae_info(loaded: LoadedSAE) -> dict:
    s = loaded.sae
    return {
        "source": loaded.source,
        "format": loaded.format,
        "path": str(loaded.path),
        "model_name": loaded.model_name,
        "layer": loaded.layer,
        "site": loaded.site,
        "d_in": s.d_in,
        "width": s.width,
        "architecture": s.arch,
        "k": s.k,
        "transcoder": loaded.is_transcoder,
        "layer_out": loaded.layer_out,
        "site_out": loaded.site_out,
        "d_out": s.d_out,
        "skip": s.skip,
    }


def _store_info(store: ActivationStore) -> dict:
    m = store.meta
    return {
        "path": store.path,
        "model": m.model.name,
        "model_revision": m.model.revision,
        "hook_point": store.hook.hook_point,
        "layer": store.hook.layer,
        "site": store.hook.site,
        "rows_written": store.rows_written,
        "context_size": store.context_size,
        "dtype": m.dtype,
        "dataset": m.dataset.to_json(),
    }
