"""Fixtures for the stream pipeline: the synthetic tiny model, loaded through the real loader."""

from __future__ import annotations

import pytest
import torch

from bridge.models import load_components
from bridge.stream import StreamConfig, StreamDiffusion
from tests.stream.helpers import SIZE


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """synthetic:tiny with its tiny VAE, on the CPU in float32."""
    torch.manual_seed(0)
    cache = tmp_path_factory.mktemp("synthetic")
    return load_components("synthetic:tiny", vae="tiny", cache_dir=cache)


@pytest.fixture(scope="session")
def tiny_full_vae(tmp_path_factory):
    """synthetic:tiny with its full AutoencoderKL."""
    cache = tmp_path_factory.mktemp("synthetic-kl")
    return load_components("synthetic:tiny", cache_dir=cache)


@pytest.fixture
def make_stream(tiny):
    """Build a 64x64 pipeline on the tiny model with some settings changed."""

    def make(**settings) -> StreamDiffusion:
        prompt = settings.pop("prompt", "a red fox in the snow")
        negative = settings.pop("negative_prompt", "blurry")
        config = StreamConfig(width=SIZE, height=SIZE, **settings)
        return StreamDiffusion(tiny, config, prompt=prompt, negative_prompt=negative)

    return make
