"""Hook points (Gemma Scope 2's sites) and a forward pass that stops right after the last hooked module.

Sites, for block L at `model.model.layers[L]`, in the order a forward pass reaches them:
- attn_out:   the input of `self_attn.o_proj`, heads concatenated (`model.layers.L.self_attn.o_proj.input`)
- mlp_in:     the MLP's input, the output of `pre_feedforward_layernorm`
              (`model.layers.L.pre_feedforward_layernorm.output`; on Llama, `post_attention_layernorm`'s
              output): where Gemma Scope 2's transcoders read
- mlp_out:    the output of `post_feedforward_layernorm` (`model.layers.L.post_feedforward_layernorm.output`;
              on Llama, which has no such norm, the output of `mlp`): what transcoders predict
- resid_post: the output of the block                 (hook point `model.layers.L.output`)

`capture` records any number of (layer, site) points in one forward pass and raises `StopForward`
once it has the last of them, so no later layer and no LM head run. `splice` instead replaces a
site's activation and lets the forward pass go on (delta loss, steering).
`hidden_states[L + 1]` is deliberately not used: for the last layer transformers has
already applied the final norm there.

`read_gains` says how strongly the rest of the model reads each dimension of a residual-stream site:
every later reader of the residual stream is an RMSNorm, which divides by the vector's RMS and then
multiplies dimension d by its gain (Gemma: 1 + γ_d). fit's `--weighting reads` weighs the
reconstruction error by these gains (docs/fit.md, "Where the error goes").
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal, get_args

import torch

from pipeline.errors import GspError
from pipeline.models import base_model, decoder_layers, final_norm

Site = Literal["resid_post", "mlp_out", "attn_out", "mlp_in"]
SITES: tuple[str, ...] = get_args(Site)
ORDER = {"attn_out": 0, "mlp_in": 1, "mlp_out": 2, "resid_post": 3}  # within a block, as the forward pass goes
_MODULE = {"resid_post": "", "mlp_out": "post_feedforward_layernorm", "attn_out": "self_attn.o_proj",
           "mlp_in": "pre_feedforward_layernorm"}  # fmt: skip
POINT_SUFFIX = {"resid_post": "output", "mlp_out": "post_feedforward_layernorm.output",
          "attn_out": "self_attn.o_proj.input", "mlp_in": "pre_feedforward_layernorm.output"}  # fmt: skip
Point = tuple[int, str]  # (layer, site)


class StopForward(Exception):
    """Raised by the hook to end the forward pass once the activations are captured."""


def hook_point(layer: int, site: str) -> str:
    """The hook point's name in Gemma Scope 2's `hf_hook_point_in` style."""
    return f"model.layers.{layer}.{POINT_SUFFIX[site]}"


def point_name(layer: int, site: str) -> str:
    """The short name of a hook point: `L12.resid_post` (a store's folder for it)."""
    return f"L{layer}.{site}"


def forward_order(points: list[Point]) -> list[Point]:
    """Points sorted as a forward pass reaches them (the last one is where it may stop)."""
    return sorted(set(points), key=lambda p: (p[0], ORDER[p[1]]))


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
    if site == "mlp_in" and not hasattr(module, "pre_feedforward_layernorm") and hasattr(module, "mlp"):
        return module.post_attention_layernorm  # Llama: the norm whose output is the MLP's input
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


RESIDUAL_SITES = ("resid_post", "mlp_out")  # sites in the residual stream's basis, read by later norms


@torch.no_grad()
def read_gains(model: torch.nn.Module, layer: int, site: str) -> tuple[float, ...] | None:
    """Per dimension, the RMS over the norms that read the residual stream after this site (every later
    block's input norm and pre-MLP norm, and the final norm) of their gain: a norm applied to a vector
    of ones gives its gains exactly (up to its ε). None for a site outside the residual stream."""
    if site not in RESIDUAL_SITES:
        return None
    layers = decoder_layers(model)
    site_module(model, layer, site)  # clear errors for a wrong layer
    readers = [final_norm(model)]
    for block in layers[layer + 1 :]:
        mlp_norm = getattr(block, "pre_feedforward_layernorm", None) or block.post_attention_layernorm
        readers += [block.input_layernorm, mlp_norm]
    d = site_width(model, layer, site)
    param = next(model.parameters())
    ones = torch.ones(1, d, dtype=param.dtype, device=param.device)
    gains = torch.stack([norm(ones)[0].float() for norm in readers])
    return tuple(gains.square().mean(0).sqrt().cpu().tolist())


def register_at_module(module: torch.nn.Module, site: str, fn: Callable) -> torch.utils.hooks.RemovableHandle:
    """Call `fn(activation)` with the site's activation; a non-None return value replaces it."""
    if site == "attn_out":
        return module.register_forward_pre_hook(lambda m, args: _replace_args(args, fn(args[0])))

    def on_output(m, args, out):
        new = fn(out[0] if isinstance(out, tuple) else out)
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return module.register_forward_hook(on_output)


def _replace_args(args: tuple, new):
    return None if new is None else (new, *args[1:])


@contextlib.contextmanager
def capture(model: torch.nn.Module, points: list[Point], *, stop: bool = True) -> Iterator[dict]:
    """Within the block, every forward pass stores each point's activation in `box[(layer, site)]`
    (B, S, D); with `stop`, the pass ends once the last point (in forward order) is captured."""
    modules = {point: site_module(model, *point) for point in points}  # clear errors first
    order = forward_order(points)
    box: dict = {}
    handles = []

    def keeper(point: Point):
        def keep(acts: torch.Tensor) -> None:
            box[point] = acts
            if stop and point == order[-1]:
                raise StopForward

        return keep

    try:
        for point in order:
            handles.append(register_at_module(modules[point], point[1], keeper(point)))
        yield box
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def splice(model: torch.nn.Module, layer: int, site: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the site's activation (B, S, D) is replaced by `fn(activation)` and the pass goes on."""
    handle = register_at_module(site_module(model, layer, site), site, fn)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def splice_from(model: torch.nn.Module, source: Point, dest: Point, fn: Callable) -> Iterator[None]:
    """Within the block, `dest`'s activation is replaced by `fn(source activation, dest activation)`,
    `source` being an earlier point of the same pass (a transcoder reads the MLP's input and replaces
    its output); for an SAE the two are one point."""
    if source == dest:
        with splice(model, *dest, lambda acts: fn(acts, acts)):
            yield
        return
    if forward_order([source, dest])[0] != source:
        raise GspError(f"hook point {point_name(*source)} comes after {point_name(*dest)} in the forward pass")
    with capture(model, [source], stop=False) as box, splice(model, *dest, lambda acts: fn(box[source], acts)):
        yield


@torch.inference_mode()
def activations_at(model: torch.nn.Module, input_ids_BS: torch.Tensor, points: list[Point]) -> dict:
    """Each point's activations (B, S, D) for full-length contexts, in one forward pass that computes
    nothing after the last point."""
    with capture(model, points) as box:
        try:
            base_model(model)(input_ids=input_ids_BS, use_cache=False)
        except StopForward:
            pass
    missing = [p for p in points if p not in box]
    if missing:
        raise GspError(f"the hook at layer {missing[0][0]} site {missing[0][1]} never fired; "
                       "is this a decoder-only model?")  # fmt: skip
    return box


def activations(model: torch.nn.Module, input_ids_BS: torch.Tensor, layer: int, site: str) -> torch.Tensor:
    """One point's activations (B, S, D), computing nothing after it."""
    return activations_at(model, input_ids_BS, [(layer, site)])[(layer, site)]
