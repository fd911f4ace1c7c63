"""Synthetic models: real Stable Diffusion architectures with seeded random weights.

Each synthetic model is written once as an ordinary diffusers folder (``model_index.json`` and the
``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler`` subfolders, SDXL models also
``text_encoder_2`` and ``tokenizer_2``, safetensors weights) and then loaded by the same code that
loads a downloaded model. A ``taesd`` subfolder holds the matching tiny autoencoder (TAESD, or
TAESDXL for SDXL models: the same architecture). Speed depends on the architecture, not on the
weight values, so benchmarks on these models are honest.

The weights are random except for a few layers set by :mod:`bridge.models.passthrough`, so that a
picture gets through: both autoencoders round-trip images approximately (blurred to the latent
grid), and the UNet removes most of the noise it is given and, where its first level has
cross-attention, tints the picture by the prompt. img2img output therefore follows its input, and
on ``tiny`` and ``tiny-xl`` two prompts give visibly different outputs.

The architectures:

``synthetic:tiny`` (float32 weights, a 64x64 frame in well under a second on a CPU)
    UNet: block_out_channels (32, 64), layers_per_block 1, CrossAttnDownBlock2D + DownBlock2D,
    UpBlock2D + CrossAttnUpBlock2D, 4 attention heads, cross_attention_dim 32, sample_size 8,
    norm_num_groups 8. VAE: AutoencoderKL with block_out_channels (16, 32, 32, 32) (three
    downsamplings: latents are 1/8 of the pixels), layers_per_block 1, norm_num_groups 4,
    4 latent channels. TAESD: AutoencoderTiny with 8 channels and one block per level, three
    downsamplings, 4 latent channels. Text encoder: CLIP with hidden size 32, 2 layers, 4 heads,
    intermediate size 64.

``synthetic:tiny-xl`` (float32 weights; SDXL's shape at the size of ``tiny``)
    UNet: as ``tiny`` with cross-attention at both levels, SDXL's linear projections, two
    transformer layers at the second level, and SDXL's ``text_time`` added conditioning
    (addition_time_embed_dim 8: six size ids of 8 channels each beside a 24-wide pooled text
    embedding); cross_attention_dim 80, the two text encoders' widths side by side. VAE and TAESD
    as ``tiny``. Text encoders: a CLIPTextModel as ``tiny``'s, and a CLIPTextModelWithProjection
    (hidden 48, 2 layers, gelu, projection_dim 24) standing for OpenCLIP ViT-bigG.

``synthetic:sd-turbo`` (float16 weights; the SD 2.1 architecture sd-turbo uses)
    UNet: block_out_channels (320, 640, 1280, 1280), layers_per_block 2, attention_head_dim
    (5, 10, 20, 20), cross_attention_dim 1024, use_linear_projection, sample_size 64:
    865,910,724 parameters. Text encoder: OpenCLIP ViT-H/14 in CLIPTextModel form (the last of
    its 24 layers is dropped, as SD 2 does): hidden 1024, 23 layers, 16 heads, intermediate 4096,
    gelu, projection_dim 1024: 340,387,840 parameters.

``synthetic:sd15`` (float16 weights; the SD 1.5 architecture)
    UNet: as above with attention_head_dim 8, cross_attention_dim 768, no linear projection:
    859,520,964 parameters. Text encoder: CLIP ViT-L/14: hidden 768, 12 layers, 12 heads,
    intermediate 3072, quick_gelu, projection_dim 768: 123,060,480 parameters.

``synthetic:sdxl-turbo`` (float16 weights; the SDXL architecture sdxl-turbo uses)
    UNet: stabilityai/sdxl-turbo's unet/config.json: block_out_channels (320, 640, 1280),
    DownBlock2D then two CrossAttnDownBlock2D, transformer_layers_per_block (1, 2, 10),
    attention_head_dim (5, 10, 20), cross_attention_dim 2048, text_time added conditioning
    (addition_time_embed_dim 256, projection_class_embeddings_input_dim 2816), sample_size 64:
    2,567,463,684 parameters. Text encoders (its text_encoder and text_encoder_2 config.json):
    CLIP ViT-L/14 as in SD 1.5, and OpenCLIP ViT-bigG/14 as a CLIPTextModelWithProjection:
    hidden 1280, 32 layers, 20 heads, intermediate 5120, gelu, projection_dim 1280:
    694,659,840 parameters. VAE: the SD VAE architecture with SDXL's scaling_factor 0.13025.

``synthetic:sdxs`` (float16 weights; the pruned one-step UNet of SDXS-512)
    UNet: IDKiro/sdxs-512-0.9's unet/config.json: SD 2.1 base with its middle block, its
    lowest-resolution level and the attention of its highest-resolution level removed:
    block_out_channels (320, 640, 1280), DownBlock2D then two CrossAttnDownBlock2D,
    layers_per_block 1, attention_head_dim (5, 10, 20), cross_attention_dim 1024, no mid block:
    318,695,364 parameters. Text encoder as ``sd-turbo``'s.

The large models other than ``sdxl-turbo`` use the SD VAE (AutoencoderKL, block_out_channels
(128, 256, 512, 512), layers_per_block 2, scaling_factor 0.18215: 83,653,863 parameters); all use
TAESD's architecture (AutoencoderTiny with its defaults: 2,445,063 parameters).

Every model has CLIP's 49408-token embedding table, CLIP tokenizers (see
:mod:`bridge.models.clip_vocab`) and an LCMScheduler configuration with Stable Diffusion's
training betas (scaled_linear from 0.00085 to 0.012 over 1000 steps), which SDXL shares.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bridge.models.clip_vocab import (
    BOS_TOKEN,
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    EOS_TOKEN,
    find_open_clip_bpe,
    write_clip_tokenizer,
)
from bridge.models.passthrough import kl_passthrough, taesd_passthrough, unet_passthrough

SYNTHETIC_PREFIX = "synthetic:"
# Bump when a recipe below changes, so cached folders built from the old one are not reused.
# (A model added with a new name needs no bump: no folder of that name exists yet.)
RECIPE_VERSION = 2
TAESD_SUBFOLDER = "taesd"
CACHE_ENV = "SD_BRIDGE_CACHE"

# Seeds per component, so each component's weights do not depend on the build order.
_SEEDS = {"unet": 1, "vae": 2, TAESD_SUBFOLDER: 3, "text_encoder": 4, "text_encoder_2": 5}

SD_SCHEDULER: Mapping[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


@dataclass(frozen=True)
class SyntheticSpec:
    """One synthetic model: constructor arguments of each component, and the weights' precision.

    ``text_encoder_2`` is SDXL's second text encoder (a CLIPTextModelWithProjection), None for
    models with one.
    """

    unet: Mapping[str, Any]
    vae: Mapping[str, Any]
    taesd: Mapping[str, Any]
    text_encoder: Mapping[str, Any]
    half_precision: bool
    text_encoder_2: Mapping[str, Any] | None = None


def _sd_unet(
    attention_head_dim: int | tuple[int, ...], cross_attention_dim: int, linear: bool
) -> dict[str, Any]:
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "attention_head_dim": attention_head_dim,
        "cross_attention_dim": cross_attention_dim,
        "use_linear_projection": linear,
    }


SD_VAE: Mapping[str, Any] = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "latent_channels": 4,
    "scaling_factor": 0.18215,
}
# stabilityai/sdxl-turbo vae/config.json: the SD VAE's architecture with another latent scale.
SDXL_VAE: Mapping[str, Any] = {**SD_VAE, "scaling_factor": 0.13025}

# stabilityai/sdxl-turbo unet/config.json (sample_size 64: trained at 512x512).
SDXL_TURBO_UNET: Mapping[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

# IDKiro/sdxs-512-0.9 unet/config.json, as the SDXS paper (arXiv 2403.16627) describes it: SD 2.1
# base without its middle block, its lowest-resolution level and the attention of its highest-
# resolution level, one resnet per level: 318,695,364 parameters, the paper's 319M.
SDXS_UNET: Mapping[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": None,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-2-1-base text_encoder/config.json (and sd-turbo's).
OPEN_CLIP_VIT_H: Mapping[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 1024,
}
# stable-diffusion-v1-5 text_encoder/config.json; also SDXL's first text encoder.
CLIP_VIT_L: Mapping[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# stabilityai/sdxl-turbo text_encoder_2/config.json.
OPEN_CLIP_VIT_BIGG: Mapping[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

TINY_VAE: Mapping[str, Any] = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (16, 32, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "scaling_factor": 0.18215,
}
TINY_TAESD: Mapping[str, Any] = {
    # Eight channels keep the CPU demo fast: the full-resolution convolutions dominate.
    "encoder_block_out_channels": (8, 8, 8, 8),
    "decoder_block_out_channels": (8, 8, 8, 8),
    "num_encoder_blocks": (1, 1, 1, 1),
    "num_decoder_blocks": (1, 1, 1, 1),
    "latent_channels": 4,
}
TINY_TEXT: Mapping[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}

SPECS: Mapping[str, SyntheticSpec] = {
    "tiny": SyntheticSpec(
        unet={
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            # Four channels per group at the first level, as the see-through weights need.
            "norm_num_groups": 8,
            "attention_head_dim": 4,
            "cross_attention_dim": 32,
        },
        vae=TINY_VAE,
        taesd=TINY_TAESD,
        text_encoder=TINY_TEXT,
        half_precision=False,
    ),
    "tiny-xl": SyntheticSpec(
        unet={
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            # Cross-attention at the first level, unlike SDXL, so that the prompt shows.
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "attention_head_dim": (4, 8),
            "transformer_layers_per_block": (1, 2),
            "cross_attention_dim": 32 + 48,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            # The pooled embedding (24) and six size ids of addition_time_embed_dim each.
            "projection_class_embeddings_input_dim": 24 + 6 * 8,
        },
        vae=TINY_VAE,
        taesd=TINY_TAESD,
        text_encoder=TINY_TEXT,
        # Wider than the first encoder, as in SDXL: diffusers tells the two apart by width when
        # it converts a single-file checkpoint.
        text_encoder_2={
            **TINY_TEXT,
            "hidden_size": 48,
            "intermediate_size": 96,
            "hidden_act": "gelu",
            "projection_dim": 24,
        },
        half_precision=False,
    ),
    "sd-turbo": SyntheticSpec(
        unet=_sd_unet((5, 10, 20, 20), 1024, linear=True),
        vae=SD_VAE,
        taesd={},
        text_encoder=OPEN_CLIP_VIT_H,
        half_precision=True,
    ),
    "sd15": SyntheticSpec(
        unet=_sd_unet(8, 768, linear=False),
        vae=SD_VAE,
        taesd={},
        text_encoder=CLIP_VIT_L,
        half_precision=True,
    ),
    "sdxl-turbo": SyntheticSpec(
        unet=SDXL_TURBO_UNET,
        vae=SDXL_VAE,
        taesd={},
        text_encoder=CLIP_VIT_L,
        text_encoder_2=OPEN_CLIP_VIT_BIGG,
        half_precision=True,
    ),
    "sdxs": SyntheticSpec(
        unet=SDXS_UNET,
        vae=SD_VAE,
        taesd={},
        text_encoder=OPEN_CLIP_VIT_H,
        half_precision=True,
    ),
}


def synthetic_name(model: str) -> str | None:
    """The bare name in ``synthetic:<name>``, or None if ``model`` is not a synthetic model."""
    if not model.startswith(SYNTHETIC_PREFIX):
        return None
    return model[len(SYNTHETIC_PREFIX) :]


def default_synthetic_root() -> Path:
    """Where synthetic models are kept: ``<cache>/synthetic``.

    ``<cache>`` is ``$SD_BRIDGE_CACHE``, or ``~/.cache/sd-bridge`` when that is not set.
    """
    base = os.environ.get(CACHE_ENV)
    root = Path(base) if base else Path.home() / ".cache" / "sd-bridge"
    return root / "synthetic"


def text_encoder_config(
    settings: Mapping[str, Any], vocabulary: Mapping[str, int]
) -> CLIPTextConfig:
    """A CLIP text encoder configuration from ``settings``, with the token ids of ``vocabulary``.

    ``settings`` is a spec's ``text_encoder`` or ``text_encoder_2``.
    """
    return CLIPTextConfig(
        **settings,
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=vocabulary[BOS_TOKEN],
        eos_token_id=vocabulary[EOS_TOKEN],
        pad_token_id=vocabulary[EOS_TOKEN],
    )


def ensure_synthetic(name: str, root: str | Path | None = None) -> Path:
    """Folder of the synthetic model ``name`` (``tiny`` or ``synthetic:tiny``), built on first use.

    The folder is ``<root>/<name>-v<recipe>``; ``root`` defaults to :func:`default_synthetic_root`.
    It is built in a temporary folder beside it and renamed into place, so a reader never sees
    a half-written model, and two processes building at once both end with a complete one.
    """
    bare = synthetic_name(name) or name
    if bare not in SPECS:
        raise ValueError(
            f"Unknown synthetic model {name!r}; choose one of "
            f"{', '.join(SYNTHETIC_PREFIX + known for known in SPECS)}."
        )
    root = Path(root) if root is not None else default_synthetic_root()
    return build_once(
        root / f"{bare}-v{RECIPE_VERSION}", lambda staging: write_synthetic(SPECS[bare], staging)
    )


def build_once(folder: Path, write: Callable[[Path], None]) -> Path:
    """``folder``, written by ``write`` into a temporary folder beside it unless it exists.

    The temporary folder is renamed into place, so a reader never sees a half-written model, and
    two processes building at once both end with a complete one.
    """
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-building-", dir=folder.parent))
    try:
        write(staging)
        try:
            staging.rename(folder)
        except OSError:
            # Another process renamed its copy into place first; the copies are identical.
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_synthetic(spec: SyntheticSpec, folder: Path) -> None:
    """Write a diffusers folder for ``spec`` with seeded see-through weights into ``folder``."""
    bpe = find_open_clip_bpe()
    vocabulary = write_clip_tokenizer(folder / "tokenizer", bpe)
    scheduler = LCMScheduler(**SD_SCHEDULER)
    scheduler.save_pretrained(folder / "scheduler")

    builders = {
        "unet": lambda: unet_passthrough(
            UNet2DConditionModel(**spec.unet), _SEEDS["unet"], scheduler.alphas_cumprod
        ),
        "vae": lambda: kl_passthrough(AutoencoderKL(**spec.vae)),
        TAESD_SUBFOLDER: lambda: taesd_passthrough(AutoencoderTiny(**spec.taesd)),
        "text_encoder": lambda: CLIPTextModel(text_encoder_config(spec.text_encoder, vocabulary)),
    }
    if spec.text_encoder_2 is not None:
        settings = spec.text_encoder_2
        builders["text_encoder_2"] = lambda: CLIPTextModelWithProjection(
            text_encoder_config(settings, vocabulary)
        )
        write_clip_tokenizer(folder / "tokenizer_2", bpe)
        _set_pad_token(folder / "tokenizer_2", "!")
    for subfolder, build in builders.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEEDS[subfolder])
            module = build()
        if spec.half_precision:
            module.half()
        module.save_pretrained(folder / subfolder)
        # Free each network before building the next: the large ones take gigabytes.
        del module

    # AutoencoderTiny saves a block_out_channels entry that its constructor does not take back,
    # so loading would warn about it; the released TAESD configuration has no such entry.
    taesd_config = folder / TAESD_SUBFOLDER / "config.json"
    settings = json.loads(taesd_config.read_text(encoding="utf-8"))
    settings.pop("block_out_channels", None)
    taesd_config.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    model_index_file = folder / "model_index.json"
    model_index_file.write_text(json.dumps(model_index(spec), indent=2), encoding="utf-8")


def model_index(spec: SyntheticSpec) -> dict[str, Any]:
    """The ``model_index.json`` of a synthetic model: SD's pipeline, or SDXL's with two encoders."""
    parts: dict[str, Any] = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "LCMScheduler"],
    }
    if spec.text_encoder_2 is not None:
        return {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": diffusers.__version__,
            **parts,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            # As in the model_index.json of stabilityai/sdxl-turbo and
            # stabilityai/stable-diffusion-xl-base-1.0: an empty negative prompt is zeros.
            "force_zeros_for_empty_prompt": True,
        }
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        **parts,
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


def _set_pad_token(folder: Path, token: str) -> None:
    """SDXL's second tokenizer pads with ``!`` (OpenCLIP's habit), not with the end token."""
    config_file = folder / "tokenizer_config.json"
    settings = json.loads(config_file.read_text(encoding="utf-8"))
    settings["pad_token"] = token
    config_file.write_text(json.dumps(settings, indent=2), encoding="utf-8")
