"""Loading a Stable Diffusion model for the stream pipeline, from wherever it is.

``load_components`` accepts four kinds of model, told apart in this order:

- ``synthetic:<name>``: a random-weight model built on first use (:mod:`bridge.models.synthetic`)
  and then read like any folder;
- a folder in diffusers layout (``model_index.json`` and the ``unet``, ``vae``, ``text_encoder``,
  ``tokenizer`` and ``scheduler`` subfolders);
- a single ``.safetensors`` or ``.ckpt`` checkpoint in the original (CompVis/LDM) key layout,
  converted by diffusers with the configuration of a diffusers model of the same architecture;
- a Hugging Face id such as ``stabilityai/sd-turbo``, taken from the local cache; nothing is
  downloaded unless ``download=True`` (:mod:`bridge.models.hub`).

Whatever the scheduler of the model, the stream pipeline gets an LCMScheduler built from its
configuration: StreamDiffusion denoises with LCM's consistency step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from bridge.models.components import (
    SUPPORTED_FAMILIES,
    Components,
    family_of,
)
from bridge.models.family import (
    check_model_index,
    check_unet_config,
    force_zeros_for_empty_prompt,
    read_model_index,
)
from bridge.models.hub import (
    AUTOENCODER_FILES,
    CONFIG_FILES,
    hf_snapshot,
    resolve_model_path,
    resolve_path,
)
from bridge.models.lora import check_loras, fuse_loras
from bridge.models.synthetic import TAESD_SUBFOLDER

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Diffusers repositories whose configurations describe each family's original checkpoints
# (the same choice diffusers makes when it converts one).
CONFIG_REPOS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
# TAESD was trained on the latent space that SD 1.x and 2.x share; TAESDXL on SDXL's.
TAESD_REPOS = {
    "sd15": "madebyollin/taesd",
    "sd21": "madebyollin/taesd",
    "sdxl": "madebyollin/taesdxl",
}
AUTOENCODERS: dict[str, type[AutoencoderKL] | type[AutoencoderTiny]] = {
    "AutoencoderKL": AutoencoderKL,
    "AutoencoderTiny": AutoencoderTiny,
}
_PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer")
_SDXL_PARTS = ("text_encoder_2", "tokenizer_2")


def load_components(
    model: str | PathLike[str],
    *,
    vae: str | PathLike[str] | None = None,
    loras: Sequence[tuple[str | PathLike[str], float]] = (),
    lcm_lora: str | PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    config: str | PathLike[str] | None = None,
    download: bool = False,
) -> Components:
    """Load ``model`` and return its components on ``device`` in ``dtype``, frozen, in eval mode.

    Args:
        model: ``synthetic:<name>``, a diffusers folder, a ``.safetensors``/``.ckpt`` checkpoint
            or a Hugging Face id (see the module docstring).
        vae: None keeps the model's own VAE; ``"tiny"`` takes TAESD, or TAESDXL for SDXL (the
            model folder's ``taesd`` subfolder if it has one, as synthetic models do, else
            ``madebyollin/taesd`` or ``madebyollin/taesdxl``);
            anything else is a folder or Hugging Face id of an AutoencoderKL or AutoencoderTiny.
        loras: ``(path, scale)`` pairs of LoRA files fused into the weights in order; scale 0
            leaves the model unchanged.
        lcm_lora: an LCM-LoRA file, fused at scale 1 before ``loras``.
        device: where the components are put.
        dtype: the floating point type of every weight.
        cache_dir: a cache folder to use instead of the usual ones: it serves as the Hugging
            Face hub cache, and synthetic models are built in its ``synthetic`` subfolder.
        config: for a single-file checkpoint, a diffusers folder or id with the same architecture
            whose configuration describes it; by default the family's reference repository
            (``CONFIG_REPOS``) from the Hugging Face cache.
        download: fetch Hugging Face ids (the model, its configuration, the VAE) that are not
            in the cache; by default loading makes no network connection.

    Raises:
        FileNotFoundError: the model, its configuration, the VAE or a LoRA file is nowhere to be
            found; the message says where it looked and how to fetch it.
        ValueError: an argument has the wrong form, or the model is of an unsupported family.
    """
    model = os.fspath(model)
    adapters = check_loras(([(lcm_lora, 1.0)] if lcm_lora is not None else []) + list(loras))
    path = resolve_model_path(model, cache_dir, download=download)
    if path.is_file():
        components = _load_single_file(path, model, config, cache_dir, dtype, download)
    elif config is not None:
        raise ValueError(
            f"config={config!r} only applies to single-file checkpoints, and {model!r} is a "
            "folder that carries its own configuration; leave config out."
        )
    else:
        components = _load_folder(path, model, dtype)
    if vae is not None:
        components.vae = _load_vae(
            os.fspath(vae), components.family, path, cache_dir, dtype, download
        )

    components.unet.to(device)
    components.vae.to(device)
    for text_encoder in components.text_encoders():
        text_encoder.to(device=device, dtype=dtype)
    for module in (components.unet, components.vae, *components.text_encoders()):
        module.eval()
        module.requires_grad_(False)
    fuse_loras(components, adapters)
    return components


def _require_supported(family: str, source: str) -> None:
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"{source} is an {family} model; only {', '.join(SUPPORTED_FAMILIES)} models "
            "are supported, so pick an SD 1.x, SD 2.x or SDXL model."
        )


def _lcm_scheduler(folder: Path) -> LCMScheduler:
    """An LCMScheduler from the scheduler configuration in ``folder``, else with SD's defaults."""
    if not (folder / "scheduler_config.json").is_file():
        return LCMScheduler()
    return LCMScheduler.from_config(LCMScheduler.load_config(folder))


