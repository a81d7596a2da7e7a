"""Shared fixtures: a tiny random Gemma 3 saved like a Hub model, a synthetic corpus, a CLI runner."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.tiny import make_tiny_model, write_corpus

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-gemma3")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.txt", n_docs=300)


@pytest.fixture
def gsp():
    """Run `gsp ARGS...` in-process; returns the click Result (exit_code, output)."""
    from pipeline.cli import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


def gsp_subprocess(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ARGS...` as a separate process (for kill tests)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def tiny_harvest_args(model: Path, corpus: Path, store: Path, /, **over) -> list[str]:
    """A small harvest over several shards: 32 contexts of 32 tokens, shards of 8 contexts."""
    opts = {
        "model": model,
        "dataset": corpus,
        "layer": 1,
        "tokens": 1024,
        "context-size": 32,
        "batch-size": 3,
        "shard-mib": 8 * 32 * 64 * 4 / 2**20,  # 8 contexts of float32 rows per shard
        "store": store,
        "store-dtype": "float32",
        **over,
    }
    args = ["harvest"]
    for k, v in opts.items():
        args += [f"--{k}", str(v)]
    return args


@pytest.fixture(scope="session")
def tiny_fit(tiny_model, corpus, tmp_path_factory) -> Path:
    """A folder with `store` (the tiny model's layer 1, float32) and `sae` (a small JumpReLU fitted on it)."""
    from pipeline.cli import app

    root = tmp_path_factory.mktemp("fit")
    run = CliRunner()
    r = run.invoke(app, [str(a) for a in tiny_harvest_args(tiny_model, corpus, root / "store")])
    assert r.exit_code == 0, r.output
    r = run.invoke(app, ["fit", "--store", str(root / "store"), "--out", str(root / "sae"), "--width", "96",
                         "--steps", "40", "--batch-size", "128", "--target-l0", "12"])  # fmt: skip
    assert r.exit_code == 0, r.output
    return root
