"""The synthetic models let a picture through: output follows input, and the prompt shows."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bridge.models import load_components
from bridge.stream import StreamConfig, StreamDiffusion

VAES = {"taesd": "tiny", "kl": None}


@pytest.fixture(scope="module", params=sorted(VAES))
def tiny(request, tiny_folder):
    """synthetic:tiny with its TAESD, then with its AutoencoderKL."""
    return load_components(str(tiny_folder), vae=VAES[request.param])


def _images(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def _latents(components, frame: np.ndarray) -> torch.Tensor:
    stream = StreamDiffusion(components, StreamConfig(width=frame.shape[1], height=frame.shape[0]))
    return stream.encode(_images(frame))


def _gradient(size: int) -> np.ndarray:
    """A smooth colour picture: red across, green down, blue constant."""
    ramp = np.linspace(0, 255, size)
    frame = np.empty((size, size, 3), dtype=np.uint8)
    frame[..., 0] = ramp[None, :]
    frame[..., 1] = ramp[:, None]
    frame[..., 2] = 90
    return frame


def _moving_bar(index: int, size: int) -> np.ndarray:
    """A white band half the frame wide on black, moving an eighth of the frame per index."""
    columns = (np.arange(size) - index * size // 8) % size < size // 2
    frame = np.zeros((size, size, 3), dtype=np.uint8)
    frame[:, columns] = 255
    return frame


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def _run(components, frames, size, prompt="a forest"):
    stream = StreamDiffusion(components, StreamConfig(width=size, height=size), prompt=prompt)
    return [stream(frame) for frame in frames]


def test_autoencoder_round_trips_a_smooth_picture(tiny):
    frame = _gradient(128)
    with torch.no_grad():
        stream = StreamDiffusion(tiny, StreamConfig(width=128, height=128))
        decoded = stream.decode(stream.encode(_images(frame)))
    error = ((decoded[0].permute(1, 2, 0) + 1.0) * 127.5 - torch.from_numpy(frame)).abs()
    # Measured 3-5 levels; the borders fade a little towards grey.
    assert error.mean() < 10.0


def test_both_autoencoders_share_one_latent_space(tiny_folder):
    frame = _gradient(64)
    with torch.no_grad():
        taesd = _latents(load_components(str(tiny_folder), vae="tiny"), frame)
        kl = _latents(load_components(str(tiny_folder)), frame)
    assert taesd.abs().max() > 1.0
    assert (taesd - kl).abs().max() < 0.1


def test_unet_removes_most_of_the_noise(tiny_folder):
    components = load_components(str(tiny_folder), vae="tiny")
    scheduler = components.scheduler
    tokens = components.tokenizer(["a forest"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        x0 = _latents(components, _gradient(128))
        context = components.text_encoder(tokens.input_ids)[0]
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        for timestep in (199, 359, 679):
            alpha = scheduler.alphas_cumprod[timestep].sqrt()
            beta = (1.0 - scheduler.alphas_cumprod[timestep]).sqrt()
            x_t = alpha * x0 + beta * noise
            eps = components.unet(x_t, timestep, encoder_hidden_states=context).sample
            # Inside the zero-padded border, less the prompt's tint (a shift per channel).
            error = ((x_t - beta * eps) / alpha - x0)[..., 1:-1, 1:-1]
            error = error - error.mean(dim=(2, 3), keepdim=True)
            # Without the UNet the x0 estimate x_t / alpha carries beta / alpha of noise; the
            # see-through UNet leaves about a third, its 3x3 average (measured 0.35).
            assert error.std() < 0.45 * beta / alpha, timestep


def test_white_and_black_frames_give_far_apart_outputs(tiny):
    white = np.full((64, 64, 3), 255, dtype=np.uint8)
    black = np.zeros_like(white)
    from_white = _run(tiny, [white] * 3, 64)[-1].astype(int)
    from_black = _run(tiny, [black] * 3, 64)[-1].astype(int)
    # The inputs are 255 levels apart; with random weights the outputs were 0.0015 apart. A third
    # of the input's difference must survive noise, tint and the 8x8 latent grid (measured
    # 118-153 levels).
    assert np.abs(from_white - from_black).mean() > 85.0
    assert from_white.mean() > 128.0 > from_black.mean()


def test_output_follows_a_moving_picture(tiny):
    size = 128
    frames = [_moving_bar(index, size) for index in range(10)]
    outputs = _run(tiny, frames, size)
    # With t_index_list (32, 45) an output shows the input of one call earlier.
    for index in range(4, len(frames)):
        shown = _correlation(outputs[index], frames[index - 1])
        moved_away = _correlation(outputs[index], frames[index - 4])
        # Measured 0.68-0.80 against the input shown; four steps later the band has moved by
        # half the frame, so the correlation turns negative.
        assert shown > 0.55, index
        assert moved_away < shown - 0.5, index


def test_two_prompts_give_different_outputs(tiny):
    frames = [_gradient(64)] * 3
    forest = _run(tiny, frames, 64, "a forest")[-1].astype(int)
    again = _run(tiny, frames, 64, "a forest")[-1].astype(int)
    desert = _run(tiny, frames, 64, "a desert at noon")[-1].astype(int)
    assert np.array_equal(forest, again)
    # Measured about 10 levels on average.
    assert np.abs(forest - desert).mean() > 4.0


@pytest.mark.slow
def test_the_demo_shows_the_pattern(tmp_path, synthetic_cache):
    pattern = tmp_path / "frame_%03d.png"
    run = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "run", "--model", "synthetic:tiny"]
        + ["--width", "128", "--height", "128", "--frames", "12", "--output", f"file:{pattern}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    frames = [np.asarray(Image.open(path)) for path in sorted(tmp_path.glob("frame_*.png"))]
    assert len(frames) == 12
    last = frames[-1].astype(float)
    # Random weights gave every pixel 0-10: now the frame has the bars' bright and dark parts.
    assert last.mean() > 40.0
    assert np.percentile(last, 90) > 150.0
    assert last.std() > 30.0
