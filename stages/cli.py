"""The `gsp` command: thin commands that build a stage's config and call the stage.

It sits above the stages (pipeline/ never imports it): `gsp` and `python -m stages` both run `main`.
"""

import inspect
import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from pipeline import __version__
from pipeline.config import build_config, command_from_config
from pipeline.console import UNWRAPPED, cli_errors, console
from pipeline.errors import GspError
from stages import evaluate as evaluate_stage
from stages import fit as fit_stage
from stages import harvest as harvest_stage
from stages.evaluate import EvaluateConfig, run_evaluate
from stages.features import FeaturesConfig, run_features
from stages.fit import FitConfig, run_sweep
from stages.harvest import HarvestConfig, run_harvest
from stages.run import RunConfig, run_all
from stages.steer import SteerConfig, run_steer
from stages.trace import TraceConfig, run_trace


class _Commands(TyperGroup):
    """gsp's commands, with help that is whole wherever it is read: rich's panels at a terminal; in a file
    or a pipe (`gsp fit --help > file`, `| less`), click's plain help with each option's text on one line,
    where rich would draw an 80-column table and cut a long word short ("STORE/L12.resid_po…")."""

    def main(self, *args, **extra):
        if not sys.stdout.isatty():  # asked per run: a test runner swaps sys.stdout
            for command in (self, *self.commands.values()):
                command.rich_markup_mode = None  # click's help (and usage errors), wrapped at terminal_width
            extra.setdefault("terminal_width", UNWRAPPED)  # the commands' contexts inherit it
        return super().main(*args, **extra)


app = typer.Typer(
    cls=_Commands,
    help="gsp: harvest Gemma activations into a Zarr store, fit sparse autoencoders, evaluate them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold a Hub token
)


def _flag(name: str, annotation, default, help: str, **kw) -> inspect.Parameter:
    return inspect.Parameter(
        name.replace("-", "_"),
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[annotation, typer.Option(f"--{name}", help=help, **kw)],
    )


TOKEN = _flag(
    "token",
    str | None,
    None,
    "Hugging Face token (default: $HF_TOKEN). Used for downloads, never stored.",
    envvar="HF_TOKEN",
    show_envvar=False,
    show_default=False,
)
OVERWRITE = _flag("overwrite", bool, False, "Replace an existing store written with other parameters.")


def _smoke(what: str) -> inspect.Parameter:
    return _flag("smoke-test", bool, False, f"{what}, in seconds.")


def harvest(cfg: HarvestConfig, *, token: str | None, overwrite: bool, smoke_test: bool) -> None:
    """Run the model up to --layer/--site and write activations + token ids into a Zarr store.

    Resumable: rerun the same command after a crash and it continues where it stopped.
    """
    run_harvest(harvest_stage.smoke_config(cfg) if smoke_test else cfg, token=token, overwrite=overwrite)


command_from_config(
    app,
    HarvestConfig,
    harvest,
    name="harvest",
    extra=[TOKEN, OVERWRITE, _smoke("Harvest a tiny random Gemma 3 over a synthetic corpus")],
)


RESUME = _flag("resume", bool, False, "Continue from the checkpoint in --out (same parameters).")


def fit(cfgs: list[FitConfig], *, resume: bool, smoke_test: bool) -> None:
    """Train a JumpReLU or TopK SAE, or a transcoder (--target-store), from a store; the model is never loaded.

    Writes params.safetensors + config.json in Gemma Scope 2's format, scales folded in. Lists sweep:
    --width 4096,16384 --target-l0 20,60,120 fits all six SAEs from one read of the store.
    """
    if smoke_test:
        if len(cfgs) > 1:
            raise GspError("--smoke-test fits one SAE; give each option one value")
        cfgs = [fit_stage.smoke_config(cfgs[0])]
    run_sweep(cfgs, resume=resume)


command_from_config(
    app, FitConfig, fit, name="fit", extra=[RESUME, _smoke("Fit a few steps on a synthetic store of random rows")],
    expand=fit_stage.sweep,
)  # fmt: skip


def evaluate(cfg: EvaluateConfig, *, token: str | None, smoke_test: bool) -> None:
    """Measure an SAE: L0, FVU, dead latents… on a store, and delta LM loss by re-running the model.

    Takes a gsp fit folder, a Gemma Scope 2 / Gemma Scope / Llama Scope folder, or a Hub path.
    Writes reports/report_<timestamp>.md + .json + plots.
    """
    run_evaluate(evaluate_stage.smoke_config(cfg) if smoke_test else cfg, token=token)


