"""Compiling in the background while uncompiled frames flow (bridge/accel/background.py).

On the CPU the recorded calls are made on the compiled stand-ins as `accelerate` builds them, with
Dynamo's "eager" backend in place of Inductor (conftest.py): what counts is that the thread
traces everything the frame step needs, so that the frames after the swap trace nothing. The GPU
tests run the whole of `accelerate` with its CUDA graphs.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from bridge.accel import _compiled_networks, accelerate
from bridge.accel.background import (
    SWITCH_INTERVAL,
    BackgroundCompile,
    CompiledNetworks,
    adopted,
)
from bridge.models import Components, load_components
from bridge.stream import StreamConfig, StreamDiffusion

SIZE = 64
CONFIG = StreamConfig(width=SIZE, height=SIZE, t_index_list=(32,), cfg_type="none", seed=3)


def picture(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def traced() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_the_thread_traces_all_the_frames_need_and_they_trace_nothing_after_the_swap(
    tiny, eager_compile, tmp_path, scope
):
    compiled = StreamDiffusion(tiny, CONFIG, prompt="a fox")
    eager = StreamDiffusion(tiny, CONFIG, prompt="a fox")
    job = BackgroundCompile(
        _compiled_networks(compiled, "default", scope, tmp_path), torch.device("cpu")
    )
    with torch.inference_mode():
        assert np.array_equal(compiled(picture()), eager(picture()))
        with job.recording():
            assert np.array_equal(compiled(picture(2)), eager(picture(2)))
    assert job.recorded >= 3  # the UNet, the VAE's encoder and decoder
    assert compiled.unet is tiny.unet  # nothing in place yet
    before = traced()
    job.start()
    assert job.wait(timeout=600) and job.error is None
    assert traced() > before
    said: list[str] = []
    assert adopted(job, said.append)
    assert compiled.unet is not tiny.unet and said[0].startswith("compiled in the background in")
    before = traced()
    with torch.inference_mode():
        for seed in (3, 4):
            assert np.array_equal(compiled(picture(seed)), eager(picture(seed)))
    assert traced() == before


class Plain(nn.Module):
    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return x + 1


def test_a_failed_background_compile_leaves_the_networks_as_they_were(caplog):
    network = Plain()
    installed = []

    def fails(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no compiler for this")

    job = BackgroundCompile(
        CompiledNetworks([(network, fails)], lambda: installed.append(True)), torch.device("cpu")
    )
    with job.recording():
        network(torch.zeros(2))
    network(torch.zeros(3))  # not recorded: outside
    assert job.recorded == 1
    job.start()
    assert job.wait(timeout=60)
    with caplog.at_level(logging.WARNING):
        assert not adopted(job, None)
    assert installed == []
    assert "compiling in the background failed (RuntimeError: no compiler for this)" in caplog.text
    assert not network._forward_pre_hooks  # the recording hook is gone


def test_threads_switch_faster_while_the_thread_compiles_and_as_before_after():
    network = Plain()
    seen = []
    job = BackgroundCompile(
        CompiledNetworks([(network, lambda x: seen.append(sys.getswitchinterval()))], lambda: None),
        torch.device("cpu"),
    )
    with job.recording():
        network(torch.zeros(2))
    before = sys.getswitchinterval()
    job.start()
    assert job.wait(timeout=60)
    assert seen == [SWITCH_INTERVAL] and sys.getswitchinterval() == before


def test_the_switch_interval_comes_back_when_the_last_of_two_threads_ends():
    network, release = Plain(), threading.Event()
    slow = BackgroundCompile(
        CompiledNetworks([(network, lambda x: release.wait(60))], lambda: None), torch.device("cpu")
    )
    quick = BackgroundCompile(CompiledNetworks([(network, network)], lambda: None), slow.device)
    for job in (slow, quick):
        with job.recording():
            network(torch.zeros(2))
    before = sys.getswitchinterval()
    slow.start()
    quick.start()
    assert quick.wait(timeout=60)
    assert sys.getswitchinterval() == SWITCH_INTERVAL  # the slow one still works
    release.set()
    assert slow.wait(timeout=60)
    assert sys.getswitchinterval() == before


def test_the_recorded_arguments_are_copies_with_the_same_strides():
    network = Plain()
    job = BackgroundCompile(
        CompiledNetworks([(network, network)], lambda: None), torch.device("cpu")
    )
    channels_last = torch.rand(1, 4, 8, 8).to(memory_format=torch.channels_last)
    expanded = torch.rand(1).expand(4)
    with torch.inference_mode(), job.recording():
        network(channels_last, scale=expanded)
        network(torch.rand(2))
    (call, second) = job.calls[0]
    (copied,), kwargs = call.args, call.kwargs
    assert copied is not channels_last and torch.equal(copied, channels_last)
    assert copied.stride() == channels_last.stride()
    # An expanded tensor cannot be copied stride for stride, so it is kept as it is.
    assert kwargs["scale"] is expanded
    # Made outside inference mode and copied inside it, a tensor stays a normal one.
    assert not copied.is_inference() and second.args[0].is_inference()
    assert call.inference and not call.grad


class Settling:
    """A stand-in accelerator that notes what the pipeline asks of it."""

    def __init__(self, stream: StreamDiffusion) -> None:
        self.stream = stream
        self.asked: list[str] = []

    def settle(self) -> None:
        self.asked.append("settle")

    def __call__(self, pixels: torch.Tensor, pixel_format: str) -> torch.Tensor:
        self.asked.append("replay")
        return self.stream.frame_step(pixels, pixel_format)


def test_the_pipeline_settles_its_accelerator_before_steps_outside_it_and_a_new_bank(tiny):
    two_steps = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 35), cfg_type="none")
    stream = StreamDiffusion(tiny, two_steps, prompt="a fox")
    stream.accelerator = accelerator = Settling(stream)
    with torch.inference_mode():
        stream(picture())  # fills the buffer: outside the accelerator
        stream(picture())
        stream.update(feature_bank_size=1)  # new processors on the UNet
        assert accelerator.asked == ["settle", "replay", "settle"]
        stream(picture())  # fills the bank: outside again
        stream(picture())
        stream.update(feature_bank_strength=0.5)  # the same bank: nothing to wait for
    assert accelerator.asked == ["settle", "replay", "settle", "settle", "replay"]


def compiling_in_background(
    cache: Path,
    config: StreamConfig = CONFIG,
    say: Callable[[str], None] | None = None,
    live_compile: bool = True,
) -> tuple[StreamDiffusion, Components]:
    """A pipeline on synthetic:tiny on the GPU, accelerated with compile in the background."""
    torch._dynamo.reset()
    components = load_components("synthetic:tiny", vae="tiny", device="cuda")
    stream = StreamDiffusion(components, config, prompt="a fox")
    accelerate(
        stream,
        "compile",
        compile_in_background=True,
        live_compile=live_compile,
        say=say,
        cache_dir=cache,
    )
    return stream, components


def close(stream: StreamDiffusion, eager: StreamDiffusion, seed: int) -> bool:
    """Whether the two pipelines' next frames of the same picture are within 3 levels."""
    frame = picture(seed)
    ours, theirs = stream(frame), eager(frame)
    return int(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max()) <= 3


