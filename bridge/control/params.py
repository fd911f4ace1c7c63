"""The live parameters: one schema that validates values and documents the OSC surface.

Every knob the engine reads between frames is a `Param` in `PARAMS`. The schema is the single
source of truth: the store validates with it, the OSC server routes and replies with it, and the
table in docs/osc.md is generated from it by `osc_table_markdown`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from types import MappingProxyType

Value = str | float | int | bool | tuple[int, ...] | tuple[str, ...]
"""A validated parameter value; lists (`t_index_list`, `output`) are tuples."""

MAX_PROMPT_CHARS = 1000
MAX_FADE_SECONDS = 60.0
# An LCM schedule is drawn from the 50 steps the model was distilled with, so it has at most 50.
MAX_INFERENCE_STEPS = 50
MAX_T_INDICES = 8
MAX_LIST_ENTRIES = 16


class ParamError(ValueError):
    """A value a parameter cannot take, told as one sentence naming the address and the fix."""

    def __init__(self, address: str, sentence: str) -> None:
        super().__init__(sentence)
        self.address = address
        self.sentence = sentence


class Kind(str, Enum):
    """The type of value a parameter holds."""

    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    STRING = "string"
    CHOICE = "choice"
    INT_LIST = "int_list"
    STRING_LIST = "string_list"


@dataclass(frozen=True)
class Param:
    """One live parameter: its name, OSC address, type, allowed values, default and effect.

    `minimum` and `maximum` bound numbers (for `INT_LIST`, each entry); `max_length` caps a
    string's characters or a list's entries. `changes_shapes` marks parameters whose change
    resizes tensors, which the engine applies as a visible rebuild rather than between frames.
    `name` is the store key, the TOML key, the CLI flag (with dashes) and, where `stream` is set,
    the `StreamConfig` field it drives; `aliases` are older spellings still accepted. A setting
    that is not `live` is fixed at start: it has no OSC address. `group` heads its CLI section.
    """

    name: str
    address: str
    kind: Kind
    default: Value
    effect: str
    minimum: float | None = None
    maximum: float | None = None
    maximum_exclusive: bool = False
    choices: tuple[str, ...] = ()
    max_length: int = 0
    changes_shapes: bool = False
    aliases: tuple[str, ...] = ()
    stream: bool = True
    live: bool = True
    multiple_of: int = 1
    group: str = "stream"

    def validate(self, value: object) -> Value:
        """Return `value` coerced to this parameter's type, or raise `ParamError`."""
        if self.kind is Kind.FLOAT:
            return self._validate_float(value)
        if self.kind is Kind.INT:
            return self._validate_int(value, value)
        if self.kind is Kind.BOOL:
            return self._validate_bool(value)
        if self.kind is Kind.STRING:
            if isinstance(value, str) and len(value) <= self.max_length:
                return value
            raise self._error(value)
        if self.kind is Kind.CHOICE:
            if isinstance(value, str) and value in self.choices:
                return value
            raise self._error(value)
        if self.kind is Kind.STRING_LIST:
            return self._validate_string_list(value)
        return self._validate_int_list(value)

    def from_osc(self, args: Sequence[object]) -> Value:
        """Return the value carried by one OSC message's arguments, or raise `ParamError`.

        A list parameter takes its entries as separate arguments or as one OSC array; every
        other parameter takes exactly one argument.
        """
        if self.kind is Kind.INT_LIST:
            if len(args) == 1 and isinstance(args[0], list):
                return self.validate(args[0])
            return self.validate(list(args))
        if not args:
            raise self._error(None, "no argument")
        if len(args) > 1:
            raise self._error(None, f"{len(args)} arguments {describe(list(args))}")
        return self.validate(args[0])

    def to_osc(self, value: Value) -> list[int | float | str]:
        """Return `value` as OSC arguments: booleans as 0/1, a list as several ints."""
        if isinstance(value, tuple):
            return [int(entry) for entry in value]
        if isinstance(value, bool):
            return [int(value)]
        return [value]

    def allowed(self) -> str:
        """Say in a few words which values this parameter accepts."""
        if self.kind is Kind.FLOAT:
            upper = "up to but not including" if self.maximum_exclusive else "to"
            return f"a float from {self.minimum} {upper} {self.maximum}"
        if self.kind is Kind.INT:
            steps = f", a multiple of {self.multiple_of}" if self.multiple_of > 1 else ""
            return f"an int from {int(self.minimum or 0)} to {int(self.maximum or 0)}{steps}"
        if self.kind is Kind.BOOL:
            return "0 or 1 (or T/F)"
        if self.kind is Kind.STRING:
            return f"one string of at most {self.max_length} characters"
        if self.kind is Kind.CHOICE:
            return "one of " + ", ".join(self.choices)
        if self.kind is Kind.STRING_LIST:
            return f"a list of up to {MAX_LIST_ENTRIES} strings"
        return (
            f"1 to {self.max_length} strictly increasing ints, "
            f"each from {int(self.minimum or 0)} to num_inference_steps - 1"
        )

    def _error(self, value: object, shown: str | None = None) -> ParamError:
        shown = describe(value) if shown is None else shown
        where = self.address or self.name
        verb = "send" if self.live else "use"
        return ParamError(where, f"{where} got {shown}; {verb} {self.allowed()}.")

    def _in_range(self, number: float) -> bool:
        assert self.minimum is not None and self.maximum is not None
        if self.maximum_exclusive:
            return self.minimum <= number < self.maximum
        return self.minimum <= number <= self.maximum

    def _validate_float(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self._error(value)
        number = float(value)
        if not math.isfinite(number) or not self._in_range(number):
            raise self._error(value)
        return number

    def _validate_int(self, value: object, shown: object) -> int:
        number = _integral(value)
        if number is None or not self._in_range(number) or number % self.multiple_of:
            raise self._error(shown)
        return number

    def _validate_bool(self, value: object) -> bool:
        if isinstance(value, bool):
            return value
        number = _integral(value)
        if number not in (0, 1):
            raise self._error(value)
        return bool(number)

    def _validate_string_list(self, value: object) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)) or len(value) > MAX_LIST_ENTRIES:
            raise self._error(value)
        if not all(isinstance(entry, str) and entry for entry in value):
            raise self._error(value)
        return tuple(value)

    def _validate_int_list(self, value: object) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= self.max_length:
            raise self._error(value)
        entries = tuple(self._validate_int(entry, value) for entry in value)
        if list(entries) != sorted(set(entries)):
            raise self._error(value)
        return entries


