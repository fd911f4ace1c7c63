"""Feature bank: self-attention that also looks at the last frames, after StreamV2V.

StreamV2V (Liang et al., arXiv 2405.15757) steadies a diffusion video by letting each frame see
the features of the frames before it. Every self-attention layer (`attn1` of each transformer
block) turns a frame's T tokens into queries q, keys k and values v and computes
    out = softmax(q k^T / sqrt(d)) v.
The bank keeps the keys and values the layer made for the last N frames, and the current queries
attend over all of them at once (extended self-attention):
    out = softmax(q [k, k_1, ..., k_N]^T / sqrt(d)) [v, v_1, ..., v_N],
so a token borrows what the same content looked like a moment ago, and textures stay in place.

Each layer's keys and values live in a ring of N + 1 positions per bank row. The current
frame's keys overwrite the position of the oldest frame before the attention, so the ring then
holds exactly the current frame and the N before it, and the attention reads the ring as it lies:
softmax does not care about the order of its keys, so nothing is concatenated. The position to
write is `position`, a tensor advanced in place after every frame step, so a CUDA graph writes
where it should on every replay. Outputs kept for injection need no room for the current frame:
their ring has N positions, at `output_position`.

An empty bank (at the start, after a reset, after a change of size) is filled by the next frame
step, run eagerly: its frames get the plain attention of the layer's own processor, bit for bit,
and their keys and values are copied into every position. Keys repeated m times give the
attention of keys given once (each weight and the sum it is divided by grow m-fold), so the
frames after it see the first one as if it had been streaming all along, as the latent buffer
does.

Feature injection (StreamV2V's feature fusion): in the mid block and the up blocks below the
highest resolution with attention, each output token o of the attention also moves towards the
most similar output token y of the last N frames (cosine similarity c),
    o <- o + s * [c >= threshold] * (y - o),
with strength s and the threshold held in tensors that live changes overwrite. At s = 0 the output
is unchanged bit for bit. The highest-resolution layers are left out: their token-to-token
similarity costs as much as a large part of the UNet. The outputs kept are the attention's own,
before injection, so the bank never feeds on itself.

Rows. A stream-batch UNet call holds frames at different denoising steps, and for cfg_type "full"
and "initialize" also negative-prompt passes. A frame at step j should look at frames at the same
step, so the bank has one row per kind of latent in the batch: row j*f + i for the frame in
buffer position i at step j, then the negative passes in the same order. The pipeline says which
row each latent of a UNet call uses (`select`): the frame in each slot attends to the frames that
went through that slot's step before it, which is what the k steps one after the other see.

Processors are installed once per UNet (`install`) and stand in for the originals only while a
pipeline serves its bank (`BankSwitch.serve`); at any other time they call the original
processor, so pipelines without a bank that share the UNet compute exactly what they did.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import MAX_FEATURE_BANK


@dataclass
class _LayerBank:
    """One layer's ring: keys and values (rows, N + 1, T, C); outputs (rows, N, T, C) or None."""

    keys: torch.Tensor
    values: torch.Tensor
    outputs: torch.Tensor | None


