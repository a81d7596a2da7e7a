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


def test_every_config_file_loads_into_every_stage():
    """Each file's values pass every stage's checks (unknown keys and bad values raise)."""
    from pipeline.config import build_config
    from pipeline.paths import configs_dir
    from stages.evaluate import EvaluateConfig
    from stages.features import FeaturesConfig
    from stages.fit import FitConfig
    from stages.harvest import HarvestConfig
    from stages.run import RunConfig

    names = sorted(p.stem for p in configs_dir().glob("*.yaml"))
    assert {"default", "gemma-3-270m", "gemma-3-1b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b"} <= set(names)
    for name in names:
        for cls in (HarvestConfig, FitConfig, EvaluateConfig, FeaturesConfig, RunConfig):
            build_config(cls, name, {})  # raises GspError on a bad value


def test_each_preset_harvests_its_gemma_scope_2_layers_and_runs_one_of_them():
    """A preset harvests its release's resid_post layers of its own model in one pass, so that Google's
    SAEs for those layers can be evaluated on the store, and gsp run fits one of them (`about:` is what
    the preset claims; checked here)."""
    import yaml

    from pipeline.config import build_config
    from pipeline.models import model_name
    from pipeline.paths import configs_dir
    from stages.harvest import HarvestConfig
    from stages.run import RunConfig

    for path in sorted(configs_dir().glob("gemma-3-*.yaml")):
        about = yaml.safe_load(path.read_text())["about"]
        harvest = build_config(HarvestConfig, path.stem, {})
        run = build_config(RunConfig, path.stem, {})
        size = path.stem.removeprefix("gemma-3-")
        assert model_name(harvest.model) in (f"google/gemma-3-{size}", f"google/gemma-3-{size}-pt"), path.name
        assert about["gemma_scope_2"] == f"google/gemma-scope-2-{size}-pt", path.name
        layers = about["gemma_scope_2_resid_post_layers"]
        points = harvest.points(about["num_layers"])
        assert points == [(layer, "resid_post") for layer in layers] and max(layers) < about["num_layers"], path.name
        assert run.hook in {f"L{layer}.resid_post" for layer in layers}, path.name
