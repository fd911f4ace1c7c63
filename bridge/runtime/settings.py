"""Settings of `sd-bridge run`: defaults, a TOML file, then the command line on top."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge.stream import StreamConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ACCEL_CHOICES = ("auto", "none", "cudagraph", "compile")
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")


@dataclass
class RunSettings:
    """Everything `sd-bridge run` needs; field names are the TOML keys."""

    input: str = "pattern:bars"
    output: list[str] = field(default_factory=lambda: ["shm:sd-bridge-out"])
    model: str = "stabilityai/sd-turbo"
    vae: str = "tiny"
    lora: list[str] = field(default_factory=list)
    lcm_lora: str = ""
    prompt: str = "a psychedelic painting, vivid colours"
    negative_prompt: str = ""
    t_index: list[int] = field(default_factory=lambda: [32, 45])
    num_inference_steps: int = 50
    cfg: str = "self"
    guidance: float = 1.2
    delta: float = 1.0
    seed: int = 2
    width: int = 512
    height: int = 512
    frame_buffer_size: int = 1
    mode: str = "img2img"
    filter: bool = False
    filter_threshold: float = 0.98
    filter_max_skip: int = 10
    accel: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    fps: float = 30.0
    on_input_loss: str = "last"
    frames: int = 0
    osc_host: str = "127.0.0.1"
    osc_port: int = 7000
    osc_allow: list[str] = field(default_factory=list)
    osc_feedback: list[str] = field(default_factory=list)
    osc: bool = True
    quiet: bool = False

    def stream_config(self) -> StreamConfig:
        """The pipeline settings these settings start with (ValueError if out of bounds)."""
        # Imported here so that `sd-bridge --help` and `list` stay free of torch.
        from bridge.stream import StreamConfig

        return StreamConfig(
            width=self.width,
            height=self.height,
            t_index_list=tuple(self.t_index),
            num_inference_steps=self.num_inference_steps,
            frame_buffer_size=self.frame_buffer_size,
            cfg_type=self.cfg,
            guidance_scale=self.guidance,
            delta=self.delta,
            seed=self.seed,
            mode=self.mode,
            similarity_filter=self.filter,
            similarity_threshold=self.filter_threshold,
            max_skip_frames=self.filter_max_skip,
        )

    def store_values(self) -> dict[str, object]:
        """The live parameters these settings start the store with."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "guidance_scale": self.guidance,
            "delta": self.delta,
            "seed": self.seed,
            "num_inference_steps": self.num_inference_steps,
            "t_index_list": tuple(self.t_index),
            "cfg_type": self.cfg,
            "filter_enable": self.filter,
            "filter_threshold": self.filter_threshold,
            "filter_max_skip": self.filter_max_skip,
        }


def _type_name(kind: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        kind, "a list"
    )


def _check(name: str, value: Any, default: Any) -> str | None:
    """A sentence if `value` does not have the type of `default`, else None."""
    kind = type(default)
    if isinstance(default, list):
        item = int if name == "t_index" else str
        if not isinstance(value, list) or not all(
            isinstance(v, item) and not isinstance(v, bool) for v in value
        ):
            what = "integers" if item is int else "strings"
            return f"{name} must be a list of {what}, got {value!r}."
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        return f"{name} must be {_type_name(kind)}, got {value!r}."
    return None


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML config; raise ValueError listing every problem, one sentence each."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist; check the --config path.") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config file {path} is not valid TOML: {error}.") from None
    defaults = {
        f.name: f.default_factory() if callable(f.default_factory) else f.default
        for f in fields(RunSettings)
    }
    problems = []
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in defaults:
            problems.append(f"{path}: unknown setting {key!r}; see `sd-bridge run --help`.")
            continue
        problem = _check(name, value, defaults[name])
        if problem:
            problems.append(f"{path}: {problem}")
    if problems:
        raise ValueError("\n".join(problems))
    return {key.replace("-", "_"): value for key, value in data.items()}


def merge(config: dict[str, Any], overrides: dict[str, Any]) -> RunSettings:
    """Defaults, then the config file, then the command-line values that were given."""
    values = dict(config)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "guidance" in values and isinstance(values["guidance"], int):
        values["guidance"] = float(values["guidance"])
    return RunSettings(**values)
