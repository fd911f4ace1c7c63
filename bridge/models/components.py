"""The loaded parts of a Stable Diffusion model, and which family it belongs to."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from bridge.models.family import FAMILIES, family_of_config

SUPPORTED_FAMILIES = FAMILIES


@dataclass
class Components:
    """What the stream pipeline runs: the networks on one device and dtype, in eval mode.

    ``family`` is ``"sd15"``, ``"sd21"`` or ``"sdxl"``; ``source`` says, for people, where the
    model came from. SDXL models also have ``text_encoder_2`` and ``tokenizer_2`` (OpenCLIP
    ViT-bigG with its projection); the others leave them None. ``force_zeros_for_empty_prompt``
    is the SDXL pipeline's flag of that name, read from ``model_index.json``
    (:func:`bridge.models.family.force_zeros_for_empty_prompt`): an empty negative prompt then
    conditions on zeros. SD 1.x and 2.x pipelines have no such flag and leave it False.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL | AutoencoderTiny
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    scheduler: LCMScheduler
    family: str
    source: str
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: PreTrainedTokenizerBase | None = None
    force_zeros_for_empty_prompt: bool = False

    def text_encoders(self) -> list[nn.Module]:
        """The text encoders: one, or two for SDXL."""
        second = [] if self.text_encoder_2 is None else [self.text_encoder_2]
        return [self.text_encoder, *second]

    def pipeline_networks(self) -> dict[str, object]:
        """The networks and tokenizers as a diffusers pipeline's constructor names them, the
        SDXL pair included where the model has it: a pipeline made with them runs these very
        objects."""
        networks: dict[str, object] = {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "unet": self.unet,
        }
        if self.text_encoder_2 is not None:
            networks |= {"text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2}
        return networks


def family_of(unet: UNet2DConditionModel) -> str:
    """``"sd21"`` for a UNet conditioned on 1024-wide text (OpenCLIP ViT-H), ``"sdxl"`` for SDXL.

    Every other UNet is ``"sd15"``: one CLIP text encoder and no added conditioning, as in
    SD 1.x (768-wide text) and the synthetic tiny model.
    """
    return family_of_config(unet.config)