def _load_folder(folder: Path, model: str, dtype: torch.dtype) -> Components:
    source = model if model == str(folder) else f"{model} ({folder})"
    check_model_index(folder, source)
    missing = [part for part in _PIPELINE_PARTS if not (folder / part).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a Stable Diffusion folder in diffusers layout: it has no "
            f"{', '.join(part + '/' for part in missing)}; pass the folder that holds "
            "model_index.json."
        )
    family = check_unet_config(UNet2DConditionModel.load_config(folder / "unet"), source)
    _require_supported(family, source)
    second = {}
    if family == "sdxl":
        missing = [part for part in _SDXL_PARTS if not (folder / part).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{source} has an SDXL UNet but no {', '.join(part + '/' for part in missing)}; "
                "pass the whole SDXL folder, with both text encoders and tokenizers."
            )
        second = {
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", local_files_only=True
            ),
            "tokenizer_2": CLIPTokenizer.from_pretrained(
                folder, subfolder="tokenizer_2", local_files_only=True
            ),
            "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt(read_model_index(folder)),
        }
    unet = UNet2DConditionModel.from_pretrained(
        folder, subfolder="unet", torch_dtype=dtype, local_files_only=True
    )
    return Components(
        unet=unet,
        vae=_autoencoder(folder / "vae", f"The vae/ of {source}", dtype),
        text_encoder=CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", local_files_only=True
        ),
        tokenizer=CLIPTokenizer.from_pretrained(
            folder, subfolder="tokenizer", local_files_only=True
        ),
        scheduler=_lcm_scheduler(folder / "scheduler"),
        family=family_of(unet),
        source=source,
        **second,
    )


def _checkpoint_keys(path: Path) -> list[str]:
    """The tensor names in a checkpoint, read without loading the tensors where possible."""
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt") as checkpoint:
            return list(checkpoint.keys())
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return list(state)