command_from_config(
    app,
    EvaluateConfig,
    evaluate,
    name="evaluate",
    extra=[TOKEN, _smoke("Harvest, fit and evaluate on a tiny random Gemma 3")],
)


def features(cfg: FeaturesConfig, *, token: str | None) -> None:
    """See what features mean: an HTML feature browser, one feature (--feature N), or a prompt (--prompt).

    From a store: top-activating contexts, activation histograms and the logit lens of every
    feature, written as a static page (no server) and JSON. --prompt TEXT runs the model instead.
    """
    run_features(cfg, token=token)


command_from_config(app, FeaturesConfig, features, name="features", extra=[TOKEN])


def steer(cfg: SteerConfig, *, token: str | None) -> None:
    """Generate with SAE features added (or clamped) at the SAE's layer, beside the unsteered text (same seed).

    Example: gsp steer --sae DIR --feature 123 --strength 2000 --prompt "The weather today"
    """
    run_steer(cfg, token=token)


command_from_config(app, SteerConfig, steer, name="steer", extra=[TOKEN])


def trace(cfg: TraceConfig, *, token: str | None) -> None:
    """Trace a prompt through a transcoder set: its attribution graph as JSON and a static HTML page.

    Example: gsp trace --transcoders cache/saes/SET --prompt "The capital of the state containing Dallas is"
    """
    run_trace(cfg, token=token)


command_from_config(app, TraceConfig, trace, name="trace", extra=[TOKEN])


@app.command("run")
def run_(
    config: Annotated[
        str, typer.Option("--config", "-c", help="YAML config with harvest/fit/evaluate/run sections.")
    ] = "default",
    heldout_tokens: Annotated[
        int | None, typer.Option(help=RunConfig.__dataclass_fields__["heldout_tokens"].metadata["help"])
    ] = None,
    hook: Annotated[str | None, typer.Option(help=RunConfig.__dataclass_fields__["hook"].metadata["help"])] = None,
    token: Annotated[str | None, TOKEN.annotation.__metadata__[0]] = None,
) -> None:
    """The main job: harvest a train and a held-out store, fit an SAE, evaluate it; prints the report's path.

    Settings come from the config's sections (default: configs/default.yaml). Rerun after a crash to finish.
    """
    with cli_errors():
        cfg = build_config(RunConfig, config, {"heldout_tokens": heldout_tokens, "hook": hook})
        report = run_all(cfg, config, token=token)
        console.print(f"the main job is done; the report is at [bold]{report}[/]", highlight=False)


