"""Test helpers for model loading: a fake Hugging Face cache entry and a converter that writes
a diffusers model (SD or SDXL) as one checkpoint in the original (LDM) key layout."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file


def add_to_hf_cache(cache: Path, repo_id: str, folder: Path, revision: str = "0" * 40) -> Path:
    """Copy ``folder`` into ``cache`` the way huggingface_hub stores a downloaded snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def _rename(state: dict[str, torch.Tensor], renames: list[tuple[str, str]]) -> dict[str, Any]:
    """Rename every key by the first matching prefix rule; every key must match one."""
    renamed = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                renamed[new + key[len(old) :]] = value
                break
        else:
            raise AssertionError(f"no LDM name for {key}")
    return renamed


_LDM_RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers UNet state dict in the key layout of the original Stable Diffusion UNet."""
    per_block = config["layers_per_block"]
    resnets = [
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    others = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
        # SDXL's added conditioning (pooled text and size ids).
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
    ]
    for block in range(len(config["block_out_channels"])):
        first_down = 1 + block * (per_block + 1)
        for layer in range(per_block):
            resnets.append(
                (f"down_blocks.{block}.resnets.{layer}.", f"input_blocks.{first_down + layer}.0.")
            )
            others.append(
                (
                    f"down_blocks.{block}.attentions.{layer}.",
                    f"input_blocks.{first_down + layer}.1.",
                )
            )
        others.append(
            (
                f"down_blocks.{block}.downsamplers.0.conv.",
                f"input_blocks.{first_down + per_block}.0.op.",
            )
        )
        first_up = block * (per_block + 1)
        for layer in range(per_block + 1):
            resnets.append(
                (f"up_blocks.{block}.resnets.{layer}.", f"output_blocks.{first_up + layer}.0.")
            )
            others.append(
                (f"up_blocks.{block}.attentions.{layer}.", f"output_blocks.{first_up + layer}.1.")
            )
        # The upsampler follows the last layer's resnet, and its attention where there is one.
        slot = 2 if config["up_block_types"][block].startswith("CrossAttn") else 1
        others.append(
            (f"up_blocks.{block}.upsamplers.0.", f"output_blocks.{first_up + per_block}.{slot}.")
        )

    ldm = {}
    for key, value in state.items():
        for old, new in resnets:
            if key.startswith(old):
                rest = _rename({key[len(old) :]: value}, _LDM_RESNET)
                ldm.update({new + name: tensor for name, tensor in rest.items()})
                break
        else:
            ldm.update(_rename({key: value}, others))
    return {"model.diffusion_model." + key: value for key, value in ldm.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers AutoencoderKL state dict in the key layout of the original autoencoder."""
    levels = len(config["block_out_channels"])
    renames = [
        ("encoder.conv_norm_out.", "encoder.norm_out."),
        ("decoder.conv_norm_out.", "decoder.norm_out."),
    ]
    for part in ("encoder", "decoder"):
        renames += [
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."),
        ]
    for level in range(levels):
        renames += [
            (f"encoder.down_blocks.{level}.resnets.", f"encoder.down.{level}.block."),
            (f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample."),
            # The decoder counts its levels from the bottom in the original layout.
            (f"decoder.up_blocks.{level}.resnets.", f"decoder.up.{levels - 1 - level}.block."),
            (
                f"decoder.up_blocks.{level}.upsamplers.0.",
                f"decoder.up.{levels - 1 - level}.upsample.",
            ),
        ]
    renames += [
        (prefix, prefix) for prefix in ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    ]
    attention = {
        "group_norm.": "norm.",
        "to_q.": "q.",
        "to_k.": "k.",
        "to_v.": "v.",
        "to_out.0.": "proj_out.",
    }

    ldm = {}
    for key, value in _rename(state, renames).items():
        key = key.replace("conv_shortcut.", "nin_shortcut.")
        if ".mid.attn_1." in key:
            head, _, tail = key.partition(".mid.attn_1.")
            for old, new in attention.items():
                if tail.startswith(old):
                    tail = new + tail[len(old) :]
            key = f"{head}.mid.attn_1.{tail}"
            # The original attention projections are 1x1 convolutions.
            if value.ndim == 2:
                value = value[:, :, None, None]
        ldm["first_stage_model." + key] = value
    return ldm


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state dict in OpenCLIP's layout (SDXL's second encoder):
    fused q/k/v projections, renamed layers and a transposed text projection."""
    ldm = {}
    renames = [
        ("self_attn.out_proj.", "attn.out_proj."),
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ]
    layers = "text_model.encoder.layers."
    for key, value in state.items():
        if key == "text_model.embeddings.token_embedding.weight":
            ldm["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            ldm["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            ldm["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            ldm["text_projection"] = value.T
        elif key.startswith(layers):
            index, rest = key[len(layers) :].split(".", 1)
            block = f"transformer.resblocks.{index}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                kind = rest.rsplit(".", 1)[1]
                if rest.startswith("self_attn.q_proj."):
                    fused = [
                        state[f"{layers}{index}.self_attn.{part}_proj.{kind}"] for part in "qkv"
                    ]
                    ldm[f"{block}attn.in_proj_{kind}"] = torch.cat(fused)
                continue
            for old, new in renames:
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            ldm[block + rest] = value
        elif "position_ids" not in key:
            raise AssertionError(f"no OpenCLIP name for {key}")
    return {"conditioner.embedders.1.model." + key: value for key, value in ldm.items()}


def write_ldm_checkpoint(folder: Path, path: Path) -> Path:
    """Write the model in ``folder`` as one original-layout ``.safetensors`` or ``.ckpt`` file."""
    unet_config = UNet2DConditionModel.load_config(folder / "unet")
    vae_config = AutoencoderKL.load_config(folder / "vae")
    checkpoint = unet_to_ldm(
        load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), unet_config
    )
    checkpoint |= vae_to_ldm(
        load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"), vae_config
    )
    text = load_file(folder / "text_encoder" / "model.safetensors")
    second = folder / "text_encoder_2" / "model.safetensors"
    # SDXL checkpoints keep both text encoders under conditioner.embedders.
    prefix = "conditioner.embedders.0." if second.is_file() else "cond_stage_model."
    checkpoint |= {prefix + "transformer.text_model." + key: value for key, value in text.items()}
    if second.is_file():
        checkpoint |= open_clip_to_ldm(load_file(second))
    checkpoint = {key: value.contiguous() for key, value in checkpoint.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": checkpoint, "global_step": 0}, path)
    else:
        save_file(checkpoint, path)
    return path
