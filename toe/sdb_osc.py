"""Which OSC message each live parameter of the StreamDiffusionBridge component sends, and back.

Plain Python without TouchDesigner: the component's extension calls it, and the tests check it
against the bridge's own parameter schema. Values are checked here before they are sent, so a
typing slip in a parameter shows up as one sentence on the component instead of an `/sd/error`.
"""

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

OscArg = int | float | str
Message = tuple[str, list[OscArg]]
"""An OSC address and its arguments, as `oscoutDAT.sendOSC` takes them."""

MAX_PROMPT_CHARS = 1000
MAX_T_INDICES = 8


@dataclass(frozen=True)
class LiveParam:
    """A custom parameter of the component that changes the running bridge over OSC.

    `par` is the TouchDesigner parameter name (a capital, then lower case), `kind` one of
    `str`, `float`, `int`, `toggle`, `menu` and `int_list` (ints typed as text, `32, 45`).
    """

    par: str
    label: str
    address: str
    kind: str
    default: str | float | int | bool
    minimum: float | None = None
    maximum: float | None = None
    maximum_exclusive: bool = False
    choices: tuple[str, ...] = ()


LIVE_PARAMS: tuple[LiveParam, ...] = (
    LiveParam("Prompt", "Prompt", "/sd/prompt", "str", "a psychedelic painting, vivid colours"),
    LiveParam("Negativeprompt", "Negative prompt", "/sd/negative_prompt", "str", ""),
    LiveParam("Promptfade", "Prompt fade (s)", "/sd/prompt/fade", "float", 0.0, 0.0, 60.0),
    LiveParam("Delta", "Delta", "/sd/delta", "float", 1.0, 0.0, 5.0),
    LiveParam("Guidance", "Guidance", "/sd/guidance", "float", 1.2, 0.0, 20.0),
    LiveParam(
        "Cfg", "CFG type", "/sd/cfg", "menu", "self", choices=("none", "full", "self", "initialize")
    ),
    LiveParam("Seed", "Seed", "/sd/seed", "int", 2, 0, 2**31 - 1),
    LiveParam("Seedfade", "Seed fade (s)", "/sd/seed/fade", "float", 0.0, 0.0, 60.0),
    LiveParam("Tindex", "T-index list", "/sd/t_index", "int_list", "32, 45", 0, 999),
    LiveParam("Numinferencesteps", "Schedule steps", "/sd/num_inference_steps", "int", 50, 1, 50),
    LiveParam("Doaddnoise", "Re-noise between steps", "/sd/do_add_noise", "toggle", True),
    LiveParam("Noise", "Noise", "/sd/noise", "menu", "fixed", choices=("fixed", "fresh", "drift")),
    LiveParam("Noisedrift", "Noise drift (rad/frame)", "/sd/noise/drift", "float", 0.05, 0.0, 1.5),
    LiveParam("Filterenable", "Similarity filter", "/sd/filter/enable", "toggle", False),
    LiveParam(
        "Filterthreshold",
        "Filter threshold",
        "/sd/filter/threshold",
        "float",
        0.98,
        0.0,
        1.0,
        maximum_exclusive=True,
    ),
    LiveParam("Filtermaxskip", "Filter max skip", "/sd/filter/max_skip", "int", 10, 0, 600),
    LiveParam("Banksize", "Feature bank frames", "/sd/bank/size", "int", 0, 0, 8),
    LiveParam("Bankstrength", "Feature injection", "/sd/bank/strength", "float", 0.8, 0.0, 1.0),
    LiveParam(
        "Bankthreshold", "Injection threshold", "/sd/bank/threshold", "float", 0.98, 0.0, 1.0
    ),
    LiveParam("Feedback", "Latent feedback", "/sd/feedback", "float", 0.0, 0.0, 1.0),
    LiveParam("Ipadapterscale", "IP-Adapter scale", "/sd/ipadapter/scale", "float", 0.6, 0.0, 2.0),
    LiveParam("Pause", "Pause", "/sd/pause", "toggle", False),
)