@app.command()
def download(
    model: Annotated[
        str | None, typer.Option("--model", help="A Hugging Face model id, e.g. google/gemma-3-270m.")
    ] = None,
    sae: Annotated[
        str | None,
        typer.Option("--sae", help="A Hub SAE path owner/repo/sub/folder; only that SAE's files are fetched."),
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision of --model.")] = None,
    sae_revision: Annotated[str | None, typer.Option("--sae-revision", help="Hub revision of --sae.")] = None,
    token: Annotated[str | None, TOKEN.annotation.__metadata__[0]] = None,
) -> None:
    """Fetch a model and/or an SAE into the Hugging Face cache, for later runs without a network.

    Afterwards the same ids work offline (HF_HUB_OFFLINE=1): gsp harvest --model ID, gsp evaluate --sae PATH.
    """
    from pipeline.models import download_model
    from pipeline.sae_formats import fetch_sae, hub_sae_path

    with cli_errors():
        if not model and not sae:
            raise GspError("nothing to download: pass --model, --sae or both")
        if model:
            console.print(f"model {model}: {download_model(model, revision=revision, token=token)}", highlight=False)
        if sae:
            where = hub_sae_path(sae)
            if where is None:
                raise GspError(f"--sae {sae} is not a Hub path like google/gemma-scope-2-270m-pt/resid_post/"
                               "layer_12_width_16k_l0_medium")  # fmt: skip
            path = fetch_sae(*where, revision=sae_revision, token=token)
            console.print(f"SAE {sae}: {path}", highlight=False)


@app.command()
def info(
    store: Annotated[str, typer.Argument(help="Path or fsspec URL (s3://, gs://, memory://) of a store.")],
    verify: Annotated[bool, typer.Option("--verify", help="Read every written row back and check checksums.")] = False,
) -> None:
    """Print what a store holds: model, hook point, rows, dtype, corpus, statistics."""
    from pipeline.console import progress
    from pipeline.store import ActivationStore
    from pipeline.store.location import size_on_disk

    with cli_errors():
        hooks = ActivationStore.open_some(store)
        s, m = hooks[0], hooks[0].meta
        table = Table(show_header=False)
        size = size_on_disk(s.root)
        rows = {
            "model": f"{m.model.name} ({m.model.revision})",
            "rows written": f"{s.rows_written:,} of {s.n_rows:,} "
            f"({'complete' if s.complete else 'INCOMPLETE: rerun the harvest command to resume'})",
            "contexts": f"{s.rows_written // s.context_size:,} × {s.context_size} tokens (BOS first)",
            "stored dtype": m.dtype,
            "layout": f"chunks of {s.chunk_rows:,} rows, shards of {s.shard_rows:,} rows, crc32c",
            "corpus": ", ".join(f"{k}={v}" for k, v in m.dataset.to_json().items() if v is not None),
            "special ids": f"bos={m.tokenizer.bos_id} eos={m.tokenizer.eos_id} pad={m.tokenizer.pad_id}",
            "computed on": f"{m.compute.device} {m.compute.dtype}",
            "written by": f"gsp {m.gsp_version}, {m.created_at} .. {m.updated_at}",
            "size on disk": f"{size / 2**20:,.1f} MiB ({size / max(s.rows_written, 1):,.0f} bytes/token, "
            f"{len(m.hooks)} hook point{'s' * (len(m.hooks) > 1)})",
        }
        for k, v in rows.items():
            table.add_row(k, str(v))
        console.print(f"[italic]gsp store[/] {escape(store)}", highlight=False, soft_wrap=True)  # not a table title,
        console.print(table)  # which wraps a long path to the table's width
        several = " (each is a store of its own: STORE/NAME)" if len(hooks) > 1 else ""
        console.print(f"[bold]hook points[/]{several}:", highlight=False)
        for h in hooks:
            st = h.hook.stats
            norm = sum(v * v for v in st.mean) ** 0.5
            line = (f"  {h.hook.name}  {h.hook.hook_point}  d_in {h.d_in}  {st.count:,} non-special rows, "
                    f"mean ‖x‖² {st.mean_sq_norm:.4g}, ‖mean‖ {norm:.4g}")  # fmt: skip
            if h.hook.read_gains is not None:
                g = sorted(h.hook.read_gains)
                line += f", read gains {g[0]:.3g}..{g[-1]:.3g} (median {g[len(g) // 2]:.3g})"
            console.print(line, highlight=False, soft_wrap=True)
        if verify:
            with progress("rows") as bar:
                task = bar.add_task("verify", total=s.rows_written * len(hooks))
                for h in hooks:
                    h.verify(lambda n: bar.advance(task, n))
            every = f" at each of {len(hooks)} hook points" if len(hooks) > 1 else ""
            console.print(f"checksums OK: {s.rows_written:,} rows read back{every}")


@app.command()
def export(
    sae: Annotated[
        str, typer.Argument(help="An SAE folder (gsp's, or any format gsp reads), a Hub path, or a transcoder set.")
    ],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="saelens, sparsify (TopK only) or gemma-scope-2 (JumpReLU only); circuit-tracer for a "
            "transcoder set (JumpReLU).",
        ),
    ],
    out: Annotated[str, typer.Option("--out", help="Folder to write into (gsp never writes over a folder).")],
    l0: Annotated[
        float | None,
        typer.Option(
            "--l0",
            help="Gemma Scope 2 folder name: the L0 for its small/medium/big label "
            "(default: the SAE's target L0, or k).",
        ),  # fmt: skip
    ] = None,
    token: Annotated[str | None, TOKEN.annotation.__metadata__[0]] = None,
) -> None:
    """Write an SAE in the on-disk layout SAELens, EleutherAI sparsify or Gemma Scope 2 reads, or a
    transcoder set in the layout circuit-tracer reads.

    Example: gsp export cache/saes/SAE --to saelens --out exported/saelens
    """
    from stages.export import run_export

    with cli_errors():
        run_export(sae, to, out, l0=l0, token=token)


@app.command()
def version() -> None:
    """Print gsp's version."""
    console.print(f"gsp {__version__}")


def main() -> None:
    app()
