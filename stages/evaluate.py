"""gsp evaluate: measure SAEs on a store's activations and, by re-running the model, on LM loss.

Two measurements, both over ordinary tokens only (BOS, EOS and PAD rows excluded):
1. Reconstruction, from the store without the language model: L0, FVU, MSE, explained variance,
   cosine, dead and dense latents, feature frequencies, error by position (pipeline/metrics.py).
2. Delta LM loss (pipeline/lm_loss.py): the model named in the store runs the store's own contexts
   clean, with the SAE's reconstruction spliced in at the hook, and zero-ablated there.
Then a terminal table and reports/report_<timestamp>.{md,json} with plots (pipeline/report.py): the
single report for one SAE, the comparison with the L0–FVU and L0–delta-loss frontier for several.

One pipeline for every case. What --sae names is measured as `SAEs` of one hook point (one SAE is
the comparison of one; several share each read of the store and each clean and zero-ablated forward
pass) or as `CrossLayer` transcoders, a cross-layer transcoder or a transcoder set (one per layer,
pipeline/transcoder_set.py), which read every layer's MLP input and replace every MLP's output at
once (a set also one layer at a time); both answer the same five questions (what they are, moving
to a device, their reconstruction figures, how they splice into the model, which delta losses are
whose). Every input (the SAE files, the stores, the rerun model's spec) is checked before the work
starts, and under torchrun the process group is torn down however the stage ends.
"""

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from pipeline import __version__, dist
from pipeline.clt import CrossLayerTranscoder, is_clt_folder, replace_mlps, zero_mlps
from pipeline.config import opt, stage_config
from pipeline.console import info, warn
from pipeline.errors import GspError
from pipeline.hooks import Point, site_width
from pipeline.lm_loss import Splices, contexts_to_rerun, delta_losses, sae_splices
from pipeline.metrics import clt_reconstruction, reconstructions
from pipeline.models import LoadedModel, decoder_layers, load_model, model_to_run
from pipeline.paths import cache_dir
from pipeline.sae_formats import LoadedSAE, check_against_store, load_sae, open_input_store, sae_folder, sae_sources
from pipeline.store import ActivationStore
from pipeline.store.reader import same_rows
from pipeline.transcoder_set import TranscoderSet, is_set_folder


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


def run_evaluate(cfg: EvaluateConfig, *, token: str | None = None) -> Path | None:
    """Measure, print the table, write the report; returns the Markdown report's path (None on every
    process of a torchrun but the first, which writes it)."""
    from pipeline import report

    if not cfg.sae:
        raise GspError("--sae is required: a gsp fit folder, a pretrained SAE folder, or a Hub path")
    subjects = _subjects(cfg, token)
    rerun_model = _rerun_model(cfg, subjects.store) if cfg.delta_loss else None
    with dist.session(cfg.device) as group:  # under torchrun, each process measures its share of the tokens
        subjects.to(group.device)
        t0 = time.perf_counter()
        recons = subjects.reconstructions(cfg.tokens, cfg.batch_size, group)
        if recons[0]["tokens"] < cfg.tokens and group.main:
            info(f"the store holds {recons[0]['tokens']:,} ordinary tokens; all were used (asked for {cfg.tokens:,})")
        t_recon = (time.perf_counter() - t0) / len(recons)  # each SAE's share of the one pass
        deltas, lm_info, t_delta = [None] * len(recons), None, 0.0
        if rerun_model is not None:
            t0 = time.perf_counter()
            deltas, lm_info = _delta_losses(cfg, subjects, rerun_model, token, group)
            deltas = subjects.deltas(deltas)
            t_delta = (time.perf_counter() - t0) / len(recons)
        results = [
            _results(cfg, group, sae_info, subjects, recon, (delta, lm_info), (t_recon, t_delta))
            for sae_info, recon, delta in zip(subjects.infos(), recons, deltas, strict=True)
        ]
        if not group.main:
            return None
        return report.write(results, [recon["_frequency"] for recon in recons], Path(cfg.reports))


