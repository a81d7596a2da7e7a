"""One definition per config: a dataclass whose field docs become `--help`.

Precedence is defaults < config file < command-line flags. A field marked `sweep` takes a list
(`--width 4096,16384` on the command line, `width: [4096, 16384]` in a file): `build_values` hands
such fields over as lists, and a stage that sweeps expands them; `build_config` wants one value.
A config file is YAML,
either flat (`layer: 12`, like the original `configs/default.yaml`) or with one
section per stage (`harvest:`, `fit:`, ...); section keys win over flat ones, and
an `about:` section is free text for people. Unknown keys are an error, so a typo
never silently falls back to a default.
"""

import dataclasses
import inspect
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
import yaml

from pipeline.console import cli_errors
from pipeline.errors import GspError
from pipeline.paths import configs_dir

# section name -> config class, filled by @stage_config
STAGE_CONFIGS: dict[str, type] = {}


def opt(
    default: Any, help: str, *, aliases: tuple[str, ...] = (), run_only: bool = False, path: bool = False,
    sweep: bool = False,
) -> Any:  # fmt: skip
    """A config field: its default, the help text shown by --help, and old names accepted in files.

    `run_only`: the field steers a run (where to write, logging, device) without deciding what the
    artifact holds, so it may differ on resume. `path`: a local path, compared resolved (an absolute
    and a relative spelling of one folder are the same setting). `sweep`: the field also takes a list
    of values (see the module's docstring).
    """
    meta = {"help": help, "aliases": aliases, "run_only": run_only, "path": path, "sweep": sweep}
    return dataclasses.field(default=default, metadata=meta)


def content(cfg: Any) -> dict[str, Any]:
    """The fields of a config that decide its artifact's content (run-only fields left out).

    This is the one definition of "the same settings": harvest resume, fit --resume and gsp run's
    reuse of a finished SAE all compare these values."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not f.metadata.get("run_only")}


def differences(saved: dict[str, Any], cfg: Any, what: str) -> list[str]:
    """`key: <what> has X, asked Y` for every content field whose saved value differs from cfg's
    (a key the saved record lacks counts as its default; path fields are compared resolved)."""
    out = []
    for f in dataclasses.fields(cfg):
        if f.metadata.get("run_only"):
            continue
        now = getattr(cfg, f.name)
        was = saved.get(f.name, f.default)
        if f.metadata.get("path"):
            same = resolve_path(was) == resolve_path(now)
        else:
            same = was == now
        if not same:
            show = lambda v: "the default" if v is None else repr(v)  # noqa: E731  (None: resolved where used)
            out.append(f"{f.name}: {what} has {show(was)}, asked {show(now)}")
    return out


def resolve_path(value: Any) -> Any:
    """A local path made absolute (URLs other than file:// are left as they are)."""
    if not isinstance(value, str) or ("://" in value and not value.startswith("file://")):
        return value
    return str(Path(value.removeprefix("file://")).expanduser().resolve())


def stage_config(section: str):
    """Register a config dataclass as the one definition of a stage's `section` in config files."""

    def register(cls: type) -> type:
        STAGE_CONFIGS[section] = cls
        cls.section = section
        return cls

    return register


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check a value read from a file against the field's type; ints are fine where floats are."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise GspError(f"config key '{key}' may not be empty")
    if get_origin(base) is list:
        if not isinstance(value, list):
            value = [value]  # `feature: 12` in a file means [12]
        (inner,) = get_args(base)
        return [_coerce(inner, v, key) for v in value]
    if get_origin(base) is Literal:
        if value not in get_args(base):
            raise GspError(f"config key '{key}' is {value!r}; choose one of {', '.join(map(str, get_args(base)))}")
        return value
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if base is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if base is str and isinstance(value, list) and all(isinstance(v, int | str) for v in value):
        return ",".join(str(v) for v in value)  # `layer: [5, 9, 12]` in a file means --layer 5,9,12
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise GspError(f"config key '{key}' should be {base.__name__}, got {value!r}")
    return value


def resolve_config_path(name: str) -> Path:
    """A path to a YAML file, or the name of one in configs/ (`default`, `gemma-3-1b`)."""
    for candidate in (Path(name), configs_dir() / name, configs_dir() / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in configs_dir().glob("*.yaml")))
    raise GspError(f"config '{name}' not found: give a YAML file's path or one of: {known}")


def load_config_values(cls: type, name: str) -> dict[str, Any]:
    """The values a config file sets for `cls`'s section, checked and keyed by field name."""
    path = resolve_config_path(name)
    text = path.read_text()
    try:
        _refuse_repeated_keys(yaml.compose(text), path)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise GspError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise GspError(f"config {path} should be a mapping of keys to values")
    all_keys = {}
    for c in STAGE_CONFIGS.values():
        all_keys.update(_field_names(c))
    own = _field_names(cls)
    flat, section = {}, {}
    for key, value in data.items():
        if key == "about":
            continue
        if key in STAGE_CONFIGS:
            if not isinstance(value, dict):
                raise GspError(f"section '{key}' in {path} should be a mapping")
            for sub in value:
                if sub not in _field_names(STAGE_CONFIGS[key]):
                    raise GspError(f"unknown key '{key}.{sub}' in {path}; see `gsp {key} --help`")
            if key == cls.section:
                section = value
        elif key not in all_keys:
            raise GspError(f"unknown key '{key}' in {path}; see `gsp <stage> --help` for the options")
        else:
            flat[key] = value
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in [*flat.items(), *section.items()]:
        if key in own:
            f = fields[own[key]]
            values[f.name] = _sweep_values(f, value, key) if f.metadata.get("sweep") else _coerce(f.type, value, key)
    return values