def _integral(value: object) -> int | None:
    """Return `value` as an int when it is a whole number (2.0 counts), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    number = float(value)
    if not math.isfinite(number) or not number.is_integer():
        return None
    return int(number)


def describe(value: object) -> str:
    """Show a received value briefly enough for a one-line error."""
    if isinstance(value, str):
        if len(value) > 40:
            return f"a {len(value)}-character string {value[:24]!r}..."
        return repr(value)
    if isinstance(value, bytes):
        return f"a blob of {len(value)} bytes"
    if value is None:
        return "nil"
    if isinstance(value, (list, tuple)):
        if len(value) > 10:
            return f"{len(value)} values"
        return "[" + ", ".join(describe(entry) for entry in value) + "]"
    return repr(value)


PARAMS: tuple[Param, ...] = (
    Param(
        name="prompt",
        address="/sd/prompt",
        kind=Kind.STRING,
        default="a psychedelic painting, vivid colours",
        effect="Text the image is steered towards; re-encoded off the hot path.",
        max_length=MAX_PROMPT_CHARS,
        stream=False,
    ),
    Param(
        name="negative_prompt",
        address="/sd/negative_prompt",
        kind=Kind.STRING,
        default="",
        effect="Text steered away from; used when cfg_type is full or initialize.",
        max_length=MAX_PROMPT_CHARS,
        stream=False,
    ),
    Param(
        name="guidance_scale",
        address="/sd/guidance",
        kind=Kind.FLOAT,
        default=1.2,
        effect="Classifier-free guidance strength; at or below 1.0 guidance is off (conditional "
        "prediction only), for every cfg_type.",
        minimum=0.0,
        maximum=20.0,
        aliases=("guidance",),
    ),
    Param(
        name="delta",
        address="/sd/delta",
        kind=Kind.FLOAT,
        default=1.0,
        effect="Residual CFG: scales the virtual negative noise (cfg_type self or initialize).",
        minimum=0.0,
        maximum=5.0,
    ),
    Param(
        name="cfg_type",
        address="/sd/cfg",
        kind=Kind.CHOICE,
        default="self",
        effect="Guidance mode: none, full (doubles the batch), self or initialize (residual CFG).",
        choices=("none", "full", "self", "initialize"),
        changes_shapes=True,
        aliases=("cfg",),
    ),
    Param(
        name="num_inference_steps",
        address="/sd/num_inference_steps",
        kind=Kind.INT,
        default=50,
        effect="Length of the scheduler's timestep schedule that t_index_list indexes into.",
        minimum=1,
        maximum=MAX_INFERENCE_STEPS,
    ),
    Param(
        name="t_index_list",
        address="/sd/t_index",
        kind=Kind.INT_LIST,
        default=(32, 45),
        effect="Denoising steps per frame: fewer are faster, higher indices keep more input.",
        minimum=0,
        maximum=MAX_INFERENCE_STEPS - 1,
        max_length=MAX_T_INDICES,
        changes_shapes=True,
        aliases=("t_index",),
    ),
    Param(
        name="seed",
        address="/sd/seed",
        kind=Kind.INT,
        default=2,
        effect="Seed of the initial noise.",
        minimum=0,
        maximum=2**31 - 1,
    ),
    Param(
        name="do_add_noise",
        address="/sd/do_add_noise",
        kind=Kind.BOOL,
        default=True,
        effect="Re-noise frames between their denoising steps; off keeps only the noise added "
        "to the input latent.",
    ),
    Param(
        name="noise",
        address="/sd/noise",
        kind=Kind.CHOICE,
        default="fixed",
        effect="How the noise changes between frames: fixed (the seed's, every frame), fresh "
        "(new every frame) or drift (a slow walk at noise_drift).",
        choices=("fixed", "fresh", "drift"),
    ),
    Param(
        name="noise_drift",
        address="/sd/noise/drift",
        kind=Kind.FLOAT,
        default=0.05,
        effect="Drift speed: radians per frame the noise turns towards new noise, keeping its "
        "norm (0 holds it still).",
        minimum=0.0,
        maximum=1.5,
    ),
    Param(
        name="similarity_filter",
        address="/sd/filter/enable",
        kind=Kind.BOOL,
        default=False,
        effect="Stochastic similarity filter: skip frames that barely differ from the last one.",
        aliases=("filter", "filter_enable"),
    ),
    Param(
        name="similarity_threshold",
        address="/sd/filter/threshold",
        kind=Kind.FLOAT,
        default=0.98,
        effect="Cosine similarity above which the filter may skip a frame.",
        minimum=0.0,
        maximum=1.0,
        maximum_exclusive=True,
        aliases=("filter_threshold",),
    ),
    Param(
        name="max_skip_frames",
        address="/sd/filter/max_skip",
        kind=Kind.INT,
        default=10,
        effect="Most frames the filter skips in a row before one is processed anyway.",
        minimum=0,
        maximum=600,
        aliases=("filter_max_skip",),
    ),
    Param(
        name="feature_bank_size",
        address="/sd/bank/size",
        kind=Kind.INT,
        default=0,
        effect="Feature bank: how many past frames each frame also attends to (their attention "
        "keys and values), for less flicker; 0 is off. A change empties the bank and captures the "
        "CUDA graph again.",
        minimum=0,
        maximum=8,
        changes_shapes=True,
    ),
    Param(
        name="feature_bank_strength",
        address="/sd/bank/strength",
        kind=Kind.FLOAT,
        default=0.8,
        effect="Feature injection: how far features move towards their most similar banked ones "
        "(0 is attention only).",
        minimum=0.0,
        maximum=1.0,
    ),
    Param(
        name="feature_bank_threshold",
        address="/sd/bank/threshold",
        kind=Kind.FLOAT,
        default=0.98,
        effect="Cosine similarity a banked feature needs for injection to use it.",
        minimum=0.0,
        maximum=1.0,
    ),
    Param(
        name="latent_feedback",
        address="/sd/feedback",
        kind=Kind.FLOAT,
        default=0.0,
        effect="Blends the last output latent into each new input latent (img2img); 0 is off, "
        "1 ignores the input.",
        minimum=0.0,
        maximum=1.0,
    ),
    Param(
        name="ip_adapter_scale",
        address="/sd/ipadapter/scale",
        kind=Kind.FLOAT,
        default=0.6,
        effect="IP-Adapter: how strongly the picture (ip_adapter_image) steers the output; 0 is "
        "off, 1 as trained, above 1 stronger. Needs ip_adapter.",
        minimum=0.0,
        maximum=2.0,
        stream=False,
    ),
    Param(
        name="pause",
        address="/sd/pause",
        kind=Kind.BOOL,
        default=False,
        effect="Stop diffusing; outputs keep the last frame.",
        stream=False,
    ),
    Param(
        name="prompt_fade",
        address="/sd/prompt/fade",
        kind=Kind.FLOAT,
        default=0.0,
        effect="Seconds over which the next prompt change cross-fades the embeddings; 0 cuts.",
        minimum=0.0,
        maximum=MAX_FADE_SECONDS,
        stream=False,
    ),
    Param(
        name="seed_fade",
        address="/sd/seed/fade",
        kind=Kind.FLOAT,
        default=0.0,
        effect="Seconds over which the next seed change cross-fades the noise; 0 cuts.",
        minimum=0.0,
        maximum=MAX_FADE_SECONDS,
        stream=False,
    ),
)


def _start(**fields: object) -> Param:
    """A setting fixed at start: no OSC address; a pipeline field only where it says so."""
    fields.setdefault("stream", False)
    return Param(address="", live=False, **fields)  # type: ignore[arg-type]


START_SETTINGS: tuple[Param, ...] = (
    _start(
        name="input",
        kind=Kind.STRING,
        default="pattern:bars",
        effect="Source URI: spout:NAME, cam:0, shm:NAME, ndi:NAME, syphon:NAME, file:PATH or "
        "pattern:KIND.",
        max_length=MAX_PROMPT_CHARS,
        group="input and output",
    ),
    _start(
        name="output",
        kind=Kind.STRING_LIST,
        default=("shm:sd-bridge-out",),
        effect="Sink URI, repeatable: spout:NAME, vcam, shm:NAME, ndi:NAME, syphon:NAME, "
        "file:PATH or null.",
        group="input and output",
    ),
    _start(
        name="fps",
        kind=Kind.FLOAT,
        default=30.0,
        effect="Frame rate of pattern and file inputs and of outputs held while the input is gone.",
        minimum=1.0,
        maximum=240.0,
        group="input and output",
    ),
    _start(
        name="on_input_loss",
        kind=Kind.CHOICE,
        default="last",
        effect="While the input is gone, keep sending the last frame or black.",
        choices=("last", "black"),
        group="input and output",
    ),
    _start(
        name="ip_adapter_image",
        kind=Kind.STRING,
        default="",
        effect="The picture the IP-Adapter follows: a PNG or JPEG file, read at start, or a source "
        "URI (shm:NAME, spout:NAME, ndi:NAME, pattern:KIND, ...) whose newest frame wins.",
        max_length=MAX_PROMPT_CHARS,
        group="input and output",
    ),
    _start(
        name="model",
        kind=Kind.STRING,
        default="stabilityai/sd-turbo",
        effect="Diffusers folder, .safetensors file, cached Hugging Face id or synthetic:NAME.",
        max_length=MAX_PROMPT_CHARS,
        group="model",
    ),
    _start(
        name="vae",
        kind=Kind.STRING,
        default="tiny",
        effect="tiny (TAESD), model (the model's own VAE), or a VAE folder or id.",
        max_length=MAX_PROMPT_CHARS,
        group="model",
    ),
    _start(
        name="lora",
        kind=Kind.STRING_LIST,
        default=(),
        effect="LoRA file, PATH or PATH:SCALE; repeatable; unless fuse_loras, its scale changes "
        "live over OSC, from -2 to 2 (/sd/lora/0/scale for the first file).",
        group="model",
    ),
    _start(
        name="lcm_lora",
        kind=Kind.STRING,
        default="",
        effect="LCM-LoRA file, fused at scale 1 before the other LoRAs.",
        max_length=MAX_PROMPT_CHARS,
        group="model",
    ),
    _start(
        name="download",
        kind=Kind.BOOL,
        default=False,
        effect="Fetch a Hugging Face model that is not in the cache (needs the internet); off, "
        "the bridge never touches the network.",
        group="model",
    ),
    _start(
        name="fuse_loras",
        kind=Kind.BOOL,
        default=False,
        effect="Fuse the LoRA files into the weights at their start scales: a few percent "
        "faster, but their scales no longer change live.",
        group="model",
    ),
    _start(
        name="ip_adapter",
        kind=Kind.STRING,
        default="",
        effect="IP-Adapter weights file (e.g. h94/IP-Adapter's models/ip-adapter_sd15.safetensors) "
        "or synthetic:NAME; the output then follows the style of ip_adapter_image.",
        max_length=MAX_PROMPT_CHARS,
        group="model",
    ),
    _start(
        name="ip_adapter_image_encoder",
        kind=Kind.STRING,
        default="",
        effect="Folder of the IP-Adapter's CLIP image encoder; empty: the image_encoder folder "
        "beside the weights file.",
        max_length=MAX_PROMPT_CHARS,
        group="model",
    ),
    _start(
        name="controlnet",
        kind=Kind.STRING_LIST,
        default=(),
        effect="ControlNet, MODEL@SOURCE@SCALE; repeatable. SOURCE is canny (edges of the input), "
        "passthrough (the input itself) or a source URI (shm:depth, spout:NAME, ...); canny and "
        "1.0 when left out. Live at /sd/controlnet/0/scale, /enable, /canny/low and /canny/high.",
        group="model",
    ),
    _start(
        name="device",
        kind=Kind.STRING,
        default="auto",
        effect="cuda, cuda:1, mps or cpu; auto picks the best there is.",
        max_length=32,
        group="model",
    ),
    _start(
        name="dtype",
        kind=Kind.CHOICE,
        default="auto",
        effect="Weight and activation precision; auto is fp16 on a GPU and fp32 on the CPU.",
        choices=("auto", "fp16", "bf16", "fp32"),
        group="model",
    ),
    _start(
        name="accel",
        kind=Kind.CHOICE,
        default="auto",
        effect="Acceleration; auto is compile where CUDA and a matching Triton are found, else "
        "cudagraph on CUDA, else none; the start says which and why.",
        choices=("auto", "none", "cudagraph", "compile"),
        group="model",
    ),
    _start(
        name="precision",
        kind=Kind.CHOICE,
        default="default",
        effect="UNet matrix products: default keeps dtype; fp8 runs the large ones in float8 "
        "(NVIDIA GPUs of compute capability 8.9 or newer: Ada, Hopper).",
        choices=("default", "fp8"),
        group="model",
    ),
    _start(
        name="compile_scope",
        kind=Kind.CHOICE,
        default="model",
        effect="What accel compile compiles: model (each network whole) or blocks (each repeated "
        "block once per size: less to trace and compile; the parts between blocks uncompiled).",
        choices=("model", "blocks"),
        group="model",
    ),
    _start(
        name="live_compile",
        kind=Kind.BOOL,
        default=True,
        effect="Under accel compile, a live change to a shape not run since start (feature bank, "
        "steps, size) is compiled first: a pause of seconds. Off: it runs uncompiled, no pause, "
        "slower until the start's shape returns.",
        group="model",
    ),
    _start(
        name="background_compile",
        kind=Kind.BOOL,
        default=False,
        effect="Under accel compile, send uncompiled frames (CUDA graph, slower) while compiling "
        "in the background, rather than none until the compile is done. A feature bank at start "
        "waits for the compile anyway.",
        group="model",
    ),
    _start(
        name="width",
        kind=Kind.INT,
        default=512,
        effect="Width of the pictures the pipeline makes; inputs are fitted to it.",
        minimum=8,
        maximum=4096,
        multiple_of=8,
        stream=True,
    ),
    _start(
        name="height",
        kind=Kind.INT,
        default=512,
        effect="Height of the pictures the pipeline makes; inputs are fitted to it.",
        minimum=8,
        maximum=4096,
        multiple_of=8,
        stream=True,
    ),
    _start(
        name="frame_buffer_size",
        kind=Kind.INT,
        default=1,
        effect="Input frames batched into one pipeline step: more throughput, more latency.",
        minimum=1,
        maximum=64,
        stream=True,
    ),
    _start(
        name="mode",
        kind=Kind.CHOICE,
        default="img2img",
        effect="img2img transforms the input; txt2img makes pictures from the prompt alone.",
        choices=("img2img", "txt2img"),
        stream=True,
    ),
    _start(
        name="osc",
        kind=Kind.BOOL,
        default=True,
        effect="Run the OSC server (--no-osc turns it off).",
        group="OSC",
    ),
    _start(
        name="osc_host",
        kind=Kind.STRING,
        default="127.0.0.1",
        effect="Address the OSC server listens on.",
        max_length=255,
        group="OSC",
    ),
    _start(
        name="osc_port",
        kind=Kind.INT,
        default=7000,
        effect="UDP port of the OSC server.",
        minimum=1,
        maximum=65535,
        group="OSC",
    ),
    _start(
        name="osc_allow",
        kind=Kind.STRING_LIST,
        default=(),
        effect="Host or network allowed to send; repeatable; needed for a non-loopback osc_host.",
        group="OSC",
    ),
    _start(
        name="osc_feedback",
        kind=Kind.STRING_LIST,
        default=(),
        effect="host:port that receives status and errors; repeatable.",
        group="OSC",
    ),
    _start(
        name="frames",
        kind=Kind.INT,
        default=0,
        effect="Stop after this many output frames; 0 runs until stopped.",
        minimum=0,
        maximum=2**31 - 1,
        group="run",
    ),
    _start(
        name="quiet",
        kind=Kind.BOOL,
        default=False,
        effect="No status line.",
        group="run",
    ),
)
"""Settings fixed at start: CLI flags and TOML keys like the live ones, but no OSC address."""

SETTINGS: tuple[Param, ...] = PARAMS + START_SETTINGS
"""Every setting of `sd-bridge run`, live or not, in the order `--help` shows them."""

SETTINGS_BY_KEY: Mapping[str, Param] = MappingProxyType(
    {key: p for p in SETTINGS for key in (p.name, *p.aliases)}
)
"""Settings by name and by alias: the keys a TOML file and the command line may use."""

PARAMS_BY_NAME: Mapping[str, Param] = MappingProxyType({p.name: p for p in PARAMS})
PARAMS_BY_ADDRESS: Mapping[str, Param] = MappingProxyType({p.address: p for p in PARAMS})


PARAMS_BY_ALIAS: Mapping[str, Param] = MappingProxyType(
    {alias: p for p in PARAMS for alias in p.aliases}
)


STREAM_PARAMS: tuple[str, ...] = tuple(p.name for p in PARAMS if p.stream)
"""The live parameters that are `StreamConfig` fields of the same name, set between frames."""


def find_param(text: str) -> Param | None:
    """The live parameter `text` names: its name, an alias, its address, or that without `/sd/`."""
    found = PARAMS_BY_NAME.get(text) or PARAMS_BY_ADDRESS.get(text) or PARAMS_BY_ALIAS.get(text)
    if found is None and not text.startswith("/"):
        found = PARAMS_BY_ADDRESS.get("/sd/" + text)
    return found


@dataclass(frozen=True)
class ParamFamily:
    """Live parameters made at start, one per loaded item, such as `/sd/lora/<index>/scale`.

    The schema cannot list them: how many there are depends on what the bridge loaded. `name`
    and `address` hold `{index}`; `members` makes the parameters of the loaded items from their
    start values, and `refusal` answers an address of the family whose index is not loaded.
    Members are floats from `minimum` to `maximum` unless `kind` says otherwise (BOOL takes no
    range).
    """

    name: str
    address: str
    item: str
    effect: str
    minimum: float | None
    maximum: float | None
    start_fix: str
    absent_fix: str
    kind: Kind = Kind.FLOAT

    def members(self, starts: Sequence[object]) -> tuple[Param, ...]:
        """The parameters of items 0, 1, ... starting at `starts`, or `ParamError` for one out of
        range."""
        members = []
        for index, start in enumerate(starts):
            param = Param(
                name=self.name.format(index=index),
                address=self.address.format(index=index),
                kind=self.kind,
                default=False if self.kind is Kind.BOOL else 0.0,
                effect=self.effect,
                minimum=self.minimum,
                maximum=self.maximum,
                stream=False,
            )
            try:
                default = param.validate(start)
            except ParamError:
                raise ParamError(
                    param.address,
                    f"{self.item} {index} starts at {describe(start)}; use {param.allowed()}"
                    f"{self.start_fix}.",
                ) from None
            members.append(replace(param, default=default))
        return tuple(members)

    def index_in(self, address: str) -> int | None:
        """The index `address` names if it is this family's address pattern, else None."""
        head, _, tail = self.address.partition("{index}")
        if not (address.startswith(head) and address.endswith(tail)):
            return None
        digits = address[len(head) : len(address) - len(tail)]
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 6):
            return None
        if digits != str(int(digits)):  # leading zeros: another address
            return None
        return int(digits)

    def refusal(self, address: str, count: int) -> ParamError | None:
        """The refusal of an address of this family whose index is not among `count` loaded."""
        index = self.index_in(address)
        if index is None or index < count:
            return None
        if count == 0:
            sentence = (
                f"{address} names {self.item} {index}, but no {self.item} is loaded live; "
                f"{self.absent_fix}."
            )
        else:
            allowed = "index 0" if count == 1 else f"an index from 0 to {count - 1}"
            loaded = f"1 {self.item} is" if count == 1 else f"{count} {self.item}s are"
            sentence = (
                f"{address} names {self.item} {index}, but only {loaded} loaded live; "
                f"send {allowed}."
            )
        return ParamError(address, sentence)


