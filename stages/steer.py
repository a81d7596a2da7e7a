"""gsp steer: generate with SAE features added (or clamped) at the SAE's hook point, beside the
unsteered continuation from the same seed (pipeline/steering.py holds the edit).

The model is the one the SAE's training store was harvested from, at its revision (pipeline/models.py's
`model_to_run`, as evaluate and features choose it). A strength beyond float32, or one that breaks the
model's forward pass (an activation too large for its norms, NaN logits), is a one-line error rather
than an empty continuation decoded from broken logits.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.config import opt, stage_config
from pipeline.console import console
from pipeline.errors import GspError
from pipeline.hooks import check_width, splice_from
from pipeline.models import model_to_run
from pipeline.sae_formats import load_sae
from pipeline.steering import finite_logits, steer_fn

FLOAT32_MAX = torch.finfo(torch.float32).max  # the model computes in float32 or bfloat16: no larger value exists


@stage_config("steer")
@dataclass
class SteerConfig:
    sae: str | None = opt(None, "SAE: a gsp fit folder, a pretrained SAE folder, or a Hub path.")
    sae_revision: str | None = opt(None, "Hub revision of a Hub --sae.")
    feature: list[int] | None = opt(None, "Feature to steer with; repeat the flag for several.")
    strength: list[float] | None = opt(
        None, "Added multiple of the feature's decoder row (residual units); one per --feature, or one for all."
    )
    clamp: bool = opt(False, "Clamp each feature's activation to --strength instead of adding.")
    positions: Literal["all", "generated"] = opt(
        "all", "all (every position but BOS) or generated (from the last prompt token on)."
    )
    prompt: str = opt("The", "Text to continue.")
    max_new_tokens: int = opt(40, "Tokens to generate.")
    temperature: float = opt(0.7, "Sampling temperature; 0 decodes greedily.")
    top_p: float = opt(0.95, "Nucleus sampling: keep the smallest set of tokens with this much probability.")
    top_k: int = opt(0, "Sample among the k likeliest tokens only (0: no limit).")
    seed: int = opt(0, "Seed of the sampling, the same for both continuations.")
    model: str | None = opt(None, "Model (default: the one the SAE's store came from, else the SAE's model name).")
    revision: str | None = opt(None, "Hub revision of --model.")
    layer: int | None = opt(None, "Layer, for SAEs whose files do not name it.")
    site: Literal["resid_post", "mlp_out", "attn_out", "mlp_in"] | None = opt(
        None, "Site, for SAEs that do not name it."
    )
    device: str = opt("auto", "auto (CUDA if present), cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16"] = opt("auto", "Model dtype (auto: bfloat16 on CUDA).")

    def __post_init__(self):
        if not self.feature:
            raise GspError("--feature is required (repeat it to steer with several features)")
        if not self.strength:
            raise GspError("--strength is required: how much of each feature's direction to add (or clamp to)")
        if len(self.strength) not in (1, len(self.feature)):
            raise GspError(f"give one --strength, or one per --feature ({len(self.feature)}), not {len(self.strength)}")
        if self.max_new_tokens <= 0 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise GspError("--max-new-tokens must be positive, --temperature ≥ 0, 0 < --top-p ≤ 1, --top-k ≥ 0")
        if not all(_is_float32(v) for v in (*self.strength, self.temperature)):
            raise GspError(f"--strength and --temperature must be finite numbers in float32's range (|v| ≤ "
                           f"{FLOAT32_MAX:.4g}), got --strength {self.strength}, "
                           f"--temperature {self.temperature:g}")  # fmt: skip
        if not self.prompt.strip():
            raise GspError("--prompt is empty: give the text to continue")

    @property
    def values(self) -> list[float]:
        return self.strength * len(self.feature) if len(self.strength) == 1 else list(self.strength)


def run_steer(cfg: SteerConfig, *, token: str | None = None) -> tuple[str, str]:
    """(unsteered, steered) continuations, printed side by side."""
    from rich.table import Table

    from pipeline.models import load_model

    if not cfg.sae:
        raise GspError("--sae is required: a gsp fit folder, a pretrained SAE folder, or a Hub path")
    loaded = load_sae(cfg.sae, revision=cfg.sae_revision, token=token)
    bad = [f for f in cfg.feature if not 0 <= f < loaded.sae.width]
    if bad:
        raise GspError(f"feature {bad[0]} is out of range: this SAE has features 0..{loaded.sae.width - 1}")
    layer = cfg.layer if cfg.layer is not None else loaded.layer
    site = cfg.site or loaded.site
    if layer is None or site is None:
        raise GspError("this SAE's files name no layer or site: pass --layer and --site")
    spec, revision = model_to_run(cfg.model, cfg.revision, store_path=loaded.training_store, named=loaded.model_name)
    lm = load_model(spec, device=cfg.device, dtype=cfg.dtype, revision=revision, token=token)
    check_width(lm.model, layer, site, loaded.sae.d_in, f"the SAE {cfg.sae}")
    dest = (loaded.layer_out, loaded.site_out) if loaded.is_transcoder else (layer, site)
    check_width(lm.model, *dest, loaded.sae.d_out, f"the SAE {cfg.sae}'s decoder")
    sae = loaded.sae.to(lm.device)
    ids = lm.tokenizer(cfg.prompt, return_tensors="pt").input_ids.to(lm.device)
    plain = generate(lm.model, ids, cfg)
    fn = steer_fn(sae, cfg.feature, cfg.values, clamp=cfg.clamp, positions=cfg.positions, prompt_len=ids.shape[1])
    with splice_from(lm.model, (layer, site), dest, fn), finite_logits(lm.model):
        steered = generate(lm.model, ids, cfg)
    texts = [lm.tokenizer.decode(out[ids.shape[1] :], skip_special_tokens=True) for out in (plain, steered)]

    how = "clamped to" if cfg.clamp else "+"
    edits = ", ".join(f"#{f} {how} {v:g}" for f, v in zip(cfg.feature, cfg.values, strict=True))
    where = f"layer {dest[0]} {dest[1]}" + (f" (read at layer {layer} {site})" if dest != (layer, site) else "")
    table = Table(title=f"{cfg.prompt!r} · {where} · seed {cfg.seed}", title_justify="left")
    table.add_column("unsteered", ratio=1)
    table.add_column(f"steered: {edits} ({cfg.positions} positions)", ratio=1)
    table.add_row(*texts)
    console.print(table)
    return texts[0], texts[1]


def generate(model: torch.nn.Module, ids: torch.Tensor, cfg: SteerConfig) -> torch.Tensor:
    """One continuation, seeded: the same seed gives the same draws with and without steering."""
    torch.manual_seed(cfg.seed)
    sample = cfg.temperature > 0
    kw = {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k} if sample else {}  # top_k 0: off
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=sample, **kw)[0]


def _is_float32(v: float) -> bool:
    """A finite number that float32 holds (1e39 is finite in Python, infinite in float32)."""
    return math.isfinite(v) and abs(v) <= FLOAT32_MAX