class FeatureBank:
    """The self-attention keys, values and outputs of the last `size` frames, per layer and row.

    `rows` is the number of latents of a stream-batch UNet call (see the module docstring).
    `strength` and `threshold` are 0-dim tensors of the injection that their owner overwrites in
    place. The tensors of each layer are made when the first frame fills the bank.
    """

    def __init__(
        self, size: int, rows: int, strength: torch.Tensor, threshold: torch.Tensor
    ) -> None:
        if not 1 <= size <= MAX_FEATURE_BANK:
            raise ValueError(
                f"a feature bank holds 1 to {MAX_FEATURE_BANK} frames, got {size}; "
                "use no bank (feature_bank_size 0) to turn it off."
            )
        self.size = size
        self.rows = rows
        self.strength = strength
        self.threshold = threshold
        self.position = torch.zeros(1, dtype=torch.long, device=strength.device)
        self.output_position = torch.zeros(1, dtype=torch.long, device=strength.device)
        self.filling = True
        self._layers: dict[str, _LayerBank] = {}
        self._selected: torch.Tensor | None = None
        # Where the selected rows' current features go in a ring seen as (rows * positions, ...).
        self._key_index = self.position
        self._output_index = self.output_position

    def select(self, rows: torch.Tensor | None) -> None:
        """Say which bank row each latent of the next UNet call uses; None: all rows, in order."""
        self._selected = rows
        if rows is not None:
            self._key_index = rows * (self.size + 1) + self.position
            self._output_index = rows * self.size + self.output_position

    def empty(self) -> None:
        """Forget the frames held: the next frame step fills every position with its features."""
        self.filling = True

    def advance(self) -> None:
        """Move on to the next ring position, in place; called once after every frame step."""
        if self.filling:
            self.filling = False
            return
        self.position.add_(1).remainder_(self.size + 1)
        self.output_position.add_(1).remainder_(self.size)

    def state_tensors(self) -> list[torch.Tensor]:
        """The tensors a frame step advances: ring positions and every layer's ring."""
        tensors = [self.position, self.output_position]
        for layer in self._layers.values():
            tensors += [layer.keys, layer.values]
            if layer.outputs is not None:
                tensors.append(layer.outputs)
        return tensors

    def fill(
        self, name: str, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor | None
    ) -> None:
        """Write one layer's features of this call into every position of the selected rows."""
        expected = self.rows if self._selected is None else self._selected.shape[0]
        if key.shape[0] != expected:
            raise RuntimeError(
                f"a UNet batch of {key.shape[0]} does not fit a feature bank selection of "
                f"{expected} rows."
            )
        layer = self._layers.get(name)
        if layer is None or layer.keys.shape[2:] != key.shape[1:] or layer.keys.dtype != key.dtype:
            layer = self._allocate(key, output)
            self._layers[name] = layer
        self._fill(layer.keys, key)
        self._fill(layer.values, value)
        if output is not None and layer.outputs is not None:
            self._fill(layer.outputs, output)

    def extend(
        self, name: str, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this frame's keys and values into the ring; return all (N + 1) * T of each."""
        layer = self._layer(name, key.shape[0])
        self._write(layer.keys, key, self._key_index, self.position)
        self._write(layer.values, value, self._key_index, self.position)
        return self._read(layer.keys).flatten(1, 2), self._read(layer.values).flatten(1, 2)

    def inject(self, name: str, output: torch.Tensor) -> torch.Tensor:
        """Blend each output token towards its most similar banked one; then bank the output."""
        layer = self._layer(name, output.shape[0])
        assert layer.outputs is not None
        banked = self._read(layer.outputs).flatten(1, 2)
        similarity = F.normalize(output, dim=-1) @ F.normalize(banked, dim=-1).transpose(1, 2)
        best, index = similarity.max(dim=-1)
        nearest = banked.gather(1, index.unsqueeze(-1).expand(-1, -1, output.shape[-1]))
        weight = (self.strength * (best >= self.threshold)).unsqueeze(-1).to(output.dtype)
        injected = output + weight * (nearest - output)
        self._write(layer.outputs, output, self._output_index, self.output_position)
        return injected

    def _layer(self, name: str, batch: int) -> _LayerBank:
        layer = self._layers.get(name)
        if layer is None:
            raise RuntimeError(f"feature bank layer {name} was never filled; call empty() first.")
        expected = layer.keys.shape[0] if self._selected is None else self._selected.shape[0]
        if batch != expected:
            raise RuntimeError(
                f"a UNet batch of {batch} does not fit a feature bank selection of {expected} rows."
            )
        return layer

    def _allocate(self, key: torch.Tensor, output: torch.Tensor | None) -> _LayerBank:
        tokens, width = key.shape[1:]
        ring = (self.rows, self.size + 1, tokens, width)
        outputs = None
        if output is not None:
            outputs = key.new_zeros((self.rows, self.size, *output.shape[1:]))
        return _LayerBank(key.new_zeros(ring), key.new_zeros(ring), outputs)

    def _fill(self, ring: torch.Tensor, features: torch.Tensor) -> None:
        if self._selected is None:
            ring.copy_(features.unsqueeze(1).expand_as(ring))
        else:
            repeated = features.unsqueeze(1).expand(-1, ring.shape[1], -1, -1)
            ring.index_copy_(0, self._selected, repeated)

    def _write(
        self,
        ring: torch.Tensor,
        features: torch.Tensor,
        flat_index: torch.Tensor,
        position: torch.Tensor,
    ) -> None:
        """Write `features` at the ring position of each selected row, in place."""
        if self._selected is None:
            ring.index_copy_(1, position, features.unsqueeze(1))
        else:
            ring.view(-1, *ring.shape[2:]).index_copy_(0, flat_index, features)

    def _read(self, ring: torch.Tensor) -> torch.Tensor:
        """The selected rows of a ring (the ring itself when all rows are selected in order)."""
        return ring if self._selected is None else ring[self._selected]


class BankSwitch:
    """Which bank the banked processors of one UNet serve; None: they run the originals."""

    def __init__(self) -> None:
        self.bank: FeatureBank | None = None

    @contextmanager
    def serve(self, bank: FeatureBank) -> Iterator[None]:
        """Serve `bank` to the UNet calls made inside, then move its ring on by one frame.

        A bank that is filling is served with torch.compile held to eager execution, so a
        compiled UNet is not compiled a second time for the one frame that fills it.
        """
        self.bank = bank
        eager = torch.compiler.set_stance("force_eager") if bank.filling else nullcontext()
        try:
            with eager:
                yield
        finally:
            self.bank = None
        bank.advance()


class BankedSelfAttention:
    """A diffusers attention processor for self-attention over the frame and the bank's frames.

    Without a bank being served, or for a call it does not handle (cross-attention, a mask, a
    group or spatial norm), it runs `original`, the processor it replaced.
    """

    def __init__(self, original: Any, switch: BankSwitch, name: str, inject: bool) -> None:
        self.original = original
        self.switch = switch
        self.name = name
        self.inject = inject

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        bank = self.switch.bank
        plain = bank is None or encoder_hidden_states is not None or attention_mask is not None
        # Transformer blocks' self-attention has neither norm; a layer with one keeps its own.
        normed = attn.group_norm is not None or attn.spatial_norm is not None
        if plain or normed or hidden_states.ndim != 3:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        if bank.filling:
            output = self.original(attn, hidden_states, None, None, temb, *args, **kwargs)
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
            bank.fill(self.name, key, value, output if self.inject else None)
            return output
        output = self._extended(attn, hidden_states, bank)
        return bank.inject(self.name, output) if self.inject else output

    def _extended(self, attn: Any, hidden_states: torch.Tensor, bank: FeatureBank) -> torch.Tensor:
        """The layer's attention with the banked keys and values beside the frame's own."""
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        keys, values = bank.extend(self.name, attn.to_k(hidden_states), attn.to_v(hidden_states))
        head_dim = query.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        keys = keys.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        values = values.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            keys = attn.norm_k(keys)
        out = F.scaled_dot_product_attention(query, keys, values)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install(unet: Any) -> BankSwitch:
    """Put banked processors on every self-attention layer of `unet` once; return their switch.

    Layers keep their original processors inside. Injection is on in the mid block and in the up
    blocks before the last one with attention, which works at the highest resolution that has
    attention (64x64 tokens at 512x512 for SD 1.5 and 2.1, SDXL's at 1024x1024 too).
    """
    processors = dict(unet.attn_processors)
    banked = {name: p for name, p in processors.items() if name.endswith("attn1.processor")}
    if not banked:
        raise ValueError(
            "this UNet has no self-attention layers (attn1) for a feature bank to work on; "
            "use feature_bank_size 0."
        )
    for processor in banked.values():
        if isinstance(processor, BankedSelfAttention):
            return processor.switch
    switch = BankSwitch()
    places = {name: name.split(".")[:2] for name in banked}
    # The last up block with attention works at the highest resolution that has any.
    last_up = max(
        (int(index) for block, index in places.values() if block == "up_blocks"), default=0
    )
    for name, original in banked.items():
        block, index = places[name]
        inject = block == "mid_block" or (block == "up_blocks" and int(index) < last_up)
        processors[name] = BankedSelfAttention(original, switch, name, inject)
    unet.set_attn_processor(processors)
    return switch
