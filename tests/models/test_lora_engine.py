"""Live LoRA scales in a running pipeline and engine: frames and prompts follow the scale."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from bridge.control import ParamStore
from bridge.control.params import LORA_SCALES
from bridge.models import load_components
from bridge.models.live_lora import load_live_loras
from bridge.models.lora import check_loras
from bridge.runtime.engine import Engine
from bridge.stream import StreamConfig, StreamDiffusion
from bridge.stream.prompts import PromptEncoder
from tests.control.helpers import wait_until
from tests.models.loras import write_lora

SIZE = 64
PROMPT = "a red fox in the snow"
# One denoising step and no guidance: a frame depends on its input alone, not on earlier ones.
ONE_STEP = {"t_index_list": (20,), "cfg_type": "none"}


@pytest.fixture(scope="module")
def unet_lora(tiny_folder, tmp_path_factory):
    """A LoRA of the UNet's attention only, strong enough to show in 8-bit pixels."""
    path = tmp_path_factory.mktemp("lora") / "unet.safetensors"
    return write_lora(tiny_folder, path, seed=2, rank=4, alpha=16)


def live_stream(lora, scale: float, **settings) -> tuple[StreamDiffusion, object]:
    components = load_components("synthetic:tiny", vae="tiny")
    loras = load_live_loras(components, check_loras([(lora, scale)]))
    config = StreamConfig(width=SIZE, height=SIZE, **settings)
    return StreamDiffusion(components, config, prompt=PROMPT), loras


def picture() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def latents(stream: StreamDiffusion, frame: np.ndarray) -> torch.Tensor:
    """The latents of one img2img step, before decoding (8-bit pixels would hide small changes)."""
    captured = []
    decode = stream.decode
    stream.decode = lambda x: captured.append(x.clone()) or decode(x)
    stream.img2img(frame)
    stream.decode = decode
    return captured[0]


@pytest.mark.slow
def test_a_live_scale_change_changes_frames_like_a_pipeline_started_at_that_scale(unet_lora):
    stream, loras = live_stream(unet_lora, 1.0, **ONE_STEP)
    before = latents(stream, picture())
    loras.set_scale(0, -0.5)
    after = latents(stream, picture())
    started, _ = live_stream(unet_lora, -0.5, **ONE_STEP)
    expected = latents(started, picture())
    assert (after - before).abs().max().item() > 1e-2
    assert (after - expected).abs().max().item() < 1e-5


def test_a_text_encoder_lora_change_re_encodes_the_prompt_in_the_engine(tiny_lora):
    components = load_components("synthetic:tiny", vae="tiny")
    loras = load_live_loras(components, check_loras([(tiny_lora, 1.0)]))
    store = ParamStore({"prompt": PROMPT}, families={LORA_SCALES: [1.0]})
    config = StreamConfig(width=SIZE, height=SIZE, mode="txt2img", **ONE_STEP)
    stream = StreamDiffusion(components, config, prompt=PROMPT)
    engine = Engine(stream, store, None, [], loras=loras)
    at_start = stream.current_embedding()
    reference = load_components("synthetic:tiny", loras=[(tiny_lora, 0.3)])
    expected = PromptEncoder(reference.tokenizer, reference.text_encoder)(PROMPT)
    assert (at_start - expected).abs().max().item() > 1e-3

    stop = threading.Event()
    runner = threading.Thread(target=engine.run, args=(stop,))
    runner.start()
    try:
        store.set("lora_0_scale", 0.3)

        def re_encoded() -> bool:
            return (stream.current_embedding() - expected).abs().max().item() < 1e-5

        assert wait_until(re_encoded, timeout=20.0)
        assert loras.scale(0) == pytest.approx(0.3)
    finally:
        stop.set()
        runner.join(20.0)