LORA_SCALES = ParamFamily(
    name="lora_{index}_scale",
    address="/sd/lora/{index}/scale",
    item="LoRA",
    effect="Scale of the LoRA file at this index of the lora setting (0 is the first); 0 turns "
    "it off, negative values push away from it. Text-encoder LoRAs re-encode the prompt.",
    # Below -2 or above 2 most LoRAs leave the range they were trained near and the picture
    # falls apart (and fp16 activations near overflow); negative scales are a known live effect.
    minimum=-2.0,
    maximum=2.0,
    start_fix=" as its start scale, or fuse_loras=True to fuse it at any scale",
    absent_fix="give LoRA files at start (the lora setting) and leave fuse_loras off",
)
"""One live scale per LoRA file loaded at start, unfused: `/sd/lora/<index>/scale`."""

# ControlNets: one member of each family per ControlNet given at start (the controlnet setting).
# Above 2 a ControlNet's residuals outweigh the UNet's own and the picture breaks up.
MAX_CONTROLNET_SCALE = 2.0
# Canny thresholds are gradient magnitudes on cv2.Canny's scale: |gx| + |gy| of a 3x3 Sobel on
# 0-255 luma reaches 2040 at most.
MAX_CANNY_THRESHOLD = 2040.0
_CONTROLNET_ABSENT = "give ControlNets at start (the controlnet setting)"

