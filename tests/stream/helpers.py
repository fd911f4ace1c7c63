"""Test helpers for the stream pipeline: frames, latents and a UNet call recorder."""

from __future__ import annotations

import numpy as np
import torch

SIZE = 64


def frame(seed: int, channels: int = 3, count: int | None = None) -> np.ndarray:
    """A random uint8 test frame (or a batch of `count`)."""
    shape = (SIZE, SIZE, channels) if count is None else (count, SIZE, SIZE, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def latents(seed: int, count: int = 1) -> torch.Tensor:
    """Random input latents of the size a 64x64 frame encodes to."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((count, 4, SIZE // 8, SIZE // 8), generator=generator)


class UNetSpy:
    """Records the batch and the text context of every UNet call, without changing the result."""

    def __init__(self, unet) -> None:
        self.batches: list[int] = []
        self.contexts: list[torch.Tensor] = []
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.batches.append(args[0].shape[0])
        self.contexts.append(kwargs["encoder_hidden_states"].clone())

    def close(self) -> None:
        self.handle.remove()
