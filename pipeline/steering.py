"""Steering: edit the model's activation at an SAE's hook point along the SAE's decoder directions.

Two edits, per feature i with decoder row d_i (unit norm for gsp and Gemma Scope SAEs, so a strength
is in the residual stream's own units; a gsp transcoder's rows have norm s/t, its input and output
scales):
- add:   x' = x + s_i · d_i
- clamp: x' = x + (v_i − f_i(x)) · d_i, f_i(x) the SAE's activation of feature i on x: the feature
  reads v_i afterwards while the SAE's reconstruction error is left in place.
Positions: "all" edits every position but BOS; "generated" edits from the last prompt token on (the
one whose output picks the first new token), so the prompt itself is read unchanged.

A strength can be too large for the model: once an edited activation's mean square overflows
float32, the norm after it (RMSNorm computes in float32) returns zeros or NaN, and decoding picks
<pad> from flat or NaN logits. The edit refuses such an activation, and `finite_logits` refuses NaN
or infinite logits however they arise: a one-line GspError, never an empty continuation.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from pipeline.errors import GspError
from pipeline.sae import SAE

Positions = Literal["all", "generated"]


def steer_fn(
    sae: SAE,
    features: list[int],
    values: list[float],
    *,
    clamp: bool = False,
    positions: Positions = "all",
    prompt_len: int = 0,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A function `edit(source, acts)` for pipeline.hooks.splice_from that edits (B, S, D) activations
    call after call. `source` is what the SAE reads (for a transcoder the MLP's input, its decoder rows
    being added to the MLP's output `acts`; for an SAE the same tensor); clamping encodes it.

    Calls arrive as generation runs: the prompt first (S = prompt_len), then one token at a time;
    a counter turns each call's positions into absolute ones.
    """
    idx = torch.tensor(features, dtype=torch.long, device=sae.w_dec.device)
    vals = torch.tensor(values, dtype=torch.float32, device=sae.w_dec.device)
    rows_FD = sae.w_dec[idx].detach()  # (n, D)
    first = 1 if positions == "all" else max(prompt_len - 1, 1)
    seen = {"n": 0}

    def edit(source_BSD: torch.Tensor, acts_BSD: torch.Tensor) -> torch.Tensor:
        s = acts_BSD.shape[1]
        pos = torch.arange(seen["n"], seen["n"] + s, device=acts_BSD.device)
        seen["n"] += s
        on = (pos >= first)[None, :, None]  # (1, S, 1)
        if clamp:
            f = sae.encode(source_BSD.reshape(-1, source_BSD.shape[-1]).float())[0][:, idx]  # (B·S, n)
            coef = (vals - f).reshape(*acts_BSD.shape[:2], -1)  # (B, S, n)
            delta = coef @ rows_FD
        else:
            delta = (vals @ rows_FD).expand_as(acts_BSD)
        edited_BSD = torch.where(on, acts_BSD + delta.to(acts_BSD.dtype), acts_BSD)
        if not torch.isfinite(edited_BSD.float().square().mean(-1)).all():
            raise GspError(f"steering by {max(abs(v) for v in values):g} makes the activation at the hook point too "
                           "large for the model (its mean square overflows float32, so the next norm outputs zeros "
                           "or NaN): use a smaller --strength")  # fmt: skip
        return edited_BSD

    return edit


@contextlib.contextmanager
def finite_logits(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, a forward pass whose last position's logits (what generation samples from)
    hold NaN or an infinity raises a GspError."""

    def check(module, args, out) -> None:
        logits = getattr(out, "logits", None)
        if logits is not None and not torch.isfinite(logits[:, -1]).all():
            raise GspError("the steered model's logits are NaN or infinite (the edit broke its forward pass): "
                           "use a smaller --strength")  # fmt: skip

    handle = model.register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()
