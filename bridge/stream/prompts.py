"""Text-encoder outputs computed once per prompt and kept in a small LRU cache."""

from __future__ import annotations

from collections import OrderedDict

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

    @torch.inference_mode()
    def _encode(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        self.encode_count += 1
        ids = tokens.input_ids.to(self.device)
        return self.text_encoder(ids)[0]
