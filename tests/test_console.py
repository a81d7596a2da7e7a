"""What gsp prints when its output is a file or a pipe (`gsp run > log 2>&1`, `gsp fit --help | less`):
messages and paths never broken at a column, every option's help whole, and progress as plain lines
at a steady interval (pipeline/console.py, stages/cli.py)."""

import dataclasses
import time

import numpy as np
import pytest
import typer
from conftest import gsp_subprocess, one_line_error

import stages.cli
from pipeline.config import STAGE_CONFIGS
from pipeline.console import console, err_console, info, progress, status, warn

LONG = "/" + "/".join(f"folder-{i:02d}-with-a-rather-long-name" for i in range(12)) + "/store"  # ~400 characters


# ------------------------------------------------------------------------------ messages
@pytest.mark.parametrize("say", ["info", "warn", "console", "err_console"])
def test_a_long_path_in_a_message_is_one_line(capsys, say):
    message = f"wrote {LONG} (and more words after it)"
    {"info": info, "warn": warn, "console": console.print, "err_console": err_console.print}[say](message)
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    assert len(lines) == 1 and f"wrote {LONG} (and more words after it)" in lines[0], lines


def test_an_error_naming_a_long_path_is_one_line(gsp):
    one_line_error(gsp("info", LONG), LONG)


def test_a_log_of_a_real_process_keeps_long_lines_whole(tmp_path):
    """stdout and stderr are pipes here, as in `gsp ... > log 2>&1`, whatever terminal stdin is."""
    r = gsp_subprocess("info", LONG, env={"COLUMNS": "80"})
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and LONG in errors[0], r.stderr


def test_info_names_a_long_store_path_on_one_line(gsp, tmp_path):
    from pipeline.tiny import write_synthetic_store

    path = tmp_path.joinpath(*[f"folder-{i:02d}-with-a-rather-long-name" for i in range(6)], "store")
    write_synthetic_store(path, np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32))
    r = gsp("info", path)
    assert r.exit_code == 0 and f"gsp store {path}" in r.output.splitlines(), r.output


# ------------------------------------------------------------------------------ help
def _commands() -> dict:
    return typer.main.get_command(stages.cli.app).commands


@pytest.mark.parametrize("name", [n for n, c in _commands().items() if c.params])
def test_help_in_a_file_holds_every_option_whole(gsp, name):
    """Each option's (and argument's) help on one line, as the command has it (`info`, `export`, `download`...)."""
    r = gsp(name, "--help")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    for p in _commands()[name].params:
        assert p.help and p.help in _entry(lines, p.opts[-1]), (p.opts, p.help, r.output)


@pytest.mark.parametrize("section", sorted(STAGE_CONFIGS))
def test_help_in_a_file_holds_each_config_fields_text_whole(gsp, section):
    """The text comes from the config dataclass (pipeline/config.py's field metadata): it must reach the
    reader whole, long paths and all ("STORE/L12.resid_post", not "STORE/L12.resid_po…")."""
    cls = STAGE_CONFIGS[section]
    r = gsp(section, "--help")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    flags = {o for p in _commands()[section].params for o in p.opts}
    shown = [f for f in dataclasses.fields(cls) if "--" + f.name.replace("_", "-") in flags]
    assert shown  # `run` shows a few of its fields; the stages all of theirs
    for f in shown:
        flag = "--" + f.name.replace("_", "-")
        assert f.metadata["help"] in _entry(lines, flag), (flag, r.output)


def _entry(lines: list[str], flag: str) -> str:
    """An option's (or argument's) entry in click's help: its line, and the next, where a long option's text goes."""
    table = min(lines.index(x) for x in ("Arguments:", "Options:") if x in lines)  # below the command's own text
    starts = [line.strip().split("  ")[0].replace(",", " ").split() for line in lines[table:]]
    (i,) = [table + i for i, names in enumerate(starts) if flag in names]
    return lines[i] + "\n" + (lines[i + 1] if i + 1 < len(lines) else "")


def test_the_command_list_in_a_file_is_whole(gsp):
    """Each command's first sentence, never cut with "..." to fit 80 columns."""
    r = gsp("--help")
    assert r.exit_code == 0, r.output
    for name, command in _commands().items():
        (line,) = [x for x in r.output.splitlines() if x.split()[:1] == [name]]
        shown = line.split()[1:]
        first = command.help.strip().split("\n\n")[0].split()
        assert shown == first[: len(shown)] and shown[-1].endswith("."), (name, line)