CONTROLNET_SCALES = ParamFamily(
    name="controlnet_{index}_scale",
    address="/sd/controlnet/{index}/scale",
    item="ControlNet",
    effect="Conditioning scale of the ControlNet at this index of the controlnet setting (0 is "
    "the first); 0 leaves the picture as without it. Changes with no pause.",
    minimum=0.0,
    maximum=MAX_CONTROLNET_SCALE,
    start_fix=" as its start scale (MODEL@SOURCE@SCALE)",
    absent_fix=_CONTROLNET_ABSENT,
)
"""One live conditioning scale per ControlNet: `/sd/controlnet/<index>/scale`."""

CONTROLNET_ENABLES = ParamFamily(
    name="controlnet_{index}_enable",
    address="/sd/controlnet/{index}/enable",
    item="ControlNet",
    effect="Run the ControlNet at this index; off saves its time. A change captures the CUDA "
    "graph again (a short pause).",
    minimum=None,
    maximum=None,
    start_fix="",
    absent_fix=_CONTROLNET_ABSENT,
    kind=Kind.BOOL,
)
"""One live on/off switch per ControlNet: `/sd/controlnet/<index>/enable`."""

CANNY_LOWS = ParamFamily(
    name="controlnet_{index}_canny_low",
    address="/sd/controlnet/{index}/canny/low",
    item="ControlNet",
    effect="Canny's lower threshold for the ControlNet at this index (cv2.Canny's scale): "
    "weaker gradients joined to an edge still count. Used by the canny control source only.",
    minimum=0.0,
    maximum=MAX_CANNY_THRESHOLD,
    start_fix="",
    absent_fix=_CONTROLNET_ABSENT,
)
"""One live lower canny threshold per ControlNet: `/sd/controlnet/<index>/canny/low`."""

