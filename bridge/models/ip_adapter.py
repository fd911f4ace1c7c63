"""Reading an IP-Adapter: its weights into the UNet, its CLIP image encoder beside it.

An IP-Adapter as h94/IP-Adapter publishes it is one weights file (``.safetensors`` or ``.bin``)
with two parts: ``image_proj``, the projection from a CLIP image embedding to image tokens, and
``ip_adapter``, a key and a value projection (``to_k_ip``, ``to_v_ip``) for every cross-attention
layer of the UNet, numbered as the original training code numbered the UNet's attention
processors (1, 3, 5, ... for SD). The CLIP vision encoder it was trained with,
``CLIPVisionModelWithProjection``, sits in an ``image_encoder`` folder beside the weights
(``models/image_encoder`` for ``models/ip-adapter_sd15.safetensors``).

diffusers reads the weights into the UNet (``_load_ip_adapter_weights``): its IP-Adapter
attention processors take the key and value projections, and an image projection module is put
on the UNet. The projection is taken back off here, so that the UNet is called as before, and
kept with the image encoder: together they turn a picture into image tokens (``IPAdapter``), off
the frame path. :mod:`bridge.stream.ip_adapter` then puts processors that read those tokens and a
live scale from tensors in place of diffusers'.

Only the base IP-Adapter (``image_proj`` with ``proj.weight``: ``ip-adapter_sd15``,
``ip-adapter_sdxl``, ``ip-adapter_sdxl_vit-h``) is read; the Plus, Full-face and FaceID
variants, which need another projection or a face model, are refused with one sentence, as is an
adapter made for another family than the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import ImageProjection
from diffusers.models.model_loading_utils import load_state_dict
from diffusers.utils import logging as diffusers_logging
from safetensors import SafetensorError, safe_open
from transformers import CLIPVisionModelWithProjection

from bridge.models.components import Components
from bridge.models.lora import FAMILY_NAMES
from bridge.models.synthetic import synthetic_name

IMAGE_ENCODER_FOLDER = "image_encoder"
# OpenAI CLIP's pixel statistics, which every CLIP image encoder of IP-Adapter was trained with
# (transformers' CLIPImageProcessor defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Text widths of the families, to name an adapter's family in a sentence.
_FAMILY_OF_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
_PARTS = ("image_proj", "ip_adapter")


@dataclass
class IPAdapter:
    """An IP-Adapter loaded for a model: what turns a picture into the UNet's image tokens.

    The UNet holds the adapter's key and value projections; `image_encoder` (CLIP vision with its
    projection) and `image_projection` (to `tokens` tokens of the text's width) stay here, on the
    model's device and dtype.
    """

    path: Path
    image_encoder: CLIPVisionModelWithProjection
    image_projection: ImageProjection
    encoder_path: Path

    @property
    def tokens(self) -> int:
        """How many image tokens a picture becomes."""
        return self.image_projection.num_image_text_embeds

    @torch.inference_mode()
    def pixel_values(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """An RGB uint8 (H, W, 3) picture as the image encoder's input, (1, 3, size, size).

        CLIP's preprocessing: the shorter side scaled to the encoder's size (bicubic, with
        antialiasing), the middle cut out square, then normalised with CLIP's mean and std.
        """
        encoder = self.image_encoder
        size = encoder.config.image_size
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels.copy())  # a frame's pixels may be read-only
        picture = pixels.to(encoder.device)
        if picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != torch.uint8:
            raise ValueError(
                f"a picture for the IP-Adapter must be uint8 RGB (H, W, 3), got "
                f"{picture.dtype} {tuple(picture.shape)}; convert it with Frame.to('rgb')."
            )
        image = picture.permute(2, 0, 1)[None].float() / 255.0
        height, width = image.shape[2:]
        scale = size / min(height, width)
        resized = (max(size, round(height * scale)), max(size, round(width * scale)))
        image = F.interpolate(image, size=resized, mode="bicubic", antialias=True)
        top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
        image = image[:, :, top : top + size, left : left + size].clamp(0.0, 1.0)
        mean = torch.tensor(CLIP_MEAN, device=image.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=image.device).view(1, 3, 1, 1)
        return ((image - mean) / std).to(encoder.dtype)

    @torch.inference_mode()
    def image_tokens(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The (1, T, width) image tokens of an RGB uint8 (H, W, 3) picture."""
        embedding = self.image_encoder(self.pixel_values(pixels)).image_embeds
        return self.image_projection(embedding)

    @torch.inference_mode()
    def empty_tokens(self) -> torch.Tensor:
        """The (1, T, width) tokens of no picture: those of a zero image embedding, which the
        adapter was trained to read as "no picture"."""
        width = self.image_projection.image_embeds.in_features
        weight = self.image_projection.image_embeds.weight
        return self.image_projection(weight.new_zeros((1, width)))


def resolve_ip_adapter(name: str | PathLike[str], cache_dir: str | Path | None = None) -> Path:
    """The weights file `name` names: `synthetic:<model>` (built on first use) or a path."""
    name = os.fspath(name)
    bare = synthetic_name(name)
    if bare is not None:
        from bridge.models.synthetic_ip_adapter import ensure_synthetic_ip_adapter

        root = Path(cache_dir) / "synthetic" if cache_dir is not None else None
        return ensure_synthetic_ip_adapter(bare, root)
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"IP-Adapter file {name!r} does not exist ({path.absolute()}); give the path of an "
            "IP-Adapter weights file such as h94/IP-Adapter's models/ip-adapter_sd15.safetensors."
        )
    return path.absolute()


