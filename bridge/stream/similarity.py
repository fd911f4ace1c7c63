"""The stochastic similarity filter: skip frames that barely differ from the last one processed.

What is compared. The cosine similarity of a frame's picture (in [-1, 1], as the VAE takes it) to
the reference's, measured on both pictures average-pooled to at most `POOLED_SIDE` (64) pixels a
side; pictures no larger are compared whole. The threshold keeps its meaning, a cosine
similarity, now of the pooled pictures: a change finer than a pooled cell (sensor noise, a
one-pixel line moving within its cell) weighs less than on the full picture, while anything that
moves the picture's colours or shapes at the scale of the latent grid weighs as before. Pooling
keeps the comparison a few microseconds of GPU work at any frame size.

Waiting. The decision is made on the host, so the similarity has to reach it. On CUDA the frame
step of the previous frame is usually still queued when the next frame arrives, and reading a
result on the main stream (`.item()`) would wait for all of it. `should_skip_pixels` therefore
computes the similarity on a side stream that waits only for the new frame's upload (the event
`frames.upload_event` finds; for a frame made any other way, for the caller's stream), copies the
scalar into pinned host memory and waits on that copy's event alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .frames import to_model_input

POOLED_SIDE = 64


def skip_probability(similarity: float, threshold: float) -> float:
    """max(0, 1 - (1 - similarity) / (1 - threshold)): 0 below the threshold, 1 for identical."""
    return max(0.0, 1.0 - (1.0 - similarity) / (1.0 - threshold))


def signature(images: torch.Tensor) -> torch.Tensor:
    """What the filter compares, as one float32 row: (N, C, H, W) pictures average-pooled to at
    most POOLED_SIDE a side; any other tensor as it is."""
    images = images.float()
    height, width = images.shape[-2:] if images.dim() == 4 else (0, 0)
    if max(height, width) > POOLED_SIDE:
        images = F.adaptive_avg_pool2d(images, (min(height, POOLED_SIDE), min(width, POOLED_SIDE)))
    return images.reshape(1, -1)


class SimilarityFilter:
    """Decides per frame whether the UNet may be skipped because the input hardly changed.

    The cosine similarity of a frame to the last *processed* frame sets a skip probability;
    the draw comes from a seeded generator, so a run is reproducible. At most `max_skip_frames`
    frames are skipped in a row, so a static scene still refreshes.
    """

    def __init__(self, threshold: float = 0.98, max_skip_frames: int = 10, seed: int = 0) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"similarity threshold must be in [0, 1), got {threshold}.")
        if max_skip_frames < 0:
            raise ValueError(f"max_skip_frames must be 0 or more, got {max_skip_frames}.")
        self.threshold = threshold
        self.max_skip_frames = max_skip_frames
        self._random = random.Random(seed)
        self._reference: torch.Tensor | None = None
        self._skipped_in_row = 0
        self.last_similarity = 0.0
        self._side: torch.cuda.Stream | None = None
        self._host: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def reset(self) -> None:
        """Forget the reference frame; the next frame is always processed."""
        self._reference = None
        self._skipped_in_row = 0

    def should_skip(self, images: torch.Tensor) -> bool:
        """True if this picture may reuse the previous output; otherwise it becomes the reference.

        `images` are (N, C, H, W) pictures or any other tensor. On CUDA the comparison waits for
        the caller's stream, where `images` were made.
        """
        return self._judge(images, lambda: signature(images), None)

    def should_skip_pixels(
        self,
        pixels: torch.Tensor,
        pixel_format: str,
        ready: torch.cuda.Event | None = None,
    ) -> bool:
        """`should_skip` for uint8 (N, H, W, C) frames; on CUDA it waits for `ready` only.

        `ready` is the event after which the frame is on the device (its upload); without it the
        comparison waits for the caller's stream, which is always correct and may be slower.
        """

        def pooled() -> torch.Tensor:
            return signature(to_model_input(pixels, pixel_format, torch.float32))

        return self._judge(pixels, pooled, ready)

    def _judge(
        self,
        source: torch.Tensor,
        make_signature: Callable[[], torch.Tensor],
        ready: torch.cuda.Event | None,
    ) -> bool:
        """Compare the signature of `source` with the reference and decide."""
        if source.device.type != "cuda":
            flat = make_signature()
            if not self._comparable(flat):
                return self._decide(flat, None)
            return self._decide(flat, F.cosine_similarity(flat, self._reference).item())
        side = self._side_stream(source.device)
        if ready is not None:
            side.wait_event(ready)
        else:
            side.wait_stream(torch.cuda.current_stream(source.device))
        # Read on the side stream: its memory must not be handed out again before that is done.
        source.record_stream(side)
        with torch.cuda.stream(side):
            flat = make_signature()
            if not self._comparable(flat):
                return self._decide(flat, None)
            self._host.copy_(F.cosine_similarity(flat, self._reference), non_blocking=True)
            self._copied.record(side)
        self._copied.synchronize()
        return self._decide(flat, self._host.item())

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._side is None or self._side.device != device:
            self._side = torch.cuda.Stream(device)
            self._host = torch.empty(1, dtype=torch.float32, pin_memory=True)
            self._copied = torch.cuda.Event()
            self._reference = None
        return self._side

    def _comparable(self, flat: torch.Tensor) -> bool:
        return self._reference is not None and self._reference.shape == flat.shape

    def _decide(self, flat: torch.Tensor, similarity: float | None) -> bool:
        """Skip or not from the similarity to the reference (None: nothing to compare with)."""
        if similarity is not None:
            self.last_similarity = similarity
            if self._skipped_in_row < self.max_skip_frames:
                if self._random.random() < skip_probability(similarity, self.threshold):
                    self._skipped_in_row += 1
                    return True
        self._reference = flat
        self._skipped_in_row = 0
        return False