CANNY_HIGHS = ParamFamily(
    name="controlnet_{index}_canny_high",
    address="/sd/controlnet/{index}/canny/high",
    item="ControlNet",
    effect="Canny's upper threshold for the ControlNet at this index: gradients above it are "
    "edges. Used by the canny control source only.",
    minimum=0.0,
    maximum=MAX_CANNY_THRESHOLD,
    start_fix="",
    absent_fix=_CONTROLNET_ABSENT,
)
"""One live upper canny threshold per ControlNet: `/sd/controlnet/<index>/canny/high`."""

CONTROLNET_FAMILIES: tuple[ParamFamily, ...] = (
    CONTROLNET_SCALES,
    CONTROLNET_ENABLES,
    CANNY_LOWS,
    CANNY_HIGHS,
)
"""The live parameters of each ControlNet, in the order `/sd/list` gives them."""
CANNY_START = (100.0, 200.0)
"""The canny thresholds a ControlNet starts with: those of ControlNet's canny annotator."""

FAMILIES: tuple[ParamFamily, ...] = (LORA_SCALES, *CONTROLNET_FAMILIES)
"""Every family of indexed parameters; a store without members of one still refuses its addresses
with a sentence."""


def default_values() -> dict[str, Value]:
    """Return every parameter's default, by name."""
    return {p.name: p.default for p in PARAMS}


