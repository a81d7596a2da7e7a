"""gsp export: an SAE (gsp's own, or any gsp reads) written in the layout SAELens, sparsify or Gemma Scope 2
reads; a transcoder set in the layout circuit-tracer reads.

The formats, and why a TopK SAE never carries a threshold, are in pipeline/export.py. After writing,
the exported folder is read back (an SAE through gsp's own loader, a set's files in numpy with
circuit-tracer's formulas) and must give the SAE's outputs, so a layout that would change what the
SAE computes never leaves this command unnoticed.
"""

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from pipeline.console import console
from pipeline.errors import GspError
from pipeline.export import SET_FORMATS, export, export_set
from pipeline.files import read_json
from pipeline.hooks import SITES, hook_point
from pipeline.sae_formats import load_sae
from pipeline.transcoder_set import INDEX, TranscoderSet, is_set_folder


def run_export(spec: str, fmt: str, out: str, *, l0: float | None = None, token: str | None = None) -> Path:
    if Path(spec).is_dir() and is_set_folder(Path(spec)):
        return run_export_set(Path(spec), fmt, Path(out))
    if fmt in SET_FORMATS:
        raise GspError(f"--to {fmt} writes a transcoder set (a folder with {INDEX}, from gsp fit --transcoders "
                       f"mlp_in:mlp_out --layers all); {spec} is not one")  # fmt: skip
    loaded = load_sae(spec, token=token)
    sae, cfg = loaded.sae, loaded.config
    if l0 is None:
        l0 = cfg.get("l0") if isinstance(cfg.get("l0"), (int, float)) else (sae.k if sae.arch == "topk" else None)
    hook_in = cfg.get("hf_hook_point_in") or (
        hook_point(loaded.layer, loaded.site) if loaded.layer is not None and loaded.site in SITES else None
    )
    hook_out = cfg.get("hf_hook_point_out") or hook_in
    folder = export(sae, fmt, Path(out), layer=loaded.layer, site=loaded.site, model_name=loaded.model_name,
                    hook_in=hook_in, hook_out=hook_out, l0=l0)  # fmt: skip
    _check_round_trip(loaded.sae, folder)
    console.print(f"wrote the {fmt} SAE to [bold]{folder}[/]", highlight=False)
    return folder


def _check_round_trip(sae, folder: Path) -> None:
    """The written folder, read back by gsp, must compute what the SAE computes: the same
    pre-activations on random rows, and the same output from the same random sparse latents (compared
    separately, so that a near-tie at a threshold or a k-th value cannot blur the check)."""
    again = load_sae(str(folder)).sae
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, sae.d_in, generator=g) * 10
    f = torch.rand(256, sae.width, generator=g) * (torch.rand(256, sae.width, generator=g) < 16 / sae.width)
    with torch.no_grad():
        pairs = [(sae.encode(x)[1], again.encode(x)[1]), (sae.decode(f, x), again.decode(f, x))]
    for want, got in pairs:
        err = float((want - got).abs().max() / want.abs().max().clamp_min(1e-30))
        if err > 1e-5 or want.shape != got.shape:
            raise GspError(f"internal: the exported {folder} does not compute what the SAE computes (relative "
                           f"difference {err:.2g}); please report it")  # fmt: skip


def run_export_set(folder: Path, fmt: str, out: Path) -> Path:
    """A transcoder set in circuit-tracer's layout, checked in numpy against gsp's transcoders."""
    if fmt not in SET_FORMATS:
        raise GspError(f"a transcoder set exports --to {' or '.join(SET_FORMATS)}; export one layer's transcoder "
                       f"({folder}/layer_L) --to gemma-scope-2")  # fmt: skip
    tset = TranscoderSet.load(folder)
    first = next(iter(tset.members.values()))
    saes = {layer: m.sae for layer, m in tset.members.items()}
    written = export_set(saes, out, sites=(first.site, first.site_out), model_name=read_json(folder / INDEX)["model"],
                         scan=str(folder.resolve()))  # fmt: skip
    for layer, sae in saes.items():
        _check_circuit_tracer(sae, written / f"layer_{layer}.safetensors")
    console.print(f"wrote the {fmt} transcoder set ({len(saes)} layers) to [bold]{written.resolve()}[/] "
                  "(circuit-tracer loads a local folder by its absolute path)", highlight=False)  # fmt: skip
    return written


def _check_circuit_tracer(sae, file: Path) -> None:
    """circuit-tracer's encode and decode of the written tensors, in float64 numpy, must compute what the
    transcoder computes: the same pre-activations on random rows, the same latents from the same
    pre-activations, and the same output from the same random sparse latents and rows."""
    t = {k: v.astype(np.float64) for k, v in load_file(file).items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, sae.d_in, generator=g) * 10
    f = torch.rand(256, sae.width, generator=g) * (torch.rand(256, sae.width, generator=g) < 16 / sae.width)
    with torch.no_grad():
        want_f, pre = sae.encode(x)
        want_y = sae.decode(f, x)
    x64, pre64 = x.double().numpy(), pre.double().numpy()
    got_y = f.double().numpy() @ t["W_dec"] + t["b_dec"] + (x64 @ t["W_skip"].T if "W_skip" in t else 0)
    pairs = [(pre, x64 @ t["W_enc"].T + t["b_enc"]),
             (want_f, pre64 * (pre64 > t["activation_function.threshold"])), (want_y, got_y)]  # fmt: skip
    for want, got in pairs:
        want = want.double().numpy()
        err = np.abs(want - got).max() / max(np.abs(want).max(), 1e-30) if want.shape == got.shape else np.inf
        if err > 1e-5:
            raise GspError(f"internal: the exported {file} does not compute what the transcoder computes "
                           f"(relative difference {err:.2g}); please report it")  # fmt: skip
