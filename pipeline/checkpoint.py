"""Checkpoints of a fit: a `TrainState` (pipeline/train.py) written so that a kill at any moment leaves
a whole one, and read back exactly or refused.

    <root>/step-N/state.safetensors   param.<name>, adam.<name>.exp_avg, adam.<name>.exp_avg_sq, since_fired
    <root>/step-N/state.json          step, loader position, Adam's step counts, density, the fit's
                                      settings, and the sha256 of state.safetensors
    <root>/latest.json                the newest folder and the sha256 of its state.json

A new checkpoint goes to a fresh `step-N/`; then `latest.json` is replaced atomically to point at it;
only then are older folders removed. The checksum chain makes a damaged or incomplete checkpoint an
error on resume, never a silently different run. The settings saved beside the state are compared
with the resuming run's: a checkpoint never continues another fit.
"""

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from pipeline.errors import GspError
from pipeline.files import atomic_write_text, is_disk_full, save_tensors
from pipeline.loader import LoaderState
from pipeline.train import TrainState

MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's per-parameter tensors


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _param_names(state: TrainState) -> dict[int, str]:
    """Adam's parameter index (its state_dict's key) -> the SAE's parameter name."""
    by_id = {id(getattr(state.sae, name)): name for name in state.sae.params}
    return {i: by_id[id(p)] for i, p in enumerate(state.opt.param_groups[0]["params"])}


def save(root: Path, state: TrainState, settings: dict) -> None:
    """Write `state` (training-scale weights, Adam, dead-latent counters, position) and the fit's
    `settings` as the newest checkpoint under `root`; a full disk is a GspError, the previous one kept."""
    folder = root / f"step-{state.step}"
    tensors = {f"param.{k}": getattr(state.sae, k).detach().cpu().contiguous() for k in state.sae.params}
    adam_steps = {}
    names = _param_names(state)
    for i, per_param in state.opt.state_dict()["state"].items():
        for moment in MOMENTS:
            tensors[f"adam.{names[i]}.{moment}"] = per_param[moment].cpu().contiguous()
        adam_steps[names[i]] = float(per_param["step"])
    tensors["since_fired"] = state.since_fired_F.cpu().contiguous()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(tensors, folder / "state.safetensors")
        record = {"step": state.step, "loader": dataclasses.asdict(state.loader),
                  "adam_steps": adam_steps, "density": state.density, "config": settings,
                  "state_sha256": _sha256((folder / "state.safetensors").read_bytes())}  # fmt: skip
        text = json.dumps(record, indent=1)
        atomic_write_text(folder / "state.json", text)
        latest = {"folder": folder.name, "json_sha256": _sha256(text.encode())}
        atomic_write_text(root / "latest.json", json.dumps(latest))
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)  # this step's folder only: the previous checkpoint stays
        if not is_disk_full(e):
            raise
        raise GspError(f"disk full while writing the checkpoint at step {state.step:,}: free some space and rerun "
                       f"({resume_hint(root)})") from None  # fmt: skip
    for old in root.glob("step-*"):
        if old != folder:
            shutil.rmtree(old)


def latest_step(root: Path) -> int | None:
    """The step of the newest checkpoint under `root`, or None."""
    try:
        return int(json.loads((root / "latest.json").read_text())["folder"].removeprefix("step-"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume_hint(root: Path) -> str:
    """What --resume would do with the checkpoints under `root`, for error messages."""
    kept = latest_step(root)
    return f"with --resume, it continues from step {kept:,}" if kept else "no checkpoint was kept"


def settings(root: Path) -> dict:
    """The fit settings saved with the newest checkpoint under `root` (its checksums checked)."""
    return _read(root)[0]["config"]


def load(root: Path, state: TrainState, compare: Callable[[dict], list[str]]) -> None:
    """Fill `state` from the newest checkpoint under `root`, after checking its checksums and that
    `compare(saved settings)` finds no difference from the resuming fit's settings."""
    record, tensors = _read(root, with_tensors=True)
    diffs = compare(record["config"])
    if diffs:
        raise GspError(f"the checkpoint in {root} was trained with other parameters ({'; '.join(diffs)})")
    try:
        _restore(state, tensors, record)
    except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as e:
        raise _damaged(root, f"incomplete state: {type(e).__name__}: {e}") from None


def _damaged(root: Path, why: str) -> GspError:
    return GspError(f"the checkpoint in {root} is damaged ({why}); it cannot be resumed: move "
                    f"{root.parent} away and fit again")  # fmt: skip


def _read(root: Path, with_tensors: bool = False) -> tuple[dict, dict | None]:
    """(state.json's record, the tensors or None), every checksum of the chain checked."""
    try:
        latest = json.loads((root / "latest.json").read_text())
        path = root / latest["folder"]
        text = (path / "state.json").read_text()
        if _sha256(text.encode()) != latest["json_sha256"]:
            raise _damaged(root, "state.json does not match its checksum")
        record = json.loads(text)
        if not isinstance(record.get("config"), dict):
            raise _damaged(root, "state.json holds no settings")
        if not with_tensors:
            return record, None
        data = (path / "state.safetensors").read_bytes()
        if _sha256(data) != record["state_sha256"]:
            raise _damaged(root, "state.safetensors does not match its checksum")
        return record, load_safetensors_bytes(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
            SafetensorError) as e:  # fmt: skip
        raise _damaged(root, f"{type(e).__name__}: {e}") from None


def _restore(state: TrainState, tensors: dict, record: dict) -> None:
    with torch.no_grad():
        for k in state.sae.params:
            getattr(state.sae, k).copy_(tensors[f"param.{k}"])
        state.since_fired_F.copy_(tensors["since_fired"])
    # through Adam's own load_state_dict, which puts each tensor (its step counter included) on the
    # device and in the dtype this optimiser keeps it
    saved = state.opt.state_dict()
    names = _param_names(state)
    per_param = {}
    for i, name in names.items():
        if name in record["adam_steps"]:
            per_param[i] = {"step": torch.tensor(record["adam_steps"][name], dtype=torch.float32),
                            **{m: tensors[f"adam.{name}.{m}"] for m in MOMENTS}}  # fmt: skip
    state.opt.load_state_dict({"state": per_param, "param_groups": saved["param_groups"]})
    state.step, state.density = record["step"], record["density"]
    state.loader = LoaderState.from_json(record["loader"])
