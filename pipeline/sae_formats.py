"""Pretrained and foreign SAE files, local or from the Hub, read into gsp's one `SAE` class (raw activations).

The format is told by the folder's files, never by its name: `FORMATS` (below the readers) is the one
table of each format's identifying files (all present), the files it may also read, and its reader;
a Hub fetch downloads exactly the files the table names. The formats:

- **gsp** and **Gemma Scope 2** (`google/gemma-scope-2-*`): `config.json` + `params.safetensors` (gsp's own
  config also holds "gsp_version"). Keys w_enc (D, F), b_enc (F,), w_dec (F, D), b_dec (D,), threshold (F,)
  (threshold optional for topk). config "architecture": "jump_relu" (the default) or "topk" with "k".
      pre = x @ w_enc + b_enc;  f = ReLU(pre)·1[pre > threshold]  (topk: the k largest of ReLU(pre))
      x̂ = f @ w_dec + b_dec
  Layer and site come from "hf_hook_point_in" (`model.layers.L.output` → resid_post,
  `….post_feedforward_layernorm.output` → mlp_out, `….self_attn.o_proj.input` → attn_out,
  `….pre_feedforward_layernorm.output` → mlp_in), else from gsp's "layer"/"site", else from the path
  (`<site>[_all]/layer_L_width_…`). Transcoders (`type` "transcoder", plain or with an
  affine_skip_connection; `transcoder[_all]/layer_L_…`) read mlp_in and predict "hf_hook_point_out"
  (mlp_out). Cross-layer transcoders: pipeline/clt.py.
- **Gemma Scope 1** (`google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att}`): `params.npz`, keys W_enc (D, F),
  W_dec (F, D), b_enc, b_dec, threshold; the same JumpReLU inference. No config: the layer comes from a
  `layer_L` path part, the site and model from the repo name in the path (res/mlp/att → resid_post/mlp_out/attn_out;
  att SAEs read the concatenated heads, o_proj's input, which is gsp's attn_out). The SAEs of the token
  embeddings (`embedding/`, no layer) are refused: gsp has no hook site before the first block.
- **Llama Scope** (OpenMOSS lm-saes): `hyperparams.json` + `checkpoints/final.safetensors` with encoder.weight E
  (F, D), encoder.bias b_E, decoder.weight Dw (D, F), decoder.bias b_D. lm-saes inference, with
  s_in = √D / norm_in, s_out = √D / norm_out ("dataset-wise"; both 1 for "inference") and m_i = ‖Dw[:, i]‖
  when sparsity_include_decoder_norm (default true), else 1:
      pre = (x·s_in) @ Eᵀ + b_E;  g = pre·m;  f = pre·1[g > θ]  (topk: pre at the top_k largest g, ReLU'd)
      x̂ = (f @ Dwᵀ + b_D) / s_out
  folded exactly into gsp's layout (same x̂, same active set; features in raw units, unit-norm decoder rows):
      w_enc = s_in·Eᵀ·m/s_out,  b_enc = b_E·m/s_out,  threshold = θ/s_out,  w_dec = (Dw/m)ᵀ,  b_dec = b_D/s_out
  since then x@w_enc + b_enc = g/s_out, which crosses θ/s_out exactly when g crosses θ, and
  (g/s_out)·(Dw_i/m_i) = pre·Dw_i/s_out.
- **SAELens 6** (`cfg.json` + `sae_weights.safetensors`, jumprelu or topk, no activation normalisation) and
  **EleutherAI sparsify** (`cfg.json` + `sae.safetensors`, topk): both subtract b_dec from the input before
  the encoder (SAELens where apply_b_dec_to_input, its default); that is folded into b_enc. What `gsp
  export` writes (pipeline/export.py) reads back here.
Pickles are never read: npz with allow_pickle=False, everything else safetensors or JSON.
"""

import math
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import numpy as np
import torch

