"""The README's two commands are the ones that work: CI runs the test command verbatim."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    return [line for line in lines if line.startswith("python3 -m venv .venv")]


def test_ci_runs_the_readme_test_command():
    main_job, tests = _commands()[:2]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci and tests.endswith("python -m pytest -q")
    assert main_job.endswith(".venv/bin/gsp run")  # harvest → fit → evaluate, printing the report's path


def test_every_config_file_loads():
    from pipeline.config import load_config_values
    from pipeline.paths import configs_dir
    from stages.evaluate import EvaluateConfig
    from stages.fit import FitConfig
    from stages.harvest import HarvestConfig
    from stages.run import RunConfig

    names = sorted(p.stem for p in configs_dir().glob("*.yaml"))
    assert "default" in names and {"gemma-3-270m", "gemma-3-1b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b"} <= set(
        names
    )
    for name in names:
        cfg = HarvestConfig(**load_config_values(HarvestConfig, name))
        assert cfg.layer >= 0
        assert FitConfig(**load_config_values(FitConfig, name)).width > 0
        assert EvaluateConfig(**load_config_values(EvaluateConfig, name)).delta_tokens > 0
        assert RunConfig(**load_config_values(RunConfig, name)).heldout_tokens > 0
