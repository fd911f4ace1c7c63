"""Frames between TouchDesigner TOPs and the shared-memory frame protocol (numpy + stdlib).

TouchDesigner keeps images bottom row first (its origin is the bottom-left corner) and hands
them to Python as float32 RGBA from 0 to 1; the frame protocol carries 8-bit pixels, top row
first. The two Script TOPs of the component convert here: one publishes its input for the
bridge's `shm:<name>-in` source, the other shows what the bridge's `shm:<name>-out` sink wrote.

`shm_protocol` is the bridge's `bridge/io/shm_protocol.py`, which the component carries as a
Text DAT of that name.
"""

import numpy as np
import shm_protocol

# Where each of RGBA sits in a frame of each pixel format; alpha is None when absent.
_RGBA_INDICES: dict[str, tuple[int, int, int, int | None]] = {
    "rgb": (0, 1, 2, None),
    "rgba": (0, 1, 2, 3),
    "bgr": (2, 1, 0, None),
    "bgra": (2, 1, 0, 3),
}


def top_to_frame(image: np.ndarray) -> np.ndarray:
    """A TOP's image (height x width x channels, bottom row first) as uint8 RGBA, top row first.

    Float images are taken as 0 to 1 and clipped; one channel is grey, three get opaque alpha.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ValueError(
            f"A TOP image has the shape (height, width, 1 to 4 channels); got {image.shape}."
        )
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    height, width, channels = image.shape
    frame = np.empty((height, width, 4), np.uint8)
    if channels <= 2:
        frame[:, :, :3] = image[::-1, :, :1]
    else:
        frame[:, :, :3] = image[::-1, :, :3]
    if channels in (2, 4):
        frame[:, :, 3] = image[::-1, :, channels - 1]
    else:
        frame[:, :, 3] = 255
    return frame


def frame_to_top(pixels: np.ndarray, pixel_format: str) -> np.ndarray:
    """A protocol frame (top row first, in `pixel_format`) as uint8 RGBA, bottom row first."""
    if pixel_format not in _RGBA_INDICES:
        raise ValueError(
            f"Pixel format {pixel_format!r} is unknown; the protocol has "
            f"{', '.join(_RGBA_INDICES)}."
        )
    red, green, blue, alpha = _RGBA_INDICES[pixel_format]
    flipped = pixels[::-1]
    image = np.empty((*pixels.shape[:2], 4), np.uint8)
    image[:, :, 0] = flipped[:, :, red]
    image[:, :, 1] = flipped[:, :, green]
    image[:, :, 2] = flipped[:, :, blue]
    image[:, :, 3] = 255 if alpha is None else flipped[:, :, alpha]
    return image


class FrameSender:
    """Publishes TOP images under a stream name, for the bridge's `shm:<name>` source.

    The name is claimed on the first frame; a new image size starts a new generation of the
    stream, which readers follow by themselves.
    """

    def __init__(self, name: str) -> None:
        self.name = shm_protocol.validate_name(name)
        self._writer: shm_protocol.ShmWriter | None = None

    def send(self, image: np.ndarray) -> int:
        """Publish one TOP image; return its frame counter."""
        frame = top_to_frame(image)
        if self._writer is None:
            height, width = frame.shape[:2]
            self._writer = shm_protocol.ShmWriter(self.name, width, height, "rgba")
        return self._writer.write(frame)

    def close(self) -> None:
        """Close the stream: readers see it closed and its segments are removed."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class FrameReceiver:
    """Reads the newest frame a writer (the bridge's `shm:<name>` sink) published."""

    def __init__(self, name: str) -> None:
        self.name = shm_protocol.validate_name(name)
        self._reader = shm_protocol.ShmReader(name)

    @property
    def connected(self) -> bool:
        """Whether a live writer publishes under the name."""
        return self._reader.connected

    def receive(self) -> np.ndarray | None:
        """The newest frame as a TOP image (uint8 RGBA, bottom row first), or None if none came."""
        got = self._reader.read()
        if got is None:
            return None
        pixels, meta = got
        return frame_to_top(pixels, meta.pixel_format)

    def close(self) -> None:
        """Let go of the writer's segments; they stay for other readers."""
        self._reader.close()