from pipeline import clt
from pipeline.console import warn
from pipeline.errors import GspError
from pipeline.files import check_tensors, first_line, read_json, read_safetensors
from pipeline.hooks import POINT_SUFFIX, SITES
from pipeline.models import hf_token, hub_errors, looks_local
from pipeline.sae import SAE
from pipeline.transcoder_set import INDEX as SET_INDEX

_HF_SITE = {suffix: site for site, suffix in POINT_SUFFIX.items()}  # "post_feedforward_layernorm.output" -> mlp_out
_HF_HOOK = re.compile(r"(?:[\w.]*\.)?layers\.(\d+)\.(" + "|".join(map(re.escape, _HF_SITE)) + ")")
_GS1_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)\b")
_GS1_SITE = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_out"}


@dataclass
class LoadedSAE:
    sae: SAE  # float32, CPU, eval mode, requires_grad False; takes raw activations
    source: str  # what the user passed (--sae)
    path: Path  # the local folder it was read from
    format: str  # "gsp" | "gemma-scope-2" | "gemma-scope" | "llama-scope" | "saelens" | "sparsify"
    model_name: str | None  # the model the SAE was trained on, as its files name it
    layer: int | None
    site: str | None  # one of pipeline.hooks.SITES, or None when the files don't say
    config: dict  # the SAE's own config file contents (empty for Gemma Scope 1)
    training_store: str | None = None  # the store a gsp fit SAE was trained on, as its config recorded it
    # a transcoder reads (layer, site) and predicts (layer_out, site_out); an SAE: the same point
    layer_out: int | None = None
    site_out: str | None = None
    training_target: str | None = None  # the store a gsp fit transcoder predicted

    def __post_init__(self):
        if self.layer_out is None and self.site_out is None:
            self.layer_out, self.site_out = self.layer, self.site

    @property
    def is_transcoder(self) -> bool:
        return self.sae.is_transcoder or (self.layer_out, self.site_out) != (self.layer, self.site)


@dataclass(frozen=True)
class Format:
    """One row of `FORMATS`: a folder holding every file of `files` (glob patterns relative to it) is
    read by `read`; `also` names the files the reader uses when they are there (a Hub fetch gets them too)."""

    name: str  # who publishes it, as the messages say it
    files: tuple[str, ...]
    read: Callable[[Path], LoadedSAE]
    also: tuple[str, ...] = ()

    def found_in(self, folder: Path) -> bool:
        return all(_has(folder, pattern) for pattern in self.files)


def sae_folder(spec: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """The local folder of an SAE: `spec` itself (or the folder of a file in it), or a Hub path's
    files fetched into the Hub cache."""
    path = Path(spec).expanduser()
    if not path.exists():
        hub = hub_sae_path(spec)
        if hub is None:
            first = spec.split("/")[0]
            why = f" (read as a local path: {first}/ is a folder here)" if "/" in spec and Path(first).is_dir() else ""
            raise GspError(f"no SAE at '{spec}'{why}: give an SAE folder that exists, or a Hub path "
                           "owner/repo/sub/folder")  # fmt: skip
        path = fetch_sae(*hub, revision=revision, token=token)
    return path.parent if path.is_file() else path


def sae_sources(specs: list[str]) -> list[str]:
    """The SAEs named by `specs`, a local folder of SAE folders (a sweep's --out, a release's
    resid_post/) standing for each SAE folder in it, in name order; a transcoder set's folder for itself."""
    out = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir() and not _has_sae_files(path):  # (a transcoder set's folder has its index)
            inside = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.endswith(".partial")
                            and _has_sae_files(p))  # fmt: skip
            if inside:
                out += [str(p) for p in inside]
                continue
        out.append(spec)
    return list(dict.fromkeys(out))


