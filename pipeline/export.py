"""An SAE written in the on-disk layout another library reads: SAELens, EleutherAI sparsify, Gemma Scope 2.

gsp's SAE computes, on raw activations,  pre = x @ W_enc + b_enc,  f = JumpReLU_θ(pre) or the k largest
of ReLU(pre),  x̂ = f @ W_dec + b_dec.  Each layout is written so that its library computes the same:

- **saelens** (SAELens 6, `SAE.load_from_disk(DIR)`): `DIR/cfg.json` + `DIR/sae_weights.safetensors` with
  W_enc (D, F), W_dec (F, D), b_enc, b_dec and, for JumpReLU, threshold. `apply_b_dec_to_input` false
  and `normalize_activations` "none" (SAELens then encodes x @ W_enc + b_enc, as gsp does);
  architecture "jumprelu" or "topk" (+ k, `rescale_acts_by_decoder_norm` false). metadata carries
  `sae_lens_version` "6.0.0": the version of SAELens' config layout these files follow (without it
  SAELens reads the file as a pre-6 config and drops the metadata).
- **sparsify** (EleutherAI, TopK only; `SparseCoder.load_from_disk(DIR/<hookpoint>)`): `cfg.json` (+ d_in)
  and `sae.safetensors` with encoder.weight (F, D) = W_encᵀ, encoder.bias, W_dec (F, D), b_dec. sparsify
  encodes (x − b_dec) @ W_encᵀ + bias, so bias = b_enc + b_dec @ W_enc (computed in float64) gives the same
  pre-activations; then the k largest of ReLU(pre), as gsp. The hookpoint folder is sparsify's name of
  the module: `layers.L` (resid_post), `layers.L.mlp` (mlp_out), `layers.L.self_attn` (attn_out).
- **gemma-scope-2** (JumpReLU SAEs and transcoders): `DIR/<site>/layer_L_width_W_l0_<label>/` with
  `config.json` (Gemma Scope 2's keys only) + `params.safetensors`, Gemma Scope 2's own folder naming:
  site `resid_post`, `mlp_out`, `attn_out` or `transcoder` (`_affine` for a skip transcoder), width
  16k / 65k / 262k / 1m (4096 → 4k), l0 label small (L0 ≤ 30), medium (≤ 90) or big, from the SAE's L0.

- **circuit-tracer** (a transcoder set, pipeline/transcoder_set.py; circuit-tracer 0.5.0,
  `ReplacementModel.from_pretrained(MODEL, "/ABSOLUTE/DIR", backend="nnsight")`, which loads a local folder
  only by its absolute path): `DIR/config.yaml` (`model_kind: transcoder_set`, `feature_input_hook:
  mlp.hook_in`, `feature_output_hook: hook_mlp_out` — its names of Gemma 3's pre_feedforward_layernorm and
  post_feedforward_layernorm outputs, gsp's mlp_in and mlp_out —, `scan`: the set's absolute path, and
  `model_name`: the set's model) and `DIR/layer_L.safetensors` for L = 0 … n−1 with W_enc (F, D) = W_encᵀ,
  W_dec (F, D), b_enc, b_dec, `activation_function.threshold` and, for skip transcoders, W_skip (D, D) =
  W_skipᵀ (utils/caching.py, transcoder/single_layer_transcoder.py: it loads the keys strictly and
  computes pre = x @ W_encᵀ + b_enc, f = pre · 1[pre > θ], ŷ = f @ W_dec + b_dec + x @ W_skipᵀ). Its
  JumpReLU has no ReLU, so θ is written as max(θ, 0): the same f for every θ.

A TopK SAE is never written with a `threshold`: a JumpReLU reader would apply it (and SAELens' strict
loading refuses an unexpected tensor), and no threshold makes JumpReLU compute TopK, whose cut
depends on each row. So saelens and sparsify get TopK as TopK, and gemma-scope-2 and circuit-tracer
(JumpReLU-only formats) refuse it. Single transcoders go to gemma-scope-2 only, sets to circuit-tracer
only. Every file is written into a new folder that is renamed into place whole; an existing folder is
never written over.
"""

import json
import os
import shutil
from pathlib import Path

import yaml

from pipeline.errors import GspError
from pipeline.files import atomic_write_text, save_tensors
from pipeline.sae import FILE_ARCH, FILE_KEYS, SAE

