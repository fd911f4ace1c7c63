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

Launching. Those few kernels (conversion, pooling, the cosine, the copy) cost far more host time
to launch one by one than GPU time to run, and the frame step cannot start before the decision.
So on CUDA they are captured once per frame shape as a small CUDA graph of their own (the
`_Comparison`): a frame is copied into the graph's input, one replay writes the pooled picture
and its similarity to the reference, and a processed frame's pooled picture becomes the
reference by one copy. Where capture fails the same work runs uncaptured.
"""

from __future__ import annotations

import gc
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
        self.configure(threshold, max_skip_frames)
        self._random = random.Random(seed)
        self._reference: torch.Tensor | None = None
        self._skipped_in_row = 0
        self.last_similarity = 0.0
        self._side: torch.cuda.Stream | None = None
        self._host: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        # Whether CUDA frames go through captured comparisons; off for good if capture fails.
        self._graphs = True
        self._comparison: _Comparison | None = None
        # Comparisons captured so far (one per frame shape and format seen on CUDA).
        self.captures = 0

    def configure(self, threshold: float, max_skip_frames: int) -> None:
        """Set the threshold and the longest run of skipped frames, from the next frame on;
        the reference, the draws and any captured comparison stay."""
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"similarity threshold must be in [0, 1), got {threshold}.")
        if max_skip_frames < 0:
            raise ValueError(f"max_skip_frames must be 0 or more, got {max_skip_frames}.")
        self.threshold = threshold
        self.max_skip_frames = max_skip_frames

    def close(self) -> None:
        """Wait for comparison work still queued on the GPU, whose results land in memory this
        filter owns; call it before dropping a filter that has seen CUDA frames."""
        if self._side is not None:
            self._side.synchronize()

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
        if pixels.device.type == "cuda" and self._graphs:
            return self._judge_graphed(pixels, pixel_format, ready)

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
            similarity = None
            if self._comparable(flat):
                similarity = F.cosine_similarity(flat, self._reference).item()
            return self._decide(flat, similarity)
        side = self._wait_on_side(source, ready)
        with torch.cuda.stream(side):
            flat = make_signature()
            if not self._comparable(flat):
                return self._decide(flat, None)
            self._host.copy_(F.cosine_similarity(flat, self._reference), non_blocking=True)
            self._copied.record(side)
        self._copied.synchronize()
        return self._decide(flat, self._host.item())

    def _judge_graphed(
        self, pixels: torch.Tensor, pixel_format: str, ready: torch.cuda.Event | None
    ) -> bool:
        """`_judge` for frames on CUDA, through the captured comparison of their shape."""
        side = self._wait_on_side(pixels, ready)
        with torch.cuda.stream(side):
            comparison = self._comparison_for(pixels, pixel_format, side)
            if comparison is not None:
                comparison.pixels.copy_(pixels)
                comparison.graph.replay()
                self._copied.record(side)
        if comparison is None:
            self._graphs = False
            return self.should_skip_pixels(pixels, pixel_format, ready)
        if not self._comparable(comparison.signature):
            return self._decide_graphed(comparison, side, None)
        self._copied.synchronize()
        return self._decide_graphed(comparison, side, self._host.item())

    def _decide_graphed(
        self, comparison: _Comparison, side: torch.cuda.Stream, similarity: float | None
    ) -> bool:
        if self._decide(comparison.signature, similarity):
            return True
        # A processed frame's picture becomes the reference; on the side stream, after the
        # replay that made it and before the next one.
        with torch.cuda.stream(side):
            comparison.reference.copy_(comparison.signature)
        self._reference = comparison.reference
        return False

    def _wait_on_side(self, source: torch.Tensor, ready: torch.cuda.Event | None):
        """The side stream, made to wait for `ready` (or the caller's stream) and to keep
        `source` alive until what it queues has read it."""
        side = self._side_stream(source.device)
        if ready is not None:
            side.wait_event(ready)
        else:
            side.wait_stream(torch.cuda.current_stream(source.device))
        # Read on the side stream: its memory must not be handed out again before that is done.
        source.record_stream(side)
        return side

    def _comparison_for(
        self, pixels: torch.Tensor, pixel_format: str, side: torch.cuda.Stream
    ) -> _Comparison | None:
        """The captured comparison for frames like `pixels` (captured on first use), or None
        where capture fails."""
        key = (tuple(pixels.shape), pixels.dtype, pixels.device, pixel_format)
        if self._comparison is not None and self._comparison.key == key:
            return self._comparison
        if self._comparison is not None:
            # Frames changed shape (rare): the old graph goes only once nothing of it is queued.
            side.synchronize()
        try:
            comparison = _Comparison(key, self._host, side)
        except RuntimeError:
            self._comparison = None
            return None
        self.captures += 1
        if self._comparable(comparison.signature):
            # The last reference carries over to frames of a new size that pool alike.
            comparison.reference.copy_(self._reference)
            self._reference = comparison.reference
        self._comparison = comparison
        return comparison

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._side is None or self._side.device != device:
            # Work queued for the old device writes into the pinned scalar: let it finish.
            self.close()
            self._side = torch.cuda.Stream(device)
            self._host = torch.empty(1, dtype=torch.float32, pin_memory=True)
            self._copied = torch.cuda.Event()
            self._reference = None
            self._comparison = None
        return self._side

    def _comparable(self, flat: torch.Tensor) -> bool:
        return self._reference is not None and self._reference.shape == flat.shape

    def _decide(self, flat: torch.Tensor, similarity: float | None) -> bool:
        """Skip or not from the similarity to the reference (None: nothing to compare with);
        a frame not skipped makes `flat` the reference."""
        if similarity is not None:
            self.last_similarity = similarity
            if self._skipped_in_row < self.max_skip_frames:
                if self._random.random() < skip_probability(similarity, self.threshold):
                    self._skipped_in_row += 1
                    return True
        self._reference = flat
        self._skipped_in_row = 0
        return False


class _Comparison:
    """The filter's work for one frame shape, captured as a CUDA graph on the filter's stream.

    A replay reads `pixels`, writes their pooled picture to `signature` and its cosine
    similarity to `reference` into the pinned `host` scalar.
    """

    def __init__(self, key: tuple, host: torch.Tensor, side: torch.cuda.Stream) -> None:
        shape, dtype, device, pixel_format = key
        self.key = key
        self.pixels = torch.zeros(shape, dtype=dtype, device=device)

        def pool() -> torch.Tensor:
            return signature(to_model_input(self.pixels, pixel_format, torch.float32))

        # Once uncaptured, so that nothing is initialised lazily during capture.
        pooled = pool()
        self.reference = torch.zeros_like(pooled)
        F.cosine_similarity(pooled, self.reference)
        self.graph = torch.cuda.CUDAGraph()
        # A graph freed by the cycle collector during capture would invalidate it: the
        # collector stays off meanwhile. Only this thread's CUDA calls are checked against the
        # capture (as in accel/cudagraph).
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                self.signature = pool()
                host.copy_(F.cosine_similarity(self.signature, self.reference), non_blocking=True)
        finally:
            if collecting:
                gc.enable()
