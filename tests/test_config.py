"""Config files: a key given twice (a setting or a whole section) is refused, naming it and both lines."""

import re

import pytest
from conftest import one_line_error

from pipeline.config import load_config_values
from pipeline.errors import GspError
from stages.fit import FitConfig
from stages.harvest import HarvestConfig


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("layer: 3\nseed: 1\nlayer: 5\n", "layer", (1, 3)),
        ("harvest:\n  seed: 1\n  context_size: 16\n  seed: 2\n", "harvest.seed", (2, 4)),
        ("fit:\n  width: 64\nharvest:\n  seed: 1\nfit:\n  width: 128\n", "fit", (1, 5)),
        ("about: |\n  notes\nfit:\n  steps: 10\n  lr: 1.0e-4\n  lr: 3.0e-4\n", "fit.lr", (5, 6)),
    ],
)
@pytest.mark.parametrize("cls", [HarvestConfig, FitConfig])
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path, text, key, lines, cls):
    """YAML itself lets the later value win: one of the two settings would be dropped without a word,
    whichever stage reads the file (here even a section another stage reads)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(GspError, match=rf"sets '{re.escape(key)}' twice \(lines {lines[0]} and {lines[1]}\)"):
        load_config_values(cls, str(cfg))


def test_the_same_key_in_different_sections_is_not_a_repeat(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 1\nharvest:\n  seed: 2\nfit:\n  seed: 3\n  width: [64, 128]\n")
    assert load_config_values(HarvestConfig, str(cfg)) == {"seed": 2}  # a section wins over a flat key
    assert load_config_values(FitConfig, str(cfg))["seed"] == 3


@pytest.mark.parametrize("command", ["fit", "run"])
def test_gsp_refuses_a_repeated_section_in_one_line(gsp, tmp_path, command):
    cfg = tmp_path / "c.yaml"  # (were it read, its tokens: 0 and width: 0 would stop either command at once)
    cfg.write_text("harvest:\n  tokens: 0\nfit:\n  width: 64\nfit:\n  width: 0\n")
    one_line_error(gsp(command, "-c", cfg), str(cfg), "sets 'fit' twice (lines 3 and 5)")
