"""Fusing LoRA files into the UNet and text encoder.

A fused LoRA costs nothing per frame: its low-rank update is added into the base weights once,
and the adapter layers are removed again. diffusers reads the file (its own, PEFT's and Kohya's
key layouts) and does the fusing; this module only runs it for each file in turn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

from diffusers import LCMScheduler, StableDiffusionPipeline

from bridge.models.components import Components


def check_loras(loras: Sequence[tuple[str | PathLike[str], float]]) -> list[tuple[Path, float]]:
    """The LoRA list with absolute paths, once each file is found and each scale is a number."""
    checked = []
    for entry in loras:
        if len(entry) != 2:
            raise ValueError(
                f"LoRA entry {entry!r} is not a (path, scale) pair; pass ('a.safetensors', 0.8)."
            )
        path, scale = Path(entry[0]).expanduser(), entry[1]
        if not path.is_file():
            raise FileNotFoundError(
                f"LoRA file {str(entry[0])!r} does not exist ({path.absolute()}); "
                "pass the path of a LoRA .safetensors file."
            )
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
        ):
            raise ValueError(
                f"LoRA scale {scale!r} for {path.name} is not a finite number; pass e.g. 0.8."
            )
        checked.append((path.absolute(), float(scale)))
    return checked


def fuse_loras(components: Components, loras: Sequence[tuple[Path, float]]) -> None:
    """Add each LoRA into the weights of ``components`` at its scale, in order.

    Each file is loaded, fused and unloaded before the next, so later files apply on top of the
    fused result of earlier ones and no adapter layers are left behind.
    """
    if not loras:
        return
    # The LoRA loader lives on the pipeline class; a pipeline over the same networks fuses in
    # place. It gets a copy of the scheduler because its constructor rewrites outdated settings.
    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=LCMScheduler.from_config(components.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for index, (path, scale) in enumerate(loras):
        adapter = f"lora_{index}"
        pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
        pipeline.fuse_lora(lora_scale=scale, adapter_names=[adapter])
        pipeline.unload_lora_weights()
