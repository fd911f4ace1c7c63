"""Random LoRA files shaped for a loaded model, for benchmarks on machines without real ones.

Like the synthetic models, they cost what real LoRAs of the same rank and layers cost: the time
a LoRA adds depends on its shapes, not on its values. Each file holds rank-`rank` factors, in
PEFT's key layout, for every attention projection of the UNet and the text encoder, the layers
style LoRAs usually train.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from bridge.models.components import Components
from bridge.models.lora import lora_networks

ATTENTION_PROJECTIONS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
)


def write_synthetic_lora(components: Components, path: Path, *, seed: int, rank: int = 16) -> Path:
    """Write a random LoRA of `components`' attention projections to `path` and return it."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for network_name, network in lora_networks(components).items():
        for name, module in network.named_modules():
            if not isinstance(module, nn.Linear) or not name.endswith(ATTENTION_PROJECTIONS):
                continue
            # Small factors, so the update is of the size trained LoRAs make.
            down = torch.randn((rank, module.in_features), generator=generator) / module.in_features
            up = torch.randn((module.out_features, rank), generator=generator) / rank
            tensors[f"{network_name}.{name}.lora_A.weight"] = down.to(torch.float16)
            tensors[f"{network_name}.{name}.lora_B.weight"] = up.to(torch.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