def load_sae(spec: str, *, revision: str | None = None, token: str | None = None) -> LoadedSAE:
    """An SAE from a local folder (or a file in it) or a Hub path `owner/repo/sub/folder`, read by the
    first format in `FORMATS` whose files the folder holds."""
    path = sae_folder(spec, revision=revision, token=token)
    fmt = next((f for f in FORMATS if f.found_in(path)), None)
    if fmt is None:
        has = sorted(p.relative_to(path).as_posix() for pattern in SAE_FILES for p in path.glob(pattern) if p.is_file())
        found = f"; it has only {', '.join(has)}" if has else ""
        raise GspError(f"{path} holds no SAE gsp can read: expected {expected()}{found}")
    loaded = fmt.read(path)
    loaded.source = spec
    return loaded


def hub_sae_path(spec: str) -> tuple[str, str] | None:
    """(repo_id, subfolder) for `owner/repo/sub/folder` that is not a local path (pipeline.models'
    `looks_local`: a missing `runs/sae/x` beside a `runs/` folder is a local path, not a Hub one), else None."""
    if spec.startswith(".") or looks_local(spec) or Path(spec).expanduser().exists():
        return None
    parts = spec.strip("/").split("/")
    if len(parts) < 3 or any(p in ("", ".", "..") for p in parts):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def fetch_sae(
    repo_id: str,
    subfolder: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    local_dir: str | Path | None = None,
) -> Path:
    """Download (or find in the Hub cache) only that one SAE's files; the local folder holding them."""
    with hub_errors(repo_id, subfolder, revision, token):
        root = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            token=hf_token(token),
            allow_patterns=[f"{subfolder}/{pattern}" for pattern in SAE_FILES],
            local_dir=local_dir,
        )
    folder = Path(root) / subfolder
    if not _has_sae_files(folder):
        raise GspError(f"Hub repository {repo_id} has no SAE under '{subfolder}' (expected {expected()})")
    return folder


def check_against_store(loaded: LoadedSAE, store, target=None) -> tuple[int, str]:
    """The SAE must read what the store holds: same d_in, layer and site (when the SAE says); a
    transcoder's `target` must hold what it predicts.

    Returns the store's (layer, site); warns when the SAE names no site or another model."""
    if target is not None:
        t = target.hook
        if loaded.sae.d_out != t.d_in or (loaded.layer_out, loaded.site_out) not in ((t.layer, t.site), (None, None)):
            raise GspError(f"the transcoder predicts layer {loaded.layer_out} {loaded.site_out} (width "
                           f"{loaded.sae.d_out}) but the target store {target.path} holds layer {t.layer} {t.site} "
                           f"(width {t.d_in})")  # fmt: skip
    m = store.hook
    if loaded.sae.d_in != m.d_in:
        raise GspError(
            f"the SAE takes d_in={loaded.sae.d_in} but store {store.path} holds d_in={m.d_in} "
            f"({m.hook_point}); pick the store harvested at the SAE's hook point"
        )
    for what, mine, theirs in (("layer", loaded.layer, m.layer), ("site", loaded.site, m.site)):
        if mine is not None and mine != theirs:
            raise GspError(
                f"the SAE was trained at {what} {mine} but store {store.path} holds {what} {theirs}; "
                f"harvest a store with --{what} {mine}"
            )
    if loaded.site is None:
        warn(f"the SAE's files do not name its site; assuming the store's ({m.site})")
    model = store.meta.model.name
    if loaded.model_name and _base_name(loaded.model_name) != _base_name(model):
        warn(f"the SAE was trained on {loaded.model_name}, the store comes from {model}")
    return m.layer, m.site


def open_input_store(loaded: LoadedSAE, path: str):
    """The store the SAE reads at `path`: a store's hook point, or a store of several hook points, of
    which the one the SAE names (a transcoder's input, say) is picked."""
    from pipeline.store import ActivationStore

    hooks = ActivationStore.open_some(path)
    if len(hooks) == 1:
        return hooks[0]
    name = f"L{loaded.layer}.{loaded.site}"
    mine = [h for h in hooks if h.hook.name == name]
    if not mine:
        names = ", ".join(h.hook.name for h in hooks)
        raise GspError(f"store {path} holds {names}, but not {name}, which this SAE reads; pass STORE/NAME")
    return mine[0]


