"""gsp fit: train a JumpReLU or TopK SAE from an activation store, never loading the language model.

The loop, once per step: set lr and sparsity coefficient (warm-ups) → read a shuffled batch (already
prefetched) → pipeline.train.train_step (loss, backward, decoder-gradient projection, Adam,
renormalisation, dead latents) → log / check the loss stayed finite / checkpoint.

Inputs are scaled by one constant s so that E‖x‖² = 1 (from the store's statistics); the saved SAE
has s folded in (pipeline.sae.SAE.fold_input_scale) and takes raw activations, like Gemma Scope 2's.

The output folder appears whole or not at all: training works in `<out>.partial/` (its checkpoints
there), the SAE's files are written into it, and it is renamed to `<out>` at the end. A lock file
`<out>.lock` keeps two fits from writing one output.
"""

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from pipeline import __version__, dist
from pipeline.config import differences, opt, resolve_path, stage_config
from pipeline.console import console, err_console, info, warn
from pipeline.errors import GspError
from pipeline.faults import fault
from pipeline.files import OutputLock, atomic_write_text, is_disk_full, read_json, save_tensors
from pipeline.loader import LoaderState, ShuffledLoader
from pipeline.metrics import dead_fraction, fvu, l0
from pipeline.paths import cache_dir
from pipeline.sae import FILE_ARCH, SAE, Objective, SAEConfig
from pipeline.store import ActivationStore
from pipeline.train import NonFinite, train_step

DEFAULT_LR = {"jumprelu": 1.75e-3, "topk": 1e-3}  # tuned on the default store at the default budget (RESULTS.md)


