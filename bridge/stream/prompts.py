"""Text-encoder outputs computed once per prompt and kept in a small LRU cache.

Encoding has two halves: the tokenizer, on the host, turns a prompt into token ids padded to the
tokenizer's fixed length (77 for CLIP); the text encoder, on the device, turns those ids into the
embedding. The second half has fixed shapes, so an accelerator may replace it (bridge.accel
replays it as a CUDA graph) without the tokenizer or the cache noticing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch


class PromptEncoder:
    """Encodes prompts with a CLIP tokenizer and text encoder, remembering recent results.

    A live set cycles through a handful of prompts; each is encoded the first time it is seen and
    served from the cache after that, so switching back costs nothing on the frame path.
    """

    def __init__(self, tokenizer, text_encoder, *, cache_size: int = 32) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}.")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.cache_size = cache_size
        self.encode_count = 0
        # What runs `embed_ids` for new prompts; None runs it eagerly.
        self.accelerator: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    def __call__(self, prompt: str) -> torch.Tensor:
        """The (1, tokens, width) embedding of `prompt`."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}.")
        # `forget` may swap the cache from another thread: an encoding in flight keeps the old.
        cache = self._cache
        cached = cache.get(prompt)
        if cached is not None:
            cache.move_to_end(prompt)
            return cached
        embedding = self._encode(prompt)
        cache[prompt] = embedding
        if len(cache) > self.cache_size:
            cache.popitem(last=False)
        return embedding

    def negative(self, prompt: str) -> torch.Tensor:
        """The embedding of `prompt` as a negative prompt: the same as any prompt's here."""
        return self(prompt)

    def forget(self) -> None:
        """Drop every cached embedding: the text encoder's weights changed (a LoRA scale)."""
        self._cache = OrderedDict()

    def token_ids(self, prompt: str) -> list[torch.Tensor]:
        """The prompt's (1, length) token ids on the host, one tensor per tokenizer."""
        return [tokenize(self.tokenizer, prompt)]

    @torch.inference_mode()
    def embed_ids(self, ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """The (1, tokens, width) embedding of token ids from `token_ids`, on the device."""
        return self.text_encoder(ids[0].to(self.device))[0]

    def _encode(self, prompt: str) -> torch.Tensor:
        ids = self.token_ids(prompt)
        self.encode_count += 1
        return (self.accelerator or self.embed_ids)(ids)


def tokenize(tokenizer: Any, prompt: str) -> torch.Tensor:
    """(1, length) token ids, padded or cut to the tokenizer's fixed length."""
    tokens = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return tokens.input_ids
