"""Under a CUDA graph: an IP-Adapter's picture and scale change the replayed frames as they change
the eager ones, with no new capture, also when the picture is encoded on the worker's stream."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from bridge.io import Frame, now
from bridge.models.ip_adapter import load_ip_adapter
from bridge.runtime.image_prompt import ImagePromptInput
from bridge.runtime.side_input import SideInput
from bridge.stream.ip_adapter import install
from tests.accel.helpers import apart, build, frames, load_tiny, same
from tests.runtime.helpers import LocalSource

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def adapted(cache):
    """synthetic:tiny on the GPU with its IP-Adapter: (components, adapter, image prompt)."""
    components = load_tiny("cuda", cache)
    adapter = load_ip_adapter(components, "synthetic:tiny", cache_dir=cache)
    return components, adapter, install(components.unet, adapter.empty_tokens(), 0.6)


def picture(seed: int) -> np.ndarray:
    """Two flat colours side by side: pictures that differ at the encoder's patches."""
    colours = np.random.default_rng(seed).integers(0, 256, (2, 3), dtype=np.uint8)
    pixels = np.empty((48, 48, 3), dtype=np.uint8)
    pixels[:, :24], pixels[:, 24:] = colours
    return pixels


def pair(cache, **settings):
    """A graphed and an eager pipeline, each on its own adapted model, following picture 1."""
    pipelines = []
    for accel in ("cudagraph", "none"):
        components, adapter, prompt = adapted(cache)
        prompt.set_image_tokens(adapter.image_tokens(picture(1)))
        pipelines.append((build(components, accel, **settings), adapter, prompt))
    return pipelines


@pytest.mark.parametrize("cfg_type", ["none", "full", "self"])
def test_graph_replay_equals_the_eager_step_with_an_ip_adapter(cache, cfg_type):
    (graphed, _, _), (eager, _, _) = pair(cache, t_index_list=(20, 35), cfg_type=cfg_type)
    with torch.inference_mode():
        for pixels in frames(5):
            assert same(graphed(pixels), eager(pixels))
    assert graphed.accelerator.captures == 1


def test_a_new_scale_and_a_new_picture_reach_the_replayed_frames_without_a_capture(cache):
    # One step and no guidance: a frame depends on its input and the adapter alone.
    (graphed, adapter, graphed_prompt), (eager, _, eager_prompt) = pair(
        cache, t_index_list=(20,), cfg_type="none"
    )
    pixels = frames(1)[0]
    with torch.inference_mode():
        before = graphed(pixels)
        assert same(before, eager(pixels))
        for prompt in (graphed_prompt, eager_prompt):
            prompt.set_scale(1.5)
        scaled = graphed(pixels)
        assert same(scaled, eager(pixels))
        tokens = adapter.image_tokens(picture(2))
        for prompt in (graphed_prompt, eager_prompt):
            prompt.set_image_tokens(tokens)
        repictured = graphed(pixels)
        assert same(repictured, eager(pixels))
        for prompt in (graphed_prompt, eager_prompt):
            prompt.set_scale(0.0)
        off = graphed(pixels)
        assert same(off, eager(pixels))
    assert apart(before, scaled) and apart(scaled, repictured) and apart(repictured, off)
    assert graphed.accelerator.captures == 1


class PictureSource(LocalSource):
    """Delivers `pixels` (which a test may replace) every few milliseconds."""

    label = "pictures"

    def __init__(self, pixels: np.ndarray) -> None:
        super().__init__()
        self.pixels = pixels

    def _read(self, timeout: float) -> Frame | None:
        time.sleep(0.005)
        return Frame(self.pixels, "rgb", now(), 0)


def test_a_picture_encoded_on_the_worker_stream_reaches_the_graph_without_a_capture(cache):
    (graphed, adapter, prompt), (eager, _, eager_prompt) = pair(
        cache, t_index_list=(20,), cfg_type="none"
    )
    side = SideInput("IP-Adapter image", PictureSource(picture(2)), say=print)
    feed = ImagePromptInput(adapter, prompt, picture="pictures", side=side)
    eager_prompt.set_image_tokens(adapter.image_tokens(picture(2)))
    pixels = frames(1)[0]
    stop = threading.Event()
    with torch.inference_mode():
        before = graphed(pixels)
        feed.start(stop)
        try:
            deadline = time.monotonic() + 30
            while feed.pictures == 0:
                assert time.monotonic() < deadline, "no picture was encoded"
                feed.advance()
                graphed(pixels)  # the graph keeps replaying while the worker encodes
                time.sleep(0.01)
        finally:
            stop.set()
            feed.stop()
        after = graphed(pixels)
        assert same(after, eager(pixels))
    assert apart(before, after)
    assert graphed.accelerator.captures == 1