def _base_name(name: str) -> str:
    """google/gemma-3-1b-pt and google/gemma-3-1b name the same weights."""
    name = name.lower().rstrip("/")
    return name.removesuffix("-pt")


# ------------------------------------------------------------------------------ formats
def _read_gemma_scope_2(path: Path) -> LoadedSAE:
    """gsp's own folders and Gemma Scope 2's, SAEs and transcoders (plain and affine)."""
    sae, config = SAE.load(path)
    if config.hf_hook_point_in:
        layer, site = _parse_hf_hook(config.hf_hook_point_in, path)
        layer_out, site_out = _parse_hf_hook(config.hf_hook_point_out or config.hf_hook_point_in, path)
    elif config.layer is not None and config.site in SITES:
        layer, site = config.layer, config.site
        layer_out, site_out = layer, ("mlp_out" if sae.is_transcoder or config.is_transcoder else site)
    else:
        layer, site = _layer_from_path(path), _site_from_path(path)
        transcoder = config.is_transcoder or site == "transcoder"
        site, site_out = ("mlp_in", "mlp_out") if transcoder else (site, site)
        layer_out = layer
    fmt = "gsp" if config.gsp_version else "gemma-scope-2"
    store, target = (config.store, config.target_store) if fmt == "gsp" else (None, None)
    return LoadedSAE(sae, str(path), path, fmt, config.model_name, layer, site, config.to_json(), store,
                     layer_out, site_out, target)  # fmt: skip


def _read_gemma_scope_1(path: Path) -> LoadedSAE:
    repo = next((m for part in reversed(path.parts) if (m := _GS1_REPO.search(part))), None)
    if repo and repo.group(3) == "transcoders":
        raise GspError(f"{path} is a Gemma Scope transcoder, not an SAE: gsp loads SAEs only")
    layer = _layer_from_path(path)
    if layer is None and "embedding" in path.parts:
        raise GspError(f"{path} is a Gemma Scope SAE of the token embeddings (embedding/), which gsp cannot hook: "
                       f"its sites are {', '.join(SITES)}, each at a layer")  # fmt: skip
    params = {k.lower(): v for k, v in _read_npz(path / "params.npz").items()}
    sae = SAE.from_params(params, "jumprelu", None, path / "params.npz")
    site = _GS1_SITE[repo.group(3)] if repo else _site_from_path(path)
    model = f"google/gemma-2-{repo.group(1)}" + ("-it" if repo.group(2) == "it" else "") if repo else None
    return LoadedSAE(sae, str(path), path, "gemma-scope", model, layer, site, {})