def checkpoint_family(path: Path) -> str:
    """The family of an original-layout checkpoint, told by the layout of its text encoder."""
    keys = _checkpoint_keys(path)
    prefixes = {
        "conditioner.embedders.": "sdxl",
        "cond_stage_model.model.": "sd21",
        "cond_stage_model.transformer.": "sd15",
    }
    for prefix, family in prefixes.items():
        if any(key.startswith(prefix) for key in keys):
            return family
    raise ValueError(
        f"{path} holds no text encoder in the layout of SD 1.x (cond_stage_model.transformer.*), "
        "SD 2.x (cond_stage_model.model.*) or SDXL (conditioner.embedders.*); pass config= a "
        "diffusers folder or id of the same architecture."
    )


def _load_single_file(
    path: Path,
    model: str,
    config: str | PathLike[str] | None,
    cache_dir: str | Path | None,
    dtype: torch.dtype,
    download: bool,
) -> Components:
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ValueError(
            f"Model file {model!r} ends in {path.suffix!r}; a single-file checkpoint must be "
            f"{' or '.join(SINGLE_FILE_SUFFIXES)}, and a diffusers model is given as its folder."
        )
    if config is None:
        family = checkpoint_family(path)
        _require_supported(family, str(path))
        purpose = f"the configuration of {family} checkpoint {path.name} (config= picks another)"
        config_folder = hf_snapshot(
            CONFIG_REPOS[family],
            CONFIG_FILES,
            cache_dir,
            context=f", {purpose},",
            download=download,
        )
    else:
        config_folder = resolve_path(config, CONFIG_FILES, cache_dir, download=download)
        family = check_unet_config(
            UNet2DConditionModel.load_config(config_folder / "unet"), f"config {config!r}"
        )
        _require_supported(family, str(path))
    if family == "sdxl":
        pipeline = StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(config_folder), local_files_only=True, torch_dtype=dtype
        )
        second = {
            "text_encoder_2": pipeline.text_encoder_2,
            "tokenizer_2": pipeline.tokenizer_2,
            # From the configuration folder's model_index.json, as diffusers read it.
            "force_zeros_for_empty_prompt": pipeline.config.force_zeros_for_empty_prompt,
        }
    else:
        pipeline = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config_folder),
            local_files_only=True,
            torch_dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        second = {}
    _require_supported(family_of(pipeline.unet), str(path))
    return Components(
        unet=pipeline.unet,
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        scheduler=LCMScheduler.from_config(pipeline.scheduler.config),
        family=family_of(pipeline.unet),
        source=f"{path} (configuration from {config_folder})",
        **second,
    )


def _load_vae(
    vae: str,
    family: str,
    model_path: Path,
    cache_dir: str | Path | None,
    dtype: torch.dtype,
    download: bool,
) -> AutoencoderKL | AutoencoderTiny:
    if vae == "tiny":
        own = model_path / TAESD_SUBFOLDER
        if own.is_dir():
            folder = own
        else:
            folder = hf_snapshot(
                TAESD_REPOS[family],
                AUTOENCODER_FILES,
                cache_dir,
                context=f", the tiny VAE of {family} models,",
                download=download,
            )
    else:
        folder = resolve_path(vae, AUTOENCODER_FILES, cache_dir, download=download)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    return _autoencoder(folder, f"VAE {vae!r}", dtype)


def _autoencoder(folder: Path, name: str, dtype: torch.dtype) -> AutoencoderKL | AutoencoderTiny:
    """The autoencoder in ``folder``, of the class its configuration names (SDXS ships a tiny
    one as its ``vae``)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{name} has no config.json in {folder}; pass the folder or Hugging Face id of "
            "a diffusers AutoencoderKL or AutoencoderTiny."
        )
    class_name = json.loads(config_file.read_text(encoding="utf-8")).get("_class_name")
    if class_name not in AUTOENCODERS:
        raise ValueError(
            f"{name} is a {class_name}; pass an AutoencoderKL or AutoencoderTiny "
            '("tiny" picks TAESD).'
        )
    return AUTOENCODERS[class_name].from_pretrained(
        folder, torch_dtype=dtype, local_files_only=True
    )
