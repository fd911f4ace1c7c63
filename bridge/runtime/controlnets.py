"""ControlNets in a running bridge: the `controlnet` setting, control inputs and live values.

Each `controlnet` entry is `MODEL@SOURCE@SCALE`, the last two optional: MODEL as `load_controlnet`
takes it (a folder, a file, a Hugging Face id, synthetic:controlnet-tiny); SOURCE `canny` (the
default), `passthrough` or any source URI (`shm:depth`, `spout:KinectDepth`, `ndi:...`,
`pattern:...`), whose newest frame is the control image; SCALE the start conditioning scale
(1.0). A model name holds no `@`; the source is everything between the first and the last.

A control input runs on its own thread (`SideInput`): the engine copies its newest frame into
the pipeline before each launch and never waits for it. A frame of another size than the stream
is resized, and that is said once; an input that goes away leaves its last frame in place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.control import Snapshot
from bridge.control.params import (
    CANNY_HIGHS,
    CANNY_LOWS,
    CANNY_START,
    CONTROLNET_ENABLES,
    CONTROLNET_FAMILIES,
    CONTROLNET_SCALES,
    ParamFamily,
)
from bridge.io import Source, open_source
from bridge.io.transports import check_uri

from .side_input import SideInput

FRAME_SOURCES = ("canny", "passthrough")
"""Control sources made from the input frame; any other source is a URI."""


@dataclass(frozen=True)
class ControlNetEntry:
    """One `controlnet` entry: the model, where its control image comes from, its start scale."""

    model: str
    source: str = "canny"
    scale: float = 1.0

    @property
    def uri(self) -> str | None:
        """The control input's source URI, or None when the image is made from the input."""
        return None if self.source in FRAME_SOURCES else self.source


def parse_controlnet(text: str) -> ControlNetEntry:
    """Read `MODEL@SOURCE@SCALE` (source and scale optional), or ValueError naming the fix."""
    model, at, rest = text.partition("@")
    if not model:
        raise ValueError(
            f"controlnet {text!r} names no model; write MODEL@SOURCE@SCALE, e.g. "
            "lllyasviel/control_v11p_sd15_canny@canny@0.8."
        )
    if not at:
        return ControlNetEntry(model)
    source, at, scale = rest.rpartition("@")
    if not at:
        source, scale = rest, ""
    try:
        entry = ControlNetEntry(model, source or "canny", float(scale) if scale else 1.0)
    except ValueError:
        raise ValueError(
            f"controlnet {text!r} ends in scale {scale!r}, which is not a number; write "
            f"MODEL@SOURCE@SCALE, e.g. {model}@{source or 'canny'}@0.8."
        ) from None
    if entry.uri is not None:
        try:
            check_uri(entry.uri, "source")
        except ValueError as error:
            raise ValueError(
                f"controlnet {text!r} takes its control image from {entry.uri!r}, which is no "
                f"source: {error} Use canny, passthrough or a source URI such as shm:depth."
            ) from None
    return entry


def check_controlnets(texts: Sequence[str], mode: str) -> list[ControlNetEntry]:
    """Parse the `controlnet` entries and refuse sources the mode has no use for."""
    entries = [parse_controlnet(text) for text in texts]
    for index, entry in enumerate(entries):
        if mode == "txt2img" and entry.uri is None:
            raise ValueError(
                f"controlnet {index} makes its control image from the input ({entry.source}), "
                "and txt2img has no input; give it a source URI (MODEL@shm:NAME) or use "
                'mode="img2img".'
            )
    return entries


def controlnet_families(entries: Sequence[ControlNetEntry]) -> dict[ParamFamily, list[object]]:
    """The start values of each ControlNet's live parameters, for `ParamStore(families=...)`."""
    count = len(entries)
    return {
        CONTROLNET_SCALES: [entry.scale for entry in entries],
        CONTROLNET_ENABLES: [True] * count,
        CANNY_LOWS: [CANNY_START[0]] * count,
        CANNY_HIGHS: [CANNY_START[1]] * count,
    }