def _read_llama_scope(path: Path) -> LoadedSAE:
    hp = read_json(path / "hyperparams.json")
    missing = [k for k in ("d_model", "d_sae", "hook_point_in", "act_fn") if k not in hp]
    if missing:
        raise GspError(f"{path / 'hyperparams.json'} lacks {', '.join(missing)}: is it a Llama Scope (lm-saes) SAE?")
    hook_in, hook_out = hp["hook_point_in"], hp.get("hook_point_out", hp["hook_point_in"])
    if hook_out != hook_in:
        raise GspError(f"{path} is a transcoder ({hook_in} → {hook_out}), not an SAE: gsp loads SAEs only")
    m = re.fullmatch(r"blocks\.(\d+)\.hook_(resid_post|mlp_out)", hook_in)
    if m is None:
        why = " (o_proj's output; gsp's attn_out is o_proj's input)" if hook_in.endswith("hook_attn_out") else ""
        raise GspError(f"{path} reads {hook_in}{why}, which is not a gsp site: gsp loads resid_post and mlp_out here")
    if hp.get("use_glu_encoder"):
        raise GspError(f"{path} has a GLU encoder, which gsp's SAE cannot express")
    act = str(hp["act_fn"]).lower()
    if act not in ("jumprelu", "topk", "relu"):
        raise GspError(f"{path}: unknown act_fn {hp['act_fn']!r}: gsp loads jumprelu and topk Llama Scope SAEs")
    t = {k: v.double() for k, v in read_safetensors(path / "checkpoints" / "final.safetensors").items()}
    d, n = _positive_int(hp, "d_model", path), _positive_int(hp, "d_sae", path)
    shapes = {"encoder.weight": (n, d), "encoder.bias": (n,), "decoder.weight": (d, n), "decoder.bias": (d,)}
    t.setdefault("decoder.bias", torch.zeros(d, dtype=torch.float64))  # use_decoder_bias false
    check_tensors(t, shapes, path / "checkpoints" / "final.safetensors")
    enc, b_e, dec, b_d = (t[k] for k in shapes)
    s_in, s_out = _llama_scales(hp, d, path)
    if hp.get("apply_decoder_bias_to_pre_encoder"):
        b_e = b_e - enc @ b_d  # pre = (x·s_in − b_D) @ Eᵀ + b_E
    norm = dec.norm(dim=0) if hp.get("sparsity_include_decoder_norm", True) else torch.ones(n, dtype=torch.float64)
    norm = torch.where(norm > 0, norm, 1.0)  # a zero decoder column contributes nothing either way
    theta = hp.get("jump_relu_threshold", 0.0) if act == "jumprelu" else 0.0
    if not isinstance(theta, int | float) or not math.isfinite(theta):
        raise GspError(f"{path}: jump_relu_threshold should be a finite number, got {theta!r}")
    params = {
        "w_enc": s_in * enc.T * norm / s_out,
        "b_enc": b_e * norm / s_out,
        "w_dec": (dec / norm).T,
        "b_dec": b_d / s_out,
        "threshold": torch.full((n,), theta / s_out, dtype=torch.float64),
    }
    arch = "topk" if act == "topk" else "jumprelu"
    sae = SAE.from_params({k: v.float() for k, v in params.items()}, arch, hp.get("top_k"), path / "checkpoints")
    lm = read_json(path / "lm_config.json") if (path / "lm_config.json").is_file() else {}
    model = lm.get("model_name") or "meta-llama/Llama-3.1-8B"
    return LoadedSAE(sae, str(path), path, "llama-scope", model, int(m.group(1)), m.group(2), hp)


def _llama_scales(hp: dict, d: int, path: Path) -> tuple[float, float]:
    """(s_in, s_out): lm-saes multiplies inputs by s_in and divides its reconstruction by s_out."""
    norms = hp.get("dataset_average_activation_norm") or {}
    mode = hp.get("norm_activation", "dataset-wise" if norms else "inference")
    if mode == "inference":
        return 1.0, 1.0
    if mode != "dataset-wise":
        raise GspError(f"{path}: norm_activation {mode!r} rescales each token, which no fixed SAE weights can express")
    values = [norms.get(side, norms.get(hp.get(f"hook_point_{side}", ""))) for side in ("in", "out")]
    if not all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values):
        raise GspError(f"{path}: dataset-wise norm needs dataset_average_activation_norm {{'in': >0, 'out': >0}}")
    return math.sqrt(d) / values[0], math.sqrt(d) / values[1]


_TL_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_post|mlp_out|attn_out)")  # TransformerLens names
_SPARSIFY_HOOK = re.compile(r"layers\.(\d+)(\.mlp|\.self_attn)?")
_SPARSIFY_SITE = {None: "resid_post", ".mlp": "mlp_out", ".self_attn": "attn_out"}