FORMATS = ("saelens", "sparsify", "gemma-scope-2")
SET_FORMATS = ("circuit-tracer",)  # formats of a whole transcoder set
CIRCUIT_TRACER_HOOKS = ("mlp.hook_in", "hook_mlp_out")  # its names of gsp's mlp_in and mlp_out on Gemma 3
SAELENS_VERSION = "6.0.0"  # the SAELens config layout written (cfg.json with nested metadata)
SPARSIFY_HOOK = {"resid_post": "layers.{}", "mlp_out": "layers.{}.mlp", "attn_out": "layers.{}.self_attn"}


def width_label(width: int) -> str:
    """Gemma Scope 2's width names: 16384 → 16k, 262144 → 262k, 1048576 → 1m."""
    if width >= 2**20 and width % 2**20 == 0:
        return f"{width // 2**20}m"
    return f"{width // 1024}k" if width % 1024 == 0 else str(width)


def l0_label(l0: float) -> str:
    """Gemma Scope 2's L0 names: small (10-20 in its releases), medium (30-60), big (90-150)."""
    return "small" if l0 <= 30 else "medium" if l0 <= 90 else "big"


def export(sae: SAE, fmt: str, out: Path, *, layer: int | None, site: str | None, model_name: str | None,
           hook_in: str | None, hook_out: str | None, l0: float | None) -> Path:  # fmt: skip
    """Write `sae` in layout `fmt` under `out`; returns the folder the library loads."""
    if fmt not in FORMATS:
        raise GspError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if sae.is_transcoder and fmt != "gemma-scope-2":
        raise GspError(f"{fmt} has no layout for gsp's transcoders: export them --to gemma-scope-2")
    p = {k: getattr(sae, k).detach().float().cpu().contiguous() for k in sae.params}
    if fmt == "saelens":
        return _write(out, _saelens(sae, p, model_name, hook_in))
    if fmt == "sparsify":
        if sae.arch != "topk":
            raise GspError("sparsify reads TopK SAEs only: export a JumpReLU SAE --to saelens or --to gemma-scope-2")
        if site not in SPARSIFY_HOOK or layer is None:
            raise GspError(f"sparsify names a hookpoint by its module; gsp knows it for {', '.join(SPARSIFY_HOOK)} "
                           f"only, and this SAE reads {site or 'an unknown site'}")  # fmt: skip
        return _write(out / SPARSIFY_HOOK[site].format(layer), _sparsify(sae, p))
    if sae.arch != "jumprelu":
        raise GspError("Gemma Scope 2's format is JumpReLU only, and no threshold makes JumpReLU compute TopK: "
                       "export a TopK SAE --to saelens or --to sparsify")  # fmt: skip
    if layer is None or l0 is None or (site is None and not sae.is_transcoder):
        raise GspError("the Gemma Scope 2 folder name needs the SAE's layer, site and L0, which its files do not say")
    kind = ("transcoder" + "_affine" * sae.skip) if sae.is_transcoder else site
    folder = out / kind.removesuffix("_affine") / f"layer_{layer}_width_{width_label(sae.width)}_l0_{l0_label(l0)}"
    if sae.skip:
        folder = folder.with_name(folder.name + "_affine")
    config = {"architecture": FILE_ARCH["jumprelu"], "model_name": model_name, "hf_hook_point_in": hook_in,
              "hf_hook_point_out": hook_out or hook_in, "width": sae.width, "l0": l0,
              "affine_connection": sae.skip, "type": "transcoder" if sae.is_transcoder else "sae"}  # fmt: skip
    return _write(folder, {"config.json": config, "params.safetensors": {FILE_KEYS.get(k, k): v for k, v in p.items()}})