def load_ip_adapter(
    components: Components,
    weights: str | PathLike[str],
    image_encoder: str | PathLike[str] | None = None,
    *,
    cache_dir: str | Path | None = None,
) -> IPAdapter:
    """Read an IP-Adapter into `components`' UNet and load its image encoder.

    `weights` is the weights file (or `synthetic:<model>`); `image_encoder` the folder of its
    CLIP image encoder, by default the ``image_encoder`` folder beside the weights. The UNet's
    cross-attention layers get diffusers' IP-Adapter processors, which
    `bridge.stream.ip_adapter.install` replaces; load before building a pipeline on the UNet.

    Raises:
        FileNotFoundError: the weights file or the image encoder folder is missing.
        ValueError: the file is not a base IP-Adapter, or it does not fit the model.
    """
    path = resolve_ip_adapter(weights, cache_dir)
    state = read_ip_adapter_file(path)
    _check_fits(state, path, components)
    encoder_path = _encoder_folder(path, image_encoder)
    unet = components.unet
    encoder = _load_image_encoder(encoder_path, unet.device, unet.dtype)
    embedding_width = state["image_proj"]["proj.weight"].shape[1]
    if encoder.config.projection_dim != embedding_width:
        raise ValueError(
            f"the image encoder in {encoder_path} gives {encoder.config.projection_dim}-wide "
            f"embeddings but IP-Adapter {path.name} takes {embedding_width}-wide ones; name the "
            "image encoder it was trained with: ip_adapter_image_encoder=FOLDER."
        )
    # diffusers puts the image projection on the UNet and marks the UNet to expect image
    # embeddings in every call; both are taken back, the projection kept here.
    hid_proj, hid_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    # It moves the UNet to its own dtype at the end, which diffusers warns about for no reason.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    except (RuntimeError, KeyError) as error:
        raise ValueError(
            f"IP-Adapter {path.name} does not fit the UNet of {components.source} ({error}); "
            "use an IP-Adapter trained for this model's family."
        ) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    unet.encoder_hid_proj = hid_proj
    unet.config.encoder_hid_dim_type = hid_type
    projection.eval().requires_grad_(False)
    return IPAdapter(path, encoder, projection, encoder_path)


def read_ip_adapter_file(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The ``image_proj`` and ``ip_adapter`` parts of a weights file, as diffusers reads them."""
    try:
        if path.suffix.lower() == ".safetensors":
            state: dict[str, dict[str, torch.Tensor]] = {part: {} for part in _PARTS}
            with safe_open(str(path), framework="pt", device="cpu") as weights:
                for key in weights.keys():
                    part, _, name = key.partition(".")
                    if part in state:
                        state[part][name] = weights.get_tensor(key)
        else:
            state = load_state_dict(path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ValueError(
            f"IP-Adapter file {path.name} could not be read ({type(error).__name__}); give an "
            "IP-Adapter .safetensors or .bin file such as h94/IP-Adapter's ip-adapter_sd15."
        ) from None
    if not isinstance(state, dict) or not all(state.get(part) for part in _PARTS):
        raise ValueError(
            f"{path.name} holds no image_proj and ip_adapter weights, so it is not an IP-Adapter "
            "file; give one such as h94/IP-Adapter's models/ip-adapter_sd15.safetensors."
        )
    if "proj.weight" not in state["image_proj"]:
        raise ValueError(
            f"{path.name} is an IP-Adapter Plus, Full-face or FaceID file, which needs another "
            "image projection; use a base IP-Adapter such as ip-adapter_sd15 or ip-adapter_sdxl."
        )
    return state


def _encoder_folder(weights: Path, image_encoder: str | PathLike[str] | None) -> Path:
    if image_encoder is None or os.fspath(image_encoder) == "":
        folder = weights.parent / IMAGE_ENCODER_FOLDER
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"the IP-Adapter's image encoder is not in {folder}; put the image_encoder "
                "folder it was trained with beside the weights (as h94/IP-Adapter has it), or "
                "name its folder with ip_adapter_image_encoder=FOLDER."
            )
        return folder
    folder = Path(image_encoder).expanduser().absolute()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"ip_adapter_image_encoder={os.fspath(image_encoder)!r} is not a CLIP image encoder "
            f"folder ({folder} has no config.json); name the image_encoder folder of the "
            "IP-Adapter."
        )
    return folder


def _check_fits(state: dict[str, dict[str, torch.Tensor]], path: Path, model: Components) -> None:
    """Refuse an adapter made for another family, with one sentence naming both."""
    keys = state["ip_adapter"]
    layers = sum(1 for key in keys if key.endswith(".to_k_ip.weight"))
    first = next((key for key in keys if key.endswith(".to_k_ip.weight")), None)
    width = keys[first].shape[1] if first is not None else 0
    unet = model.unet
    model_width = unet.config.cross_attention_dim
    model_layers = sum(1 for name in unet.attn_processors if name.endswith("attn2.processor"))
    if (width, layers) == (model_width, model_layers):
        return
    made_for = _FAMILY_OF_WIDTH.get(width, "another model")
    family = FAMILY_NAMES.get(model.family, model.family)
    raise ValueError(
        f"IP-Adapter {path.name} is made for {made_for} ({layers} cross-attention layers, "
        f"{width}-wide text tokens) but {model.source} is {family} ({model_layers} layers, "
        f"{model_width}-wide); use an IP-Adapter trained for {family}, or a model of its family."
    )


def _load_image_encoder(
    folder: Path, device: torch.device, dtype: torch.dtype
) -> CLIPVisionModelWithProjection:
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"the image encoder in {folder} could not be loaded ({type(error).__name__}); it must "
            "be a CLIPVisionModelWithProjection folder such as h94/IP-Adapter's "
            "models/image_encoder."
        ) from None
    return encoder.to(device).eval().requires_grad_(False)
