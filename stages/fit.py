"""gsp fit: train a JumpReLU or TopK SAE from an activation store, never loading the language model.

Read top to bottom: the config (`FitConfig`, the smoke test, sweeps), the run (`run_sweep`: outputs,
locks, one stream of batches for every SAE, the final save), and the loop (`_train`), which once per
step takes the next shuffled batch (already prefetched) and runs pipeline.train.train_step (loss,
backward, decoder-gradient projection, Adam, renormalisation, dead latents) for each SAE at the
schedule's lr and λ, then logs, checks the loss stayed finite, and checkpoints.

Inputs are scaled by one constant s so that E‖x‖² = 1 (from the store's statistics); the saved SAE
has s folded in (pipeline.sae.SAE.fold_input_scale) and takes raw activations, like Gemma Scope 2's.
With `--weighting reads` an SAE trains on x∘w instead, w the store's read gains (how strongly later
layers read each dimension) scaled so that E‖x∘w‖² = 1, so its error is weighed by what the model
reads; w is folded in too (SAE.fold_input_weights). Why: docs/fit.md, "Where the error goes".
The training state and its checkpoints: pipeline/train.py and pipeline/checkpoint.py; the output
folder, which appears whole or not at all: pipeline/outputs.py. A lock file `<out>.lock` keeps two
fits from writing one output.
"""

import contextlib
import dataclasses
import functools
import itertools
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline import __version__, checkpoint, dist, outputs
from pipeline import transcoder_set as tset
from pipeline.config import differences, opt, resolve_path, stage_config
from pipeline.console import console, info, progress, warn
from pipeline.errors import GspError
from pipeline.faults import fault
from pipeline.files import OutputLock, is_disk_full, read_json
from pipeline.loader import LoaderState, ShuffledLoader
from pipeline.metrics import dead_fraction, fvu, l0
from pipeline.paths import cache_dir
from pipeline.sae import FILE_ARCH, SAE, Objective, SAEConfig
from pipeline.store import ActivationStore
from pipeline.store.reader import same_rows
from pipeline.train import NonFinite, Schedule, TrainState, matmul_precision, precision, train_step

