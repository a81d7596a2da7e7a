"""The `gsp` command's last line of defence: every failure is one line and an exit code, never a
traceback (pipeline/console.py's cli_errors), and `gsp info` on stores that are damaged or out of reach."""

import errno
import json

import numpy as np
import pytest
import torch
from conftest import one_line_error
from typer.testing import CliRunner

import stages.cli
from pipeline.store import ActivationStore
from pipeline.tiny import SYNTHETIC_HOOK as H


def _raise(error: BaseException):
    def entry(*args, **kwargs):
        raise error

    return entry


# every kind of CLI command: a config-built stage (fit, evaluate), the main job (run), a plain command (info)
COMMANDS = [
    ("run_sweep", ["fit", "--store", "/no/store"]),
    ("run_evaluate", ["evaluate", "--sae", "/no/sae"]),
    ("run_all", ["run"]),
    ("info", ["info", "/no/store"]),
]


def _patch(monkeypatch, entry: str, error: BaseException) -> None:
    """Make the function that the command calls raise `error`."""
    if entry == "info":
        monkeypatch.setattr(ActivationStore, "open_some", _raise(error))
    else:
        monkeypatch.setattr(stages.cli, entry, _raise(error))


@pytest.mark.parametrize(("entry", "args"), COMMANDS)
def test_an_unexpected_error_is_one_line_that_says_it_is_a_bug(gsp, monkeypatch, entry, args):
    monkeypatch.delenv("GSP_DEBUG", raising=False)
    _patch(monkeypatch, entry, RuntimeError("boom [at step 3]\nsecond line of the message"))
    line = one_line_error(gsp(*args), "internal error", "RuntimeError", "boom [at step 3]", "bug in gsp", "GSP_DEBUG=1")
    assert "second line" not in line


@pytest.mark.parametrize(("entry", "args"), COMMANDS)
def test_with_gsp_debug_the_error_propagates(monkeypatch, entry, args):
    monkeypatch.setenv("GSP_DEBUG", "1")
    _patch(monkeypatch, entry, RuntimeError("boom"))
    r = CliRunner().invoke(stages.cli.app, args, catch_exceptions=True)
    assert isinstance(r.exception, RuntimeError) and str(r.exception) == "boom"
    assert r.exit_code == 1 and "internal error" not in r.output


@pytest.mark.parametrize(("entry", "args"), COMMANDS)
def test_ctrl_c_exits_130_saying_how_to_resume(gsp, monkeypatch, entry, args):
    _patch(monkeypatch, entry, KeyboardInterrupt())
    r = gsp(*args)
    assert r.exit_code == 130 and "Traceback" not in r.output
    assert "interrupted" in r.output and "rerun the same command" in r.output


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), ["disk full", "rerun the same command"]),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), ["disk full"]),
        (MemoryError(), ["out of memory", "--batch-size"]),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"), ["out of memory"]),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), ["out of GPU memory"]),
        (PermissionError(errno.EACCES, "Permission denied", "/data/store"), ["Permission denied", "/data/store"]),
    ],
)
def test_resource_errors_say_what_to_do(gsp, monkeypatch, error, words):
    monkeypatch.setenv("GSP_DEBUG", "1")  # these are not gsp's bugs: one line even when debugging
    _patch(monkeypatch, "run_evaluate", error)
    line = one_line_error(gsp("evaluate", "--sae", "/no/sae"), *words)
    assert "internal error" not in line


# ------------------------------------------------------------------------------ gsp info
@pytest.fixture
def store(tmp_path):
    """A fresh synthetic store of 2048 rows (4 shards of 512) in tmp_path, to damage."""
    from pipeline.tiny import write_synthetic_store

    x = np.random.default_rng(0).standard_normal((2048, 8)).astype(np.float32)
    write_synthetic_store(tmp_path / "store", x)
    return tmp_path / "store"


def _files(path) -> dict:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_info_on_a_sound_store(gsp, store):
    r = gsp("info", store, "--verify")
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "synthetic" in out and "2,048 of 2,048 (complete)" in out and "checksums OK: 2,048 rows read back" in out


def _edit_attributes(store, change) -> None:
    path = store / "zarr.json"
    doc = json.loads(path.read_text())
    change(doc["attributes"])
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (
            lambda s: _edit_attributes(s, lambda a: a["hooks"][0].pop("stats")),
            ["'hooks[0].stats'", "is missing", "harvest"],
        ),
        (lambda s: _edit_attributes(s, lambda a: a.update(rows_written="12")), ["'rows_written'", "should be int"]),
        (
            lambda s: (s / H / "activations" / "zarr.json").write_text("{ half written"),
            [f"{H}/activations/zarr.json", "damaged"],
        ),
        (lambda s: (s / "zarr.json").write_bytes(b"\xff\xfe not json"), ["not a readable Zarr"]),
    ],
)
@pytest.mark.parametrize("verify", [False, True])
def test_info_on_damaged_attributes_is_one_line(gsp, store, damage, words, verify):
    damage(store)
    before = _files(store)
    r = gsp("info", store, *(["--verify"] if verify else []))
    one_line_error(r, str(store), *words)
    assert _files(store) == before  # nothing written


def test_info_verify_names_a_shard_truncated_to_zero_bytes(gsp, store):
    shard = store / H / "activations" / "c" / "1" / "0"
    assert shard.stat().st_size > 0
    shard.write_bytes(b"")
    before = _files(store)
    one_line_error(gsp("info", store, "--verify"), f"{H}/activations/c/1/0", "rows 512..1023", "empty (0 bytes)")
    assert _files(store) == before


def test_info_verify_names_a_shard_whose_bytes_changed(gsp, store, tmp_path):
    """A flipped byte inside a chunk: the plain view still opens, --verify names the shard file."""
    shard = store / H / "activations" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert gsp("info", store).exit_code == 0
    one_line_error(gsp("info", store, "--verify"), "checksum", f"{H}/activations/c/2")


def test_info_on_an_unknown_url_scheme_names_it(gsp):
    one_line_error(gsp("info", "nosuchscheme://x/y"), "unknown storage URL scheme", "'nosuchscheme://'")


def test_info_on_s3_without_s3fs_says_what_to_install(gsp):
    try:
        import s3fs  # noqa: F401

        pytest.skip("s3fs is installed here: the missing-package message cannot be shown")
    except ImportError:
        pass
    one_line_error(gsp("info", "s3://bucket/x"), "s3://", 'pip install -e ".[s3]"')
