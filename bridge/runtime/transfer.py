"""Frames between host and GPU, overlapped with the GPU's work.

A step's download is queued behind its work, and the event recorded after it says when its
pixels are on the host: the delivery thread (delivery.py) waits on that event and hands the
frames to the sinks at once, while the engine goes on launching. Uploads and downloads go
through rings of pinned buffers with an event each, so a buffer is never rewritten while a copy
from or into it may still be queued. The ring holds one buffer more than the steps that may be
undelivered at once (`MAX_IN_FLIGHT`), so a download never lands in a buffer whose frames the
delivery thread is still copying out.

Off CUDA a step is finished when its launch returns: `PendingFrames` then has no event, and
waiting on it returns at once.

Uploads run on a copy stream of their own: queued on the main stream, frame N's copy would start
only after frame N-1's step, and so would everything that reads it. The main stream waits for
the copy's event before it uses the frame; the similarity filter waits for that event alone
(`bridge.stream.frames.upload_event`), so it decides on frame N while frame N-1 still runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bridge.stream.frames import mark_uploaded

# Steps launched but not yet handed to the sinks: the one on the GPU and the next, queued
# behind it so the GPU never waits for the host.
MAX_IN_FLIGHT = 2
RING = MAX_IN_FLIGHT + 1


@dataclass
class PendingFrames:
    """Output pixels on their way to the host, with what the sinks need to know about them."""

    pixels: torch.Tensor | np.ndarray
    capture_times: list[float]
    pixel_format: str
    started: float
    done: torch.cuda.Event | None = None

    def finished(self) -> bool:
        """Whether the pixels are on the host already; never waits."""
        return self.done is None or self.done.query()

    def wait(self) -> None:
        """Wait until the pixels are on the host: the GPU finishes work it was given."""
        if self.done is not None:
            self.done.synchronize()

    def result(self) -> np.ndarray:
        """(N, H, W, C) uint8 pixels the sinks may keep; waits for the copy if still running."""
        self.wait()
        pixels = self.pixels
        if isinstance(pixels, torch.Tensor):
            pixels = pixels.numpy().copy() if self.done is not None else pixels.numpy()
        return pixels if pixels.ndim == 4 else pixels[np.newaxis]


class HostTransfer:
    """Uploads input frames and starts downloads of outputs without waiting for the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._copies = torch.cuda.Stream(device) if self.cuda else None
        self._inputs: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        self._outputs: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        self._next_in = 0
        self._next_out = 0

    def upload(self, pixels: np.ndarray) -> torch.Tensor | np.ndarray:
        """Frame pixels on the pipeline's device (left as they are off CUDA).

        The caller's stream waits for the copy; nothing waits for the caller's stream.
        """
        if not self.cuda:
            return pixels
        buffer, copied = self._slot(self._inputs, pixels.shape, "_next_in")
        copied.synchronize()  # the upload that last used this buffer has left it
        buffer.copy_(torch.from_numpy(pixels))
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copies):
            on_device = buffer.to(self.device, non_blocking=True)
            copied.record(self._copies)
        # Made on the copy stream and used on the main one: its memory must not go back to the
        # copy stream before the main stream's work queued until it is freed has run.
        on_device.record_stream(main)
        main.wait_event(copied)
        mark_uploaded(on_device, copied)
        return on_device

    def download(
        self,
        pixels: torch.Tensor | np.ndarray,
        capture_times: list[float],
        pixel_format: str,
        started: float,
    ) -> PendingFrames:
        """Start copying output pixels to the host; `result()` of the return value waits."""
        if not self.cuda or isinstance(pixels, np.ndarray) or pixels.device.type != "cuda":
            host = pixels if isinstance(pixels, np.ndarray) else pixels.cpu()
            return PendingFrames(host, capture_times, pixel_format, started)
        buffer, done = self._slot(self._outputs, tuple(pixels.shape), "_next_out")
        done.synchronize()  # whoever read this buffer last has copied it out
        buffer.copy_(pixels, non_blocking=True)
        done.record(torch.cuda.current_stream(self.device))
        return PendingFrames(buffer, capture_times, pixel_format, started, done)

    def _slot(
        self, ring: list[tuple[torch.Tensor, torch.cuda.Event]], shape: tuple, cursor: str
    ) -> tuple[torch.Tensor, torch.cuda.Event]:
        if not ring or ring[0][0].shape != shape:
            ring.clear()
            for _ in range(RING):
                # An event never recorded has passed: a new buffer waits for nothing. A blocking
                # event puts a waiting thread to sleep until the GPU gets there, instead of
                # spinning a core for the whole step.
                event = torch.cuda.Event(blocking=True)
                ring.append((torch.empty(shape, dtype=torch.uint8, pin_memory=True), event))
        index = getattr(self, cursor)
        setattr(self, cursor, (index + 1) % RING)
        return ring[index % RING]
