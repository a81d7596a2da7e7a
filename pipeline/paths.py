"""Where gsp keeps things: the cache folder (stores, cached models) and the named configs."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """`$GSP_CACHE` if set, else `./cache` in the working directory (the repo's git-ignored cache/)."""
    return Path(os.environ.get("GSP_CACHE", "cache")).expanduser()


def configs_dir() -> Path:
    """The repo's `configs/` folder (named configs and per-model presets)."""
    return PROJECT_ROOT / "configs"