def _refuse_repeated_keys(node: yaml.Node | None, path: Path, prefix: str = "") -> None:
    """A key given twice in one mapping (`width:` twice, or a whole `fit:` section): YAML lets the
    later one win silently, so one of the two settings would be ignored without a word."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(item, path, prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[str, int] = {}
    for key, value in node.value:
        name = prefix + str(key.value)
        line = key.start_mark.line + 1
        if name in lines:
            raise GspError(f"config {path} sets '{name}' twice (lines {lines[name]} and {line}); keep one")
        lines[name] = line
        _refuse_repeated_keys(value, path, name + ".")


def _sweep_values(f: dataclasses.Field, value: Any, key: str) -> list:
    """A sweep field's values as a list: `4096,16384` (a flag, or a string in a file), a YAML list, or one value."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    values = value if isinstance(value, list) else [value]
    if not values or "" in values:
        raise GspError(f"{key} takes a value, or a list like 20,60,120; got {value!r}")
    return [_parse(f.type, v, key) if isinstance(v, str) else _coerce(f.type, v, key) for v in values]


def _parse(tp: Any, text: str, key: str) -> Any:
    """One value of a field from its text (the command line hands sweep fields over as text)."""
    base, optional = _unwrap_optional(tp)
    if get_origin(base) is Literal:
        if text not in get_args(base):
            raise GspError(f"{key} is {text!r}; choose one of {', '.join(map(str, get_args(base)))}")
        return text
    try:
        return base(text) if base in (int, float) else text
    except ValueError:
        raise GspError(f"{key} takes {base.__name__} values, or a list like 20,60,120; got {text!r}") from None


def _field_names(cls: type) -> dict[str, str]:
    """Every key a file may use for `cls` (field names and their aliases) -> field name."""
    names = {}
    for f in dataclasses.fields(cls):
        names[f.name] = f.name
        for alias in f.metadata.get("aliases", ()):
            names[alias] = f.name
    return names


def build_values(cls: type, config: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    """defaults < config file < flags (a flag left unset is None and does not override); a sweep
    field's value is a list of one or more values."""
    values = load_config_values(cls, config) if config else {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, v in flags.items():
        if v is None or v == []:  # an unset list flag is []
            continue
        f = fields[name]
        values[name] = _sweep_values(f, v, "--" + name.replace("_", "-")) if f.metadata.get("sweep") else v
    return values


def build_config(cls: type, config: str | None, flags: dict[str, Any]) -> Any:
    """One config: defaults < config file < flags, every sweep field given one value."""
    values = build_values(cls, config, flags)
    for name, v in values.items():
        if _is_sweep(cls, name) and isinstance(v, list):
            if len(set(v)) > 1:
                shown = ", ".join(map(str, v))
                raise GspError(f"{name} takes one value here, got {shown} (a list sweeps in gsp {cls.section} only)")
            values[name] = v[0]
    return cls(**values)


def _is_sweep(cls: type, name: str) -> bool:
    return any(f.name == name and f.metadata.get("sweep") for f in dataclasses.fields(cls))


def _option(f: dataclasses.Field) -> inspect.Parameter:
    base, _ = _unwrap_optional(f.type)
    if f.metadata.get("sweep"):
        base = str  # one value, or a list that sweeps (parsed by build_values)
    help_ = f.metadata.get("help", "")
    shown = f.default if f.default is not dataclasses.MISSING else None
    help_ = f"{help_} (default: {shown})" if shown is not None else help_
    flag = "--" + f.name.replace("_", "-")
    if base is bool:
        option = typer.Option(f"{flag}/--no-{flag[2:]}", help=help_)
    else:
        option = typer.Option(flag, help=help_)
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[base | None, option]
    )


def command_from_config(
    app: typer.Typer, cls: type, run, *, name: str, extra: list[inspect.Parameter], expand=None
) -> Any:  # fmt: skip
    """Register `run(cfg, **extras)` as `gsp <name>`: `--config` plus one flag per field of `cls`.

    `extra` are options that are not part of the config (secrets, actions like --overwrite). With
    `expand`, run gets `expand(values)` instead: the stage's configs from values whose sweep fields are lists.
    """
    extra_names = [p.name for p in extra]
    config_param = inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option("--config", "-c", help="YAML config: a path or a name in configs/ (flags override it)."),
        ],
    )

    def command(**kwargs):
        with cli_errors():
            extras = {k: kwargs.pop(k) for k in extra_names}
            config = kwargs.pop("config")
            cfg = expand(build_values(cls, config, kwargs)) if expand else build_config(cls, config, kwargs)
            return run(cfg, **extras)

    params = [config_param, *(_option(f) for f in dataclasses.fields(cls)), *extra]
    command.__signature__ = inspect.Signature(params)
    command.__doc__ = run.__doc__
    command.__name__ = name
    app.command(name)(command)
    return command
