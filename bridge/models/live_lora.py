"""LoRA adapters whose scales change live: the scale is a tensor, never a number baked in.

peft's LoRA layers multiply by their scale as a Python float, so a CUDA graph captured over them
keeps the value it saw at capture. Here every layer that LoRA files touch becomes a
`LiveLoraLayer`, which computes

    out = base(x) + (B diag(s)) (A x)

where A stacks the down projections of every adapter on that layer (ranks r_1 + r_2 + ...), B
stacks their up projections with each adapter's alpha / r folded in, and s repeats each
adapter's scale over its ranks. With one adapter at scale s_1 this adds s_1 (alpha / r) B_1 A_1 x,
exactly what fusing at s_1 adds to the weight; with several, the sum over them. The layer keeps
B diag(s) as a tensor of its own, rewritten when a scale changes, so a frame runs two small
matrix products per layer and nothing else, however many adapters share it.

All scales sit in one vector on the model's device. An adapter's scale is a view of one entry,
shared by all its layers in the UNet and the text encoder. The per-rank vector s is shared too, by
every layer with the same adapters and ranks (typically all of them), so a frame spends no kernel
gathering it. `LiveLoras.set_scale` overwrites the adapter's scale and the vectors that repeat it
in place, then each layer's scaled up projection, between frames, so a captured graph reads the
new values on its next replay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from bridge.models.components import Components
from bridge.models.lora import adapter_name, load_adapters, lora_networks


@dataclass(frozen=True)
class LiveAdapter:
    """One LoRA file loaded live: its path, its scale tensor and the networks it changes."""

    path: Path
    scale: torch.Tensor
    networks: tuple[str, ...]
    layers: int

    @property
    def changes_text(self) -> bool:
        """Whether it changes a text encoder, so that a new scale needs the prompt re-encoded."""
        return any(network.startswith("text_encoder") for network in self.networks)


class LiveLoraLayer(nn.Module):
    """A Linear or Conv2d layer plus the LoRA adapters on it, each scaled by a live tensor."""

    def __init__(
        self,
        base_layer: nn.Module,
        down: torch.Tensor,
        up: torch.Tensor,
        owners: Sequence[int],
        rank_scale: torch.Tensor,
        conv: dict[str, object] | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.down_weight = nn.Parameter(down, requires_grad=False)
        self.up_weight = nn.Parameter(up, requires_grad=False)
        # Buffers, not plain attributes, so torch.compile reads them as inputs rather than
        # constants; non-persistent, so state dicts stay those of the base model.
        self.register_buffer("rank_scale", rank_scale, persistent=False)
        self.register_buffer("scaled_up", torch.empty_like(up), persistent=False)
        self.adapters = tuple(sorted(set(owners)))
        self._conv = conv
        self.rescale()

    def rescale(self) -> None:
        """Rewrite the scaled up projection, B diag(s), in place from the current scales."""
        shape = (1, -1, 1, 1) if self._conv is not None else (1, -1)
        torch.mul(self.up_weight, self.rank_scale.view(shape), out=self.scaled_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self._conv is not None:
            hidden = F.conv2d(x, self.down_weight, **self._conv)
            return out.add_(F.conv2d(hidden, self.scaled_up))
        hidden = F.linear(x, self.down_weight)
        # Adding in place into the base output lets the second product accumulate into it.
        flat = out.view(-1, out.shape[-1])
        flat.addmm_(hidden.view(-1, hidden.shape[-1]), self.scaled_up.t())
        return out


class LiveLoras:
    """The LoRA adapters loaded live into a model, and the tensor of their scales."""

    def __init__(
        self,
        adapters: Sequence[LiveAdapter],
        scales: torch.Tensor,
        rank_scales: dict[tuple[int, ...], torch.Tensor],
        layers: Sequence[LiveLoraLayer] = (),
    ) -> None:
        self.adapters = tuple(adapters)
        self.layers = tuple(layers)
        self.scales = scales
        # The per-rank vectors layers read, by the adapter index of each rank.
        self.rank_scales = rank_scales
        self._gathers = {
            owners: torch.tensor(owners, device=scales.device) for owners in rank_scales
        }
        self._values = [float(value) for value in scales.tolist()]
        self._written: torch.cuda.Event | None = None

    def __len__(self) -> int:
        return len(self.adapters)

    def scale(self, index: int) -> float:
        """The scale adapter `index` runs at."""
        return self._values[index]

    def set_scale(self, index: int, scale: float) -> bool:
        """Run adapter `index` at `scale` from the next frame on; True if a prompt needs
        re-encoding because the adapter changes a text encoder and its scale moved."""
        if not 0 <= index < len(self.adapters):
            raise IndexError(
                f"LoRA index {index} is not loaded; use an index from 0 to {len(self) - 1}."
            )
        if not math.isfinite(scale):
            raise ValueError(f"LoRA scale {scale!r} is not a finite number; pass e.g. 0.8.")
        if scale == self._values[index]:
            return False
        self.adapters[index].scale.fill_(scale)
        for owners, rank_scale in self.rank_scales.items():
            if index in owners:
                rank_scale.copy_(self.scales.index_select(0, self._gathers[owners]))
        for layer in self.layers:
            if index in layer.adapters:
                layer.rescale()
        self._values[index] = float(scale)
        if self.scales.device.type == "cuda":
            # The prompt encoder runs on its own CUDA stream; it waits for this write.
            self._written = torch.cuda.Event()
            self._written.record()
        return self.adapters[index].changes_text

    def wait_for_scales(self, module: nn.Module, args: object) -> None:
        """A forward pre-hook: the caller's CUDA stream waits until the latest scale is written."""
        if self._written is not None:
            torch.cuda.current_stream(self.scales.device).wait_event(self._written)