def check_together(values: Mapping[str, Value], changed: Iterable[str]) -> None:
    """Raise `ParamError` if valid values contradict each other; `changed` picks whom to blame.

    The only such rule: every `t_index_list` entry must index into the schedule of
    `num_inference_steps` timesteps.
    """
    steps = values["num_inference_steps"]
    t_index_list = values["t_index_list"]
    assert isinstance(steps, int) and isinstance(t_index_list, tuple)
    if max(t_index_list) < steps:
        return
    t_index = PARAMS_BY_NAME["t_index_list"].address
    steps_address = PARAMS_BY_NAME["num_inference_steps"].address
    if "num_inference_steps" in set(changed):
        raise ParamError(
            steps_address,
            f"{steps_address} got {steps} but t_index_list {list(t_index_list)} needs at least "
            f"{max(t_index_list) + 1}; lower {t_index} first or send both in one bundle.",
        )
    raise ParamError(
        t_index,
        f"{t_index} got {list(t_index_list)}; send entries from 0 to {steps - 1} "
        f"(num_inference_steps is {steps}).",
    )


def _range_text(param: Param) -> str:
    if param.kind is Kind.FLOAT:
        upper = " (exclusive)" if param.maximum_exclusive else ""
        return f"{param.minimum} – {param.maximum}{upper}"
    if param.kind is Kind.INT:
        return f"{int(param.minimum or 0)} – {int(param.maximum or 0)}"
    if param.kind is Kind.BOOL:
        return "0/1 or T/F"
    if param.kind is Kind.STRING:
        return f"up to {param.max_length} characters"
    if param.kind is Kind.CHOICE:
        return ", ".join(f"`{choice}`" for choice in param.choices)
    return (
        f"1 – {param.max_length} entries, strictly increasing, "
        f"each {int(param.minimum or 0)} – num_inference_steps − 1"
    )