@stage_config("fit")
@dataclass
class FitConfig:
    store: str | None = opt(
        None, "Store written by gsp harvest (one hook point of a store of several: STORE/L12.resid_post).", path=True
    )
    target_store: str | None = opt(
        None, "Transcoder: the hook point its decoder predicts, of the same rows as --store (e.g. STORE/L12.mlp_out "
        "with --store STORE/L12.mlp_in).", path=True,
    )  # fmt: skip
    skip: bool = opt(False, "Transcoder: add an affine skip connection from the input (a skip transcoder).")
    out: str | None = opt(
        None,
        "Output folder (default: cache/saes/<store>[_<hook>][_to_<target hook>[_skip]]_<arch>_<width>).",
        run_only=True,
    )
    arch: Literal["jumprelu", "topk"] = opt("jumprelu", "jumprelu (Gemma Scope) or topk (Llama Scope).", sweep=True)
    width: int = opt(4096, "Number of latents F.", aliases=("d_sae",), sweep=True)
    k: int = opt(60, "TopK: latents kept per token.", sweep=True)
    sparsity_coeff: float = opt(
        1e-3, "JumpReLU: λ of the sparsity penalty (λ·L0, or the target-L0 penalty).", sweep=True
    )
    target_l0: float | None = opt(None, "JumpReLU: aim at this L0 with λ·(2/T)·(L0 − T)² (Gemma Scope 2).", sweep=True)
    tokens: int = opt(1_474_560, "Training tokens (special-token rows excluded).")
    steps: int | None = opt(None, "Training steps; overrides --tokens.", aliases=("num_steps",))
    batch_size: int = opt(1024, "Rows per step.")
    lr: float | None = opt(
        None, "Adam learning rate, betas (0, 0.999) (default: 1.75e-3 jumprelu, 1e-3 topk).", sweep=True
    )
    lr_warmup_steps: int | None = opt(None, "Linear lr warm-up (default: 5 % of the steps, at most 1,000).", sweep=True)
    lr_decay_steps: int | None = opt(
        None, "Linear lr decay to 0 over the last N steps (default: 20 % of the steps).", sweep=True
    )
    sparsity_warmup_steps: int | None = opt(
        None, "Linear warm-up of λ and λ_f from 0 (default: 20 % of the steps, at most 10,000).", sweep=True
    )
    decoder: Literal["auto", "sparse", "dense"] = opt(
        "auto", "JumpReLU decoder work: auto is sparse on CPU once < 5 % of latents fire (dense on CUDA for now)."
    )
    matmul: Literal["auto", "fp32", "tf32", "bf16"] = opt(
        "auto", "Matmul precision of the step: auto is tf32 on CUDA and fp32 on CPU; bf16 runs the SAE's "
        "matmuls under bfloat16 autocast (weights, Adam and the loss stay float32).",
    )  # fmt: skip
    bandwidth: float = opt(
        0.001, "JumpReLU (and TopK's frequency penalty): width ε of the straight-through rectangle kernel.", sweep=True
    )
    theta_init: float = opt(0.001, "JumpReLU: initial threshold θ (on unit-scaled inputs).", sweep=True)
    b_dec_init: Literal["mean", "zero"] = opt("mean", "Decoder bias at the data mean (fewer dead latents) or 0.")
    matryoshka: str | None = opt(
        None, "Matryoshka SAE: nested prefix sizes below --width, e.g. 128,512,2048; every prefix of the "
        "dictionary is trained to reconstruct too.",
    )  # fmt: skip
    freq_penalty: float = opt(
        0.0, "λ_f of the frequency penalty λ_f·Σ ω_i²/ω₀ on latents' firing rates ω (0: off); JumpReLU and TopK.",
        sweep=True,
    )  # fmt: skip
    freq_scale: float = opt(0.1, "ω₀ of the frequency penalty (the firing rate it starts to bite at).", sweep=True)
    freq_form: Literal["quadratic", "hinge"] = opt(
        "quadratic", "The frequency penalty's form: quadratic λ_f·Σ ω_i²/ω₀ (every latent), or hinge "
        "λ_f·Σ max(0, ω_i − ω₀)²/ω₀ (only latents firing on more than the share ω₀ of tokens).", sweep=True,
    )  # fmt: skip
    aux_k: int = opt(512, "TopK: latents in the auxiliary loss that revives dead latents.", sweep=True)
    aux_coeff: float = opt(0.125, "TopK: weight of the auxiliary loss.", sweep=True)
    dead_tokens: int = opt(50_000, "A latent that has not fired for this many tokens counts as dead.", sweep=True)
    seed: int = opt(0, "Seed of the initialisation and of the shuffle.")
    device: str = opt("auto", "auto (CUDA if present), cpu, cuda or cuda:N.", run_only=True)
    buffer_mib: float = opt(
        1024.0, "Memory for the shuffle buffer, shared by the processes: its windows hold half of it as float32 "
        "(the shuffle's reach); one process holds a whole store that fits in it, read once.",
    )  # fmt: skip
    lanes: int = opt(
        8, "Loader lanes: each process reads its own lanes' chunks; any process count dividing it trains the same SAE."
    )
    checkpoint_every: int = opt(500, "Save a checkpoint every N steps (0: never).", run_only=True)
    log_every: int = opt(10, "Refresh the live metrics every N steps.", run_only=True)
    wandb: bool = opt(False, "Log metrics to Weights & Biases (needs the wandb package and a login).", run_only=True)

    def __post_init__(self):
        positive = ("width", "k", "tokens", "batch_size", "aux_k", "dead_tokens", "log_every", "lanes")
        for name in positive + ("steps",) * (self.steps is not None):
            if getattr(self, name) <= 0:
                raise GspError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "lr_decay_steps", "sparsity_warmup_steps", "checkpoint_every"):
            if (getattr(self, name) or 0) < 0:
                raise GspError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        finite = {"lr": self.lr, "bandwidth": self.bandwidth, "sparsity-coeff": self.sparsity_coeff,
                  "buffer-mib": self.buffer_mib, "aux-coeff": self.aux_coeff}  # fmt: skip
        for name, v in finite.items():
            if v is not None and not math.isfinite(v):
                raise GspError(f"--{name} must be a finite number, got {v}")
        if (self.lr is not None and self.lr <= 0) or self.bandwidth <= 0 or self.sparsity_coeff < 0:
            raise GspError("--lr and --bandwidth must be positive and --sparsity-coeff not negative")
        if self.buffer_mib <= 0 or self.aux_coeff < 0:
            raise GspError("--buffer-mib must be positive and --aux-coeff not negative")
        if self.arch == "topk" and self.k > self.width:
            raise GspError(f"--k {self.k} is more than --width {self.width}")
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.width:
            raise GspError(f"--target-l0 must be above 0 and at most --width {self.width}, got {self.target_l0}")
        _ = self.prefixes  # a malformed --matryoshka is an error here
        if self.freq_penalty < 0 or not math.isfinite(self.freq_penalty) or not self.freq_scale > 0:
            raise GspError("--freq-penalty must be a finite number ≥ 0 and --freq-scale above 0")
        if self.skip and not self.target_store:
            raise GspError("--skip makes a skip transcoder: give --target-store, the hook point it predicts")

    @property
    def learning_rate(self) -> float:
        """--lr, or the architecture's default (resolved here, where it is used)."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.arch]

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else max(1, self.tokens // self.batch_size)

    @property
    def prefixes(self) -> tuple[int, ...]:
        """--matryoshka's prefix sizes, increasing and below --width; () without it."""
        if not self.matryoshka:
            return ()
        try:
            sizes = tuple(int(v) for v in str(self.matryoshka).split(","))
        except ValueError:
            raise GspError(f"--matryoshka takes prefix sizes like 128,512,2048, got {self.matryoshka!r}") from None
        if any(a >= b for a, b in zip(sizes, sizes[1:], strict=False)) or sizes[0] <= 0 or sizes[-1] >= self.width:
            raise GspError(f"--matryoshka sizes must increase, from above 0 to below --width {self.width}; "
                           f"got {self.matryoshka}")  # fmt: skip
        return sizes

    @property
    def objective(self) -> Objective:
        return Objective(self.bandwidth, self.target_l0, self.aux_k, self.aux_coeff, self.prefixes,
                         self.freq_penalty, self.freq_scale, self.freq_form)  # fmt: skip

    @property
    def out_dir(self) -> Path:
        """--out, or cache/saes/<store>[_<hook>][_to_<target hook>[_skip]]_<arch>_<width>."""
        if self.out:
            return Path(self.out)
        name = _store_name(self.store)
        if self.target_store:
            name += f"_to_{Path(self.target_store.rstrip('/')).name}" + ("_skip" if self.skip else "")
        return cache_dir() / "saes" / f"{name}_{self.arch}_{self.width}"


