"""Shared fixtures: a tiny random Gemma 3 saved like a Hub model, a synthetic corpus, a CLI runner."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
    from stages.cli import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


def gsp_subprocess(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m stages ARGS...` (the gsp command) as a separate process (for kill tests)."""
    return subprocess.run(
        [sys.executable, "-m", "stages", *map(str, args)],
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
    from stages.cli import app

    root = tmp_path_factory.mktemp("fit")
    run = CliRunner()
    r = run.invoke(app, [str(a) for a in tiny_harvest_args(tiny_model, corpus, root / "store")])
    assert r.exit_code == 0, r.output
    r = run.invoke(app, ["fit", "--store", str(root / "store"), "--out", str(root / "sae"), "--width", "96",
                         "--steps", "40", "--batch-size", "128", "--target-l0", "12"])  # fmt: skip
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture(scope="session")
def transcoder(tiny_model, corpus, tmp_path_factory):
    """A store of layer 1's MLP input and output (one harvest), and a skip transcoder fitted on it."""
    from stages.cli import app

    root = tmp_path_factory.mktemp("transcoder")
    run = CliRunner()
    args = tiny_harvest_args(tiny_model, corpus, root / "store", site="mlp_in,mlp_out")
    r = run.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    r = run.invoke(app, ["fit", "--store", str(root / "store" / "L1.mlp_in"), "--target-store",
                         str(root / "store" / "L1.mlp_out"), "--skip", "--out", str(root / "t"), "--width", "96",
                         "--steps", "60", "--batch-size", "128", "--target-l0", "12"])  # fmt: skip
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture(scope="session")
def every_mlp(tiny_model, corpus, tmp_path_factory):
    """A folder with `store`: every layer's MLP input and output of the tiny Gemma 3 (one harvest)."""
    from stages.cli import app

    root = tmp_path_factory.mktemp("every_mlp")
    args = tiny_harvest_args(tiny_model, corpus, root / "store", layer="all", site="mlp_in,mlp_out")
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return root


def error_line(output: str, *words: str) -> str:
    """The one `error:` line of a failed command, which holds `words`, with no traceback anywhere."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert all(w in errors[0] for w in words), (words, errors[0])
    return errors[0]


def one_line_error(r, *words: str) -> str:
    """A bad input through the CLI: exit 1 and one `error:` line, the last thing printed, holding `words`."""
    assert r.exit_code == 1, r.output
    line = error_line(r.output, *words)
    assert [x for x in r.output.splitlines() if x.strip()][-1] == line, r.output
    return line


def direct_site(model, ids, layer, site):
    """Independent reference for a hook point: a full forward pass (LM head included) with a hook
    written here, not gsp's."""
    block = model.model.layers[layer]
    got = {}
    if site == "resid_post":
        h = block.register_forward_hook(lambda m, a, o: got.setdefault("x", o[0] if isinstance(o, tuple) else o))
    elif site == "mlp_out":
        h = block.post_feedforward_layernorm.register_forward_hook(lambda m, a, o: got.setdefault("x", o))
    elif site == "mlp_in":
        h = block.mlp.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))  # what the MLP reads
    else:
        h = block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(ids))
    h.remove()
    return got["x"]


class SmallDisk:
    """A real filesystem of a few hundred KiB (tmpfs), so that writes past it fail with ENOSPC as on a
    full disk; `resize` frees space, as a user would."""

    def __init__(self, path: Path):
        self.path = path

    def resize(self, kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(self.path)], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(kib)` mounts a tmpfs of that size (needs root, as in CI; skipped elsewhere)."""
    mounted = []

    def make(kib: int) -> SmallDisk:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()}); run as root")
        mounted.append(path)
        return SmallDisk(path)

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


def headless_chromium() -> list[str]:
    """The command line of a headless Chromium for the page tests; skips without one (fails instead
    where GSP_REQUIRE_BROWSER is set, as in CI)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("GSP_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (GSP_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1300,900",
            "--virtual-time-budget=5000"]  # fmt: skip


def ce_with_mlps_replaced(lm, ids: torch.Tensor, special: torch.Tensor, layers, predict) -> float:
    """The model's mean cross-entropy over the predictions between ordinary tokens of `ids` (B, S), run
    with the MLP outputs of `layers` replaced by `predict(layer, seen)` (seen: the MLP inputs met so
    far in the pass, by layer; special (B, S, 1) positions keep their own output): an independent
    delta-loss rerun, with hooks written here."""
    seen, handles = {}, []
    for layer, block in enumerate(lm.model.layers):
        handles.append(block.mlp.register_forward_pre_hook(lambda m, a, i=layer: seen.update({i: a[0]})))
        if layer in layers:

            def replace(m, a, out, i=layer):
                return torch.where(special, out, predict(i, seen).to(out.dtype).view(out.shape))

            handles.append(block.post_feedforward_layernorm.register_forward_hook(replace))
    try:
        with torch.no_grad():
            logits = lm(input_ids=ids).logits[:, :-1]
    finally:
        for h in handles:
            h.remove()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    counted = ~special[:, :-1, 0] & ~special[:, 1:, 0]
    return ce[counted].double().mean().item()