# ------------------------------------------------------------------------------ progress
def _lines_until(capsys, seen: list[str], ready, timeout: float = 20.0) -> None:
    """Collect stderr lines until `ready(lines)` (the progress thread prints on its own clock)."""
    deadline = time.monotonic() + timeout
    while not ready(seen):
        assert time.monotonic() < deadline, seen
        seen += capsys.readouterr().err.splitlines()
        time.sleep(0.005)


def test_progress_in_a_log_prints_steady_plain_lines_and_a_last_one(capsys, monkeypatch):
    monkeypatch.setenv("GSP_PROGRESS_SECONDS", "0.01")
    lines: list[str] = []
    with progress("tok") as bar:
        task = bar.add_task("harvest", total=4096)
        for done in (1024, 2048, 3072):
            bar.advance(task, 1024)
            _lines_until(capsys, lines, lambda seen, d=done: any(f"harvest: {d:,}/4,096 tok" in x for x in seen))
        bar.advance(task, 1024)
    lines += capsys.readouterr().err.splitlines()
    assert all(x.startswith("harvest: ") for x in lines), lines
    running = [x for x in lines if "ETA" in x]
    assert {"harvest: 1,024/4,096 tok (25%)", "harvest: 3,072/4,096 tok (75%)"} <= {x.split(" · ")[0] for x in running}
    assert all(" tok/s" in x and "elapsed" in x for x in running)
    assert lines[-1].startswith("harvest: 4,096/4,096 tok (100%) · ") and "done in" in lines[-1], lines
    assert sum("done in" in x for x in lines) == 1  # one last line, even if the thread saw the end first


def test_a_line_after_an_idle_interval_shows_the_mean_rate_not_a_blank(capsys, monkeypatch):
    """A slow batch leaves an interval with nothing done: its line gives the rate since the start."""
    monkeypatch.setenv("GSP_PROGRESS_SECONDS", "0.01")
    lines: list[str] = []
    with progress("tok") as bar:
        task = bar.add_task("delta loss", total=4096)
        bar.advance(task, 1024)
        _lines_until(capsys, lines, lambda seen: sum("delta loss: 1,024/4,096" in x for x in seen) >= 3)
        bar.advance(task, 3072)
    idle = [x for x in lines if x.startswith("delta loss: 1,024/4,096") and "ETA" in x]
    assert len(idle) >= 3 and all("- tok/s" not in x and "ETA -" not in x for x in idle), idle


def test_progress_in_a_log_says_where_a_stopped_loop_stopped(capsys, monkeypatch):
    monkeypatch.setenv("GSP_PROGRESS_SECONDS", "3600")  # no line on the clock: only the last
    with pytest.raises(KeyboardInterrupt), progress("steps", fields=("metrics",)) as bar:
        task = bar.add_task("fit", total=100, completed=10, metrics="")
        bar.update(task, completed=40, metrics="loss 0.1234  L0 60.0")
        raise KeyboardInterrupt
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("fit: 40/100 steps (40%) · ") and "stopped after" in line
    assert line.endswith(" · loss 0.1234  L0 60.0")


def test_progress_of_an_unknown_total_and_of_several_tasks(capsys, monkeypatch):
    monkeypatch.setenv("GSP_PROGRESS_SECONDS", "3600")
    with progress("rows") as bar:
        a = bar.add_task("verify", total=None)
        b = bar.add_task("sweep member", total=8)
        bar.advance(a, 5)
        bar.advance(b, 8)
    lines = capsys.readouterr().err.splitlines()
    assert [x.split(" · ")[0] for x in lines] == ["verify: 5 rows", "sweep member: 8/8 rows (100%)"], lines


def test_progress_that_is_not_shown_prints_nothing(capsys, monkeypatch):
    monkeypatch.setenv("GSP_PROGRESS_SECONDS", "0.01")
    with progress("tok", show=False) as bar:  # every process of a torchrun but the first
        task = bar.add_task("delta loss", total=10)
        bar.advance(task, 10)
        time.sleep(0.05)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf"])
def test_a_bad_progress_interval_is_one_line(gsp, tmp_path, monkeypatch, value):
    from pipeline.tiny import write_synthetic_store

    write_synthetic_store(tmp_path / "store", np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32))
    monkeypatch.setenv("GSP_PROGRESS_SECONDS", value)
    one_line_error(gsp("info", tmp_path / "store", "--verify"), "GSP_PROGRESS_SECONDS", repr(value))


def test_a_wait_without_a_count_is_one_line_in_a_log(capsys):
    with status(f"loading {LONG}"):
        pass
    assert capsys.readouterr().err == f"loading {LONG}\n"