def _store_name(path: str) -> str:
    """A store's folder name; a hook point of a store of several (STORE/L12.mlp_in) as STORE_L12.mlp_in."""
    parts = path.rstrip("/").rsplit("/", 2)
    if len(parts) > 1 and re.fullmatch(r"L\d+\.\w+", parts[-1]):
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def smoke_config(cfg: FitConfig) -> FitConfig:
    """--smoke-test: a few steps on a synthetic store of random rows (made once under cache/smoke).
    The SAE goes to cfg.out, or to cache/smoke/fit-sae, replacing only an SAE an earlier smoke test wrote there."""
    import numpy as np

    from pipeline.tiny import write_synthetic_store

    root = cache_dir() / "smoke"
    store = root / "fit-store"
    try:
        ActivationStore.open(store)
    except GspError:
        _remove_smoke_output(store, "zarr.json")
        x = np.random.default_rng(0).standard_normal((8192, 32)).astype(np.float32) * 50
        write_synthetic_store(store, x)
    out = Path(cfg.out) if cfg.out else root / "fit-sae"
    if not cfg.out:  # the default smoke output: an earlier smoke test's SAE and work folder are gsp's own
        _remove_smoke_output(out, "config.json")
        shutil.rmtree(_work_dir(out), ignore_errors=True)
    target = min(cfg.target_l0, 16) if cfg.target_l0 is not None else None
    return dataclasses.replace(cfg, store=str(store), out=str(out), width=128, k=min(cfg.k, 16), steps=40,
                               batch_size=256, target_l0=target)  # fmt: skip


def _remove_smoke_output(path: Path, marker: str) -> None:
    """Remove an earlier smoke test's output under cache/smoke, and only if gsp wrote it."""
    if not path.exists():
        return
    text = (path / marker).read_text(errors="replace") if (path / marker).is_file() else ""
    if "gsp" not in text:
        raise GspError(f"{path} holds files gsp did not write; move them away to run the smoke test")
    shutil.rmtree(path)


# ------------------------------------------------------------------------------ sweeps
# Options only one architecture reads: in a sweep over --arch they keep their defaults in the other
# architecture's SAEs, so `--arch jumprelu,topk --target-l0 20,60 --k 20,60` is four SAEs, not eight.
ARCH_ONLY = {
    **dict.fromkeys(("k", "aux_k", "aux_coeff"), "topk"),
    **dict.fromkeys(("target_l0", "sparsity_coeff", "bandwidth", "theta_init"), "jumprelu"),
}


def _reads(cfg: "FitConfig", key: str) -> bool:
    """Whether an SAE of cfg's architecture reads the option (TopK reads --bandwidth for its frequency
    penalty only)."""
    owner = ARCH_ONLY.get(key, cfg.arch)
    return owner == cfg.arch or (key == "bandwidth" and bool(cfg.freq_penalty))


# What the SAEs of one sweep share: the stream of batches, the device and the run's bookkeeping.
_STREAM = ("store", "target_store", "seed", "batch_size", "lanes", "buffer_mib", "device", "matmul",
           "checkpoint_every", "wandb")  # fmt: skip


def sweep(values: dict) -> list[FitConfig]:
    """One FitConfig per combination of the listed values (lists from pipeline.config.build_values).

    Each SAE of a sweep of several is written to `<default output>_<option>_<value>…`, or with
    --out DIR to `DIR/<arch>_<width>_<option>_<value>…`, naming the options that vary."""
    lists = {k: v for k, v in values.items() if isinstance(v, list)}
    varying = [k for k, v in lists.items() if len(set(v)) > 1]
    defaults = {f.name: f.default for f in dataclasses.fields(FitConfig)}
    members: dict[tuple, tuple[FitConfig, str]] = {}  # (arch, width, suffix) -> (config, suffix)
    for combo in itertools.product(*lists.values()):
        v = {**values, **dict(zip(lists, combo, strict=True))}
        cfg = FitConfig(**v)
        for key in ARCH_ONLY:
            if not _reads(cfg, key) and ("arch" in varying or key in varying):
                setattr(cfg, key, defaults[key])  # not this architecture's option
        shown = [k for k in varying if k not in ("arch", "width") and _reads(cfg, k)]
        suffix = "".join(f"_{k}_{_short(getattr(cfg, k))}" for k in shown)
        members.setdefault((cfg.arch, cfg.width, suffix), (cfg, suffix))
    if len(members) > 1:
        for cfg, suffix in members.values():
            if cfg.out:
                cfg.out = str(Path(cfg.out) / f"{cfg.arch}_{cfg.width}{suffix}")
            elif cfg.store:
                cfg.out = f"{cfg.out_dir}{suffix}"
    return [cfg for cfg, _ in members.values()]


