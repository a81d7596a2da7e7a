"""Steering: edit the model's activation at an SAE's hook point along the SAE's decoder directions.

Two edits, per feature i with decoder row d_i (unit norm for gsp and Gemma Scope SAEs, so a strength
is in the residual stream's own units; a gsp transcoder's rows have norm s/t, its input and output
scales):
- add:   x' = x + s_i · d_i
- clamp: x' = x + (v_i − f_i(x)) · d_i, f_i(x) the SAE's activation of feature i on x: the feature
  reads v_i afterwards while the SAE's reconstruction error is left in place.
Positions: "all" edits every position but BOS; "generated" edits from the last prompt token on (the
one whose output picks the first new token), so the prompt itself is read unchanged.
"""

from collections.abc import Callable
from typing import Literal

import torch

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
        return torch.where(on, acts_BSD + delta.to(acts_BSD.dtype), acts_BSD)

    return edit