def load_controlnets(
    entries: Sequence[ControlNetEntry],
    components: Any,
    *,
    device: Any,
    dtype: Any,
    download: bool = False,
    say: Callable[[str], None] | None = None,
) -> list[Any]:
    """The stream's `ControlNet`s of `entries`, loaded for `components`' UNet.

    `say`, when given, hears where each one is live.
    """
    from bridge.models.controlnet import load_controlnet
    from bridge.stream import ControlNet

    controlnets = []
    for index, entry in enumerate(entries):
        model = load_controlnet(
            entry.model, components.unet.config, device=device, dtype=dtype, download=download
        )
        controlnets.append(
            ControlNet(
                model,
                source="image" if entry.uri is not None else entry.source,
                scale=entry.scale,
                canny_low=CANNY_START[0],
                canny_high=CANNY_START[1],
            )
        )
        if say is not None:
            say(
                f"ControlNet {entry.model} on {entry.source} at scale {entry.scale}, live at "
                f"{_address(index)}/scale"
            )
    return controlnets


class ControlInputs:
    """The engine's side of the ControlNets: live values from the store, control input frames.

    `sources` holds, per entry, its opened control input or None. `attach` gives it the
    pipeline's `ControlStack` once the stream exists.
    """

    def __init__(
        self,
        entries: Sequence[ControlNetEntry],
        sources: Sequence[Source | None],
        width: int,
        height: int,
    ) -> None:
        self.entries = list(entries)
        self.sources = list(sources)
        self.size = (height, width)
        self.stack: Any = None
        self.inputs: dict[int, SideInput] = {}
        self._resized: set[int] = set()
        self._say: Callable[[str, str], None] = lambda address, sentence: None
        self._names = {
            family.name.format(index=index): (family, index)
            for family in CONTROLNET_FAMILIES
            for index in range(len(self.entries))
        }

    @classmethod
    def open(
        cls, entries: Sequence[ControlNetEntry], width: int, height: int, fps: float
    ) -> ControlInputs:
        """Open the control input of every entry that has a URI; close them all on failure."""
        sources: list[Source | None] = []
        try:
            for entry in entries:
                uri = entry.uri
                sources.append(
                    None if uri is None else open_source(uri, width=width, height=height, fps=fps)
                )
        except Exception:
            for source in sources:
                if source is not None:
                    source.close()
            raise
        return cls(entries, sources, width, height)

    def attach(self, stack: Any) -> None:
        """Drive `stack`, the pipeline's `ControlStack`."""
        self.stack = stack

    def start(self, stop: threading.Event, say: Callable[[str, str], None]) -> None:
        """Read every control input on its own thread; `say(address, sentence)` reports."""
        self._say = say
        for index, source in enumerate(self.sources):
            if source is None:
                continue
            address = _address(index)
            side = SideInput(
                f"control input {index}",
                source,
                say=lambda sentence, address=address: say(address, sentence),
            )
            side.start(stop)
            self.inputs[index] = side

    def poll(self) -> None:
        """Copy the newest frame of each control input into the pipeline; never waits."""
        for index, side in self.inputs.items():
            frame = side.poll()
            if frame is None:
                continue
            height, width = frame.pixels.shape[:2]
            if (height, width) != self.size and index not in self._resized:
                self._resized.add(index)
                self._say(
                    _address(index),
                    f"{side.role} {side.source.describe()} sends {width}x{height} frames; "
                    f"resizing them to {self.size[1]}x{self.size[0]}.",
                )
            self.stack.set_image(index, frame.pixels, frame.pixel_format)

    def apply(self, snapshot: Snapshot, changed: set[str] | frozenset[str]) -> None:
        """Bring the ControlNets in line with the store's values that changed."""
        for name in changed & self._names.keys():
            family, index = self._names[name]
            value = snapshot[name]
            if family is CONTROLNET_SCALES:
                self.stack.set_scale(index, float(value))
            elif family is CONTROLNET_ENABLES:
                self.stack.set_enabled(index, bool(value))
            else:
                low = snapshot[CANNY_LOWS.name.format(index=index)]
                high = snapshot[CANNY_HIGHS.name.format(index=index)]
                self.stack.set_canny(index, float(low), float(high))

    def join(self) -> None:
        """Wait for the control inputs' threads to end (after `stop` was set)."""
        for side in self.inputs.values():
            side.join()

    def close(self) -> None:
        """Close every control input that no thread reads (start-up failed before `start`)."""
        for index, source in enumerate(self.sources):
            if source is not None and index not in self.inputs:
                source.close()


def _address(index: int) -> str:
    """Where sentences about ControlNet `index` are reported: `/sd/controlnet/<index>`."""
    return CONTROLNET_SCALES.address.format(index=index).removesuffix("/scale")