def export_set(saes: dict[int, SAE], out: Path, *, sites: tuple[str, str], model_name: str | None,
               scan: str) -> Path:  # fmt: skip
    """Write a transcoder set (`saes` by layer, each reading mlp_in and predicting mlp_out per `sites`) in
    circuit-tracer's layout under `out`; returns `out`."""
    if sites != ("mlp_in", "mlp_out"):
        raise GspError(f"circuit-tracer's transcoder sets read mlp_in and predict mlp_out; this set maps "
                       f"{sites[0]} to {sites[1]}")  # fmt: skip
    if list(saes) != list(range(len(saes))):
        raise GspError(f"circuit-tracer needs a transcoder for every layer 0 … L−1; this set has layers "
                       f"{', '.join(map(str, saes))}")  # fmt: skip
    if any(sae.arch != "jumprelu" for sae in saes.values()):
        raise GspError("circuit-tracer's transcoders are JumpReLU or ReLU, and no threshold makes JumpReLU compute "
                       "TopK: a TopK set has no circuit-tracer layout")  # fmt: skip
    config = {"model_kind": "transcoder_set", "feature_input_hook": CIRCUIT_TRACER_HOOKS[0],
              "feature_output_hook": CIRCUIT_TRACER_HOOKS[1], "scan": scan, "model_name": model_name}  # fmt: skip
    return _write(out, {"config.yaml": config} | {f"layer_{layer}.safetensors": _circuit_tracer(sae)
                                                  for layer, sae in saes.items()})  # fmt: skip


def _circuit_tracer(sae: SAE) -> dict:
    p = {k: getattr(sae, k).detach().float().cpu() for k in sae.params}
    # θ⁺ = max(θ, 0), as pre·1[pre > θ⁺] = ReLU(pre)·1[pre > θ]
    tensors = {"W_enc": p["w_enc"].T, "W_dec": p["w_dec"], "b_enc": p["b_enc"], "b_dec": p["b_dec"],
               "activation_function.threshold": p["threshold"].clamp(min=0)}  # fmt: skip
    if sae.skip:
        tensors["W_skip"] = p["w_skip"].T  # circuit-tracer adds x @ W_skipᵀ
    return tensors


def _saelens(sae: SAE, p: dict, model_name: str | None, hook: str | None) -> dict:
    config = {
        "architecture": sae.arch, "d_in": sae.d_in, "d_sae": sae.width, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_VERSION, "model_name": model_name, "hook_name": hook,
                     "exported_by": "gsp"},
    }  # fmt: skip
    tensors = {"W_enc": p["w_enc"], "W_dec": p["w_dec"], "b_enc": p["b_enc"], "b_dec": p["b_dec"]}
    if sae.arch == "topk":
        config.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    else:
        tensors["threshold"] = p["threshold"]
    return {"cfg.json": config, "sae_weights.safetensors": tensors}


def _sparsify(sae: SAE, p: dict) -> dict:
    bias = (p["b_enc"].double() + p["b_dec"].double() @ p["w_enc"].double()).float()  # undoes x − b_dec
    config = {"activation": "topk", "expansion_factor": max(1, sae.width // sae.d_in), "normalize_decoder": True,
              "num_latents": sae.width, "k": sae.k, "multi_topk": False, "skip_connection": False,
              "transcode": False, "d_in": sae.d_in}  # fmt: skip
    tensors = {"encoder.weight": p["w_enc"].T.contiguous(), "encoder.bias": bias, "W_dec": p["w_dec"],
               "b_dec": p["b_dec"]}  # fmt: skip
    return {"cfg.json": config, "sae.safetensors": tensors}


def _write(folder: Path, files: dict) -> Path:
    """The files into `folder`, which must not exist (or be empty): written in `<folder>.partial` and
    renamed into place, so the folder appears whole or not at all."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise GspError(f"{folder} already exists; choose another --out (gsp never writes over a folder)")
    work = folder.with_name(folder.name + ".partial")
    if work.exists():
        ours = {"cfg.json", "config.json", "sae_weights.safetensors", "sae.safetensors", "params.safetensors"}
        ours |= set(files)
        if not work.is_dir() or any(f.name.removesuffix(".partial") not in ours for f in work.iterdir()):
            raise GspError(f"{work} is in the way and holds files gsp did not write; move it away")
        shutil.rmtree(work)  # an interrupted export's own files
    try:
        work.mkdir(parents=True)
        for name, content in files.items():
            if name.endswith(".json"):
                atomic_write_text(work / name, json.dumps(content, indent=2))
            elif name.endswith(".yaml"):
                atomic_write_text(work / name, yaml.safe_dump(content, sort_keys=False))
            else:
                save_tensors({k: v.contiguous() for k, v in content.items()}, work / name)
        if folder.is_dir():
            folder.rmdir()  # empty (checked above)
        os.replace(work, folder)
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise GspError(f"could not write {folder}: {e.strerror or e}") from None
    return folder
