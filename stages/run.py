"""gsp run: the main job in one command — harvest, fit, evaluate on held-out documents.

1. harvest the train store (the config's `harvest:` section);
2. harvest a held-out store with the same settings (`--part heldout`, `heldout_tokens` tokens);
3. fit an SAE on the train store (`fit:`);
4. evaluate it on the held-out store (`evaluate:`), writing the report.
Each step talks to the next through its artifact on disk, and each is idempotent: a complete store
is kept, an interrupted harvest resumes, an interrupted fit resumes from its checkpoint, and an SAE
already fitted with the same settings is reused. Rerunning after a crash finishes the job.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import build_config, opt, stage_config
from pipeline.console import info
from pipeline.errors import GspError
from stages.evaluate import EvaluateConfig, run_evaluate
from stages.fit import FitConfig, fit_or_reuse
from stages.harvest import HarvestConfig, run_harvest


@stage_config("run")
@dataclass
class RunConfig:
    heldout_tokens: int = opt(32_768, "Tokens of the held-out store the SAE is evaluated on.")
    hook: str | None = opt(
        None, "The hook point to fit and evaluate when the harvest writes several (e.g. L12.resid_post)."
    )

    def __post_init__(self):
        if self.heldout_tokens <= 0:
            raise GspError(f"--heldout-tokens must be positive, got {self.heldout_tokens}")


def _hook_path(harvest: HarvestConfig, hook: str | None) -> str:
    """The store's path, or its hook point's when the harvest writes several."""
    several = harvest.layer == "all" or "," in harvest.layer + harvest.site
    if several and hook is None:
        raise GspError("the harvest section names several hook points: set `hook` in the config's run section "
                       "(e.g. L12.resid_post) to the one gsp run fits and evaluates")  # fmt: skip
    return f"{harvest.store_path}/{hook}" if hook else harvest.store_path


def run_all(cfg: RunConfig, config: str | None, *, token: str | None = None) -> Path:
    """Run the four steps with the stage settings from `config`; returns the report's path."""
    harvest = build_config(HarvestConfig, config, {})
    _hook_path(harvest, cfg.hook)  # before any work
    if harvest.part != "train":
        raise GspError("gsp run harvests the train part itself; remove `part` from the config's harvest section")
    heldout = dataclasses.replace(harvest, part="heldout", tokens=cfg.heldout_tokens, store=None)
    info(f"[bold]1/4[/] train store {harvest.store_path}")
    run_harvest(harvest, token=token)
    info(f"[bold]2/4[/] held-out store {heldout.store_path}")
    run_harvest(heldout, token=token)

    fit = build_config(FitConfig, config, {})
    fit.store = fit.store or _hook_path(harvest, cfg.hook)
    info(f"[bold]3/4[/] SAE {fit.out_dir}")
    fit_or_reuse(fit)

    evaluate = build_config(EvaluateConfig, config, {})
    evaluate.sae = evaluate.sae or [str(fit.out_dir)]
    evaluate.store = evaluate.store or _hook_path(heldout, cfg.hook)
    info(f"[bold]4/4[/] evaluate on {evaluate.store}")
    return run_evaluate(evaluate, token=token)