def _short(v) -> str:
    """A value as a folder name shows it: 20 for 20.0, 0.001; exact (repr) where %g would round."""
    return f"{v:g}" if isinstance(v, float) and float(f"{v:g}") == v else str(v)


# ------------------------------------------------------------------------------ the stage
def run_fit(cfg: FitConfig, *, resume: bool = False) -> Path:
    """Train, checkpoint, and write the SAE in Gemma Scope 2's format to cfg.out_dir."""
    return run_sweep([cfg], resume=resume)[0]


def run_sweep(cfgs: list[FitConfig], *, resume: bool = False) -> list[Path]:
    """Fit every SAE of a sweep from one read of the store: each batch goes through each SAE in turn.

    Every SAE has its own output, work folder and checkpoints, and is what it would be fitted alone
    with the same settings and seed (the stream depends only on the store, seed, batch and lanes,
    which a sweep does not vary). Returns the output folders."""
    first = cfgs[0]
    if not first.store:
        raise GspError("--store is required: the path of a store written by gsp harvest")
    store = ActivationStore.open(first.store)
    if store.hook.stats.count == 0:
        raise GspError(f"store {first.store} has no statistics over non-special rows; is it empty?")
    for c in cfgs[1:]:
        differ = [k for k in _STREAM if getattr(c, k) != getattr(first, k)]
        if differ or c.total_steps != first.total_steps:
            raise GspError(
                f"the SAEs of one sweep read one stream: they must agree on {', '.join(differ or ['steps'])}"
            )
    outs = [c.out_dir for c in cfgs]
    if len(set(outs)) < len(outs):
        raise GspError("two SAEs of this sweep would be written to one folder; give each its own --out")
    group = dist.setup(first.device)  # one process, or this process's share under torchrun
    _precision(first.matmul, group.device)  # a wrong --matmul before any file is touched
    with contextlib.ExitStack() as locks:
        if group.main:
            for out in outs:
                locks.enter_context(OutputLock(out, "gsp fit"))
        todo = dist.on_main(group, lambda: _check_outputs(cfgs, resume))
        members = _fit([c for c in cfgs if c.out_dir in todo], todo, store, group) if todo else []
        if group.main:
            for m in members:
                if not m.failed:
                    _publish(_work_dir(m.cfg.out_dir), m.cfg.out_dir)
    dist.teardown(group)
    failed = [m.failed for m in members if m.failed]  # (a fit of one SAE raised already)
    if failed:
        raise GspError(f"{len(failed)} of the sweep's {len(cfgs)} SAEs stopped early, the others were saved: "
                       + "; ".join(failed))  # fmt: skip
    return outs


def fit_or_reuse(cfg: FitConfig) -> Path:
    """Fit; or resume an interrupted fit; or keep an SAE already fitted with these settings (gsp run)."""
    out = cfg.out_dir
    if (out / "config.json").is_file():
        diffs = _saved_differences(cfg)
        if not diffs:
            info(f"{out} already holds an SAE fitted with these settings; keeping it")
            return out
        raise GspError(f"{out} holds an SAE fitted with other settings ({'; '.join(diffs)}); "
                       "move it away or set fit.out in the config")  # fmt: skip
    return run_fit(cfg, resume=(_work_dir(out) / "checkpoints" / "latest.json").is_file())


def _saved_differences(cfg: FitConfig) -> list[str]:
    """How the SAE saved at cfg.out_dir was fitted differently from cfg ([] when the same)."""
    saved = SAEConfig.from_json(read_json(cfg.out_dir / "config.json"), cfg.out_dir).fit_config
    return differences(saved, cfg, "the SAE") if saved is not None else ["it was not written by gsp fit"]


def _work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _record(cfg: FitConfig) -> dict:
    """The settings as checkpoints and config.json keep them, the store's local path made absolute: a
    relative one would name another folder when resumed, reused or evaluated from another directory."""
    return {**dataclasses.asdict(cfg), "store": resolve_path(cfg.store), "target_store": resolve_path(cfg.target_store)}


def _check_outputs(cfgs: list[FitConfig], resume: bool) -> dict[Path, str]:
    """Rank 0: the outputs still to train, each "resume" (from its checkpoint) or "train" (from the start).

    With --resume, an SAE of the sweep already fitted with these settings is kept, one whose final save
    only needed its last rename is finished, and one killed before its first checkpoint starts over."""
    state = {c.out_dir: _output_state(c, resume) for c in cfgs}
    if resume and "resume" not in state.values():
        c = cfgs[0]
        if "train" in state.values():
            raise GspError(f"no checkpoint in {_work_dir(c.out_dir)} to resume from; run without --resume to start")
        if "saved" not in state.values():
            raise GspError(f"{c.out_dir} already holds an SAE; choose another --out (or move it away to fit again)")
    for c in cfgs:
        out, work = c.out_dir, _work_dir(c.out_dir)
        if state[out] == "saved":
            _publish(work, out)  # killed between the SAE's files and the rename: they are whole
            info(f"finished saving the SAE of an interrupted fit to {out}")
        elif state[out] == "done" and len(cfgs) > 1:
            info(f"{out} already holds this sweep's SAE; kept")
        elif state[out] == "train" and work.exists():
            _clear_work(work)
    return {out: s for out, s in state.items() if s in ("train", "resume")}


