"""gsp fit: train a JumpReLU or TopK SAE from an activation store, never loading the language model.

The loop, once per step: set lr and sparsity coefficient (warm-ups) → read a shuffled batch (already
prefetched) → forward, loss, backward → remove the decoder-gradient component parallel to each
decoder row, Adam step, renormalise decoder rows → track dead latents → log / checkpoint.

Inputs are scaled by one constant s so that E‖x‖² = 1 (from the store's statistics); the saved SAE
has s folded in (pipeline.sae.SAE.fold_input_scale) and takes raw activations, like Gemma Scope 2's.
"""

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from pipeline import __version__, dist
from pipeline.config import opt, stage_config
from pipeline.console import console, err_console, info
from pipeline.errors import GspError
from pipeline.faults import fault
from pipeline.loader import LoaderState, ShuffledLoader
from pipeline.metrics import dead_fraction, fvu, l0
from pipeline.paths import cache_dir
from pipeline.sae import SAE, jumprelu, sparse_jumprelu_sae, step
from pipeline.store import ActivationStore

_PARAMS = ("w_enc", "b_enc", "w_dec", "b_dec", "threshold")


@stage_config("fit")
@dataclass
class FitConfig:
    store: str | None = opt(None, "Store written by gsp harvest.")
    out: str | None = opt(None, "Output folder (default: cache/saes/<store>_<arch>_<width>).")
    arch: Literal["jumprelu", "topk"] = opt("jumprelu", "jumprelu (Gemma Scope) or topk (Llama Scope).")
    width: int = opt(4096, "Number of latents F.", aliases=("d_sae",))
    k: int = opt(60, "TopK: latents kept per token.")
    sparsity_coeff: float = opt(1e-3, "JumpReLU: λ of the sparsity penalty (λ·L0, or the target-L0 penalty).")
    target_l0: float | None = opt(None, "JumpReLU: aim at this L0 with λ·(2/T)·(L0 − T)² (Gemma Scope 2).")
    tokens: int = opt(1_474_560, "Training tokens (special-token rows excluded).")
    steps: int | None = opt(None, "Training steps; overrides --tokens.", aliases=("num_steps",))
    batch_size: int = opt(1024, "Rows per step.")
    lr: float | None = opt(None, "Adam learning rate, betas (0, 0.999) (default: 1.75e-3 jumprelu, 1e-3 topk).")
    lr_warmup_steps: int | None = opt(None, "Linear lr warm-up (default: 5 % of the steps, at most 1,000).")
    lr_decay_steps: int | None = opt(None, "Linear lr decay to 0 over the last N steps (default: 20 % of the steps).")
    sparsity_warmup_steps: int | None = opt(
        None, "Linear warm-up of λ from 0 (default: 20 % of the steps, at most 10,000)."
    )
    decoder: Literal["auto", "sparse", "dense"] = opt(
        "auto", "JumpReLU decoder work: auto is sparse on CPU once < 5 % of latents fire (dense on CUDA for now)."
    )
    bandwidth: float = opt(0.001, "JumpReLU: width ε of the straight-through rectangle kernel.")
    theta_init: float = opt(0.001, "JumpReLU: initial threshold θ (on unit-scaled inputs).")
    b_dec_init: Literal["mean", "zero"] = opt("mean", "Decoder bias at the data mean (fewer dead latents) or 0.")
    aux_k: int = opt(512, "TopK: latents in the auxiliary loss that revives dead latents.")
    aux_coeff: float = opt(0.125, "TopK: weight of the auxiliary loss.")
    dead_tokens: int = opt(50_000, "A latent that has not fired for this many tokens counts as dead.")
    seed: int = opt(0, "Seed of the initialisation and of the shuffle.")
    device: str = opt("auto", "auto (CUDA if present), cpu, cuda or cuda:N.")
    buffer_mib: float = opt(1024.0, "Memory for the shuffle buffer (two windows of chunks), shared by the processes.")
    lanes: int = opt(
        8, "Loader lanes: each process reads its own lanes' chunks; any process count dividing it trains the same SAE."
    )
    checkpoint_every: int = opt(500, "Save a checkpoint every N steps (0: never).")
    log_every: int = opt(10, "Refresh the live metrics every N steps.")
    wandb: bool = opt(False, "Log metrics to Weights & Biases (needs the wandb package and a login).")

    def __post_init__(self):
        for name in ("width", "k", "tokens", "batch_size", "aux_k", "dead_tokens", "log_every", "lanes"):
            if getattr(self, name) <= 0:
                raise GspError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr is None:  # tuned on the default store at the default budget (benchmarks/RESULTS.md)
            self.lr = 1.75e-3 if self.arch == "jumprelu" else 1e-3
        if self.lr <= 0 or self.bandwidth <= 0 or self.sparsity_coeff < 0:
            raise GspError("--lr and --bandwidth must be positive and --sparsity-coeff not negative")
        if self.arch == "topk" and self.k > self.width:
            raise GspError(f"--k {self.k} is more than --width {self.width}")
        if self.target_l0 is not None and self.target_l0 <= 0:
            raise GspError(f"--target-l0 must be positive, got {self.target_l0}")

    @property
    def total_steps(self) -> int:
        return self.steps or max(1, self.tokens // self.batch_size)

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return cache_dir() / "saes" / f"{Path(self.store).name}_{self.arch}_{self.width}"


def run_fit(cfg: FitConfig, *, resume: bool = False) -> Path:
    """Train, checkpoint, and write the SAE in Gemma Scope 2's format to cfg.out_dir."""
    if not cfg.store:
        raise GspError("--store is required: the path of a store written by gsp harvest")
    store = ActivationStore.open(cfg.store)
    group = dist.setup(cfg.device)  # one process, or this process's share under torchrun
    device = group.device
    stats = store.attrs["stats"]
    if stats["count"] == 0:
        raise GspError(f"store {cfg.store} has no statistics over non-special rows; is it empty?")
    scale = 1.0 / math.sqrt(stats["mean_sq_norm"])  # unit-scaled inputs: E‖x·s‖² = 1

    sae = SAE(store.d_in, cfg.width, arch=cfg.arch, k=cfg.k).init_gemma_scope(
        torch.Generator().manual_seed(cfg.seed), theta=cfg.theta_init
    )
    if cfg.b_dec_init == "mean":
        with torch.no_grad():
            sae.b_dec.copy_(torch.tensor(stats["mean"]) * scale)
    sae.to(device)
    opt_ = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.0, 0.999))
    since_fired = torch.zeros(cfg.width, dtype=torch.int64, device=device)
    # density: share of latents active at the last log step; picks JumpReLU's decoder path
    start_step, loader_state, density = 0, None, 1.0
    ckpt = cfg.out_dir / "checkpoints"
    if resume:
        start_step, loader_state, density = _load_checkpoint(ckpt, cfg, sae, opt_, since_fired)
        info(f"resuming from step {start_step:,} of {cfg.total_steps:,}")
    elif (cfg.out_dir / "params.safetensors").exists() or ckpt.exists():
        raise GspError(f"{cfg.out_dir} already holds an SAE; use --resume to continue it, or another --out")
    dist.barrier(group)  # every process has checked the output folder before rank 0 writes to it

    loader = ShuffledLoader(
        store, cfg.batch_size, seed=cfg.seed, buffer_mib=cfg.buffer_mib, pin=device.type == "cuda",
        state=loader_state, part=(group.rank, group.world), lanes=cfg.lanes,
    )  # fmt: skip
    if group.world > 1 and group.main:
        share, lanes = cfg.batch_size // group.world, loader.lanes
        info(
            f"{group.world} processes, {share:,} rows each of every {cfg.batch_size:,}-row batch, "
            f"each reading {lanes // group.world} of the store's {lanes} loader lanes"
        )
    logger = _wandb(cfg) if cfg.wandb and group.main else None
    last = _train(cfg, sae, opt_, loader, since_fired, scale, start_step, density, group, ckpt, logger)
    out = _save(cfg, store, sae, scale, last) if group.main else cfg.out_dir
    dist.teardown(group)
    return out


