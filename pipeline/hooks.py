"""Hook points (Gemma Scope 2's sites) and a forward pass that stops right after the hooked module.

Sites, for block L at `model.model.layers[L]`:
- resid_post: the output of the block                 (hook point `model.layers.L.output`)
- mlp_out:    the output of `post_feedforward_layernorm` (`model.layers.L.post_feedforward_layernorm.output`;
              on Llama, which has no such norm, the output of `mlp`)
- attn_out:   the input of `self_attn.o_proj`, heads concatenated (`model.layers.L.self_attn.o_proj.input`)

The hook raises `StopForward` once it has the activation, so no later layer and no LM head run.
`splice` instead replaces the site's activation and lets the forward pass go on (delta loss, steering).
`hidden_states[L + 1]` is deliberately not used: for the last layer transformers has
already applied the final norm there.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal, get_args

import torch

from pipeline.errors import GspError
from pipeline.models import base_model, decoder_layers

Site = Literal["resid_post", "mlp_out", "attn_out"]
SITES: tuple[str, ...] = get_args(Site)
_MODULE = {"resid_post": "", "mlp_out": "post_feedforward_layernorm", "attn_out": "self_attn.o_proj"}


class StopForward(Exception):
    """Raised by the hook to end the forward pass once the activation is captured."""


def hook_point(layer: int, site: str) -> str:
    """The hook point's name in Gemma Scope 2's `hf_hook_point_in` style."""
    suffix = {"resid_post": "output", "mlp_out": "post_feedforward_layernorm.output"}.get(
        site, "self_attn.o_proj.input"
    )
    return f"model.layers.{layer}.{suffix}"


def site_module(model: torch.nn.Module, layer: int, site: str) -> torch.nn.Module:
    """The module whose output (or, for attn_out, input) is the site's activation; clear errors otherwise."""
    if site not in SITES:
        raise GspError(f"unknown site '{site}': choose one of {', '.join(SITES)}")
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise GspError(f"layer {layer} is out of range: this model has {len(layers)} layers (0..{len(layers) - 1})")
    module = layers[layer]
    if site == "mlp_out" and not hasattr(module, "post_feedforward_layernorm") and hasattr(module, "mlp"):
        return module.mlp  # Llama: the MLP's own output is what the block adds to the residual stream
    for part in filter(None, _MODULE[site].split(".")):
        module = getattr(module, part, None)
        if module is None:
            raise GspError(f"site {site} needs model.layers.{layer}.{_MODULE[site]}, which this model lacks")
    return module


def site_width(model: torch.nn.Module, layer: int, site: str) -> int:
    """d_in of the site: d_model, or heads × head_dim for attn_out."""
    module = site_module(model, layer, site)
    if site == "attn_out":
        return module.in_features
    config = getattr(model.config, "text_config", model.config)
    return config.hidden_size


def check_width(model: torch.nn.Module, layer: int, site: str, d_in: int, what: str) -> None:
    """An SAE (or store) of width `d_in` must fit the model's site: one clear error otherwise."""
    width = site_width(model, layer, site)
    if width != d_in:
        raise GspError(f"{what} has d_in {d_in}, but this model's layer {layer} {site} has width {width}: "
                       "use the model the SAE was trained on (--model)")  # fmt: skip


@contextlib.contextmanager
def capture(model: torch.nn.Module, layer: int, site: str, *, stop: bool = True) -> Iterator[dict]:
    """Within the block, every forward pass stores the site's activation in `box["acts"]` (B, S, D)."""
    module = site_module(model, layer, site)
    box: dict = {}

    def keep(acts: torch.Tensor) -> None:
        box["acts"] = acts
        if stop:
            raise StopForward

    if site == "attn_out":
        handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: keep(out[0] if isinstance(out, tuple) else out))
    try:
        yield box
    finally:
        handle.remove()


@contextlib.contextmanager
def splice(model: torch.nn.Module, layer: int, site: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the site's activation (B, S, D) is replaced by `fn(activation)` and the pass goes on."""
    module = site_module(model, layer, site)
    if site == "attn_out":
        handle = module.register_forward_pre_hook(lambda m, args: (fn(args[0]), *args[1:]))
    else:

        def replace(m, args, out):
            if isinstance(out, tuple):
                return (fn(out[0]), *out[1:])
            return fn(out)

        handle = module.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def activations(model: torch.nn.Module, input_ids_BS: torch.Tensor, layer: int, site: str) -> torch.Tensor:
    """The site's activations (B, S, D) for full-length contexts, computing nothing after the site."""
    with capture(model, layer, site) as box:
        try:
            base_model(model)(input_ids=input_ids_BS, use_cache=False)
        except StopForward:
            pass
    if "acts" not in box:
        raise GspError(f"the hook at layer {layer} site {site} never fired; is this a decoder-only model?")
    return box["acts"]
