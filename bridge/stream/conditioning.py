"""What a UNet call is given besides the latents: SDXL's added conditioning, and the sizes it takes.

SD 1.x and 2.x condition the UNet on one tensor, the text encoder's tokens (1, 77, width). SDXL
encodes the prompt with two text encoders, CLIP ViT-L and OpenCLIP ViT-bigG, and puts the
penultimate layers of both side by side (768 + 1280 = 2048 wide). It also adds, through
``added_cond_kwargs``, ``text_embeds``, the pooled and projected output of the second encoder
(1, 1280), and ``time_ids``: the original size, the crop corner and the target size the model
was trained to condition on, six numbers per latent.

The pipeline keeps a prompt's conditioning in one tensor whatever the family, so that everything
that handles prompts (the LRU cache, cross-fades, the in-place overwrites a captured CUDA graph
reads, the (uncond, cond) batch layout of classifier-free guidance) works unchanged. For SDXL that
tensor is (1, 77 + 1, 2048): the 77 token rows, and one more row holding the pooled embedding in
its first 1280 columns, zeros after them. A blend of two such tensors is the blend of their tokens
and of their pooled embeddings, as a cross-fade wants. The size ids follow the stream's width and
height, not the prompt, so they live apart, in a tensor overwritten in place when the size changes.

SDXL pipelines carry one more setting, ``force_zeros_for_empty_prompt`` (true for SDXL base and
SDXL-Turbo): given no negative prompt, the negative conditioning is zeros, tokens and pooled
embedding alike, rather than the encoding of "". diffusers applies it to the negative prompt
only; an empty prompt is encoded as it is. Here a negative prompt is never absent, only empty,
so the empty negative prompt is the one that becomes zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .prompts import PromptEncoder, tokenize

# Original height and width, crop top and left, target height and width.
TIME_IDS = 6


def pack(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(N, T, W) tokens and an (N, P) pooled embedding as one (N, T + 1, W) tensor, P <= W."""
    width = tokens.shape[-1]
    if pooled.shape[-1] > width:
        raise ValueError(
            f"a pooled embedding {pooled.shape[-1]} wide does not fit beside tokens {width} "
            "wide; the second text encoder's projection_dim must be at most the token width."
        )
    row = tokens.new_zeros((tokens.shape[0], 1, width))
    row[:, 0, : pooled.shape[-1]] = pooled.to(tokens.dtype)
    return torch.cat([tokens, row], dim=1)


class DualPromptEncoder(PromptEncoder):
    """SDXL's prompt encoding: two tokenizers and text encoders, packed with the pooled output.

    With ``force_zeros_for_empty_prompt`` the empty negative prompt is all zeros.
    """

    def __init__(
        self,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[torch.nn.Module],
        *,
        cache_size: int = 32,
        force_zeros_for_empty_prompt: bool = False,
    ) -> None:
        super().__init__(tokenizers[0], text_encoders[0], cache_size=cache_size)
        self.pairs = list(zip(tokenizers, text_encoders, strict=True))
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    def negative(self, prompt: str) -> torch.Tensor:
        """The embedding of `prompt` as a negative prompt: zeros for "" if the model says so."""
        embedding = self(prompt)
        if prompt == "" and self.force_zeros_for_empty_prompt:
            return torch.zeros_like(embedding)
        return embedding

    def token_ids(self, prompt: str) -> list[torch.Tensor]:
        """The prompt's (1, length) token ids on the host from each tokenizer."""
        return [tokenize(tokenizer, prompt) for tokenizer, _ in self.pairs]

    @torch.inference_mode()
    def embed_ids(self, ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """Both encoders' penultimate tokens side by side, packed with the pooled embedding."""
        hidden = []
        for token_ids, (_, text_encoder) in zip(ids, self.pairs, strict=True):
            output = text_encoder(token_ids.to(text_encoder.device), output_hidden_states=True)
            # SDXL reads the penultimate layer of both encoders.
            hidden.append(output.hidden_states[-2])
        # The pooled embedding is the last encoder's projected end-of-text token.
        return pack(torch.cat(hidden, dim=-1), output.text_embeds)


class AddedConditioning:
    """SDXL's ``added_cond_kwargs`` for each UNet call, read from packed prompt tensors."""

    def __init__(self, tokens: int, pooled_width: int, device: torch.device, dtype: torch.dtype):
        self.tokens = tokens
        self.pooled_width = pooled_width
        self.time_ids = torch.zeros((1, TIME_IDS), device=device, dtype=dtype)

    def set_size(self, width: int, height: int) -> None:
        """Condition on a picture of this size, neither cropped nor resized (in place)."""
        ids = [height, width, 0, 0, height, width]
        self.time_ids.copy_(torch.tensor([ids], dtype=self.time_ids.dtype))

    def unet_kwargs(self, context: torch.Tensor) -> dict[str, Any]:
        """The UNet's conditioning arguments for a batch of packed prompt tensors."""
        return {
            "encoder_hidden_states": context[:, : self.tokens],
            "added_cond_kwargs": {
                "text_embeds": context[:, self.tokens, : self.pooled_width],
                "time_ids": self.time_ids.expand(context.shape[0], -1),
            },
        }


def prompt_conditioning(
    components: Any, device: torch.device, dtype: torch.dtype, *, cache_size: int = 32
) -> tuple[PromptEncoder, AddedConditioning | None]:
    """The prompt encoder of a model, and its added conditioning (None for SD 1.x and 2.x).

    An SDXL model's ``force_zeros_for_empty_prompt`` (False where ``components`` has none; the
    loader reads it as diffusers does) decides what the empty negative prompt encodes to.
    """
    config = components.unet.config
    if config.get("addition_embed_type") != "text_time":
        encoder = PromptEncoder(
            components.tokenizer, components.text_encoder, cache_size=cache_size
        )
        return encoder, None
    text_encoder_2 = getattr(components, "text_encoder_2", None)
    tokenizer_2 = getattr(components, "tokenizer_2", None)
    if text_encoder_2 is None or tokenizer_2 is None:
        raise ValueError(
            "this UNet takes SDXL's added conditioning, which needs a second tokenizer and text "
            "encoder; load the model with bridge.models.load_components."
        )
    pooled_width = text_encoder_2.config.projection_dim
    ids_width = config.projection_class_embeddings_input_dim - pooled_width
    if ids_width != TIME_IDS * config.addition_time_embed_dim:
        raise ValueError(
            f"this SDXL UNet conditions on {ids_width / config.addition_time_embed_dim:g} size "
            f"ids, not SDXL's {TIME_IDS} (a refiner takes an aesthetic score); pick an SDXL "
            "base or turbo model."
        )
    encoder = DualPromptEncoder(
        (components.tokenizer, tokenizer_2),
        (components.text_encoder, text_encoder_2),
        cache_size=cache_size,
        force_zeros_for_empty_prompt=getattr(components, "force_zeros_for_empty_prompt", False),
    )
    added = AddedConditioning(components.tokenizer.model_max_length, pooled_width, device, dtype)
    return encoder, added


def check_resolution(unet_config: Any, width: int, height: int) -> None:
    """Refuse a size whose latent is smaller than the UNet's coarsest level."""
    halvings = len(unet_config.block_out_channels) - 1
    smallest = 8 * 2**halvings
    if min(width, height) < smallest:
        raise ValueError(
            f"{width}x{height} is too small for this model: its UNet halves the latent "
            f"{halvings} times, so each side needs at least {smallest} pixels; try "
            f"{max(width, smallest)}x{max(height, smallest)}."
        )
