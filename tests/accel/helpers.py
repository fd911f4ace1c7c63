"""What the graph tests share: the tiny models, a tap on the final latents, test pictures and the
two comparisons (graph and eager agree; two outputs differ by more than that agreement)."""

from __future__ import annotations

import torch

from bridge.accel import accelerate
from bridge.models import load_components
from bridge.stream import StreamConfig, StreamDiffusion

SIZE = 64
# Graph and eager run the same kernels: latents agree to float error, pixels to one level.
LATENT_TOLERANCE = 1e-2
PIXEL_TOLERANCE = 1
# What the next frame or another prompt must change at least, on average (measured on the CPU
# at t_index_list (32, 45): 0.14-0.65 and 8-38 levels between frames for tiny and tiny-xl; 0.17
# and 9.6 between "a forest" and "a desert at noon" for tiny).
LATENT_GAP = 0.05
PIXEL_GAP = 2.0


def load_tiny(device: str, cache, name: str = "tiny") -> object:
    """synthetic:`name` (tiny or tiny-xl) with its tiny VAE, in fp32 on `device`."""
    return load_components(
        f"synthetic:{name}", vae="tiny", device=device, dtype=torch.float32, cache_dir=cache
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


class Tapped:
    """A pipeline whose every frame step also copies its final latents into `tap.latest`."""

    def __init__(self, stream: StreamDiffusion) -> None:
        self.stream = stream
        self.tap = LatentTap(stream)

    def __call__(self, pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, pixels) of the next frame: img2img when given pixels, else txt2img."""
        out = self.stream(pixels) if pixels is not None else self.stream.txt2img()[0]
        return self.tap.latest.clone(), out.clone()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def build(components, accel: str = "none", width: int = SIZE, **settings) -> Tapped:
    """A tapped SIZE-high pipeline on `components`, accelerated by `accel`."""
    config = StreamConfig(width=width, height=SIZE, **settings)
    stream = StreamDiffusion(components, config, prompt="a forest", negative_prompt="fog")
    return Tapped(accelerate(stream, accel))


def frames(count: int = 6, device: str = "cuda", width: int = SIZE) -> list[torch.Tensor]:
    """Pictures that differ at the scale of the latent grid: a coloured band moving across a
    background of another colour (uniform noise would average to grey in every 8x8 block)."""
    generator = torch.Generator().manual_seed(3)
    pictures = []
    for index in range(count):
        colours = torch.randint(0, 256, (2, 3), generator=generator, dtype=torch.uint8)
        picture = colours[0].expand(SIZE, width, 3).clone()
        start = (index * width // 4) % width
        picture[:, start : start + width // 2] = colours[1]
        pictures.append(picture.to(device))
    return pictures


Output = tuple[torch.Tensor, torch.Tensor]


def same(a: Output, b: Output) -> bool:
    """Whether two (latents, pixels) agree as graph and eager must."""
    latent_error = (a[0] - b[0]).abs().max().item()
    pixel_error = (a[1].int() - b[1].int()).abs().max().item()
    return latent_error <= LATENT_TOLERANCE and pixel_error <= PIXEL_TOLERANCE


def apart(
    a: Output, b: Output, latent_gap: float = LATENT_GAP, pixel_gap: float = PIXEL_GAP
) -> bool:
    """Whether two (latents, pixels) differ on average by more than the gaps."""
    latent = (a[0] - b[0]).abs().mean().item()
    pixel = (a[1].float() - b[1].float()).abs().mean().item()
    return latent > latent_gap and pixel > pixel_gap
