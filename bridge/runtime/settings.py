"""Settings of `sd-bridge run`: the schema's defaults, a TOML file, then the command line on top.

Every field of `RunSettings` is one entry of the schema in bridge/control/params.py: its name is
the TOML key and the CLI flag, its aliases are older spellings still accepted, and its check is
the one the OSC server applies to live changes.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.control.params import (
    PARAMS,
    SETTINGS,
    SETTINGS_BY_KEY,
    Kind,
    Param,
    ParamError,
    describe,
)

if TYPE_CHECKING:
    from bridge.stream import StreamConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PYTHON_TYPES = {
    Kind.FLOAT: float,
    Kind.INT: int,
    Kind.BOOL: bool,
    Kind.STRING: str,
    Kind.CHOICE: str,
    Kind.INT_LIST: tuple,
    Kind.STRING_LIST: tuple,
}


class _RunSettingsMethods:
    """What `RunSettings` adds to its schema-generated fields."""

    def stream_config(self) -> StreamConfig:
        """The pipeline settings these settings start with (ValueError if out of bounds)."""
        # Imported here so that `sd-bridge --help` and `list` stay free of torch.
        from bridge.stream import StreamConfig

        return StreamConfig(**{p.name: getattr(self, p.name) for p in SETTINGS if p.stream})

    def store_values(self) -> dict[str, object]:
        """The live parameters these settings start the store with."""
        return {p.name: getattr(self, p.name) for p in PARAMS}


RunSettings = make_dataclass(
    "RunSettings",
    [(p.name, PYTHON_TYPES[p.kind], field(default=p.default)) for p in SETTINGS],
    bases=(_RunSettingsMethods,),
    frozen=True,
    namespace={"__doc__": "Everything `sd-bridge run` needs; one field per schema setting."},
)


def check_setting(key: str, value: Any, where: str) -> tuple[str, Any]:
    """Return (name, validated value) for a setting named `key`, or raise ValueError.

    `where` says where the value came from (a file path, or "the command line"), so the one
    sentence the user reads names the place, the key and what is allowed.
    """
    param = SETTINGS_BY_KEY.get(key.replace("-", "_"))
    if param is None:
        raise ValueError(f"{where}: unknown setting {key!r}; see `sd-bridge run --help`.")
    if param.kind is Kind.FLOAT and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        return param.name, param.validate(value)
    except ParamError:
        raise ValueError(f"{where}: {key} got {describe(value)}; use {param.allowed()}.") from None


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML config; raise ValueError listing every problem, one sentence each."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist; check the config path.") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config file {path} is not valid TOML: {error}.") from None
    values: dict[str, Any] = {}
    problems = []
    for key, value in data.items():
        try:
            name, checked = check_setting(key, value, str(path))
        except ValueError as error:
            problems.append(str(error))
            continue
        values[name] = checked
    if problems:
        raise ValueError("\n".join(problems))
    return values


def merge(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> Any:
    """Defaults, then the config file, then the command-line values that were given.

    Both mappings are by setting name and already checked; None in `overrides` means "not
    given". Values that contradict each other (a t_index_list beyond num_inference_steps) raise
    ValueError.
    """
    values = dict(config)
    values.update({name: value for name, value in overrides.items() if value is not None})
    settings = RunSettings(**values)
    steps, t_index_list = settings.num_inference_steps, settings.t_index_list
    if max(t_index_list) >= steps:
        raise ValueError(
            f"t_index_list={','.join(map(str, t_index_list))} indexes past the schedule of "
            f"num_inference_steps={steps}; use indices below {steps} or more steps."
        )
    return settings


def parse_lora(text: str) -> tuple[str, float]:
    """Split a LoRA entry `PATH` or `PATH:SCALE` into the path and its scale (1.0 if none).

    A whole entry that names an existing file is a path, colons and all. Otherwise the part after
    the last colon is the scale when it has no path separator in it, and then it must be a number.
    """
    if Path(text).is_file():
        return text, 1.0
    path, colon, scale = text.rpartition(":")
    if not colon or not path or "/" in scale or "\\" in scale or len(path) == 1:
        return text, 1.0
    try:
        return path, float(scale)
    except ValueError:
        raise ValueError(
            f"lora {text!r} ends in scale {scale!r}, which is not a number; "
            f"write PATH:SCALE, e.g. {path}:0.8."
        ) from None


@dataclass(frozen=True)
class SettingHelp:
    """How a setting reads in `--help`: its flags, what it does and its default."""

    flags: tuple[str, ...]
    text: str


def setting_help(param: Param) -> SettingHelp:
    """The flags (name and aliases, with dashes) and help line of one setting."""
    flags = tuple("--" + key.replace("_", "-") for key in (param.name, *param.aliases))
    return SettingHelp(flags, f"{param.effect} Default: {default_text(param)}.")


def default_text(param: Param) -> str:
    """A setting's default as a user would type it."""
    default = param.default
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        if not default:
            return "none"
        return ",".join(str(entry) for entry in default)
    if default == "":
        return "none"
    return str(default)


def settings_table_markdown() -> str:
    """The Markdown table of every setting: flags, TOML key, OSC address, default and effect."""
    lines = [
        "| Setting (TOML key) | Command line | OSC | Default | Effect |",
        "|---|---|---|---|---|",
    ]
    for param in SETTINGS:
        flags = setting_help(param).flags
        if param.kind is Kind.BOOL:
            flags = tuple(f"{flag}, --no-{flag[2:]}" for flag in flags[:1]) + flags[1:]
        osc = f"`{param.address}`" if param.live else "start only"
        aliases = f" (also {', '.join(f'`{a}`' for a in param.aliases)})" if param.aliases else ""
        cells = (
            f"`{param.name}`{aliases}",
            ", ".join(f"`{flag}`" for flag in flags),
            osc,
            f"`{default_text(param)}`",
            param.effect,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
