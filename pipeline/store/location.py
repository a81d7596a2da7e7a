"""Where a store lives: a local folder, or an fsspec URL (s3://, gs://, memory://) that zarr writes through.

Every way of reaching a store goes through here, so a wrong path, an unknown URL scheme or a
missing filesystem package is one clear error, never a traceback from fsspec or zarr.
"""

import json
from pathlib import Path

import zarr
from zarr.errors import GroupNotFoundError

from pipeline.errors import GspError

_EXTRAS = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}  # URL scheme -> pip extra that installs its filesystem


def is_url(path: str | Path) -> bool:
    """A store on an fsspec filesystem (s3://, gs://, memory://, ...); file:// URLs are local paths."""
    return "://" in str(path) and not str(path).startswith("file://")


def local(path: str | Path) -> str:
    """A local store path as a plain path (file:// stripped)."""
    return str(path).removeprefix("file://")


def zarr_path(path: str | Path) -> str:
    """What zarr.open_group takes for this location."""
    return str(path) if is_url(path) else local(path)


def filesystem(url: str):
    """(fsspec filesystem, path within it) of a URL, or a GspError naming what to install."""
    import fsspec

    scheme = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        extra = _EXTRAS.get(scheme)
        how = f'pip install -e ".[{extra}]"' if extra else f"install the fsspec filesystem for {scheme}://"
        raise GspError(f"stores on {scheme}:// need a filesystem package that is not installed: {how}") from None
    except ValueError as e:
        raise GspError(f"unknown storage URL scheme '{scheme}://' in {url} ({e}); use a local path, "
                       "s3://, gs:// or memory://") from None  # fmt: skip


def path_state(path: str | Path) -> str:
    """What is at a store path: "missing", "empty" (an empty folder), "file", "zarr" or "other"."""
    if is_url(path):
        fs, p = filesystem(str(path))
        if not fs.exists(p):
            return "missing"
        if fs.isfile(p):
            return "file"
        return "zarr" if fs.exists(f"{p.rstrip('/')}/zarr.json") else ("other" if fs.ls(p) else "empty")
    p = Path(local(path))
    if not p.exists():
        return "missing"
    if not p.is_dir():
        return "file"
    return "zarr" if (p / "zarr.json").is_file() else ("other" if any(p.iterdir()) else "empty")


def entries(path: str | Path) -> list[str]:
    """The names directly under a store path (files and folders)."""
    if is_url(path):
        fs, p = filesystem(str(path))
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(p, detail=False)]
    return [p.name for p in Path(local(path)).iterdir()]


def open_group(path: str | Path, mode: str) -> zarr.Group:
    """The Zarr v3 group at `path`; a missing or unreadable group is a GspError naming the path."""
    if is_url(path):
        filesystem(str(path))  # a clear error for an unknown scheme or a missing package
    try:
        return zarr.open_group(zarr_path(path), mode=mode, zarr_format=3)
    except (FileNotFoundError, GroupNotFoundError):
        raise GspError(f"no store at {path}: check the path, or write one with `gsp harvest --store {path}`") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise GspError(
            f"{path} is not a readable Zarr v3 group ({type(e).__name__}: {e}); was it copied whole?"
        ) from None


def size_on_disk(path: str | Path) -> int:
    """Bytes of every file under the store."""
    if is_url(path):
        fs, p = filesystem(str(path))
        return fs.du(p)
    return sum(f.stat().st_size for f in Path(local(path)).rglob("*") if f.is_file())
