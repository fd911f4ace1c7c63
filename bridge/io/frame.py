"""The frame that every transport passes around, its pixel formats and the capture clock."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

# A pixel format's name spells its channels in memory order: "bgra" is blue, green, red, alpha.
PIXEL_FORMATS: tuple[str, ...] = ("rgb", "rgba", "bgr", "bgra")


def now() -> float:
    """Seconds on the machine-wide monotonic clock that every `capture_time` uses.

    This is `time.perf_counter()`: CLOCK_MONOTONIC on Linux, QueryPerformanceCounter on Windows
    and mach_absolute_time on macOS. All three count from the same origin in every process of
    one machine, so a capture time taken in TouchDesigner or OBS can be compared with one taken
    here; the shared-memory protocol relies on that.
    """
    return time.perf_counter()


def channels_of(pixel_format: str) -> int:
    """Number of bytes per pixel of a pixel format."""
    _check_format(pixel_format)
    return len(pixel_format)


@dataclass(frozen=True)
class Frame:
    """One picture: `pixels` is uint8, height x width x channels, C-contiguous.

    `capture_time` is `now()` when the picture entered the bridge (or when the peer that sent it
    captured it, for transports that carry a timestamp); `index` counts frames of one source.
    Treat `pixels` as read-only: several consumers may share one array.
    """

    pixels: np.ndarray
    pixel_format: str
    capture_time: float
    index: int

    def __post_init__(self) -> None:
        _check_format(self.pixel_format)
        pixels = self.pixels
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3:
            raise ValueError(
                "Frame pixels must be a uint8 array of shape (height, width, channels); "
                f"got {_describe_array(pixels)}."
            )
        if pixels.shape[2] != channels_of(self.pixel_format):
            raise ValueError(
                f"Frame pixels have {pixels.shape[2]} channels but pixel format "
                f"{self.pixel_format!r} needs {channels_of(self.pixel_format)}."
            )
        if not pixels.flags.c_contiguous:
            raise ValueError(
                "Frame pixels must be C-contiguous; pass np.ascontiguousarray(pixels)."
            )

    @property
    def width(self) -> int:
        """Width in pixels."""
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        """Height in pixels."""
        return int(self.pixels.shape[0])

    def to(self, pixel_format: str) -> Frame:
        """This frame in another pixel format (the same frame when it already is)."""
        if pixel_format == self.pixel_format:
            return self
        pixels = convert_pixels(self.pixels, self.pixel_format, pixel_format)
        return Frame(pixels, pixel_format, self.capture_time, self.index)

    def fitted(self, width: int, height: int) -> Frame:
        """This frame cropped to the aspect ratio of width x height and resized to it."""
        if (width, height) == (self.width, self.height):
            return self
        pixels = fit_pixels(self.pixels, width, height)
        return Frame(pixels, self.pixel_format, self.capture_time, self.index)


def convert_pixels(pixels: np.ndarray, source_format: str, target_format: str) -> np.ndarray:
    """Reorder, drop or add channels; an added alpha channel is opaque (255)."""
    _check_format(source_format)
    _check_format(target_format)
    if source_format == target_format:
        return pixels
    height, width = pixels.shape[:2]
    out = np.empty((height, width, len(target_format)), dtype=np.uint8)
    for position, channel in enumerate(target_format):
        if channel in source_format:
            out[:, :, position] = pixels[:, :, source_format.index(channel)]
        else:
            out[:, :, position] = 255
    return out


def fit_pixels(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Crop the centre to the target aspect ratio, then resize with Pillow's bilinear filter.

    Cropping instead of stretching keeps faces and shapes undistorted when a 16:9 camera feeds a
    square model. Pillow's bilinear filter widens its support when shrinking, so downscaling is
    antialiased. Every channel is resized on its own, so the result does not depend on the
    channel order or on alpha.
    """
    if width < 1 or height < 1:
        raise ValueError(f"Cannot fit a frame to {width}x{height}; both sides must be positive.")
    source_height, source_width = pixels.shape[:2]
    if (source_width, source_height) == (width, height):
        return pixels
    # Widest centred box of the target aspect ratio inside the source.
    if source_width * height > width * source_height:
        box_width, box_height = source_height * width / height, float(source_height)
    else:
        box_width, box_height = float(source_width), source_width * height / width
    left = (source_width - box_width) / 2
    top = (source_height - box_height) / 2
    box = (left, top, left + box_width, top + box_height)
    # Colour and alpha are resized apart: Pillow would premultiply an RGBA image by its alpha,
    # blackening the colour of transparent pixels, which a video feed must keep.
    planes = [pixels[:, :, :3]] + ([pixels[:, :, 3]] if pixels.shape[2] == 4 else [])
    resized = [
        np.array(
            Image.fromarray(np.ascontiguousarray(plane)).resize(
                (width, height), Image.BILINEAR, box=box
            ),
            dtype=np.uint8,
        )
        for plane in planes
    ]
    if len(resized) == 1:
        return resized[0]
    return np.ascontiguousarray(np.dstack(resized))


def _check_format(pixel_format: str) -> None:
    if pixel_format not in PIXEL_FORMATS:
        raise ValueError(
            f"Unknown pixel format {pixel_format!r}; use one of {', '.join(PIXEL_FORMATS)}."
        )


def _describe_array(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__
