"""The `gsp` command: thin commands that build a stage's config and call the stage."""

import dataclasses
import inspect
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipeline import __version__
from pipeline.config import command_from_config
from pipeline.console import cli_errors, console
from pipeline.paths import cache_dir
from stages.fit import FitConfig, run_fit
from stages.harvest import HarvestConfig, run_harvest

app = typer.Typer(
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
SMOKE = _flag("smoke-test", bool, False, "Run on a tiny random Gemma 3 and a synthetic corpus, in seconds.")


def harvest(cfg: HarvestConfig, *, token: str | None, overwrite: bool, smoke_test: bool) -> None:
    """Run the model up to --layer/--site and write activations + token ids into a Zarr store.

    Resumable: rerun the same command after a crash and it continues where it stopped.
    """
    if smoke_test:
        cfg, overwrite = _smoke_harvest_config(cfg), True
    run_harvest(cfg, token=token, overwrite=overwrite)


def _smoke_harvest_config(cfg: HarvestConfig) -> HarvestConfig:
    from pipeline.tiny import make_tiny_model, write_corpus

    root = cache_dir() / "smoke"
    model = root / "tiny-gemma3"
    if not (model / "config.json").is_file():
        make_tiny_model(model)
    corpus = write_corpus(root / "corpus.txt")
    return dataclasses.replace(
        cfg,
        model=str(model),
        dataset=str(corpus),
        layer=1,
        tokens=8192,
        context_size=64,
        batch_size=16,
        shard_mib=0.25,
        store=cfg.store or str(cache_dir() / "stores" / "smoke"),
    )


command_from_config(app, HarvestConfig, harvest, name="harvest", extra=[TOKEN, OVERWRITE, SMOKE])


RESUME = _flag("resume", bool, False, "Continue from the checkpoint in --out (same parameters).")


def fit(cfg: FitConfig, *, resume: bool, smoke_test: bool) -> None:
    """Train a JumpReLU or TopK SAE from a store (the language model is never loaded).

    Writes params.safetensors + config.json in Gemma Scope 2's format, input scale folded in.
    """
    if smoke_test:
        cfg = _smoke_fit_config(cfg)
    run_fit(cfg, resume=resume)


def _smoke_fit_config(cfg: FitConfig) -> FitConfig:
    import shutil

    import numpy as np

    from pipeline.tiny import write_synthetic_store

    root = cache_dir() / "smoke"
    shutil.rmtree(root / "fit-store", ignore_errors=True)
    x = np.random.default_rng(0).standard_normal((8192, 32)).astype(np.float32) * 50
    write_synthetic_store(root / "fit-store", x)
    out = Path(cfg.out) if cfg.out else root / "fit-sae"
    shutil.rmtree(out, ignore_errors=True)
    return dataclasses.replace(
        cfg, store=str(root / "fit-store"), out=str(out), width=128, k=min(cfg.k, 16), steps=40, batch_size=256
    )


command_from_config(app, FitConfig, fit, name="fit", extra=[RESUME, SMOKE])


@app.command()
def info(
    store: Annotated[Path, typer.Argument(help="Path of a store written by gsp harvest.")],
    verify: Annotated[bool, typer.Option("--verify", help="Read every written row back and check checksums.")] = False,
) -> None:
    """Print what a store holds: model, hook point, rows, dtype, corpus, statistics."""
    from pipeline.store import ActivationStore

    with cli_errors():
        s = ActivationStore.open(store)
        a = s.attrs
        stats = a["stats"]
        table = Table(title=f"gsp store {store}", show_header=False, title_justify="left")
        rows = {
            "model": f"{a['model']['name']} ({a['model']['revision']})",
            "hook point": f"{a['hook_point']}  (layer {a['layer']}, {a['site']})",
            "d_in": a["d_in"],
            "rows written": f"{s.rows_written:,} of {s.activations.shape[0]:,} "
            f"({'complete' if s.complete else 'INCOMPLETE: rerun the harvest command to resume'})",
            "contexts": f"{s.rows_written // s.context_size:,} × {s.context_size} tokens (BOS first)",
            "stored dtype": f"{a['dtype']} ({a['storage']})",
            "layout": f"chunks of {s.chunk_rows:,} rows, shards of {s.shard_rows:,} rows, crc32c",
            "corpus": ", ".join(f"{k}={v}" for k, v in a["dataset"].items() if v is not None),
            "special ids": " ".join(f"{k}={a['tokenizer'][f'{k}_id']}" for k in ("bos", "eos", "pad")),
            "statistics": f"{stats['count']:,} non-special rows, mean ‖x‖² {stats['mean_sq_norm']:.4g}, "
            f"‖mean‖ {sum(m * m for m in stats['mean']) ** 0.5:.4g}",
            "computed on": f"{a['compute']['device']} {a['compute']['dtype']}",
            "written by": f"gsp {a['gsp_version']}, {a['created_at']} .. {a['updated_at']}",
        }
        size = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())
        rows["size on disk"] = f"{size / 2**20:,.1f} MiB ({size / max(s.rows_written, 1):,.0f} bytes/token)"
        for k, v in rows.items():
            table.add_row(k, str(v))
        console.print(table)
        if verify:
            _verify(s)


def _verify(store) -> None:
    from pipeline.console import progress

    with progress("rows") as bar:
        task = bar.add_task("verify", total=store.rows_written)
        for start in range(0, store.rows_written, store.shard_rows):
            stop = min(start + store.shard_rows, store.rows_written)
            store.read(start, stop)
            store.read_tokens(start, stop)
            bar.advance(task, stop - start)
    console.print(f"checksums OK: {store.rows_written:,} rows read back")


@app.command()
def version() -> None:
    """Print gsp's version."""
    console.print(f"gsp {__version__}")


def main() -> None:
    app()