def _output_state(cfg: FitConfig, resume: bool) -> str:
    """ "done" (kept), "saved" (to publish), "resume" or "train"; or why this output cannot be fitted."""
    out, work = cfg.out_dir, _work_dir(cfg.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if (out / "config.json").is_file() and (out / "params.safetensors").is_file():
            if resume and not _saved_differences(cfg):
                return "done"
            raise GspError(f"{out} already holds an SAE; choose another --out (or move it away to fit again)")
        raise GspError(f"{out} exists and is not a gsp SAE folder; choose another --out (nothing was changed)")
    if (work / "config.json").is_file() and not (work / "checkpoints").exists():
        return "saved"
    if (work / "checkpoints" / "latest.json").is_file():
        if not resume:
            raise GspError(f"{work} holds an interrupted fit of this output: add --resume to continue it, "
                           "or move it away to start over")  # fmt: skip
        return "resume"
    return "train"


def _clear_work(work: Path) -> None:
    """A work folder with nothing to resume (a fit stopped before its first checkpoint): gsp's own
    files only are removed; anything else in it is a reason to stop."""
    ours = {"checkpoints", "params.safetensors", "params.safetensors.partial", "config.json.partial"}
    if not work.is_dir() or any(p.name not in ours for p in work.iterdir()):
        raise GspError(f"{work} is in the way of this fit's work folder and holds files gsp did not write; "
                       "move it away")  # fmt: skip
    shutil.rmtree(work)


def _publish(work: Path, out: Path) -> None:
    """The finished folder appears at `out` in one rename (over an empty folder, if one is there)."""
    os.replace(work, out)
    fault("fit-published")


@dataclass
class _Member:
    """One SAE of a sweep (a plain fit is a sweep of one) and its training state."""

    cfg: FitConfig
    sae: SAE
    opt: torch.optim.Optimizer
    since_fired: torch.Tensor  # tokens since each latent last fired
    finite: NonFinite
    start: int = 0  # the step it resumes from: it sits out the stream's earlier batches
    loader_state: LoaderState | None = None
    density: float = 1.0  # share of latents active at the last log step; picks JumpReLU's decoder path
    metrics: dict = dataclasses.field(default_factory=dict)
    lr: float = 0.0  # this step's lr and λ
    lam: float = 0.0
    failed: str | None = None  # why it stopped early (a sweep goes on without it)

    @property
    def ckpt(self) -> Path:
        return _work_dir(self.cfg.out_dir) / "checkpoints"


def _fit(cfgs: list[FitConfig], todo: dict[Path, str], store: ActivationStore, group: dist.Group) -> list[_Member]:
    first, device = cfgs[0], group.device
    target = ActivationStore.open(first.target_store) if first.target_store else None  # a transcoder's
    out = target or store
    # unit-scaled inputs (and targets): E‖x·s‖² = 1, E‖y·t‖² = 1
    scales = (1.0 / math.sqrt(store.hook.stats.mean_sq_norm), 1.0 / math.sqrt(out.hook.stats.mean_sq_norm))
    members = [_member(cfg, store, out, scales, device, todo[cfg.out_dir] == "resume") for cfg in cfgs]
    start = min(m.start for m in members)  # the stream starts where the furthest-behind SAE stopped
    loader = ShuffledLoader(
        store, first.batch_size, seed=first.seed, buffer_mib=first.buffer_mib, device=device,
        scales=scales if target else scales[:1], part=(group.rank, group.world), lanes=first.lanes, target=target,
        state=next(m.loader_state for m in members if m.start == start),
    )  # fmt: skip
    if group.world > 1 and group.main:
        share, lanes = first.batch_size // group.world, loader.lanes
        info(
            f"{group.world} processes, {share:,} rows each of every {first.batch_size:,}-row batch, "
            f"each reading {lanes // group.world} of the store's {lanes} loader lanes"
        )
    if len(members) > 1 and group.main:
        info(f"{len(members)} SAEs from one read of {first.store}, each batch through each")
    logger = _wandb(cfgs) if first.wandb and group.main else None
    _train(members, loader, start, group, logger)
    if group.main:
        for m in members:
            if not m.failed:
                _save(m.cfg, store, target, m.sae, scales, m.metrics, _work_dir(m.cfg.out_dir))
    return members


def _member(cfg: FitConfig, store: ActivationStore, out: ActivationStore, scales, device, resume: bool) -> _Member:
    """A fresh SAE (Gemma Scope 2's initialisation, seeded), or the one in its checkpoint."""
    sae = SAE(store.d_in, cfg.width, arch=cfg.arch, k=cfg.k, d_out=out.d_in, skip=cfg.skip).init_gemma_scope(
        torch.Generator().manual_seed(cfg.seed), theta=cfg.theta_init
    )
    if cfg.b_dec_init == "mean":
        with torch.no_grad():
            sae.b_dec.copy_(torch.tensor(out.hook.stats.mean) * scales[1])
    sae.to(device)
    opt_ = torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate, betas=(0.0, 0.999))
    m = _Member(cfg, sae, opt_, torch.zeros(cfg.width, dtype=torch.int64, device=device), NonFinite(device))
    if resume:
        m.start, m.loader_state, m.density = _load_checkpoint(m.ckpt, cfg, sae, opt_, m.since_fired)
        info(f"{cfg.out_dir.name}: resuming from step {m.start:,} of {cfg.total_steps:,}")
    return m