def _read_saelens(path: Path) -> LoadedSAE:
    """SAELens 6 (`SAE.save_model`): JumpReLU and TopK SAEs on unnormalised activations. Where SAELens
    subtracts b_dec from the input first (apply_b_dec_to_input), that is folded into b_enc:
    (x − b_dec) @ W_enc + b_enc = x @ W_enc + (b_enc − b_dec @ W_enc)."""
    cfg = read_json(path / "cfg.json")
    arch = cfg.get("architecture", "standard")
    if arch not in ("jumprelu", "topk"):
        raise GspError(f"{path}: a SAELens {arch!r} SAE; gsp reads SAELens' jumprelu and topk SAEs")
    plain_values = {"normalize_activations": "none", "reshape_activations": "none",
                    "rescale_acts_by_decoder_norm": False}  # fmt: skip
    for key, plain in plain_values.items():
        if cfg.get(key, plain) not in (plain, None):
            raise GspError(f"{path}: SAELens' {key}={cfg[key]!r} is not supported by gsp (it reads {plain!r} only)")
    t = read_safetensors(path / "sae_weights.safetensors")
    params = {"w_enc": t.get("W_enc"), "w_dec": t.get("W_dec"), "b_enc": t.get("b_enc"), "b_dec": t.get("b_dec")}
    if arch == "jumprelu":
        params["threshold"] = t.get("threshold")
    if any(v is None for v in params.values()):
        missing = ", ".join(k for k, v in params.items() if v is None)
        raise GspError(f"{path / 'sae_weights.safetensors'} lacks {missing} (it has {', '.join(sorted(t))})")
    if cfg.get("apply_b_dec_to_input", True):  # SAELens' default
        params["b_enc"] = _fold_input_bias(params)
    sae = SAE.from_params(params, arch, cfg.get("k"), path / "sae_weights.safetensors")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else cfg  # pre-6 configs: top level
    hook = meta.get("hook_name")
    layer, site = _parse_any_hook(hook) if isinstance(hook, str) else (None, None)
    return LoadedSAE(sae, str(path), path, "saelens", meta.get("model_name"), layer, site, cfg)


