"""Writing files and folders so that a kill or a full disk never leaves a half-written artifact,
and so that gsp never replaces what it did not write.

- `atomic_write_text` / `save_tensors` / `atomic_path`: write to `<name>.partial`, then rename over the name.
- `OutputLock`: an exclusive lock file `<output>.lock` beside a store or an SAE folder, so two gsp
  runs never write one output at once.
- `read_safetensors`, `read_json`, `check_tensors`: read a downloaded or user-given file safely (no
  pickles) and check its tensors, every problem one GspError naming the file.
- A full disk is always an `OSError(ENOSPC)` here (safetensors reports it as its own error type),
  which the stages turn into one line saying what to free and how to resume.
"""

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import GspError


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return "No space left" in text or "StorageFull" in text or "code: 28" in text


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def save_tensors(tensors: dict, path: Path) -> None:
    """safetensors, written whole or not at all; a full disk raises OSError(ENOSPC)."""
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, tmp)
        os.chmod(tmp, 0o644)  # safetensors creates its files owner-only; an SAE is meant to be shared
        os.replace(tmp, path)
    except (SafetensorError, OSError) as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
        if isinstance(e, OSError):
            raise
        raise OSError(errno.EIO, f"could not write {path}: {e}", str(path)) from None


class OutputLock:
    """An exclusive lock on `<output>.lock`, beside a local output: one gsp run writes an output at a time.

    The lock file stays: unlinking it would let a third run lock a fresh file while a second still
    holds the old one. Object stores (s3://, gs://) offer no such lock: pass path None there.
    """

    def __init__(self, path: str | Path | None, what: str):
        self.lock_path = None if path is None else Path(f"{str(path).rstrip('/')}.lock")
        self.what = what

    def __enter__(self):
        if self.lock_path is None:
            return self
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise GspError(f"cannot write at {self.lock_path.parent}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise GspError(f"another {self.what} is writing {self.lock_path.with_suffix('')}; wait for it "
                           "to finish, or choose another output") from None  # fmt: skip
        return self

    def __exit__(self, *exc):
        if self.lock_path is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


# ------------------------------------------------------------------------------ reading files safely
def check_tensors(params: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], file) -> None:
    missing = [k for k in shapes if k not in params]
    if missing:
        raise GspError(f"{file} lacks {', '.join(missing)} (it has {', '.join(sorted(params)) or 'nothing'})")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise GspError(f"{file}: {name} has shape {tuple(params[name].shape)}, expected {shape}")
        if not torch.isfinite(params[name]).all():
            raise GspError(f"{file}: {name} holds NaN or infinite values: the file is damaged, fetch it again")


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Float tensors from a safetensors file (never a pickle), as float32."""
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise GspError(f"{file} is not a readable safetensors file ({first_line(e)}): fetch it again") from None
    bad = [k for k, v in tensors.items() if not v.is_floating_point()]
    if bad:
        raise GspError(f"{file}: {', '.join(bad)} are not floating-point tensors")
    return {k: v.float() for k, v in tensors.items()}


def read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GspError(f"{file} is not valid JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise GspError(f"{file} should hold a JSON object, not {type(data).__name__}")
    return data


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` (`<name>.partial`) for a writer that wants a path (a plot's
    savefig): renamed over `path` when the block ends, removed when it fails, so a full disk never
    leaves a truncated file under the real name."""
    tmp = path.with_name(path.name + ".partial")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