LIVE_PARAMS_BY_PAR: Mapping[str, LiveParam] = {param.par: param for param in LIVE_PARAMS}

LORA_SLOTS = 2
"""LoRA files the component can start the bridge with (Launch page: Lora0file, Lora1file)."""
LORA_PARAMS: tuple[LiveParam, ...] = tuple(
    LiveParam(
        f"Lora{slot}scale", f"LoRA {slot} scale", f"/sd/lora/{slot}/scale", "float", 1.0, -2.0, 2.0
    )
    for slot in range(LORA_SLOTS)
)
"""The live scale of each LoRA slot, also its start scale; the bridge takes -2 to 2."""
LORA_PARAMS_BY_PAR: Mapping[str, LiveParam] = {param.par: param for param in LORA_PARAMS}

CONTROLNET_SLOTS = 2
"""ControlNets the component can start the bridge with (ControlNet page: Controlnet0model and
Controlnet0source, the same for slot 1)."""
CONTROLNET_PARAMS: tuple[LiveParam, ...] = tuple(
    param
    for slot in range(CONTROLNET_SLOTS)
    for param in (
        LiveParam(
            f"Controlnet{slot}scale",
            f"ControlNet {slot} scale",
            f"/sd/controlnet/{slot}/scale",
            "float",
            1.0,
            0.0,
            2.0,
        ),
        LiveParam(
            f"Controlnet{slot}enable",
            f"ControlNet {slot} on",
            f"/sd/controlnet/{slot}/enable",
            "toggle",
            True,
        ),
        LiveParam(
            f"Controlnet{slot}cannylow",
            f"ControlNet {slot} canny low",
            f"/sd/controlnet/{slot}/canny/low",
            "float",
            100.0,
            0.0,
            2040.0,
        ),
        LiveParam(
            f"Controlnet{slot}cannyhigh",
            f"ControlNet {slot} canny high",
            f"/sd/controlnet/{slot}/canny/high",
            "float",
            200.0,
            0.0,
            2040.0,
        ),
    )
)
"""The live parameters of each ControlNet slot; its scale is also its start scale."""
CONTROLNET_PARAMS_BY_PAR: Mapping[str, LiveParam] = {
    param.par: param for param in CONTROLNET_PARAMS
}

STATUS_PARS: Mapping[str, str] = {
    "/sd/status/fps": "Fps",
    "/sd/status/latency_ms": "Latency",
    "/sd/status/drops": "Drops",
    "/sd/status/skips": "Skips",
}
"""The bridge's status addresses and the read-only parameter each one fills."""


def parse_t_index(text: str) -> list[int]:
    """Read `32, 45` (commas and/or spaces) as strictly increasing ints, or raise ValueError."""
    entries = [entry for entry in re.split(r"[,\s]+", text.strip()) if entry]
    if not entries or not all(entry.isdigit() for entry in entries):
        raise ValueError(
            f"T-index list {text!r} is not a list of whole numbers; type them like 32, 45."
        )
    values = [int(entry) for entry in entries]
    if len(values) > MAX_T_INDICES or values != sorted(set(values)):
        raise ValueError(
            f"T-index list {text!r} must hold 1 to {MAX_T_INDICES} strictly increasing numbers, "
            "like 20, 35, 45."
        )
    return values


def osc_message(param: LiveParam, value: object) -> Message:
    """The OSC message that sets `param` to `value`, or ValueError naming the fix."""
    if param.kind == "int_list":
        return param.address, list(parse_t_index(str(value)))
    if param.kind == "toggle":
        return param.address, [1 if value else 0]
    if param.kind in ("str", "menu"):
        text = str(value)
        if param.kind == "menu" and text not in param.choices:
            raise ValueError(f"{param.label} {text!r} is unknown; pick {', '.join(param.choices)}.")
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(
                f"{param.label} has {len(text)} characters; keep it to {MAX_PROMPT_CHARS}."
            )
        return param.address, [text]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{param.label} {value!r} is not a number; type one.") from None
    if not _in_range(param, number):
        upper = "below" if param.maximum_exclusive else "up to"
        raise ValueError(
            f"{param.label} {value} is out of range; use {param.minimum:g} {upper} "
            f"{param.maximum:g}."
        )
    if param.kind == "int":
        if not number.is_integer():
            raise ValueError(f"{param.label} {value} is not a whole number; type one.")
        return param.address, [int(number)]
    return param.address, [number]


