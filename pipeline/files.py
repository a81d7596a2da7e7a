"""Writing files and folders so that a kill or a full disk never leaves a half-written artifact,
and so that gsp never replaces what it did not write.

- `atomic_write_text` / `save_tensors`: write to `<name>.partial`, then rename over the name.
- `OutputLock`: an exclusive lock file `<output>.lock` beside a store or an SAE folder, so two gsp
  runs never write one output at once.
- A full disk is always an `OSError(ENOSPC)` here (safetensors reports it as its own error type),
  which the stages turn into one line saying what to free and how to resume.
"""

import errno
import fcntl
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file

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