@pytest.mark.gpu
def test_frames_flow_before_the_compile_and_run_compiled_after_it(tmp_path):
    said: list[tuple[str, int]] = []  # each sentence, and the graphs traced when it was said
    stream, components = compiling_in_background(
        tmp_path, say=lambda sentence: said.append((sentence, traced()))
    )
    eager = StreamDiffusion(components, CONFIG, prompt="a fox")
    accelerator = stream.accelerator
    with torch.inference_mode():
        assert close(stream, eager, 1)
        assert accelerator.captures == 1 and stream.unet is components.unet
        job = accelerator.background
        assert job.started
        # Replays meanwhile, beside the thread's work on the same weights.
        seed = 2
        while not job.done and seed < 500:
            assert close(stream, eager, seed)
            seed += 1
        assert job.wait(timeout=300) and job.error is None
        assert close(stream, eager, seed) and close(stream, eager, seed + 1)
    assert accelerator.background is None and accelerator.captures == 2
    assert stream.unet is not components.unet
    ((sentence, at_swap),) = said
    assert sentence == f"compiled in the background in {job.seconds:.1f} s; frames now run compiled"
    assert traced() == at_swap  # the capture after the swap found everything compiled


# A change of steps empties the buffer (the step outside the graph settles); a change of guidance
# keeps it primed (the new capture settles).
@pytest.mark.gpu
@pytest.mark.parametrize("change", [{"t_index_list": (20, 35)}, {"cfg_type": "full"}])
def test_a_change_of_shapes_during_the_compile_waits_for_it(tmp_path, change):
    stream, components = compiling_in_background(tmp_path)
    eager = StreamDiffusion(components, CONFIG, prompt="a fox")
    with torch.inference_mode():
        assert close(stream, eager, 1)
        job = stream.accelerator.background
        assert job.started and not job.done
        stream.update(**change)
        eager.update(**change)
        assert close(stream, eager, 2)
    assert job.done and stream.accelerator.background is None
    assert stream.unet is not components.unet


@pytest.mark.gpu
def test_without_live_compile_a_change_during_the_compile_runs_uncompiled(tmp_path):
    said: list[int] = []
    stream, components = compiling_in_background(
        tmp_path, say=lambda sentence: said.append(traced()), live_compile=False
    )
    eager = StreamDiffusion(components, CONFIG, prompt="a fox")
    with torch.inference_mode():
        assert close(stream, eager, 1)
        stream.update(cfg_type="full")
        eager.update(cfg_type="full")
        assert close(stream, eager, 2) and close(stream, eager, 3)
    assert stream.unet is not components.unet
    assert traced() == said[0]  # nothing traced for the new shapes after the swap


@pytest.mark.gpu
def test_a_feature_bank_at_the_start_compiles_before_the_first_frame(tmp_path):
    banked = StreamConfig(
        width=SIZE, height=SIZE, t_index_list=(32,), cfg_type="none", feature_bank_size=2
    )
    stream, components = compiling_in_background(tmp_path, banked)
    assert stream.accelerator.background is None and stream.unet is not components.unet
