"""The stochastic similarity filter: skip frames that barely differ from the last one processed."""

from __future__ import annotations

import random

import torch


def skip_probability(similarity: float, threshold: float) -> float:
    """max(0, 1 - (1 - similarity) / (1 - threshold)): 0 below the threshold, 1 for identical."""
    return max(0.0, 1.0 - (1.0 - similarity) / (1.0 - threshold))


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

    def reset(self) -> None:
        """Forget the reference frame; the next frame is always processed."""
        self._reference = None
        self._skipped_in_row = 0

    def should_skip(self, images: torch.Tensor) -> bool:
        """True if this frame may reuse the previous output; otherwise it becomes the reference."""
        flat = images.reshape(1, -1).float()
        if self._reference is None or self._reference.shape != flat.shape:
            self._accept(flat)
            return False
        similarity = torch.nn.functional.cosine_similarity(flat, self._reference).item()
        self.last_similarity = similarity
        if self._skipped_in_row < self.max_skip_frames:
            if self._random.random() < skip_probability(similarity, self.threshold):
                self._skipped_in_row += 1
                return True
        self._accept(flat)
        return False

    def _accept(self, flat: torch.Tensor) -> None:
        self._reference = flat
        self._skipped_in_row = 0
