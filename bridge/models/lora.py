"""Reading LoRA files into the UNet and text encoder: checked to fit, then fused or kept live.

diffusers reads the file (its own, PEFT's and Kohya's key layouts) and puts peft adapter layers
on the networks. A fused LoRA costs nothing per frame: its low-rank update is added into the base
weights once and the adapter layers are removed again. A live one keeps its layers, and
:mod:`bridge.models.live_lora` turns them into layers whose scale is a tensor.

A file that does not fit the model (another family, another rank layout, keys that name layers
the model lacks) is refused with one sentence naming the file, instead of being half applied.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

from diffusers import (
    DiffusionPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from peft.tuners.lora import LoraLayer
from torch import nn

from bridge.models.components import Components

FAMILY_NAMES = {"sd15": "SD 1.x", "sd21": "SD 2.x", "sdxl": "SDXL"}


def adapter_name(index: int) -> str:
    """The peft adapter name of the LoRA file at `index` of the list."""
    return f"lora_{index}"


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
    pipeline = _lora_pipeline(components)
    for index, (path, scale) in enumerate(loras):
        adapter = adapter_name(index)
        _load_adapter(pipeline, components, path, adapter)
        pipeline.fuse_lora(lora_scale=scale, adapter_names=[adapter])
        pipeline.unload_lora_weights()


def load_adapters(components: Components, loras: Sequence[tuple[Path, float]]) -> None:
    """Put every LoRA file on the networks as peft adapter layers named by `adapter_name`."""
    pipeline = _lora_pipeline(components)
    for index, (path, _) in enumerate(loras):
        _load_adapter(pipeline, components, path, adapter_name(index))


def lora_networks(components: Components) -> dict[str, nn.Module]:
    """The networks a LoRA file may change, by their name in a LoRA file's keys."""
    names = ("unet", "text_encoder", "text_encoder_2")
    found = {name: getattr(components, name, None) for name in names}
    return {name: network for name, network in found.items() if network is not None}


def _lora_pipeline(components: Components) -> DiffusionPipeline:
    # The LoRA loader lives on the pipeline class; a pipeline over the same networks loads in
    # place. It gets a copy of the scheduler because its constructor rewrites outdated settings.
    scheduler = LCMScheduler.from_config(components.scheduler.config)
    networks = components.pipeline_networks()
    if "text_encoder_2" in networks:
        return StableDiffusionXLPipeline(**networks, scheduler=scheduler)
    return StableDiffusionPipeline(
        **networks,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _load_adapter(
    pipeline: DiffusionPipeline, components: Components, path: Path, adapter: str
) -> None:
    """Load one file as `adapter`, or raise ValueError naming the file and the fix."""
    family = FAMILY_NAMES.get(components.family, components.family)
    fix = f"pass a LoRA made for {family} models"
    try:
        with _diffusers_warnings() as warned:
            pipeline.load_lora_weights(
                str(path.parent), weight_name=path.name, adapter_name=adapter
            )
    except (ValueError, RuntimeError, KeyError) as error:
        text = str(error)
        if "Invalid LoRA checkpoint" in text:
            reason, fix = "it holds no LoRA weights", "pass a LoRA .safetensors file"
        elif "size mismatch" in text:
            reason = "its layer shapes (rank layout or widths) differ from the model's"
        elif "not found in the base model" in text:
            reason = "its keys name layers this model does not have"
        else:
            reason = text.strip().splitlines()[0].rstrip(".")
        raise ValueError(
            f"LoRA file {path.name} does not fit this {family} model: {reason}; {fix}."
        ) from None
    layers = sum(
        adapter in layer.lora_A
        for network in lora_networks(components).values()
        for layer in network.modules()
        if isinstance(layer, LoraLayer)
    )
    if layers == 0 or any("unexpected keys" in message for message in warned):
        raise ValueError(
            f"LoRA file {path.name} does not fit this {family} model: some of its keys name "
            f"layers this model does not have; {fix}."
        )


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _diffusers_warnings() -> Iterator[list[str]]:
    """Collect the libraries' warnings instead of printing them: a misfit is reported here, once.

    Besides diffusers' own, transformers reports, for each text-encoder adapter after the first,
    that the earlier adapters' keys are not in the new file, which is true and harmless.
    """
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    messages: list[str] = []
    saved = [(logger.handlers[:], logger.level) for logger in loggers]
    for logger in loggers:
        logger.handlers = [_Collect(messages)]
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # peft warns on every adapter after the first that the model already has one.
            warnings.simplefilter("ignore", UserWarning)
            yield messages
    finally:
        for logger, (handlers, level) in zip(loggers, saved, strict=True):
            logger.handlers = handlers
            logger.setLevel(level)