def _results(cfg: EvaluateConfig, group, sae_info: dict, subjects: "Subjects", recon: dict, lm, seconds) -> dict:
    """One SAE's figures as the report's JSON holds them."""
    (delta, lm_info), (t_recon, t_delta) = lm, seconds
    return {
        "gsp_version": __version__,
        "sae": sae_info,
        "store": _store_info(subjects.store),
        "target_store": _store_info(subjects.target) if subjects.target is not None else None,
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


# ------------------------------------------------------------------------------ what is measured
class Subjects(Protocol):
    """What one evaluation measures, on one store."""

    store: ActivationStore  # what is read: the report's store, whose contexts the rerun re-runs
    target: ActivationStore | None  # what a transcoder predicts (None for an SAE)
    reads: Point  # the hook point read, where the rerun's activations are compared with the store's

    def infos(self) -> list[dict]:
        """The report's "sae" section of each SAE measured."""

    def to(self, device: torch.device) -> None: ...

    def reconstructions(self, tokens: int, batch_size: int, group: dist.Group) -> list[dict]:
        """Each SAE's reconstruction figures (pipeline/metrics.py), from one pass over the store."""

    def splices(self, lm: LoadedModel) -> Splices:
        """How the rerun splices each SAE into the model, after checking that the model fits."""

    def deltas(self, results: list[dict]) -> list[dict]:
        """Each SAE's delta-loss result, from the rerun's (one per splice)."""


class SAEs:
    """SAEs of one hook point (one, or several compared), the store they read and, for transcoders,
    the store of the point they predict."""

    def __init__(self, loaded: list[LoadedSAE], store: ActivationStore, target: ActivationStore | None):
        self.loaded, self.store, self.target = loaded, store, target
        self.reads = [check_against_store(s, store, target) for s in loaded][0]
        first = loaded[0]
        self.writes = (first.layer_out, first.site_out) if first.is_transcoder else self.reads

    def infos(self) -> list[dict]:
        return [_sae_info(s) for s in self.loaded]

    def to(self, device: torch.device) -> None:
        for s in self.loaded:
            s.sae.to(device)

    def reconstructions(self, tokens: int, batch_size: int, group: dist.Group) -> list[dict]:
        return reconstructions([s.sae for s in self.loaded], self.store, tokens, batch_size, group, self.target)

    def splices(self, lm: LoadedModel) -> Splices:
        sae = self.loaded[0].sae
        for (layer, site), width in ((self.reads, sae.d_in), (self.writes, sae.d_out)):
            have = site_width(lm.model, layer, site)
            if have != width:
                raise GspError(f"model {lm.spec} has width {have} at layer {layer} {site}, the SAE {width}: pass "
                               "the --model the store was harvested from")  # fmt: skip
        return sae_splices(lm.model, [s.sae for s in self.loaded], self.reads, self.writes)

    def deltas(self, results: list[dict]) -> list[dict]:
        return results


class CrossLayer:
    """A cross-layer transcoder or a transcoder set on a store of every layer's MLP input and output
    (one harvest): its prediction of every MLP output; in the rerun every MLP's output (of the set's
    layers) is replaced at once, and for a set also each layer's alone (`delta_loss.layers`)."""

    def __init__(self, clt: CrossLayerTranscoder | TranscoderSet, spec: str, folder: Path, inputs: list, targets: list):
        self.clt, self.spec, self.folder = clt, spec, folder
        self.inputs, self.targets = inputs, targets
        self.store, self.target = inputs[0], targets[0]
        self.reads = (clt.layers[0], "mlp_in")
        self.is_set = isinstance(clt, TranscoderSet)

    def infos(self) -> list[dict]:
        c, (first, last) = self.clt, (self.clt.layers[0], self.clt.layers[-1])
        arch = {m.sae.arch for m in c.members.values()} if self.is_set else {"jumprelu"}
        kind = {"format": "gsp-transcoder-set", "set_layers": c.layers} if self.is_set else {
            "format": "gemma-scope-2-clt", "clt_layers": c.n_layers}  # fmt: skip
        return [{"source": self.spec, "path": str(self.folder), "model_name": self.store.meta.model.name if self.is_set
                 else None, "layer": first, "site": "mlp_in", "d_in": c.d_model, "width": c.width,
                 "architecture": ",".join(sorted(arch)), "k": None, "transcoder": True, "layer_out": last,
                 "site_out": "mlp_out", "d_out": c.d_model, "skip": c.skip, **kind}]  # fmt: skip

    def to(self, device: torch.device) -> None:
        self.clt.to(device)

    def reconstructions(self, tokens: int, batch_size: int, group: dist.Group) -> list[dict]:
        return [clt_reconstruction(self.clt, self.inputs, self.targets, tokens, batch_size, group)]

    def splices(self, lm: LoadedModel) -> Splices:
        model, layers = lm.model, self.clt.layers
        have = len(decoder_layers(model))
        if (not self.is_set and have != len(layers)) or layers[-1] >= have:
            what = f"the set layers up to {layers[-1]}" if self.is_set else f"the CLT {len(layers)}"
            raise GspError(f"model {lm.spec} has {have} layers, {what}")
        alone = [TranscoderSet({layer: self.clt.members[layer]}) for layer in layers] if self.is_set else []
        return Splices([lambda special_BS1, c=c: replace_mlps(model, c, special_BS1) for c in [self.clt, *alone]],
                       lambda special_BS1: zero_mlps(model, layers, special_BS1))  # fmt: skip

    def deltas(self, results: list[dict]) -> list[dict]:
        """A set's: every layer at once, with each layer's alone under `layers` (its loss recovered and
        zero-ablated CE left out: the zero-ablation is of every layer of the set)."""
        first, alone = results[0], results[1:]
        if alone:
            own = ("ce_zero_ablated", "loss_recovered")
            first = {**first, "layers": {str(layer): {k: v for k, v in r.items() if k not in own}
                                         for layer, r in zip(self.clt.layers, alone, strict=True)}}  # fmt: skip
        return [first]


# ------------------------------------------------------------------------------ inputs, checked before the work
def _subjects(cfg: EvaluateConfig, token) -> Subjects:
    """What --sae names, loaded, with the stores it is measured on."""
    specs = sae_sources(cfg.sae)
    folders = [sae_folder(spec, revision=cfg.sae_revision, token=token) for spec in specs]
    clts = [spec for spec, folder in zip(specs, folders, strict=True) if is_clt_folder(folder) or is_set_folder(folder)]
    if clts and len(specs) > 1:
        raise GspError(f"{clts[0]} is a cross-layer transcoder or a transcoder set: evaluate it on its own "
                       f"(--sae {clts[0]})")  # fmt: skip
    if clts:
        return _cross_layer(cfg, specs[0], folders[0])
    loaded = [load_sae(spec, revision=cfg.sae_revision, token=token) for spec in specs]
    points = {(s.layer, s.site, s.layer_out, s.site_out, s.is_transcoder) for s in loaded}
    if len(points) > 1:
        shown = "; ".join(f"{s.source}: layer {s.layer} {s.site}" for s in loaded[:4])
        raise GspError(f"these SAEs are of different hook points ({shown}): compare SAEs of one hook point, "
                       "or evaluate each on its own")  # fmt: skip
    return SAEs(loaded, *_open_stores(cfg, loaded[0]))


def _cross_layer(cfg: EvaluateConfig, spec: str, folder: Path) -> CrossLayer:
    """A CLT or a transcoder set, with the store's hook points of its layers' MLP inputs and outputs."""
    clt = TranscoderSet.load(folder) if is_set_folder(folder) else CrossLayerTranscoder.load(folder)
    what = f"transcoder set of {clt.n_layers} layers" if is_set_folder(folder) else f"{clt.n_layers}-layer CLT"
    how = "gsp harvest --layer all --site mlp_in,mlp_out (a store of every layer's MLP input and output)"
    if not cfg.store:
        raise GspError(f"--store is required for a {what}: {how}")
    hooks = {h.hook.name: h for h in ActivationStore.open_some(cfg.store)}
    missing = [f"L{layer}.{site}" for site in ("mlp_in", "mlp_out") for layer in clt.layers]
    missing = [name for name in missing if name not in hooks]
    if missing:
        raise GspError(f"store {cfg.store} lacks {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}, "
                       f"which this {what} reads or predicts: {how}")  # fmt: skip
    inputs = [hooks[f"L{layer}.mlp_in"] for layer in clt.layers]
    targets = [hooks[f"L{layer}.mlp_out"] for layer in clt.layers]
    if inputs[0].d_in != clt.d_model:
        raise GspError(f"the {what} has d_model {clt.d_model} but store {cfg.store} holds d_in {inputs[0].d_in}")
    return CrossLayer(clt, spec, folder, inputs, targets)


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


def _rerun_model(cfg: EvaluateConfig, store: ActivationStore) -> tuple[str, str | None]:
    """(spec, revision) of the model the delta loss re-runs, checked (and the store's contexts counted)
    before any work: a missing model folder fails now, not after the reconstruction pass."""
    contexts_to_rerun(store, cfg.delta_tokens)
    return model_to_run(cfg.model, cfg.revision, harvested=store.meta.model)


def _delta_losses(cfg: EvaluateConfig, subjects: Subjects, rerun_model: tuple, token, group) -> tuple[list, dict]:
    """([delta loss of each SAE], the model's info): the model loaded and re-run on the store's contexts."""
    spec, revision = rerun_model
    lm = load_model(spec, device=str(group.device), dtype=cfg.dtype, revision=revision, token=token)
    results = delta_losses(lm.model, subjects.store, subjects.splices(lm), reads=subjects.reads,
                           tokens=cfg.delta_tokens, batch_tokens=cfg.lm_batch_tokens, group=group)  # fmt: skip
    lm_info = {"spec": lm.spec, "name": lm.name, "revision": lm.revision, "device": str(lm.device),
               "dtype": str(lm.dtype).removeprefix("torch.")}  # fmt: skip
    return results, lm_info


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
