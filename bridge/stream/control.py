"""ControlNet in the stream: residuals that hold the shapes of a control image, per frame.

A ControlNet is a copy of the UNet's encoder that reads a control image (edges, depth, a pose) as
well as the latents, and returns one residual per skip connection of the UNet and one for its
middle block. The UNet adds them, each multiplied by the ControlNet's conditioning scale, to its
own; several ControlNets add up. For each UNet call of the stream the ControlNets run first, on
the same latents, timesteps and prompt (and, for SDXL, the same added conditioning).

Where a control image comes from, per ControlNet (`ControlNet.source`):

- "canny": edges of the input frame (canny.py), made on the device inside the frame step;
- "passthrough": the input frame itself, for a depth or pose picture rendered upstream;
- "image": a picture handed in from outside (`ControlStack.set_image`), such as a second video
  input; it stays until the next one, and is black until the first.

Stream batch. Each of the k*f latents of a stream-batch call belongs to its own frame, and is
conditioned on that frame's control image: the control images are kept per slot, like the
latent buffer, slot j*f + i for the frame in buffer position i at step j. A new frame's control
images enter slots 0..f-1 and move one step (f slots) on with every call, so a frame's control
image stays with it through all k steps; before the buffer is primed every slot takes the first
frame's. The k steps one after the other (`use_denoising_batch=False`) read slots 0..f-1 only.
The negative-prompt passes of "full" and "initialize" come first in their UNet call and repeat
the first latents of it (see `StreamDiffusion._predict`), so they repeat those control images.

Live changes. Scales and canny thresholds are 0-d tensors overwritten in place; diffusers'
ControlNet multiplies its residuals by `conditioning_scale` with no branch on its value (outside
`guess_mode`, which is not used), so a captured CUDA graph follows them, and scale 0 adds
residuals of exactly zero. An external picture is copied into a fixed tensor, so a graph sees it
too. Switching a ControlNet on or off changes which networks run: it is part of the graph key
and captures the graph again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from .canny import canny
from .frames import PixelArray, check_frame, to_device_pixels, to_model_input

CONTROL_SOURCES = ("canny", "passthrough", "image")
# The architecture a ControlNet must share with the UNet for its residuals to fit.
_MATCHING_FIELDS = ("block_out_channels", "layers_per_block", "down_block_types")


@dataclass
class ControlNet:
    """One ControlNet, where its control image comes from, and its start values.

    `model` is a diffusers `ControlNetModel` on the pipeline's device and dtype; `source` one of
    `CONTROL_SOURCES`. `canny_low` and `canny_high` matter for the "canny" source only.
    """

    model: torch.nn.Module
    source: str = "canny"
    scale: float = 1.0
    enabled: bool = True
    canny_low: float = 100.0
    canny_high: float = 200.0


class ControlStack:
    """The ControlNets of one pipeline: their live values, per-slot control images and residuals."""

    def __init__(
        self,
        controlnets: Sequence[ControlNet],
        unet_config: Mapping[str, Any],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        for index, controlnet in enumerate(controlnets):
            _check_fits(index, controlnet, unet_config)
        # Copies, so that compiling one pipeline's ControlNet leaves another's as it was.
        self.controlnets = [replace(controlnet) for controlnet in controlnets]
        self.device = device
        self.dtype = dtype
        self.scales = [torch.tensor(float(c.scale), device=device) for c in controlnets]
        self.enabled = [bool(c.enabled) for c in controlnets]
        self.thresholds = [
            torch.tensor([float(c.canny_low), float(c.canny_high)], device=device)
            for c in controlnets
        ]
        self._images: list[torch.Tensor | None] = [None] * len(controlnets)
        self._slots: list[torch.Tensor] = []
        self._frames = 1
        self._rows = 0

    def __len__(self) -> int:
        return len(self.controlnets)

    # ----------------------------------------------------------------- live changes

    def set_scale(self, index: int, scale: float) -> None:
        """The conditioning scale of ControlNet `index`, from the next frame on (no re-capture)."""
        self.scales[self._index(index)].fill_(float(scale))

    def set_enabled(self, index: int, enabled: bool) -> None:
        """Run ControlNet `index` or not; a change captures a CUDA graph again."""
        self.enabled[self._index(index)] = bool(enabled)

    def set_canny(self, index: int, low: float, high: float) -> None:
        """The canny thresholds of ControlNet `index`, on the 0-255 scale of cv2.Canny."""
        self.thresholds[self._index(index)].copy_(torch.tensor([float(low), float(high)]))

    def set_image(self, index: int, pixels: PixelArray, pixel_format: str = "rgb") -> None:
        """Copy a uint8 (H, W, C) picture in as the control image of ControlNet `index`.

        A picture of another size than the stream's is resized (bilinear) to it.
        """
        index = self._index(index)
        target = self._images[index]
        if target is None:
            raise ValueError(
                f"ControlNet {index} takes its control image from the input frame "
                f"({self.controlnets[index].source}); only a ControlNet with source 'image' "
                "takes pictures from outside."
            )
        height, width = pixels.shape[-3], pixels.shape[-2]
        check_frame(pixels, pixel_format, height, width, 1)
        device_pixels = to_device_pixels(pixels, self.device)
        picture = _unit_range(to_model_input(device_pixels, pixel_format, torch.float32))
        if picture.shape[-2:] != target.shape[-2:]:
            picture = F.interpolate(
                picture, size=target.shape[-2:], mode="bilinear", antialias=True
            )
        target.copy_(picture)

    def graph_key(self) -> tuple[bool, ...]:
        """Which ControlNets run: a change of it changes the captured work."""
        return tuple(self.enabled)

    def state_tensors(self) -> list[torch.Tensor]:
        """The per-slot control images, which a frame step moves on."""
        return list(self._slots)

    # ------------------------------------------------------------- the frame step

    def reshape(self, steps: int, frames: int, height: int, width: int, mode: str) -> None:
        """Make the per-slot control images for k = `steps` and f = `frames` at this size."""
        if mode == "txt2img":
            for index, controlnet in enumerate(self.controlnets):
                if controlnet.source != "image":
                    raise ValueError(
                        f"ControlNet {index} makes its control image from the input frame "
                        f"({controlnet.source}), and txt2img has no input frame; give it a "
                        "control input instead, or use img2img."
                    )
        shape = (3, height, width)
        self._frames = frames
        self._slots = [
            torch.zeros((steps * frames, *shape), device=self.device, dtype=self.dtype)
            for _ in self.controlnets
        ]
        for index, controlnet in enumerate(self.controlnets):
            image = self._images[index]
            if controlnet.source != "image" or (image is not None and image.shape[1:] == shape):
                continue
            resized = torch.zeros((1, *shape), device=self.device, dtype=self.dtype)
            if image is not None:  # keep the picture there is, at the new size
                resized.copy_(F.interpolate(image.float(), size=shape[1:], mode="bilinear"))
            self._images[index] = resized

    def new_frames(self, images: torch.Tensor | None, fill: bool) -> None:
        """Take the control images of the f new frames (`images` in [-1, 1], None in txt2img).

        They enter slots 0..f-1 and the others move one step on; with `fill`, before the stream
        buffer is primed, every slot takes them.
        """
        frames = self._frames
        pictures = None if images is None else _unit_range(images)
        for index, controlnet in enumerate(self.controlnets):
            if controlnet.source == "canny":
                low, high = self.thresholds[index]
                new = canny(pictures, low, high)
            elif controlnet.source == "passthrough":
                new = pictures
            else:
                new = self._images[index].expand(frames, -1, -1, -1)
            new = new.to(self.dtype)
            slots = self._slots[index]
            if fill:
                slots.copy_(new.repeat(slots.shape[0] // frames, 1, 1, 1))
            else:
                slots.copy_(torch.cat([new, slots[:-frames]]))

    def select(self, rows: int) -> None:
        """The next UNet calls are for latents in slots 0..rows-1 (see the module docstring)."""
        self._rows = rows

    def residuals(
        self, x: torch.Tensor, t: torch.Tensor, unet_kwargs: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The UNet's `down_block_additional_residuals` and `mid_block_additional_residual`.

        `x` holds the selected latents, after as many negative-pass latents as it has more rows
        (they repeat the first latents). Empty when no ControlNet is on.
        """
        rows = self._rows
        negative = x.shape[0] - rows
        if not 0 <= negative <= rows:
            raise ValueError(
                f"a UNet call of {x.shape[0]} latents does not fit the {rows} selected slots."
            )
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for index, controlnet in enumerate(self.controlnets):
            if not self.enabled[index]:
                continue
            images = self._slots[index][:rows]
            if negative:
                images = torch.cat([images[:negative], images])
            down_each, mid_each = controlnet.model(
                x,
                t,
                encoder_hidden_states=unet_kwargs["encoder_hidden_states"],
                controlnet_cond=images,
                conditioning_scale=self.scales[index],
                added_cond_kwargs=unet_kwargs.get("added_cond_kwargs"),
                return_dict=False,
            )
            if down is None:
                down, mid = list(down_each), mid_each
            else:
                down = [total + each for total, each in zip(down, down_each, strict=True)]
                mid = mid + mid_each
        if down is None:
            return {}
        return {
            "down_block_additional_residuals": tuple(down),
            "mid_block_additional_residual": mid,
        }

    def _index(self, index: int) -> int:
        if not 0 <= index < len(self.controlnets):
            raise IndexError(
                f"ControlNet {index} does not exist; this pipeline has {len(self.controlnets)}."
            )
        return index


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    """Model input in [-1, 1] to a control image in [0, 1], as diffusers' pipelines give one."""
    return (images + 1.0) * 0.5


def _check_fits(index: int, controlnet: ControlNet, unet_config: Mapping[str, Any]) -> None:
    """Refuse a ControlNet whose residuals would not fit the UNet's skip connections."""
    if controlnet.source not in CONTROL_SOURCES:
        raise ValueError(
            f"ControlNet {index} has source {controlnet.source!r}; use one of "
            f"{', '.join(CONTROL_SOURCES)}."
        )
    config = controlnet.model.config
    for field in _MATCHING_FIELDS:
        ours, theirs = tuple(_listed(config.get(field))), tuple(_listed(unet_config.get(field)))
        if ours != theirs:
            raise ValueError(
                f"ControlNet {index} has {field} {list(ours)}, but the UNet has {list(theirs)}: "
                "it was made for another model; pick a ControlNet of this model's architecture."
            )


def _listed(value: object) -> list[object]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