def _schedule(cfg: FitConfig, step_: int) -> tuple[float, float, float]:
    """(lr, λ, λ_f) at this step: linear warm-ups, lr constant, then decaying linearly to 0 at the end.
    The frequency penalty's λ_f ramps up with λ: at the first steps every latent fires on about half
    the rows, and an unramped penalty would meet them at full strength before the L0 term had acted."""
    n, lr_max = cfg.total_steps, cfg.learning_rate
    lr_warm = cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None else min(1000, n // 20)
    decay = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else n // 5
    sp_warm = cfg.sparsity_warmup_steps if cfg.sparsity_warmup_steps is not None else min(10_000, n // 5)
    lr = lr_max * min(1.0, (step_ + 1) / lr_warm) if lr_warm else lr_max
    lr *= min(1.0, (n - step_) / decay) if decay else 1.0
    ramp = min(1.0, (step_ + 1) / sp_warm) if sp_warm else 1.0
    return lr, cfg.sparsity_coeff * ramp, cfg.freq_penalty * ramp


def _train(members: list[_Member], loader, start: int, group, logger) -> None:
    """The loop: each batch of the stream through each SAE that is at that step; logs, checks, checkpoints."""
    first = members[0].cfg
    paired = loader.target is not None  # a transcoder's batches: input columns, then the target's
    n, every = first.total_steps, first.checkpoint_every
    t0 = time.perf_counter()
    batches = iter(loader)
    with contextlib.closing(batches), _display(group.main) as live, _matmul(first.matmul, group.device) as autocast:
        tasks = [live.add_task(_name(m, members), total=n, completed=m.start, metrics="") for m in members]
        for step_ in range(start, n):
            batch = next(batches)
            done = step_ + 1
            active = [m for m in members if m.start <= step_ and not m.failed]
            for m in active:
                loss, truth = _step(m, batch, step_, paired, group, autocast)
                if done % m.cfg.log_every == 0 or done == n:
                    _log(m, loss, truth, done, group, (time.perf_counter() - t0, (done - start) * first.batch_size))
                    live.update(tasks[members.index(m)], completed=done, metrics=_line(m.metrics))
                    if logger:
                        logger.log({f"{_name(m, members)}/{k}" if len(members) > 1 else k: v
                                    for k, v in m.metrics.items()}, step=done)  # fmt: skip
                    _check_finite(m, members)
            if every and done % every == 0 and done < n and active:
                position = LoaderState.merge(dist.gather(group, loader.state))  # every process's lanes
                for m in active:
                    _check_finite(m, members)
                    if group.main and not m.failed:
                        _save_checkpoint(m.ckpt, m.cfg, m.sae, m.opt, m.since_fired, done, position, m.density)
                if group.main:
                    fault("fit-checkpoint-saved")
                dist.barrier(group)
    for m in members:
        _check_finite(m, members)


def _step(m: _Member, batch: torch.Tensor, step_: int, paired: bool, group, autocast):
    """One training step of one SAE on the shared batch (read, never written); (its loss, the rows it reconstructs)."""
    cfg = m.cfg
    lr, lam, freq = _schedule(cfg, step_)
    for pg in m.opt.param_groups:
        pg["lr"] = lr
    x, y = _split(batch, m.sae, paired)  # unit-scaled by the loader, on the device
    # sparse decoder work pays off once few latents are active (early JumpReLU steps are dense)
    cpu = group.device.type == "cpu"
    sparse = cfg.decoder == "sparse" or (cfg.decoder == "auto" and cpu and m.density < 0.05)
    sparse = sparse and not cfg.prefixes  # Matryoshka's nested prefixes decode densely
    objective = dataclasses.replace(cfg.objective, freq_coeff=freq) if freq != cfg.freq_penalty else cfg.objective
    loss = train_step(m.sae, m.opt, x, objective, lam=lam, since_fired_F=m.since_fired,
                      dead_tokens=cfg.dead_tokens, sparse=sparse, group=group, target_BO=y,
                      autocast=autocast)  # fmt: skip
    m.finite.update(step_ + 1, loss.total)
    m.lr, m.lam = lr, lam
    return loss, (x if y is None else y)


def _log(m: _Member, loss, truth: torch.Tensor, done: int, group, elapsed: tuple[float, int]) -> None:
    """The live metrics, averaged over processes (FVU as the mean of the shares' FVUs): the same on every process."""
    f, x_hat = loss.f_BF, loss.x_hat_BD.detach()
    logged = torch.stack([loss.total.detach(), l0(f), fvu(truth, x_hat).float(), (f != 0).float().mean()])
    dist.mean_(group, [logged])
    loss_, l0_, fvu_, m.density = logged.tolist()
    seconds, rows = elapsed
    m.metrics = {"step": done, "loss": loss_, "l0": l0_, "fvu": fvu_,
                 "dead": dead_fraction(m.since_fired, m.cfg.dead_tokens), "lr": m.lr, "lambda": m.lam,
                 "tok_s": rows / seconds}  # fmt: skip


def _precision(matmul: str, device: torch.device) -> str:
    """--matmul resolved on this device: fp32, tf32 or bf16."""
    if matmul == "tf32" and device.type != "cuda":
        raise GspError("--matmul tf32 needs a CUDA device; on CPU use fp32 (the default) or bf16")
    return ("tf32" if device.type == "cuda" else "fp32") if matmul == "auto" else matmul


@contextlib.contextmanager
def _matmul(precision: str, device: torch.device):
    """Set float32 matmul precision for the fit (restored after); yields the autocast dtype (or None)."""
    precision = _precision(precision, device)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield torch.bfloat16 if precision == "bf16" else None
    finally:
        torch.set_float32_matmul_precision(before)


def _split(batch: torch.Tensor, sae: SAE, paired: bool):
    """(x (B, D), y (B, O) or None), this process's share: an SAE's batch is its input; a
    transcoder's (`paired`, whatever its widths) holds the input's columns, then the target's."""
    if not paired:
        return batch, None
    return batch[:, : sae.d_in], batch[:, sae.d_in :]


def _check_finite(m: _Member, members: list[_Member]) -> None:
    """Stop a fit whose loss became NaN or infinite; in a sweep, only that SAE stops (its last checkpoint kept)."""
    bad = m.finite.step()
    if bad is None or m.failed:
        return
    kept = _latest_step(m.ckpt)
    then = f"; the checkpoint at step {kept:,} is kept (--resume continues from it)" if kept else ""
    why = (f"the loss became NaN or infinite at step {bad:,} (lr {m.cfg.learning_rate:g}): lower --lr "
           f"(or check the store's values); nothing was saved{then}")  # fmt: skip
    if len(members) == 1:
        raise GspError(why)
    m.failed = f"{m.cfg.out_dir.name}: {why}"
    warn(m.failed)


def _name(m: _Member, members: list[_Member]) -> str:
    return m.cfg.out_dir.name if len(members) > 1 else "fit"


def _line(m: dict) -> str:
    return (
        f"loss {m['loss']:.4f}  L0 {m['l0']:.1f}  FVU {m['fvu']:.3f}  dead {100 * m['dead']:.1f}%  "
        f"{m['tok_s']:,.0f} tok/s"
    )


def _display(show: bool = True):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps · ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=err_console,
        disable=not show,  # under torchrun only rank 0 shows progress
    )


# ------------------------------------------------------------------------------ checkpoints
# <work>/checkpoints/step-N/{state.safetensors, state.json} and latest.json naming the newest. The
# sha256 of state.safetensors is in state.json and the sha256 of state.json is in latest.json, so a
# damaged or incomplete checkpoint is an error on --resume, never a silently different run.
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _save_checkpoint(root: Path, cfg, sae, opt_, since_fired, done: int, loader_state: LoaderState, density) -> None:
    """Training-scale weights, Adam moments and dead-latent counters (safetensors) + JSON state.

    Written to a fresh `step-N/` folder; then `latest.json` is replaced atomically to point at it;
    only then are older folders removed. A kill at any moment leaves a complete checkpoint.
    """
    folder = root / f"step-{done}"
    tensors = {f"param.{k}": getattr(sae, k).detach().cpu().contiguous() for k in sae.params}
    adam_steps = {}
    for k in sae.params:
        st = opt_.state.get(getattr(sae, k), {})
        if st:
            tensors[f"adam.{k}.exp_avg"] = st["exp_avg"].cpu().contiguous()
            tensors[f"adam.{k}.exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
            adam_steps[k] = float(st["step"])
    tensors["since_fired"] = since_fired.cpu().contiguous()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(tensors, folder / "state.safetensors")
        state = {"step": done, "loader": dataclasses.asdict(loader_state), "adam_steps": adam_steps,
                 "density": density, "config": _record(cfg),
                 "state_sha256": _sha256((folder / "state.safetensors").read_bytes())}  # fmt: skip
        text = json.dumps(state, indent=1)
        atomic_write_text(folder / "state.json", text)
        latest = {"folder": folder.name, "json_sha256": _sha256(text.encode())}
        atomic_write_text(root / "latest.json", json.dumps(latest))
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)  # this step's folder only: the previous checkpoint stays
        if not is_disk_full(e):
            raise
        kept = _latest_step(root)
        then = f"with --resume, it continues from step {kept:,}" if kept else "no checkpoint was kept"
        raise GspError(f"disk full while writing the checkpoint at step {done:,}: free some space and rerun "
                       f"({then})") from None  # fmt: skip
    for old in root.glob("step-*"):
        if old != folder:
            shutil.rmtree(old)


def _latest_step(root: Path) -> int | None:
    try:
        return int(json.loads((root / "latest.json").read_text())["folder"].removeprefix("step-"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load_checkpoint(root: Path, cfg, sae, opt_, since_fired) -> tuple[int, LoaderState, float]:
    def damaged(why: str) -> GspError:
        return GspError(f"the checkpoint in {root} is damaged ({why}); it cannot be resumed: move "
                        f"{root.parent} away and fit again")  # fmt: skip

    try:
        latest = json.loads((root / "latest.json").read_text())
        path = root / latest["folder"]
        text = (path / "state.json").read_text()
        if _sha256(text.encode()) != latest["json_sha256"]:
            raise damaged("state.json does not match its checksum")
        state = json.loads(text)
        data = (path / "state.safetensors").read_bytes()
        if _sha256(data) != state["state_sha256"]:
            raise damaged("state.safetensors does not match its checksum")
        tensors = load_safetensors_bytes(data)
        step_, loader, adam_steps, density = state["step"], state["loader"], state["adam_steps"], state["density"]
        saved_config = state["config"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, SafetensorError) as e:
        raise damaged(f"{type(e).__name__}: {e}") from None
    diffs = differences(saved_config, cfg, "checkpoint")
    if diffs:
        raise GspError(f"the checkpoint in {path} was trained with other parameters ({'; '.join(diffs)})")
    try:
        with torch.no_grad():
            for k in sae.params:
                getattr(sae, k).copy_(tensors[f"param.{k}"])
            since_fired.copy_(tensors["since_fired"])
        for k, n in adam_steps.items():
            p = getattr(sae, k)
            opt_.state[p] = {
                "step": torch.tensor(n),
                "exp_avg": tensors[f"adam.{k}.exp_avg"].to(p.device),
                "exp_avg_sq": tensors[f"adam.{k}.exp_avg_sq"].to(p.device),
            }
        return step_, LoaderState.from_json(loader), density
    except (KeyError, RuntimeError, TypeError, AttributeError) as e:
        raise damaged(f"incomplete state: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------ the saved SAE
def _save(cfg, store: ActivationStore, target, sae: SAE, scales, final: dict, work: Path) -> None:
    """params.safetensors + config.json in Gemma Scope 2's format (its transcoder layout for a
    transcoder), the scales folded in, into the work folder; then its checkpoints go (the caller
    renames the folder to the output)."""
    m, record = store.meta, _record(cfg)
    sae = sae.cpu().fold_input_scale(*scales)
    config = SAEConfig(
        architecture=FILE_ARCH[cfg.arch],
        model_name=m.model.name,
        hf_hook_point_in=store.hook.hook_point,
        hf_hook_point_out=(target or store).hook.hook_point,
        affine_connection=cfg.skip,
        type="transcoder" if target else "sae",
        width=cfg.width,
        l0=cfg.target_l0 if cfg.target_l0 is not None else (cfg.k if cfg.arch == "topk" else final.get("l0")),
        k=cfg.k if cfg.arch == "topk" else None,
        d_in=store.d_in,
        layer=store.hook.layer,
        site=store.hook.site,
        store=record["store"],
        target_store=record["target_store"],
        model_revision=m.model.revision,
        input_scale_folded=scales[0],
        output_scale_folded=scales[1] if target else None,
        steps=cfg.total_steps,
        tokens_seen=cfg.total_steps * cfg.batch_size,
        final_train_metrics=final,
        fit_config=record,
        gsp_version=__version__,
    )
    try:
        sae.save(work, config)
    except OSError as e:
        if not is_disk_full(e):
            raise
        kept = _latest_step(work / "checkpoints")
        then = f"with --resume, it continues from step {kept:,}" if kept else "no checkpoint was kept"
        raise GspError(f"disk full while saving the SAE to {work}: free some space and rerun ({then})") from None
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the SAE is complete: checkpoints are done with
    fault("fit-saved")
    console.print(f"saved the SAE to [bold]{cfg.out_dir}[/] ({_line(final)})", highlight=False)


def _wandb(cfgs: list[FitConfig]):
    """One W&B run; a sweep's SAEs log under their folder names."""
    try:
        import wandb
    except ImportError:
        raise GspError("--wandb needs the wandb package: pip install wandb") from None
    config = {c.out_dir.name: dataclasses.asdict(c) for c in cfgs} if len(cfgs) > 1 else dataclasses.asdict(cfgs[0])
    return wandb.init(project="gsp", config=config)