def _schedule(cfg: FitConfig, step_: int) -> tuple[float, float]:
    """(lr, λ) at this step: linear warm-ups, lr constant, then decaying linearly to 0 at the end."""
    n = cfg.total_steps
    lr_warm = cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None else min(1000, n // 20)
    decay = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else n // 5
    sp_warm = cfg.sparsity_warmup_steps if cfg.sparsity_warmup_steps is not None else min(10_000, n // 5)
    lr = cfg.lr * min(1.0, (step_ + 1) / lr_warm) if lr_warm else cfg.lr
    lr *= min(1.0, (n - step_) / decay) if decay else 1.0
    lam = cfg.sparsity_coeff * min(1.0, (step_ + 1) / sp_warm) if sp_warm else cfg.sparsity_coeff
    return lr, lam


def loss_terms(
    cfg: FitConfig, sae: SAE, x_BD: torch.Tensor, lam: float, dead_F: torch.Tensor, sparse: bool = False,
    group: dist.Group = dist.Group(),
):  # fmt: skip
    """(loss, x̂, f) for one batch of unit-scaled inputs; `sparse`: JumpReLU's sparse decoder path.

    Under torchrun `x_BD` is this process's share of the global batch; terms that are not plain
    means over rows (the target-L0 penalty, the AuxK normaliser) use the global batch's values, so
    that the averaged gradients equal one process's on the whole batch.
    """
    if cfg.arch == "jumprelu":
        if sparse:
            x_hat, pre, active = sparse_jumprelu_sae(
                x_BD, sae.w_enc, sae.b_enc, sae.threshold, sae.w_dec, cfg.bandwidth
            )
            x_hat, f = x_hat + sae.b_dec, pre * active  # f only for metrics: no gradient through it
        else:
            pre = x_BD @ sae.w_enc + sae.b_enc
            f = jumprelu(pre, sae.threshold, cfg.bandwidth)
            x_hat = f @ sae.w_dec + sae.b_dec
        recon = (x_hat - x_BD).square().sum(-1).mean()
        l0_ = step(pre, sae.threshold, cfg.bandwidth).sum(-1).mean()
        if cfg.target_l0 is None:
            sparsity = lam * l0_
        else:
            l0_ = dist.mean_differentiable(group, l0_)  # the penalty is on the global batch's L0
            sparsity = lam * (2 / cfg.target_l0) * (l0_ - cfg.target_l0).square()
        return recon + sparsity, x_hat, f
    # TopK: decode the k active latents only (an embedding bag), plus the auxiliary loss on dead ones
    pre = x_BD @ sae.w_enc + sae.b_enc
    values, idx = pre.topk(cfg.k, dim=-1)
    values = values.relu()
    x_hat = torch.nn.functional.embedding_bag(idx, sae.w_dec, per_sample_weights=values, mode="sum") + sae.b_dec
    f = torch.zeros_like(pre).scatter_(-1, idx, values)
    recon = (x_hat - x_BD).square().sum(-1).mean()
    n_dead = int(dead_F.sum())
    if n_dead == 0:
        return recon, x_hat, f
    err = (x_BD - x_hat).detach()
    aux_vals, aux_idx = pre.masked_fill(~dead_F, -torch.inf).topk(min(cfg.aux_k, n_dead), dim=-1)
    err_hat = torch.nn.functional.embedding_bag(aux_idx, sae.w_dec, per_sample_weights=aux_vals.relu(), mode="sum")
    norm = err.square().sum(-1).mean()
    dist.mean_(group, [norm])  # the global batch's error, so that the ratio is the global one
    aux = (err_hat - err).square().sum(-1).mean() / norm.clamp_min(1e-12)
    return recon + cfg.aux_coeff * aux, x_hat, f


def train_step(
    cfg: FitConfig, sae: SAE, opt_, x_BD: torch.Tensor, lam: float, since_fired: torch.Tensor, sparse: bool,
    group: dist.Group = dist.Group(),
):  # fmt: skip
    """One optimisation step on a unit-scaled batch; returns (loss, x̂, f) for the logs.

    Under torchrun: gradients are averaged across processes (one flat all-reduce) before the
    optimiser step, and latents count as fired when they fired in any process's share, so every
    process holds the same weights and dead-latent counters after every step.
    """
    loss, x_hat, f = loss_terms(cfg, sae, x_BD, lam, since_fired >= cfg.dead_tokens, sparse, group)
    opt_.zero_grad(set_to_none=True)
    loss.backward()
    dist.mean_(group, [p.grad for p in sae.parameters() if p.grad is not None])
    with torch.no_grad():
        w, g = sae.w_dec, sae.w_dec.grad  # keep rows on the unit sphere: drop the radial part
        g -= (g * w).sum(-1, keepdim=True) * w
    opt_.step()
    with torch.no_grad():
        sae.w_dec /= sae.w_dec.norm(dim=-1, keepdim=True)
        sae.threshold.clamp_(min=0.0)  # a negative θ would let negative pre-activations through
        since_fired += len(x_BD) * group.world
        since_fired[dist.any_(group, (f != 0).any(0))] = 0
    return loss, x_hat, f


def _train(cfg, sae, opt_, loader, since_fired, scale, start_step, density, group, ckpt, logger) -> dict:
    n = cfg.total_steps
    metrics: dict = {}
    t0, tokens_at_t0 = time.perf_counter(), start_step * cfg.batch_size
    batches = iter(loader)
    with _display(group.main) as live:
        task = live.add_task("fit", total=n, completed=start_step, metrics="")
        for step_ in range(start_step, n):
            lr, lam = _schedule(cfg, step_)
            for pg in opt_.param_groups:
                pg["lr"] = lr
            x = next(batches).to(group.device, non_blocking=True) * scale  # (B, D) unit-scaled, this share

            # sparse decoder work pays off once few latents are active (early JumpReLU steps are dense)
            cpu = group.device.type == "cpu"
            sparse = cfg.decoder == "sparse" or (cfg.decoder == "auto" and cpu and density < 0.05)
            loss, x_hat, f = train_step(cfg, sae, opt_, x, lam, since_fired, sparse, group)

            done = step_ + 1
            if done % cfg.log_every == 0 or done == n:
                tok_s = (done * cfg.batch_size - tokens_at_t0) / (time.perf_counter() - t0)
                # averaged over processes (FVU as the mean of the shares' FVUs): the same on every process
                logged = torch.stack([loss.detach(), l0(f), fvu(x, x_hat.detach()).float(), (f != 0).float().mean()])
                dist.mean_(group, [logged])
                loss_, l0_, fvu_, density = logged.tolist()
                metrics = {
                    "step": done,
                    "loss": loss_,
                    "l0": l0_,
                    "fvu": fvu_,
                    "dead": dead_fraction(since_fired, cfg.dead_tokens),
                    "lr": lr,
                    "lambda": lam,
                    "tok_s": tok_s,
                }
                live.update(task, completed=done, metrics=_line(metrics))
                if logger:
                    logger.log(metrics, step=done)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < n:
                position = LoaderState.merge(dist.gather(group, loader.state))  # every process's lanes
                if group.main:
                    _save_checkpoint(ckpt, cfg, sae, opt_, since_fired, done, position, density)
                    fault("fit-checkpoint-saved")
                dist.barrier(group)
    return metrics


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
def _save_checkpoint(root: Path, cfg, sae, opt_, since_fired, done: int, loader_state: LoaderState, density) -> None:
    """Training-scale weights, Adam moments and dead-latent counters (safetensors) + JSON state.

    Written to a fresh `step-N/` folder; then `latest.json` is replaced atomically to point at it;
    only then are older folders removed. A kill at any moment leaves a complete checkpoint.
    """
    folder = root / f"step-{done}"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k}": getattr(sae, k).detach().cpu().contiguous() for k in _PARAMS}
    adam_steps = {}
    for k in _PARAMS:
        st = opt_.state.get(getattr(sae, k), {})
        if st:
            tensors[f"adam.{k}.exp_avg"] = st["exp_avg"].cpu().contiguous()
            tensors[f"adam.{k}.exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
            adam_steps[k] = float(st["step"])
    tensors["since_fired"] = since_fired.cpu().contiguous()
    save_file(tensors, folder / "state.safetensors")
    state = {"step": done, "loader": dataclasses.asdict(loader_state), "adam_steps": adam_steps,
             "density": density, "config": dataclasses.asdict(cfg)}  # fmt: skip
    (folder / "state.json").write_text(json.dumps(state, indent=1))
    (root / "latest.json.partial").write_text(json.dumps({"folder": folder.name}))
    os.replace(root / "latest.json.partial", root / "latest.json")
    for old in root.glob("step-*"):
        if old != folder:
            shutil.rmtree(old)


def _load_checkpoint(root: Path, cfg, sae, opt_, since_fired) -> tuple[int, LoaderState, float]:
    if not (root / "latest.json").is_file():
        raise GspError(f"no checkpoint in {root} to resume from; run without --resume to start")
    path = root / json.loads((root / "latest.json").read_text())["folder"]
    state = json.loads((path / "state.json").read_text())
    saved = {k: v for k, v in state["config"].items() if k not in ("checkpoint_every", "log_every", "device")}
    now = {k: v for k, v in dataclasses.asdict(cfg).items() if k in saved}
    if saved != now:
        diffs = "; ".join(f"{k}: checkpoint has {saved[k]!r}, asked {now[k]!r}" for k in saved if saved[k] != now[k])
        raise GspError(f"the checkpoint in {path} was trained with other parameters ({diffs})")
    tensors = load_file(path / "state.safetensors")
    with torch.no_grad():
        for k in _PARAMS:
            getattr(sae, k).copy_(tensors[f"param.{k}"])
        since_fired.copy_(tensors["since_fired"])
    for k, n in state["adam_steps"].items():
        p = getattr(sae, k)
        opt_.state[p] = {
            "step": torch.tensor(n),
            "exp_avg": tensors[f"adam.{k}.exp_avg"].to(p.device),
            "exp_avg_sq": tensors[f"adam.{k}.exp_avg_sq"].to(p.device),
        }
    return state["step"], LoaderState.from_json(state["loader"]), state["density"]


# ------------------------------------------------------------------------------ the saved SAE
def _save(cfg: FitConfig, store: ActivationStore, sae: SAE, scale: float, final: dict) -> Path:
    """params.safetensors + config.json in Gemma Scope 2's format, the input scale folded in."""
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    sae = sae.cpu().fold_input_scale(scale)
    tensors = {k: getattr(sae, k).detach().float().contiguous() for k in _PARAMS}
    a = store.attrs
    config = {
        # Gemma Scope 2's keys
        "model_name": a["model"]["name"],
        "architecture": "jump_relu" if cfg.arch == "jumprelu" else "topk",
        "hf_hook_point_in": a["hook_point"],
        "hf_hook_point_out": a["hook_point"],
        "width": cfg.width,
        "l0": cfg.target_l0 if cfg.target_l0 is not None else (cfg.k if cfg.arch == "topk" else final.get("l0")),
        "affine_connection": False,
        "type": "sae",
        # gsp's own
        "k": cfg.k if cfg.arch == "topk" else None,
        "d_in": store.d_in,
        "layer": a["layer"],
        "site": a["site"],
        "store": str(cfg.store),
        "model_revision": a["model"]["revision"],
        "input_scale_folded": scale,
        "steps": cfg.total_steps,
        "tokens_seen": cfg.total_steps * cfg.batch_size,
        "final_train_metrics": final,
        "fit_config": dataclasses.asdict(cfg),
        "gsp_version": __version__,
    }
    save_file(tensors, out / "params.safetensors.partial")
    os.replace(out / "params.safetensors.partial", out / "params.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the SAE is complete: checkpoints are done with
    console.print(f"saved the SAE to [bold]{out}[/] ({_line(final)})", highlight=False)
    return out


def _wandb(cfg: FitConfig):
    try:
        import wandb
    except ImportError:
        raise GspError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="gsp", config=dataclasses.asdict(cfg))