def load_live_loras(
    components: Components, loras: Sequence[tuple[Path, float]]
) -> LiveLoras | None:
    """Load LoRA files as live adapters of the UNet and text encoder(s), at their start scales.

    Raises ValueError naming the file and the fix when a file does not fit the model.
    """
    if not loras:
        return None
    load_adapters(components, loras)
    networks = lora_networks(components)
    unet = components.unet
    scales = torch.tensor([scale for _, scale in loras], device=unet.device, dtype=unet.dtype)
    owner = {adapter_name(index): index for index in range(len(loras))}
    touched: dict[int, dict[str, int]] = {index: {} for index in range(len(loras))}
    rank_scales: dict[tuple[int, ...], torch.Tensor] = {}

    def rank_scale(owners: tuple[int, ...]) -> torch.Tensor:
        if owners not in rank_scales:
            gather = torch.tensor(owners, device=scales.device)
            rank_scales[owners] = scales.index_select(0, gather)
        return rank_scales[owners]

    layers: list[LiveLoraLayer] = []
    for network_name, network in networks.items():
        for name, layer in list(network.named_modules()):
            if not isinstance(layer, LoraLayer):
                continue
            live = _live_layer(layer, name, owner, rank_scale, loras)
            layers.append(live)
            parent_name, _, child = name.rpartition(".")
            setattr(network.get_submodule(parent_name), child, live)
            for index in live.adapters:
                touched[index][network_name] = touched[index].get(network_name, 0) + 1
        _forget_peft(network)
    adapters = [
        LiveAdapter(
            path=path,
            scale=scales[index],
            networks=tuple(touched[index]),
            layers=sum(touched[index].values()),
        )
        for index, (path, _) in enumerate(loras)
    ]
    live = LiveLoras(adapters, scales, rank_scales, layers)
    for network_name, network in networks.items():
        if network_name.startswith("text_encoder") and any(a.changes_text for a in adapters):
            network.register_forward_pre_hook(live.wait_for_scales)
    return live


def _live_layer(
    layer: LoraLayer,
    name: str,
    owner: dict[str, int],
    rank_scale: Callable[[tuple[int, ...]], torch.Tensor],
    loras: Sequence[tuple[Path, float]],
) -> LiveLoraLayer:
    """The live replacement of one peft LoRA layer, holding every adapter peft put on it."""
    base = layer.get_base_layer()
    downs, ups, owners = [], [], []
    for adapter in layer.lora_A:
        index = owner[adapter]
        if layer.use_dora.get(adapter) or layer.lora_bias.get(adapter):
            raise ValueError(
                f"LoRA file {loras[index][0].name} is a DoRA or carries a bias on {name}, which "
                "live scales do not handle; fuse it at start with fuse_loras=True."
            )
        down = layer.lora_A[adapter].weight
        downs.append(down)
        ups.append(layer.lora_B[adapter].weight * layer.scaling[adapter])
        owners += [index] * down.shape[0]
    scale = rank_scale(tuple(owners))
    if isinstance(base, nn.Linear):
        return LiveLoraLayer(base, torch.cat(downs), torch.cat(ups, dim=1), owners, scale)
    if isinstance(base, nn.Conv2d):
        first = layer.lora_A[next(iter(layer.lora_A))]
        conv = {"stride": first.stride, "padding": first.padding, "dilation": first.dilation}
        return LiveLoraLayer(base, torch.cat(downs), torch.cat(ups, dim=1), owners, scale, conv)
    files = ", ".join(sorted({loras[owner[adapter]][0].name for adapter in layer.lora_A}))
    raise ValueError(
        f"LoRA file {files} changes {name}, a {type(base).__name__} layer, which live scales do "
        "not handle; fuse it at start with fuse_loras=True."
    )


def _forget_peft(network: nn.Module) -> None:
    """Drop peft's record of the adapters: their layers are gone, replaced by live ones."""
    if hasattr(network, "peft_config"):
        del network.peft_config
    if getattr(network, "_hf_peft_config_loaded", False):
        network._hf_peft_config_loaded = False
