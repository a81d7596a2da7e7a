"""gsp export: an SAE (gsp's own, or any gsp reads) written in the layout SAELens, sparsify or Gemma Scope 2 reads.

The formats, and why a TopK SAE never carries a threshold, are in pipeline/export.py. After writing,
the exported folder is read back through gsp's own loader and must give the SAE's outputs, so a
layout that would change what the SAE computes never leaves this command unnoticed.
"""

from pathlib import Path

import torch

from pipeline.console import console
from pipeline.errors import GspError
from pipeline.export import export
from pipeline.hooks import SITES, hook_point
from pipeline.sae_formats import load_sae


def run_export(spec: str, fmt: str, out: str, *, l0: float | None = None, token: str | None = None) -> Path:
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