DEFAULT_LR = {"jumprelu": 4e-3, "topk": 1e-3}  # tuned on the default store at the default budget (RESULTS.md)


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
    transcoders: str | None = opt(
        None, "Transcoder set: IN:OUT sites of --store, a store of several hook points (e.g. mlp_in:mlp_out): one "
        "transcoder per layer of --layers, all from one read of the store, into one folder with an index.",
        run_only=True,
    )  # fmt: skip
    layers: str = opt("all", "Transcoder set: its layers, all (every layer with both sites) or e.g. 3,6,9.",
                      run_only=True)  # fmt: skip
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
    tokens: int = opt(4_423_680, "Training tokens (special-token rows excluded).")
    steps: int | None = opt(None, "Training steps; overrides --tokens.", aliases=("num_steps",))
    batch_size: int = opt(1024, "Rows per step.")
    lr: float | None = opt(
        None, "Adam learning rate, betas (0, 0.999) (default: 4e-3 jumprelu, 1e-3 topk).", sweep=True
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
    theta_lr: float = opt(
        1.0, "JumpReLU: θ's learning rate as a share of --lr (Adam's step for θ scaled by it); 0.05 keeps "
        "rarely firing latents alive (docs/fit.md).", sweep=True,
    )  # fmt: skip
    b_dec_init: Literal["mean", "zero"] = opt("mean", "Decoder bias at the data mean (fewer dead latents) or 0.")
    weighting: Literal["reads", "none"] | None = opt(
        None, "Weigh each dimension's reconstruction error by how strongly later layers read it (the "
        "store's read gains; training FVU is then the weighted one), or 'none' for plain MSE (default: reads "
        "for an SAE on a store that records read gains, none otherwise).", sweep=True,
    )  # fmt: skip
    pre_encoder_bias: bool = opt(
        False, "Encode x − b_dec in training (b_dec held fixed on that path), folded into b_enc when saved."
    )
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
                  "buffer-mib": self.buffer_mib, "aux-coeff": self.aux_coeff, "theta-lr": self.theta_lr}  # fmt: skip
        for name, v in finite.items():
            if v is not None and not math.isfinite(v):
                raise GspError(f"--{name} must be a finite number, got {v}")
        if (self.lr is not None and self.lr <= 0) or self.bandwidth <= 0 or self.sparsity_coeff < 0:
            raise GspError("--lr and --bandwidth must be positive and --sparsity-coeff not negative")
        if self.buffer_mib <= 0 or self.aux_coeff < 0 or self.theta_lr <= 0:
            raise GspError("--buffer-mib and --theta-lr must be positive and --aux-coeff not negative")
        if self.arch == "topk" and self.k > self.width:
            raise GspError(f"--k {self.k} is more than --width {self.width}")
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.width:
            raise GspError(f"--target-l0 must be above 0 and at most --width {self.width}, got {self.target_l0}")
        _ = self.prefixes  # a malformed --matryoshka is an error here
        if self.freq_penalty < 0 or not math.isfinite(self.freq_penalty) or not self.freq_scale > 0:
            raise GspError("--freq-penalty must be a finite number ≥ 0 and --freq-scale above 0")
        if self.weighting == "reads" and self.target_store:
            raise GspError("--weighting reads is for SAEs: a transcoder's target is the MLP's output, not its input")
        if self.pre_encoder_bias and self.target_store:
            raise GspError("--pre-encoder-bias is for SAEs: a transcoder's b_dec is in its target's space")
        if self.skip and not (self.target_store or self.transcoders):
            raise GspError("--skip makes a skip transcoder: give --target-store, the hook point it predicts")
        if self.transcoders and not re.fullmatch(r"\w+:\w+", self.transcoders):
            raise GspError(f"--transcoders takes IN:OUT sites, e.g. mlp_in:mlp_out; got {self.transcoders!r}")

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else max(1, self.tokens // self.batch_size)

    def resolved(self, like: dict | None = None) -> "FitConfig":
        """These settings with every default that is resolved where it is used made explicit (the
        learning rate and the warm-up and decay lengths), as a fit runs and records them: taken from
        `like` (the settings a checkpoint or a saved SAE recorded) where it has them, so that a
        resumed or reused fit keeps what it started with even if gsp's defaults change."""
        n, like = self.total_steps, like or {}
        defaults = {"lr": DEFAULT_LR[self.arch], "lr_warmup_steps": min(1000, n // 20), "lr_decay_steps": n // 5,
                    "sparsity_warmup_steps": min(10_000, n // 5), "weighting": self._default_weighting}  # fmt: skip
        given = {k: getattr(self, k) if getattr(self, k) is not None else like.get(k) for k in defaults}
        return dataclasses.replace(self, **{k: v if v is not None else _value(defaults[k]) for k, v in given.items()})

    def _default_weighting(self) -> str:
        """reads for an SAE on a store that records read gains (pipeline.hooks.read_gains), none otherwise."""
        if self.target_store or not self.store:
            return "none"
        try:
            return "reads" if ActivationStore.open(self.store).hook.read_gains is not None else "none"
        except GspError:
            return "none"  # a store that cannot be opened is reported where it is read

    @property
    def schedule(self) -> Schedule:
        r = self.resolved()
        return Schedule(r.total_steps, r.lr, r.lr_warmup_steps, r.lr_decay_steps, r.sparsity_coeff,
                        r.sparsity_warmup_steps, r.freq_penalty)  # fmt: skip

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
                         self.freq_penalty, self.freq_scale, self.freq_form, self.pre_encoder_bias)  # fmt: skip

    @property
    def out_dir(self) -> Path:
        """--out, or cache/saes/<store>[_<hook>][_to_<target hook>[_skip]]_<arch>_<width>."""
        if self.out:
            return Path(self.out)
        name = _store_name(self.store)
        if self.target_store:
            name += f"_to_{Path(self.target_store.rstrip('/')).name}" + ("_skip" if self.skip else "")
        return cache_dir() / "saes" / f"{name}_{self.arch}_{self.width}"

    @property
    def checkpoints(self) -> Path:
        return outputs.work_dir(self.out_dir) / "checkpoints"

    def record(self) -> dict:
        """The settings as checkpoints and config.json keep them, the store's local path made absolute: a
        relative one would name another folder when resumed, reused or evaluated from another directory."""
        return {**dataclasses.asdict(self), "store": resolve_path(self.store),
                "target_store": resolve_path(self.target_store)}  # fmt: skip

    def differences(self, saved: dict, what: str) -> list[str]:
        """How the settings `saved` (a checkpoint's or a saved SAE's record) differ from these, with the
        defaults resolved where they are used made explicit on both sides ([] when the same)."""
        names = {f.name for f in dataclasses.fields(FitConfig)}
        saved = {"weighting": "none", **saved}  # records from before --weighting: plain MSE
        try:
            was = FitConfig(**{k: v for k, v in saved.items() if k in names}).resolved()
        except (GspError, TypeError, ValueError) as e:
            return [f"{what} records settings gsp cannot read ({e})"]
        return differences(was.record(), self.resolved(like=saved), what)


def _value(default):
    """A resolved default: a method is called only when its default is needed (it may read the store)."""
    return default() if callable(default) else default


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
        outputs.remove_smoke_output(store, "zarr.json")
        x = np.random.default_rng(0).standard_normal((8192, 32)).astype(np.float32) * 50
        write_synthetic_store(store, x)
    out = Path(cfg.out) if cfg.out else root / "fit-sae"
    if not cfg.out:  # the default smoke output: an earlier smoke test's SAE and work folder are gsp's own
        outputs.remove_smoke_output(out, "config.json")
        shutil.rmtree(outputs.work_dir(out), ignore_errors=True)
    target = min(cfg.target_l0, 16) if cfg.target_l0 is not None else None
    return dataclasses.replace(cfg, store=str(store), out=str(out), width=128, k=min(cfg.k, 16), steps=40,
                               batch_size=256, target_l0=target)  # fmt: skip


# ------------------------------------------------------------------------------ sweeps
# Options only one architecture reads: in a sweep over --arch they keep their defaults in the other
# architecture's SAEs, so `--arch jumprelu,topk --target-l0 20,60 --k 20,60` is four SAEs, not eight.
ARCH_ONLY = {
    **dict.fromkeys(("k", "aux_k", "aux_coeff"), "topk"),
    **dict.fromkeys(("target_l0", "sparsity_coeff", "bandwidth", "theta_init", "theta_lr"), "jumprelu"),
}


def _reads(cfg: FitConfig, key: str) -> bool:
    """Whether an SAE of cfg's architecture reads the option (TopK reads --bandwidth for its frequency
    penalty only)."""
    owner = ARCH_ONLY.get(key, cfg.arch)
    return owner == cfg.arch or (key == "bandwidth" and bool(cfg.freq_penalty))


# What the SAEs of one sweep share: the stream of batches, the device and the run's bookkeeping. They
# may read different hook points of one store (a transcoder set: every layer's) when each would read
# rows of the same width alone: the stream is then the one each reads alone (pipeline/loader.py).
_STREAM = ("seed", "batch_size", "lanes", "buffer_mib", "device", "matmul", "checkpoint_every", "wandb")


def sweep(values: dict) -> list[FitConfig]:
    """One FitConfig per combination of the listed values (lists from pipeline.config.build_values);
    with --transcoders, one per layer of the set (transcoder_set).

    Each SAE of a sweep of several is written to `<default output>_<option>_<value>…`, or with
    --out DIR to `DIR/<arch>_<width>_<option>_<value>…`, naming the options that vary."""
    if values.get("transcoders"):
        return transcoder_set(values)
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


def transcoder_set(values: dict) -> list[FitConfig]:
    """--transcoders IN:OUT: layer L's transcoder reads STORE/L<L>.IN and predicts STORE/L<L>.OUT, and
    is written to <set>/layer_<L> (the set's folder: --out, or cache/saes/<store>_IN_to_OUT[_skip]_
    <arch>_<width>_set); they are one sweep, whose index run_sweep writes (pipeline/transcoder_set.py)."""
    several = [k for k, v in values.items() if isinstance(v, list) and len(set(v)) > 1]
    if several:
        raise GspError(f"a transcoder set takes one value per option; --{several[0].replace('_', '-')} lists several")
    if values.get("target_store"):
        raise GspError("--transcoders names both hook points of each layer; leave out --target-store")
    base = FitConfig(**{k: v[0] if isinstance(v, list) else v for k, v in values.items()})
    if not base.store:
        raise GspError("--store is required: a store written by gsp harvest with both sites of --transcoders")
    site_in, site_out = base.transcoders.split(":")
    root = base.store.rstrip("/")
    layers = tset.layers_of(root, site_in, site_out, base.layers)
    name = f"{_store_name(root)}_{site_in}_to_{site_out}{'_skip' * base.skip}_{base.arch}_{base.width}_set"
    folder = Path(base.out) if base.out else cache_dir() / "saes" / name
    tset.check_index_free(folder)
    return [dataclasses.replace(base, store=f"{root}/L{layer}.{site_in}", target_store=f"{root}/L{layer}.{site_out}",
                                out=str(folder / tset.member_name(layer))) for layer in layers]  # fmt: skip


def _short(v) -> str:
    """A value as a folder name shows it: 20 for 20.0, 0.001; exact (repr) where %g would round."""
    return f"{v:g}" if isinstance(v, float) and float(f"{v:g}") == v else str(v)


# ------------------------------------------------------------------------------ the run
def run_fit(cfg: FitConfig, *, resume: bool = False) -> Path:
    """Train, checkpoint, and write the SAE in Gemma Scope 2's format to cfg.out_dir."""
    return run_sweep([cfg], resume=resume)[0]


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
    return run_fit(cfg, resume=(cfg.checkpoints / "latest.json").is_file())


def _saved_differences(cfg: FitConfig) -> list[str]:
    """How the SAE saved at cfg.out_dir was fitted differently from cfg ([] when the same)."""
    saved = SAEConfig.from_json(read_json(cfg.out_dir / "config.json"), cfg.out_dir).fit_config
    return cfg.differences(saved, "the SAE") if saved is not None else ["it was not written by gsp fit"]


def run_sweep(cfgs: list[FitConfig], *, resume: bool = False) -> list[Path]:
    """Fit every SAE of a sweep from one read of the store: each batch goes through each SAE in turn.

    Every SAE has its own output, work folder and checkpoints, and is what it would be fitted alone
    with the same settings and seed (the stream depends only on the store, seed, batch and lanes,
    which a sweep does not vary). Returns the output folders."""
    first = cfgs[0]
    if not first.store:
        raise GspError("--store is required: the path of a store written by gsp harvest")
    for c in cfgs[1:]:
        differ = [k for k in _STREAM if getattr(c, k) != getattr(first, k)]
        if differ or c.total_steps != first.total_steps:
            raise GspError(
                f"the SAEs of one sweep read one stream: they must agree on {', '.join(differ or ['steps'])}"
            )
    stores = _open_stores(cfgs)
    outs = [c.out_dir for c in cfgs]
    if len(set(outs)) < len(outs):
        raise GspError("two SAEs of this sweep would be written to one folder; give each its own --out")
    with dist.session(first.device) as group, contextlib.ExitStack() as locks:  # one process, or its share
        precision(first.matmul, group.device)  # a wrong --matmul before any file is touched
        if group.main:
            for out in outs:
                locks.enter_context(OutputLock(out, "gsp fit"))
        todo = dist.on_main(group, lambda: outputs.prepare(_output_states(cfgs, resume), resume))
        fits = _fit([c for c in cfgs if c.out_dir in todo], todo, stores, group) if todo else []
        failed = [f.failed for f in fits if f.failed]  # (a fit of one SAE raised already)
        if first.transcoders and group.main and not failed:
            tset.write_index(outs[0].parent, [stores[c.store] for c in cfgs], [stores[c.target_store] for c in cfgs])
    if failed:
        saved = "none was saved" if len(failed) == len(cfgs) else "the others were saved"
        raise GspError(f"{len(failed)} of the sweep's {len(cfgs)} SAEs stopped early, {saved}: " + "; ".join(failed))
    return outs


def _open_stores(cfgs: list[FitConfig]) -> dict[str, ActivationStore]:
    """Every hook point the sweep reads, opened and checked: all of the same rows (hook points of one
    store, or stores one harvest's settings wrote), each SAE's pair of the same width (so that the
    stream is the one each would read alone)."""
    stores = {p: ActivationStore.open(p) for c in cfgs for p in (c.store, c.target_store) if p}
    first = stores[cfgs[0].store]
    for path, store in stores.items():
        if store.hook.stats.count == 0:
            raise GspError(f"store {path} has no statistics over non-special rows; is it empty?")
        same_rows(first, store)
    widths = {c.out_dir.name: sum(stores[p].d_in for p in (c.store, c.target_store) if p) for c in cfgs}
    if len(set(widths.values())) > 1:
        raise GspError("the SAEs of one sweep read rows of one width (input, and target for a transcoder); "
                       f"these differ: {', '.join(f'{k} {v}' for k, v in widths.items())}")  # fmt: skip
    return stores


def _output_states(cfgs: list[FitConfig], resume: bool) -> dict[Path, str]:
    """Each output's state (pipeline/outputs.py): an SAE already there counts as done only if it was
    fitted with the same settings."""
    return {c.out_dir: outputs.state(c.out_dir, resume, lambda c=c: not _saved_differences(c)) for c in cfgs}


@dataclass
class _Fit:
    """One SAE of a sweep (a plain fit is a sweep of one): its settings, as resolved for this run, and state."""

    cfg: FitConfig
    state: TrainState
    finite: NonFinite
    start: int  # the step it resumes from: it sits out the stream's earlier batches
    schedule: Schedule
    objective: Objective
    weights: torch.Tensor | None  # w (D,) of --weighting reads, on the device: it trains on x∘w
    stores: tuple  # (its input's store, its target's or None)
    scales: tuple[float, float]  # the unit scales of its input and of its target (its input's for an SAE)
    columns: tuple[slice, slice | None]  # its input's and its target's columns of a batch
    metrics: dict = dataclasses.field(default_factory=dict)  # the last log step's
    failed: str | None = None  # why it stopped early (a sweep goes on without it)


def _fit(cfgs: list[FitConfig], todo: dict[Path, str], stores: dict, group: dist.Group) -> list[_Fit]:
    """Start (or resume) each SAE, open one stream for all of them, train, and save each SAE into its
    work folder and publish it."""
    first = cfgs[0]
    read = list(dict.fromkeys(p for c in cfgs for p in (c.store, c.target_store) if p))  # the batch's hook points
    # unit-scaled inputs (and targets): E‖x·s‖² = 1, E‖y·t‖² = 1
    scale = {p: 1.0 / math.sqrt(stores[p].hook.stats.mean_sq_norm) for p in read}
    edges = list(itertools.accumulate((stores[p].d_in for p in read), initial=0))
    columns = {p: slice(edges[i], edges[i + 1]) for i, p in enumerate(read)}
    weights = functools.cache(lambda p: input_weights(stores[p], scale[p]))  # read once, for the SAEs that use it
    read_by = {"stores": stores, "scale": scale, "columns": columns}
    fits = [_start(cfg, read_by, weights, group.device, todo[cfg.out_dir] == "resume") for cfg in cfgs]
    start = min(f.start for f in fits)  # the stream starts where the furthest-behind SAE stopped
    pair = stores[first.store].d_in + (stores[first.target_store].d_in if first.target_store else 0)
    loader = ShuffledLoader(
        stores[read[0]], first.batch_size, seed=first.seed, buffer_mib=first.buffer_mib, device=group.device,
        scales=[scale[p] for p in read], share=(group.rank, group.world), lanes=first.lanes,
        extra=[stores[p] for p in read[1:]], window_width=pair,
        state=next(f.state.loader for f in fits if f.start == start),
    )  # fmt: skip
    if group.world > 1 and group.main:
        info(f"{group.world} processes, {first.batch_size // group.world:,} rows each of every "
             f"{first.batch_size:,}-row batch, each reading {loader.lanes // group.world} of the store's "
             f"{loader.lanes} loader lanes")  # fmt: skip
    if len(fits) > 1 and group.main:
        info(f"{len(fits)} SAEs from one read of {stores[first.store].root}, each batch through each")
    logger = _wandb([f.cfg for f in fits]) if first.wandb and group.main else None
    _train(fits, loader, start, group, logger)
    if group.main:
        kept = [f for f in fits if not f.failed]
        for f in kept:
            _save(f)
        for f in kept:  # each SAE whole in its work folder first: a kill now loses no training
            outputs.publish(f.cfg.out_dir)
    return fits


def _start(cfg: FitConfig, read_by: dict, input_w, device, resume: bool) -> _Fit:
    """A fresh SAE (Gemma Scope 2's initialisation, seeded), or the one in its checkpoint, which also
    decides the defaults this run resolves (a resumed fit keeps the learning rate it started with).
    `read_by` holds, by hook point, the opened stores, their unit scales and their columns of a batch;
    `input_w(path)` gives --weighting reads' w (input_weights), computed once per store for the run."""
    cfg = cfg.resolved(like=checkpoint.settings(cfg.checkpoints) if resume else None)
    store, target = read_by["stores"][cfg.store], read_by["stores"].get(cfg.target_store)
    out = target or store
    scales = tuple(read_by["scale"][p] for p in (cfg.store, cfg.target_store or cfg.store))
    columns = (read_by["columns"][cfg.store], read_by["columns"].get(cfg.target_store))
    sae = SAE(store.d_in, cfg.width, arch=cfg.arch, k=cfg.k, d_out=out.d_in, skip=cfg.skip).init_gemma_scope(
        torch.Generator().manual_seed(cfg.seed), theta=cfg.theta_init
    )
    weights = input_w(cfg.store) if cfg.weighting == "reads" else None
    if cfg.b_dec_init == "mean":
        with torch.no_grad():
            sae.b_dec.copy_(torch.tensor(out.hook.stats.mean) * scales[1] * (1 if weights is None else weights))
    state = TrainState.fresh(sae.to(device), cfg.lr)
    if resume:
        checkpoint.load(cfg.checkpoints, state, lambda saved: cfg.differences(saved, "checkpoint"))
        info(f"{cfg.out_dir.name}: resuming from step {state.step:,} of {cfg.total_steps:,}")
    return _Fit(cfg, state, NonFinite(device), start=state.step, schedule=cfg.schedule, objective=cfg.objective,
                weights=None if weights is None else weights.to(device), stores=(store, target), scales=scales,
                columns=columns)  # fmt: skip


WEIGHT_FLOOR = 0.01  # of the gains' RMS: a dimension no later layer reads still counts a little
WEIGHT_SAMPLE = 65_536  # rows that estimate E‖x∘w‖²


def input_weights(store: ActivationStore, scale: float) -> torch.Tensor:
    """w (D,) float32 for --weighting reads: the store's read gains (floored at WEIGHT_FLOOR of their
    RMS), scaled so that E‖(x·scale)∘w‖² = 1 over the store's first WEIGHT_SAMPLE ordinary rows. The
    same on every process and every resume: the rows read are fixed."""
    gains = store.hook.read_gains
    if gains is None:
        raise GspError(f"store {store.path} records no read gains (a site outside the residual stream, a "
                       "synthetic store, or one harvested before gsp recorded them; `gsp harvest` with the "
                       "same options adds them): fit with --weighting none")  # fmt: skip
    g = torch.tensor(gains, dtype=torch.float64)
    g = g.clamp(min=WEIGHT_FLOOR * g.square().mean().sqrt())
    total, count = 0.0, 0
    for x, _ in store.ordinary_rows(WEIGHT_SAMPLE, 8192):
        total += (torch.from_numpy(x).double() * scale * g).square().sum().item()
        count += len(x)
    return (g / math.sqrt(total / count)).float()


# ------------------------------------------------------------------------------ the loop
def _train(fits: list[_Fit], loader, start: int, group, logger) -> None:
    """Each batch of the stream through each SAE that is at that step; logs, checks, checkpoints."""
    first = fits[0].cfg
    n, every = first.total_steps, first.checkpoint_every
    t0 = time.perf_counter()
    batches = iter(loader)
    live = progress("steps", show=group.main, fields=("metrics",))  # under torchrun only rank 0 shows it
    with contextlib.closing(batches), live, matmul_precision(first.matmul, group.device) as ac:
        tasks = [live.add_task(_name(f, fits), total=n, completed=f.start, metrics="") for f in fits]
        for step in range(start, n):
            batch = next(batches)
            done = step + 1
            active = [f for f in fits if f.start <= step and not f.failed]
            for f in active:
                loss, truth = _step(f, batch, step, group, ac)
                if done % f.cfg.log_every == 0 or done == n:
                    _log(f, loss, truth, done, group, (time.perf_counter() - t0, (done - start) * first.batch_size))
                    live.update(tasks[fits.index(f)], completed=done, metrics=_line(f.metrics))
                    if logger:
                        logger.log({f"{_name(f, fits)}/{k}" if len(fits) > 1 else k: v
                                    for k, v in f.metrics.items()}, step=done)  # fmt: skip
                    _check_finite(f, fits, group)
            if every and done % every == 0 and done < n and active:
                position = LoaderState.merge(dist.gather(group, loader.state))  # every process's lanes
                for f in active:
                    _check_finite(f, fits, group)
                    if group.main and not f.failed:
                        f.state.loader = position
                        checkpoint.save(f.cfg.checkpoints, f.state, f.cfg.record())
                if group.main:
                    fault("fit-checkpoint-saved")
                dist.barrier(group)
    for f in fits:
        if not f.failed:
            _check_finite(f, fits, group)


def _step(f: _Fit, batch: torch.Tensor, step: int, group, autocast):
    """One training step of one SAE on the shared batch (read, never written); (its loss, the rows it reconstructs)."""
    cfg, state = f.cfg, f.state
    lr, lam, freq_penalty = f.schedule.at(step)
    for pg in state.opt.param_groups:
        pg["lr"] = lr
    x, y = (None if c is None else batch[:, c] for c in f.columns)  # unit-scaled by the loader, on the device
    if f.weights is not None:
        x = x * f.weights
    # sparse decoder work pays off once few latents are active (early JumpReLU steps are dense)
    cpu = group.device.type == "cpu"
    sparse = cfg.decoder == "sparse" or (cfg.decoder == "auto" and cpu and state.density < 0.05)
    sparse = sparse and not cfg.prefixes  # Matryoshka's nested prefixes decode densely
    objective = dataclasses.replace(f.objective, freq_penalty=freq_penalty)
    loss = train_step(state.sae, state.opt, x, objective, lam=lam, since_fired_F=state.since_fired_F,
                      dead_tokens=cfg.dead_tokens, sparse=sparse, group=group, target_BO=y,
                      autocast=autocast, theta_lr=cfg.theta_lr)  # fmt: skip
    state.step = step + 1
    f.finite.update(step + 1, loss.total)
    f.metrics.update(lr=lr, **{"lambda": lam})
    return loss, (x if y is None else y)


def _log(f: _Fit, loss, truth: torch.Tensor, done: int, group, elapsed: tuple[float, int]) -> None:
    """The live metrics, averaged over processes (FVU as the mean of the shares' FVUs): the same on every process."""
    x_hat, f_BF = loss.x_hat_BD.detach(), loss.f_BF
    logged = torch.stack([loss.total.detach(), l0(f_BF), fvu(truth, x_hat).float(), (f_BF != 0).float().mean()])
    dist.mean_(group, [logged])
    loss_, l0_, fvu_, f.state.density = logged.tolist()
    seconds, rows = elapsed
    f.metrics = {"step": done, "loss": loss_, "l0": l0_, "fvu": fvu_,
                 "dead": dead_fraction(f.state.since_fired_F, f.cfg.dead_tokens), "lr": f.metrics["lr"],
                 "lambda": f.metrics["lambda"], "tok_s": rows / seconds}  # fmt: skip


def _check_finite(f: _Fit, fits: list[_Fit], group) -> None:
    """Stop a fit whose loss became NaN or infinite in any process: decided by all of them together (a
    collective), so that they stop the same SAE at the same step. In a sweep only that SAE stops
    (its last checkpoint kept) and the others go on."""
    bad = f.finite.first_bad(group)
    if bad is None:
        return
    kept = checkpoint.latest_step(f.cfg.checkpoints)
    then = f"; the checkpoint at step {kept:,} is kept (--resume continues from it)" if kept else ""
    why = (f"the loss became NaN or infinite at step {bad:,} (lr {f.cfg.lr:g}): lower --lr "
           f"(or check the store's values); nothing was saved{then}")  # fmt: skip
    if len(fits) == 1:
        raise GspError(why)
    f.failed = f"{f.cfg.out_dir.name}: {why}"
    if group.main:
        warn(f.failed)


def _name(f: _Fit, fits: list[_Fit]) -> str:
    return f.cfg.out_dir.name if len(fits) > 1 else "fit"


def _line(m: dict) -> str:
    return (
        f"loss {m['loss']:.4f}  L0 {m['l0']:.1f}  FVU {m['fvu']:.3f}  dead {100 * m['dead']:.1f}%  "
        f"{m['tok_s']:,.0f} tok/s"
    )


def _wandb(cfgs: list[FitConfig]):
    """One W&B run; a sweep's SAEs log under their folder names."""
    try:
        import wandb
    except ImportError:
        raise GspError("--wandb needs the wandb package: pip install wandb") from None
    config = {c.out_dir.name: dataclasses.asdict(c) for c in cfgs} if len(cfgs) > 1 else dataclasses.asdict(cfgs[0])
    return wandb.init(project="gsp", config=config)


# ------------------------------------------------------------------------------ the saved SAE
def _save(f: _Fit) -> None:
    """params.safetensors + config.json in Gemma Scope 2's format (its transcoder layout for a
    transcoder), the scales folded in, into the work folder; then its checkpoints go."""
    (store, target), scales = f.stores, f.scales
    cfg, m, record, work = f.cfg, store.meta, f.cfg.record(), outputs.work_dir(f.cfg.out_dir)
    final = f.metrics
    sae = f.state.sae.cpu()
    if cfg.pre_encoder_bias:
        sae.fold_pre_encoder_bias()
    if f.weights is not None:
        sae.fold_input_weights(f.weights.cpu())
    sae = sae.fold_input_scale(*scales)
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
        raise GspError(f"disk full while saving the SAE to {work}: free some space and rerun "
                       f"({checkpoint.resume_hint(cfg.checkpoints)})") from None  # fmt: skip
    shutil.rmtree(cfg.checkpoints, ignore_errors=True)  # the SAE is complete: checkpoints are done with
    fault("fit-saved")
    console.print(f"saved the SAE to [bold]{cfg.out_dir}[/] ({_line(final)})", highlight=False)
