"""Frames between host and GPU, overlapped with the GPU's work.

The engine launches frame N on the GPU and, while it runs, hands frame N-1 to the sinks. Uploads
and downloads go through rings of pinned buffers with an event each, so a buffer is never
rewritten while a copy from or into it may still be queued, and the only wait is for a frame
that must leave the GPU.

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

RING = 3


@dataclass
class PendingFrames:
    """Output pixels on their way to the host, with what the sinks need to know about them."""

    pixels: torch.Tensor | np.ndarray
    capture_times: list[float]
    pixel_format: str
    started: float
    done: torch.cuda.Event | None = None

    def result(self) -> np.ndarray:
        """(N, H, W, C) uint8 pixels the sinks may keep; waits for the copy if still running."""
        if self.done is not None:
            self.done.synchronize()
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
                # An event never recorded has passed: a new buffer waits for nothing.
                event = torch.cuda.Event()
                ring.append((torch.empty(shape, dtype=torch.uint8, pin_memory=True), event))
        index = getattr(self, cursor)
        setattr(self, cursor, (index + 1) % RING)
        return ring[index % RING]