def all_messages(values: Mapping[str, object]) -> tuple[list[Message], list[str]]:
    """Messages for every live parameter in `values` (by TouchDesigner name), and the refusals."""
    messages: list[Message] = []
    refusals: list[str] = []
    for param in LIVE_PARAMS:
        if param.par not in values:
            continue
        try:
            messages.append(osc_message(param, values[param.par]))
        except ValueError as error:
            refusals.append(str(error))
    return messages, refusals


def lora_files(files: Sequence[str]) -> list[str]:
    """The LoRA files of the slots in use, which must be filled from the first on."""
    given = [str(path).strip() for path in files]
    used = [path for path in given if path]
    if given[: len(used)] != used:
        raise ValueError("A LoRA slot has a file after an empty one; fill the LoRA slots in order.")
    return used


def lora_messages(files: Sequence[str], scales: Sequence[object]) -> list[Message]:
    """The scale messages of the LoRA slots that have a file (the bridge has no others)."""
    count = len(lora_files(files))
    return [osc_message(LORA_PARAMS[slot], scales[slot]) for slot in range(count)]


def controlnet_entries(
    models: Sequence[str], sources: Sequence[str], scales: Sequence[object]
) -> list[str]:
    """The bridge's `controlnet` entries, MODEL@SOURCE@SCALE, of the slots that have a model.

    Slots are filled from the first; an empty source is canny, the edges of the input.
    """
    given = [str(model).strip() for model in models]
    used = [model for model in given if model]
    if given[: len(used)] != used:
        raise ValueError(
            "A ControlNet slot has a model after an empty one; fill the ControlNet slots in order."
        )
    entries = []
    for slot, model in enumerate(used):
        source = str(sources[slot]).strip() or "canny"
        if "@" in model or "@" in source:
            raise ValueError(
                f"ControlNet {slot}'s model or source has an @, which the bridge reads as a "
                "separator; rename the folder or file."
            )
        _, scale = osc_message(CONTROLNET_PARAMS_BY_PAR[f"Controlnet{slot}scale"], scales[slot])
        entries.append(f"{model}@{source}@{scale[0]}")
    return entries


def controlnet_messages(models: Sequence[str], values: Mapping[str, object]) -> list[Message]:
    """The live messages of the ControlNet slots that have a model (the bridge has no others)."""
    loaded = tuple(
        f"/sd/controlnet/{slot}/" for slot, model in enumerate(models) if str(model).strip()
    )
    return [
        osc_message(param, values[param.par])
        for param in CONTROLNET_PARAMS
        if param.address.startswith(loaded)
    ]


def status_update(address: str, args: Sequence[object]) -> tuple[str, float] | None:
    """The read-only parameter and value a status message sets, or None for other messages."""
    par = STATUS_PARS.get(address)
    if par is None or len(args) != 1 or not isinstance(args[0], (int, float)):
        return None
    return par, float(args[0])


def error_sentence(address: str, args: Sequence[object]) -> str | None:
    """The sentence of an `/sd/error <address> <sentence>` message, or None for other messages."""
    if address != "/sd/error" or len(args) != 2:
        return None
    return str(args[1])


def _in_range(param: LiveParam, number: float) -> bool:
    if not math.isfinite(number):
        return False
    assert param.minimum is not None and param.maximum is not None
    if param.maximum_exclusive:
        return param.minimum <= number < param.maximum
    return param.minimum <= number <= param.maximum
