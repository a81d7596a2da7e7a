"""The life of a fit's output folder: it appears whole or not at all, and gsp never removes what it did
not write.

    <out>.partial/               the work folder: checkpoints/ while training, then the SAE's files
    <out>                        the finished SAE, published by renaming the work folder (one rename)

States of an output, as `gsp fit` finds it:
    "train"   nothing to keep: train from the start (a work folder without checkpoints is cleared)
    "resume"  the work folder holds a checkpoint (--resume continues from it)
    "saved"   the work folder holds the finished SAE, only its rename is missing (a kill in between)
    "done"    the output holds an SAE fitted with the same settings (kept, with --resume)
Anything else in the way (a foreign folder, an SAE with other settings) is a GspError.
"""

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline.console import info
from pipeline.errors import GspError
from pipeline.faults import fault

# what gsp itself writes into a work folder
_OURS = {"checkpoints", "params.safetensors", "params.safetensors.partial", "config.json.partial"}


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def state(out: Path, resume: bool, same_settings: Callable[[], bool]) -> str:
    """The output's state (see the module docstring); `same_settings()` says whether the SAE already at
    `out` was fitted with this fit's settings."""
    work = work_dir(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if (out / "config.json").is_file() and (out / "params.safetensors").is_file():
            if resume and same_settings():
                return "done"
            raise GspError(f"{out} already holds an SAE; choose another --out (or move it away to fit again)")
        raise GspError(f"{out} exists and is not a gsp SAE folder; choose another --out (nothing was changed)")
    if (work / "config.json").is_file() and not (work / "checkpoints").exists():
        return "saved"
    if (work / "checkpoints" / "latest.json").is_file():
        if not resume:
            raise GspError(f"{work} holds an interrupted fit of this output: add --resume to continue it, "
                           "or move it away to start over")  # fmt: skip
        return "resume"
    return "train"


def prepare(states: dict[Path, str], resume: bool) -> dict[Path, str]:
    """Act on the states of a sweep's outputs (one process does this): publish the SAEs only their
    rename was missing, clear work folders with nothing to resume. Returns the outputs still to fit,
    each "train" or "resume"; with --resume, an error when none of them has anything to resume."""
    if resume and "resume" not in states.values():
        out = next(iter(states))
        if "train" in states.values():
            raise GspError(f"no checkpoint in {work_dir(out)} to resume from; run without --resume to start")
        if "saved" not in states.values():
            raise GspError(f"{out} already holds an SAE; choose another --out (or move it away to fit again)")
    for out, s in states.items():
        if s == "saved":
            publish(out)  # killed between the SAE's files and the rename: they are whole
            info(f"finished saving the SAE of an interrupted fit to {out}")
        elif s == "done" and len(states) > 1:
            info(f"{out} already holds this sweep's SAE; kept")
        elif s == "train" and work_dir(out).exists():
            clear_work(work_dir(out))
    return {out: s for out, s in states.items() if s in ("train", "resume")}


def clear_work(work: Path) -> None:
    """A work folder with nothing to resume (a fit stopped before its first checkpoint): gsp's own
    files only are removed; anything else in it is a reason to stop."""
    if not work.is_dir() or any(p.name not in _OURS for p in work.iterdir()):
        raise GspError(f"{work} is in the way of this fit's work folder and holds files gsp did not write; "
                       "move it away")  # fmt: skip
    shutil.rmtree(work)


def publish(out: Path) -> None:
    """The finished work folder appears at `out` in one rename (over an empty folder, if one is there)."""
    os.replace(work_dir(out), out)
    fault("fit-published")


def remove_smoke_output(path: Path, marker: str) -> None:
    """Remove an earlier smoke test's output under cache/smoke, and only if gsp wrote it (its `marker`
    file names gsp)."""
    if not path.exists():
        return
    text = (path / marker).read_text(errors="replace") if (path / marker).is_file() else ""
    if "gsp" not in text:
        raise GspError(f"{path} holds files gsp did not write; move them away to run the smoke test")
    shutil.rmtree(path)