def _read_sparsify(path: Path) -> LoadedSAE:
    """EleutherAI sparsify (`cfg.json` + `sae.safetensors`): TopK on (x − b_dec) @ encoderᵀ + bias, that
    subtraction folded into b_enc (none for a transcoder); the layer and site from the hookpoint folder."""
    cfg = read_json(path / "cfg.json")
    if cfg.get("activation", "topk") != "topk" or cfg.get("multi_topk") or cfg.get("skip_connection"):
        raise GspError(f"{path}: gsp reads sparsify's plain TopK SAEs (activation topk, no multi_topk, no skip "
                       "connection)")  # fmt: skip
    t = read_safetensors(path / "sae.safetensors")
    enc, bias = t.get("encoder.weight"), t.get("encoder.bias")
    if enc is None or bias is None or "W_dec" not in t or "b_dec" not in t:
        raise GspError(f"{path / 'sae.safetensors'} lacks sparsify's encoder.weight, encoder.bias, W_dec or b_dec "
                       f"(it has {', '.join(sorted(t))})")  # fmt: skip
    params = {"w_enc": enc.T.contiguous(), "b_enc": bias, "w_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if not cfg.get("transcode", False):
        params["b_enc"] = _fold_input_bias(params)
    sae = SAE.from_params(params, "topk", cfg.get("k"), path / "sae.safetensors")
    m = _SPARSIFY_HOOK.fullmatch(path.name)
    layer, site = (int(m.group(1)), _SPARSIFY_SITE[m.group(2)]) if m else (None, None)
    return LoadedSAE(sae, str(path), path, "sparsify", None, layer, site, cfg)


def _refuse_clt(path: Path) -> LoadedSAE:
    raise GspError(f"{path} is a cross-layer transcoder: gsp evaluate measures it (a store of every layer's "
                   "mlp_in and mlp_out); it has no single hook point for this command")  # fmt: skip


def _refuse_set(path: Path) -> LoadedSAE:
    layers = sorted(p.name for p in path.glob("layer_*") if p.is_dir())
    raise GspError(f"{path} is a transcoder set: gsp evaluate measures it whole; for this command give one "
                   f"layer's transcoder, e.g. {path / (layers[0] if layers else 'layer_0')}")  # fmt: skip


# ------------------------------------------------------------------------------ the table of formats
# fmt: off
FORMATS = (  # the first whose files a folder holds reads it
    Format("gsp, Gemma Scope 2", ("config.json", "params.safetensors"), _read_gemma_scope_2),
    Format("Gemma Scope", ("params.npz",), _read_gemma_scope_1),
    Format("Llama Scope", ("hyperparams.json", "checkpoints/final.safetensors"), _read_llama_scope,
           also=("lm_config.json",)),
    Format("SAELens", ("cfg.json", "sae_weights.safetensors"), _read_saelens),
    Format("sparsify", ("cfg.json", "sae.safetensors"), _read_sparsify),
    Format("a cross-layer transcoder", (clt.FIRST_LAYER_FILE,), _refuse_clt, also=(clt.LAYER_FILES,)),
    Format("a transcoder set", (SET_INDEX,), _refuse_set),
)
# fmt: on
# every file an SAE of any format may need, relative to its folder: all that a Hub fetch downloads
SAE_FILES = tuple(dict.fromkeys(pattern for f in FORMATS for pattern in (*f.files, *f.also)))


def expected() -> str:
    """The formats' files, for messages: "config.json + params.safetensors (gsp, Gemma Scope 2), …"."""
    shown = [f"{' + '.join(f.files)} ({f.name})" for f in FORMATS]
    return ", ".join(shown[:-1]) + " or " + shown[-1]


def _has(folder: Path, pattern: str) -> bool:
    return any(p.is_file() for p in folder.glob(pattern))


def _has_sae_files(folder: Path) -> bool:
    return any(_has(folder, pattern) for pattern in SAE_FILES)


def _fold_input_bias(params: dict) -> torch.Tensor:
    """b_enc − b_dec @ W_enc (float64): the encoder bias of the same SAE when b_dec is not subtracted first."""
    w, b_dec = params["w_enc"], params["b_dec"]
    if w.ndim != 2 or b_dec.shape != (w.shape[0],):
        return params["b_enc"]  # shapes are checked, with a clear message, by SAE.from_params
    return (params["b_enc"].double() - b_dec.double() @ w.double()).float()


def _parse_any_hook(hook: str) -> tuple[int | None, str | None]:
    """(layer, site) of a Hugging Face module path (model.layers.L.output) or a TransformerLens hook name."""
    if m := _HF_HOOK.fullmatch(hook):
        return int(m.group(1)), _HF_SITE[m.group(2)]
    if m := _TL_HOOK.fullmatch(hook):
        return int(m.group(1)), m.group(2)
    return None, None


# ------------------------------------------------------------------------------ helpers
def _read_npz(file: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(file, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.asarray(data[k], dtype=np.float32)) for k in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise GspError(f"{file} is not a readable .npz of arrays ({first_line(e)}): fetch it again") from None


def _positive_int(hp: dict, key: str, path: Path) -> int:
    if not isinstance(hp[key], int) or hp[key] <= 0:
        raise GspError(f"{path / 'hyperparams.json'}: {key} should be a positive integer, got {hp[key]!r}")
    return hp[key]


def _parse_hf_hook(hook: str, path: Path) -> tuple[int, str]:
    m = _HF_HOOK.fullmatch(hook)
    if m is None:
        raise GspError(f"{path} reads hook point {hook!r}, which is not a gsp site ({', '.join(SITES)})")
    return int(m.group(1)), _HF_SITE[m.group(2)]


def _layer_from_path(path: Path) -> int | None:
    m = next((m for part in reversed(path.parts) if (m := re.match(r"layer_(\d+)(?:_|$)", part))), None)
    return int(m.group(1)) if m else None


def _site_from_path(path: Path) -> str | None:
    """The site from a `<site>[_all]/layer_L…` folder (`transcoder` for Gemma Scope 2's transcoders) or a
    Gemma Scope 1 repo name in the path, else None."""
    parts = path.parts
    for i in range(len(parts) - 1, 0, -1):
        site = parts[i - 1].removesuffix("_all")
        if re.match(r"layer_\d+", parts[i]) and (site in SITES or site == "transcoder"):
            return site
    repo = next((m for part in reversed(parts) if (m := _GS1_REPO.search(part))), None)
    return _GS1_SITE.get(repo.group(3)) if repo else None
