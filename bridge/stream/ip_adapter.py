"""IP-Adapter: cross-attention that also looks at a picture, with a scale that changes live.

IP-Adapter (Ye et al., arXiv 2308.06721) steers a text-to-image UNet with a picture. A CLIP image
encoder turns the picture into an embedding e, and a small projection turns that into T image
tokens, c = LayerNorm(reshape(W e + b)), as wide as the text tokens. Every cross-attention layer
of the UNet gets a second pair of key and value projections for them (decoupled cross-attention):
    out = Attn(q, K_text, V_text) + s * Attn(q, W'_k c, W'_v c),
with q, K_text and V_text what the layer computed before and s the adapter's scale: s = 0 leaves
the layer as it was. The adapter was trained with the picture sometimes dropped (its embedding
set to zero), so the tokens of a zero embedding mean "no picture": the negative-prompt passes of
classifier-free guidance see those, as diffusers' pipelines do, and so does the positive pass
until a first picture is given.

Here the tokens and the scale are tensors that live changes overwrite in place (`ImagePrompt`),
and the processors read them on every call instead of receiving them as arguments, so a CUDA
graph captured over the UNet follows a new picture or a new scale without a new capture, and
nothing in the step compares the scale with a number. The UNet call is not changed: diffusers
loads the adapter's weights (`UNet2DConditionModel._load_ip_adapter_weights`), `install` then
puts `IPAdapterAttention` in place of diffusers' IP-Adapter processors, keeping their weights.

Rows. A UNet call of the stream pipeline holds the negative-prompt passes first, then the
conditional ones; the pipeline says how many conditional rows the next call has (`select`), and
the rows before them get the tokens of no picture.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
from torch import nn

_DIFFUSERS_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)


class ImagePrompt:
    """The image tokens and the scale every IP-Adapter layer of one UNet reads.

    `tokens` is (2, T, width): row 0 the tokens of no picture (`empty`, (1, T, width)), row 1 the
    picture's. `scale` is a 0-dim tensor. Both are overwritten in place between UNet calls.
    """

    def __init__(self, empty: torch.Tensor, scale: float = 1.0) -> None:
        if empty.ndim != 3 or empty.shape[0] != 1:
            raise ValueError(
                f"the tokens of no picture must be (1, tokens, width), got {tuple(empty.shape)}."
            )
        self.tokens = torch.cat([empty, empty]).detach().clone()
        self.scale = torch.tensor(float(scale), device=empty.device)
        self.positives: int | None = None

    def set_image_tokens(self, tokens: torch.Tensor) -> None:
        """Use a picture's (1, T, width) tokens from the next UNet call on."""
        needed = (1, *self.tokens.shape[1:])
        if tuple(tokens.shape) != needed:
            raise ValueError(
                f"image tokens of shape {tuple(tokens.shape)} do not fit this IP-Adapter; it "
                f"needs {needed}."
            )
        self.tokens[1:].copy_(tokens)

    def image_tokens(self) -> torch.Tensor:
        """A copy of the picture's tokens in use, (1, T, width)."""
        return self.tokens[1:].clone()

    def set_scale(self, scale: float) -> None:
        """Weigh the picture's attention by `scale` from the next UNet call on; 0 turns it off."""
        self.scale.fill_(float(scale))

    def select(self, positives: int | None) -> None:
        """Say that the last `positives` rows of the next UNet calls are conditional passes and
        the rows before them negative-prompt passes; None: every row is conditional."""
        self.positives = positives

    def negatives(self, batch: int) -> int:
        """How many leading rows of a UNet call of `batch` rows are negative-prompt passes."""
        return 0 if self.positives is None else max(0, batch - self.positives)


class IPAdapterAttention(nn.Module):
    """A cross-attention processor that adds the attention to `prompt`'s image tokens, scaled.

    It computes what diffusers' `IPAdapterAttnProcessor2_0` computes for one IP-Adapter without
    masks, with the tokens and scale read from `prompt` rather than passed to the UNet.
    """

    def __init__(self, to_k_ip: nn.Linear, to_v_ip: nn.Linear, prompt: ImagePrompt) -> None:
        super().__init__()
        self.to_k_ip = to_k_ip
        self.to_v_ip = to_v_ip
        self.prompt = prompt

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
        assert encoder_hidden_states is not None, "an IP-Adapter layer is a cross-attention layer"
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        def merged(tensor: torch.Tensor) -> torch.Tensor:
            out = tensor.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
            return out.to(query.dtype)

        query = heads(query)
        text = F.scaled_dot_product_attention(
            query, heads(key), heads(value), attn_mask=attention_mask
        )
        # The image tokens' keys and values are computed once for the two kinds of row (no
        # picture, the picture) and then laid out over the batch.
        tokens = self.prompt.tokens.to(query.dtype)
        ip_key = self._laid_out(self.to_k_ip(tokens), batch)
        ip_value = self._laid_out(self.to_v_ip(tokens), batch)
        image = F.scaled_dot_product_attention(query, heads(ip_key), heads(ip_value))
        hidden_states = merged(text) + self.prompt.scale * merged(image)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _laid_out(self, per_kind: torch.Tensor, batch: int) -> torch.Tensor:
        """(2, T, C) rows for no picture and the picture as the (batch, T, C) rows of a call."""
        negatives = self.prompt.negatives(batch)
        return torch.cat(
            [per_kind[:1].expand(negatives, -1, -1), per_kind[1:].expand(batch - negatives, -1, -1)]
        )


def install(unet: Any, empty: torch.Tensor, scale: float = 1.0) -> ImagePrompt:
    """Put `IPAdapterAttention` in place of the diffusers IP-Adapter processors of `unet`.

    `empty` is the (1, T, width) tokens of no picture. Returns the `ImagePrompt` every layer
    reads; the weights stay those diffusers loaded.
    """
    processors = dict(unet.attn_processors)
    loaded = {name: p for name, p in processors.items() if isinstance(p, _DIFFUSERS_PROCESSORS)}
    if not loaded:
        raise ValueError(
            "this UNet has no IP-Adapter layers to take over; load the IP-Adapter weights first "
            "(bridge.models.ip_adapter.load_ip_adapter)."
        )
    if any(len(processor.to_k_ip) != 1 for processor in loaded.values()):
        raise ValueError("this UNet holds several IP-Adapters; load one IP-Adapter only.")
    prompt = ImagePrompt(empty, scale)
    for name, processor in loaded.items():
        processors[name] = IPAdapterAttention(processor.to_k_ip[0], processor.to_v_ip[0], prompt)
    unet.set_attn_processor(processors)
    return prompt


def image_prompt_of(unet: Any) -> ImagePrompt | None:
    """The `ImagePrompt` the IP-Adapter layers of `unet` read, or None when it has none."""
    for processor in unet.attn_processors.values():
        if isinstance(processor, IPAdapterAttention):
            return processor.prompt
    return None
