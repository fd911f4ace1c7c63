"""What the graph tests share: the tiny model on a device, and a tap on the final latents."""

from __future__ import annotations

import torch

from bridge.models import load_components
from bridge.stream import StreamDiffusion


def load_tiny(device: str, cache) -> object:
    """synthetic:tiny with its tiny VAE, in fp32 on `device`."""
    return load_components(
        "synthetic:tiny", vae="tiny", device=device, dtype=torch.float32, cache_dir=cache
    )


class LatentTap:
    """Copies the latents a frame step hands to the decoder into a fixed tensor, `latest`.

    The copy is part of the step, so a captured graph repeats it on every replay.
    """

    def __init__(self, stream: StreamDiffusion) -> None:
        config = stream.config
        shape = (config.frame_buffer_size, stream.unet.config.in_channels, *config.latent_size)
        self.latest = torch.zeros(shape, device=stream.device, dtype=stream.dtype)
        decode = stream.decode

        def tap(latents: torch.Tensor) -> torch.Tensor:
            if self.latest.shape != latents.shape:  # a size change, which re-captures anyway
                self.latest = torch.zeros_like(latents)
            self.latest.copy_(latents)
            return decode(latents)

        stream.decode = tap