def _arguments_text(param: Param) -> str:
    if param.kind is Kind.FLOAT:
        return "`f` (`i` accepted)"
    if param.kind is Kind.INT:
        return "`i` (whole `f` accepted)"
    if param.kind is Kind.BOOL:
        return "`i`, `T` or `F`"
    if param.kind is Kind.INT_LIST:
        return f"`i` × 1–{param.max_length}"
    return "`s`"


def _default_text(param: Param) -> str:
    if isinstance(param.default, tuple):
        return " ".join(str(entry) for entry in param.default)
    if isinstance(param.default, bool):
        return str(int(param.default))
    if isinstance(param.default, str):
        return f'"{param.default}"'
    return str(param.default)


def osc_table_markdown() -> str:
    """Return the Markdown table of every parameter's address, arguments, range and default."""
    lines = [
        "| Address | Arguments | Range | Default | Reshapes | Effect |",
        "|---|---|---|---|---|---|",
    ]
    for param in PARAMS:
        cells = (
            f"`{param.address}`",
            _arguments_text(param),
            _range_text(param),
            f"`{_default_text(param)}`",
            "yes" if param.changes_shapes else "no",
            param.effect,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def family_table_markdown() -> str:
    """Return the Markdown table of the indexed parameters, one row per family."""
    lines = [
        "| Address | Arguments | Range | Re-captures | Effect |",
        "|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        sample = family.members([False if family.kind is Kind.BOOL else family.minimum])[0]
        cells = (
            f"`{family.address.replace('{index}', '<index>')}`",
            _arguments_text(sample),
            _range_text(sample),
            "yes" if family is CONTROLNET_ENABLES else "no",
            family.effect,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
