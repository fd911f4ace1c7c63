"""Loading a ControlNet for a loaded model, from wherever it is, offline first.

``load_controlnet`` accepts, told apart in this order:

- ``synthetic:controlnet-<name>``: a random-weight ControlNet of a synthetic model's
  architecture, built on first use (:mod:`bridge.models.synthetic_controlnet`);
- a folder in diffusers layout (``config.json`` and ``diffusion_pytorch_model.safetensors``),
  or a pipeline folder with such a ``controlnet`` subfolder;
- a single ``.safetensors``, ``.ckpt``, ``.pth`` or ``.bin`` file, in diffusers' key layout or the
  original one (``control_v11p_sd15_canny.pth``), read by diffusers' ``from_single_file``: with
  the ``config.json`` beside it if there is one, else with the configuration a ControlNet of the
  loaded UNet has;
- a Hugging Face id such as ``lllyasviel/control_v11p_sd15_canny``, taken from the local cache;
  nothing is downloaded unless ``download=True``.

A ControlNet is made for one family of models: its residuals must fit the UNet's skip
connections, and it reads the same text embeddings. One of another family (an SD 1.5 ControlNet
on SD-Turbo, which is SD 2.1) is refused with one sentence before its weights are read.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import ControlNetModel

from bridge.models.family import family_of_config
from bridge.models.hub import is_hf_id, resolve_path
from bridge.models.synthetic import synthetic_name
from bridge.models.synthetic_controlnet import (
    CONTROLNET_BASES,
    ensure_synthetic_controlnet,
    is_synthetic_controlnet,
)

CONTROLNET_FILES: tuple[str, ...] = ("config.json", "diffusion_pytorch_model.safetensors")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".bin")
FAMILY_NAMES = {"sd15": "SD 1.x", "sd21": "SD 2.x (SD-Turbo)", "sdxl": "SDXL"}
# Where ControlNets of each family are published, for the sentence that refuses a mismatch.
FAMILY_EXAMPLES = {
    "sd15": "lllyasviel/control_v11p_sd15_canny",
    "sd21": "thibaud/controlnet-sd21-canny-diffusers",
    "sdxl": "diffusers/controlnet-canny-sdxl-1.0",
}


def load_controlnet(
    name: str | PathLike[str],
    unet_config: Mapping[str, Any],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    download: bool = False,
) -> ControlNetModel:
    """Load the ControlNet ``name`` for a UNet of ``unet_config``, frozen, in eval mode.

    Raises:
        FileNotFoundError: nothing is at ``name``, or the folder holds no ControlNet.
        ValueError: it is of another family or architecture than the UNet, or not a ControlNet.
    """
    name = os.fspath(name)
    path = _resolve(name, cache_dir, download)
    if path.is_file():
        controlnet = _load_single_file(path, name, unet_config, dtype)
    else:
        folder = _controlnet_folder(path, name)
        check_controlnet_config(_read_config(folder), unet_config, name)
        controlnet = ControlNetModel.from_pretrained(
            folder, torch_dtype=dtype, local_files_only=True
        )
    controlnet.to(device)
    controlnet.eval()
    controlnet.requires_grad_(False)
    return controlnet


def check_controlnet_config(
    config: Mapping[str, Any], unet_config: Mapping[str, Any], name: str
) -> None:
    """Refuse a ControlNet configuration that cannot condition a UNet of ``unet_config``."""
    kind = config.get("_class_name", "ControlNetModel")
    if kind != "ControlNetModel":
        raise ValueError(
            f"ControlNet {name!r} is a {kind}; only diffusers' ControlNetModel (the ControlNets "
            "of SD 1.x, SD 2.x and SDXL) is supported."
        )
    theirs, ours = family_of_config(config), family_of_config(unet_config)
    if theirs != ours:
        raise ValueError(
            f"ControlNet {name!r} is made for {FAMILY_NAMES[theirs]} models, but the model is "
            f"{FAMILY_NAMES[ours]}; pick a ControlNet trained for {FAMILY_NAMES[ours]}, such as "
            f"{FAMILY_EXAMPLES[ours]}."
        )
    if config.get("cross_attention_dim") != unet_config.get("cross_attention_dim"):
        raise ValueError(
            f"ControlNet {name!r} reads {config.get('cross_attention_dim')}-wide text "
            f"embeddings, but the model's are {unet_config.get('cross_attention_dim')} wide; "
            "pick a ControlNet made for this model."
        )


def _resolve(name: str, cache_dir: str | Path | None, download: bool) -> Path:
    if is_synthetic_controlnet(name):
        root = Path(cache_dir) / "synthetic" if cache_dir is not None else None
        return ensure_synthetic_controlnet(name, root)
    if synthetic_name(name) is not None:
        known = ", ".join(f"synthetic:{known}" for known in CONTROLNET_BASES)
        raise ValueError(f"{name!r} is no synthetic ControlNet; choose one of {known}.")
    if not Path(name).expanduser().exists() and not is_hf_id(name):
        raise FileNotFoundError(
            f"No ControlNet at {name!r}: {Path(name).absolute()} does not exist and it is no "
            "Hugging Face id; give a ControlNet folder, a weights file, an id such as "
            "lllyasviel/control_v11p_sd15_canny, or synthetic:controlnet-tiny."
        )
    return resolve_path(name, CONTROLNET_FILES, cache_dir, download=download)


def _controlnet_folder(path: Path, name: str) -> Path:
    for folder in (path, path / "controlnet"):
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(
        f"ControlNet {name!r}: {path} has no config.json (nor controlnet/config.json); pass a "
        "ControlNet folder in diffusers layout, a single weights file, or a Hugging Face id."
    )


def _read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def _load_single_file(
    path: Path, name: str, unet_config: Mapping[str, Any], dtype: torch.dtype
) -> ControlNetModel:
    """A ControlNet in one weights file, described by the config.json beside it or the UNet's."""
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ValueError(
            f"ControlNet file {name!r} ends in {path.suffix!r}; a single-file ControlNet must be "
            f"{', '.join(SINGLE_FILE_SUFFIXES)}, and a diffusers ControlNet is given as its folder."
        )
    if (path.parent / "config.json").is_file():
        config = _read_config(path.parent)
        check_controlnet_config(config, unet_config, name)
    else:
        config = dict(controlnet_config_for(unet_config))
    with tempfile.TemporaryDirectory(prefix="sd-bridge-controlnet-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config), encoding="utf-8")
        try:
            return ControlNetModel.from_single_file(
                str(path), config=folder, local_files_only=True, torch_dtype=dtype
            )
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"ControlNet file {name!r} does not fit a ControlNet of this model's "
                f"architecture ({type(error).__name__}); it is probably made for another "
                "family: pick one trained for this model, or put its config.json beside it."
            ) from error


def controlnet_config_for(unet_config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The configuration diffusers gives a ControlNet of a UNet with ``unet_config``."""
    # Built on the meta device: only the configuration is wanted, not 360 M weights.
    with torch.device("meta"):
        model = ControlNetModel.from_unet(
            SimpleNamespace(config=_Config(unet_config)), load_weights_from_unet=False
        )
    return {"_class_name": "ControlNetModel", **model.config}


class _Config(dict):
    """A configuration mapping that also reads as attributes, as ``from_unet`` reads one."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None
