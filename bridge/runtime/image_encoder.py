"""Encoding pictures into an IP-Adapter's image tokens off the frame path.

Like prompts (prompts.py), pictures are encoded on a thread and a CUDA stream of their own, and the
engine waits for the finished tokens on its own stream (`EncodedImage.wait`) only when it copies
them in, between two frames. Only the newest picture matters, and one equal to the last encoded
is skipped, so a source that repeats a still picture costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bridge.io import Frame

from .prompts import NewestRequestWorker


@dataclass(frozen=True)
class EncodedImage:
    """A picture's image tokens, ready once `ready` (a CUDA event, or None) has passed."""

    tokens: torch.Tensor
    ready: torch.cuda.Event | None

    def wait(self) -> None:
        """Make the caller's CUDA stream wait for the encoding; a no-op on the CPU."""
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)

    def release(self) -> None:
        """Say that the caller's stream has read the tokens, so their memory is not reused early."""
        if self.ready is not None:
            self.tokens.record_stream(torch.cuda.current_stream())


class ImageEncoderWorker(NewestRequestWorker[Frame, EncodedImage]):
    """Turns the newest requested picture into image tokens, on its own thread and CUDA stream.

    `encode` takes uint8 RGB (H, W, 3) pixels; `role` names the picture in what is said. A
    picture requested while another is encoded replaces any request still waiting; one equal to
    the last encoded is skipped. A failure is said (the first, then every 50th) and the last
    tokens stay in use.
    """

    def __init__(
        self,
        encode: Callable[[np.ndarray], torch.Tensor],
        device: torch.device,
        role: str,
        say: Callable[[str], None],
    ) -> None:
        super().__init__(f"{role} encoder", device)
        self._encode = encode
        self._role = role
        self._say = say
        self._last: np.ndarray | None = None
        self.skipped = 0
        self.failures = 0

    @property
    def encoded(self) -> int:
        """Pictures encoded so far."""
        return self.results

    def request(self, frame: Frame) -> None:
        """Ask for a frame's picture to be encoded; replaces a request not yet started."""
        self._ask(frame)

    def _work(self, frame: Frame) -> EncodedImage | None:
        pixels = frame.to("rgb").pixels
        if self._last is not None and np.array_equal(pixels, self._last):
            self.skipped += 1
            return None
        try:
            result = self._run_encoding(pixels)
        except Exception as error:  # a picture that fails must not end the set
            self.failures += 1
            if self.failures == 1 or self.failures % 50 == 0:
                self._say(f"the {self._role} could not be encoded ({error}); keeping the last one.")
            return None
        self._last = pixels.copy()  # a source may reuse its frame's memory
        return result

    def _run_encoding(self, pixels: np.ndarray) -> EncodedImage:
        with torch.inference_mode():
            if self._cuda_stream is None:
                return EncodedImage(self._encode(pixels), None)
            with torch.cuda.stream(self._cuda_stream):
                tokens = self._encode(pixels)
                ready = torch.cuda.Event()
                ready.record(self._cuda_stream)
            return EncodedImage(tokens, ready)
