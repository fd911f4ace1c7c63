"""`pattern:<kind>`: moving test pictures made with numpy, the default input.

Every pattern moves, so a frozen output is visible at a glance, and every frame differs from the
one before, so the similarity filter has something to decide:

* `bars`: eight colour bars scrolling left, one screen width every four seconds
  (at least a pixel a frame);
* `gradient`: a rainbow across the width whose hues turn, darker towards the bottom;
* `noise`: fresh uniform noise every frame (seeded, so runs repeat);
* `checker`: a black and white checkerboard sliding diagonally.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bridge.io.base import Source
from bridge.io.frame import Frame, now
from bridge.io.pacing import Pacer

# White, yellow, cyan, green, magenta, red, blue, black.
_BAR_COLOURS = np.array(
    [
        [235, 235, 235],
        [235, 235, 16],
        [16, 235, 235],
        [16, 235, 16],
        [235, 16, 235],
        [235, 16, 16],
        [16, 16, 235],
        [16, 16, 16],
    ],
    dtype=np.uint8,
)


class PatternSource(Source):
    """Generates `kind` frames of width x height in rgb, paced at `fps`."""

    def __init__(self, kind: str, width: int, height: int, *, fps: float = 30.0, seed: int = 0):
        super().__init__()
        if kind not in PATTERNS:
            raise ValueError(f"Unknown pattern {kind!r}; use one of {', '.join(sorted(PATTERNS))}.")
        if width < 1 or height < 1:
            raise ValueError(f"Pattern size {width}x{height} must be positive on both sides.")
        self.kind = kind
        self.width = width
        self.height = height
        self.fps = fps
        self._draw = PATTERNS[kind](width, height, fps, np.random.default_rng(seed))
        self._pacer = Pacer(fps)
        self._index = 0
        self._next: np.ndarray | None = None

    @property
    def connected(self) -> bool:
        return self.is_open

    def describe(self) -> str:
        return f"pattern:{self.kind} {self.width}x{self.height} @ {self.fps:g} fps"

    def _open(self) -> None:
        self._pacer = Pacer(self.fps)

    def _close(self) -> None:
        pass

    def _read(self, timeout: float) -> Frame | None:
        # Drawn before the tick, so the frame leaves at its scheduled time, not a drawing later.
        if self._next is None:
            self._next = self._draw(self._index)
        if not self._pacer.wait(timeout):
            return None
        frame = Frame(self._next, "rgb", now(), self._index)
        self._next = None
        self._index += 1
        return frame


Drawer = Callable[[int], np.ndarray]


def _bars(width: int, height: int, fps: float, rng: np.random.Generator) -> Drawer:
    columns = (np.arange(width) * len(_BAR_COLOURS)) // width
    row = _BAR_COLOURS[columns]
    speed = max(1.0, width / (4.0 * fps))  # pixels per frame, at least one so frames differ

    def draw(index: int) -> np.ndarray:
        shifted = np.roll(row, -int(index * speed) % width, axis=0)
        return np.ascontiguousarray(np.broadcast_to(shifted, (height, width, 3)))

    return draw


def _gradient(width: int, height: int, fps: float, rng: np.random.Generator) -> Drawer:
    x = np.arange(width) / width
    shade = np.linspace(1.0, 0.35, height)[:, None, None]
    turn = 1.0 / (6.0 * fps)  # one full hue turn every six seconds

    def draw(index: int) -> np.ndarray:
        hue = (x + index * turn) % 1.0
        # Hue to RGB at full saturation and value: each channel is a clipped triangle wave.
        offsets = np.array([0.0, 2.0 / 3.0, 1.0 / 3.0])
        rgb = np.clip(np.abs(((hue[:, None] + offsets) % 1.0) * 6.0 - 3.0) - 1.0, 0.0, 1.0)
        return (rgb[None, :, :] * shade * 255.0 + 0.5).astype(np.uint8)

    return draw


def _noise(width: int, height: int, fps: float, rng: np.random.Generator) -> Drawer:
    def draw(index: int) -> np.ndarray:
        return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)

    return draw


def _checker(width: int, height: int, fps: float, rng: np.random.Generator) -> Drawer:
    square = max(2, min(width, height) // 8)
    speed = max(1.0, square / (0.5 * fps))  # a square every half second, at least a pixel
    y, x = np.indices((height, width))

    def draw(index: int) -> np.ndarray:
        step = int(index * speed)
        board = (((x + step) // square + (y + step) // square) % 2).astype(np.uint8) * 255
        return np.ascontiguousarray(np.repeat(board[:, :, None], 3, axis=2))

    return draw


PATTERNS: dict[str, Callable[[int, int, float, np.random.Generator], Drawer]] = {
    "bars": _bars,
    "gradient": _gradient,
    "noise": _noise,
    "checker": _checker,
}
