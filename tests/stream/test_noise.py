"""Noise modes: the seed's noise every frame, fresh noise every frame, or a spherical drift."""

from __future__ import annotations

import pytest
import torch

from tests.stream.helpers import latents


def noise_per_frame(stream, frames: int, x0: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The per-slot noise each of `frames` frame steps used."""
    x0 = latents(1) if x0 is None else x0
    used = []
    for _ in range(frames):
        stream.denoise(x0)
        used.append(stream.current_noise())
    return used


def slot_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The angle in radians between the noise of each slot in `a` and in `b`."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    cosine = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return cosine.clamp(-1.0, 1.0).acos()


def decoded_latents(stream, frames: int) -> list[torch.Tensor]:
    """The latents each of `frames` txt2img frames hands to the decoder."""
    seen = []
    decode = stream.decode

    def tap(latents: torch.Tensor) -> torch.Tensor:
        seen.append(latents.clone())
        return decode(latents)

    stream.decode = tap
    try:
        for _ in range(frames):
            stream.txt2img()
    finally:
        del stream.decode
    return seen


def test_fixed_noise_is_the_seeds_noise_every_frame(make_stream):
    stream = make_stream(t_index_list=(32, 45), seed=5)
    for used in noise_per_frame(stream, 3):
        assert torch.equal(used, stream.noise_for_seed(5))
    first, second = stream.denoise(latents(1)), stream.denoise(latents(1))
    assert torch.equal(first, second)


def test_fresh_noise_is_new_every_frame_and_one_seed_gives_one_sequence(make_stream):
    stream = make_stream(t_index_list=(32, 45), noise="fresh", seed=5)
    sequence = noise_per_frame(stream, 4)
    for before, after in zip([stream.noise_for_seed(5), *sequence], sequence, strict=False):
        assert not torch.allclose(before, after)
    assert 0.8 < torch.stack(sequence).std().item() < 1.2
    twin = make_stream(t_index_list=(32, 45), noise="fresh", seed=5)
    for ours, theirs in zip(sequence, noise_per_frame(twin, 4), strict=True):
        assert torch.equal(ours, theirs)
    stream.update(seed=6)
    assert not torch.allclose(noise_per_frame(stream, 1)[0], sequence[0])
    stream.update(seed=5)
    for ours, again in zip(sequence, noise_per_frame(stream, 4), strict=True):
        assert torch.equal(ours, again)


@pytest.mark.parametrize("drift", [0.05, 0.4, 1.5708])
def test_drift_turns_every_slot_by_noise_drift_and_keeps_its_norm(make_stream, drift):
    stream = make_stream(t_index_list=(32, 45), frame_buffer_size=2, seed=3)
    stream.update(noise="drift", noise_drift=drift)
    start = stream.noise_for_seed(3)
    sequence = noise_per_frame(stream, 4, latents(1, count=2))
    for before, after in zip([start, *sequence], sequence, strict=False):
        expected = torch.full((4,), drift, dtype=torch.float64)
        torch.testing.assert_close(slot_angles(before, after), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(after.flatten(1).norm(dim=1), start.flatten(1).norm(dim=1))


def test_drift_of_zero_is_fixed_noise(make_stream):
    fixed = make_stream(t_index_list=(32, 45))
    still = make_stream(t_index_list=(32, 45), noise="drift", noise_drift=0.0)
    for seed in (1, 2, 3):
        assert torch.equal(still.denoise(latents(seed)), fixed.denoise(latents(seed)))
        assert torch.equal(still.current_noise(), fixed.current_noise())


def test_every_slot_of_a_frame_uses_that_frames_noise(make_stream):
    # The mode applies to the noise added to the input latent and to the re-noising between
    # steps: a fixed stream handed the noise a fresh frame used computes the same frame.
    settings = {"t_index_list": (16, 32, 45), "use_denoising_batch": False}
    fresh = make_stream(noise="fresh", **settings)
    fixed = make_stream(seed=9, **settings)
    for seed in (1, 2):
        out = fresh.denoise(latents(seed))
        fixed.set_noise(fresh.current_noise())
        assert torch.equal(fixed.denoise(latents(seed)), out)
    assert not torch.allclose(fresh.denoise(latents(2)), out)


def test_fixed_noise_stays_exact_when_a_draw_repeats_it(make_stream):
    # A fresh stream's first noise is what a fixed stream of the same seed draws first: the part
    # of that draw across the noise vanishes, and must not turn into inf or nan.
    fresh, fixed = make_stream(noise="fresh"), make_stream()
    fresh.denoise(latents(1))
    fixed.set_noise(fresh.current_noise())
    fixed.denoise(latents(1))
    assert torch.equal(fixed.current_noise(), fresh.current_noise())


@pytest.mark.parametrize("steps", [(45,), (0, 32)])
@pytest.mark.parametrize("mode", ["fresh", "drift"])
def test_txt2img_frames_change_from_frame_to_frame_under_fresh_and_drift(make_stream, steps, mode):
    stream = make_stream(mode="txt2img", t_index_list=steps, cfg_type="none", noise=mode)
    stream.update(noise_drift=0.3)
    # The first frame also fills the buffer, so it leaves again k - 1 frames later.
    frames = decoded_latents(stream, 4 + len(steps))[len(steps) - 1 :]
    for before, after in zip(frames, frames[1:], strict=False):
        assert (after - before).abs().max().item() > 1e-2


def test_txt2img_repeats_its_frame_under_fixed_noise(make_stream):
    stream = make_stream(mode="txt2img", t_index_list=(0, 32), cfg_type="none")
    frames = decoded_latents(stream, 4)
    torch.testing.assert_close(frames[0], frames[1])
    assert torch.equal(frames[1], frames[2]) and torch.equal(frames[1], frames[3])


def test_a_mode_change_is_a_value_change_that_restarts_from_the_seed(make_stream):
    stream = make_stream(t_index_list=(32, 45), seed=4)
    pixels = torch.zeros((1, 64, 64, 3), dtype=torch.uint8)
    key, buffer = stream.graph_key(pixels, "rgb"), stream.state_tensors()[0]
    stream.update(noise="fresh")
    assert stream.graph_key(pixels, "rgb") == key
    first = noise_per_frame(stream, 2)
    stream.update(noise="drift", noise_drift=0.2)
    assert stream.graph_key(pixels, "rgb") == key
    assert torch.equal(stream.current_noise(), stream.noise_for_seed(4))
    stream.update(noise="fresh")
    assert all(torch.equal(a, b) for a, b in zip(first, noise_per_frame(stream, 2), strict=True))
    stream.update(noise="fixed")
    assert torch.equal(noise_per_frame(stream, 1)[0], stream.noise_for_seed(4))
    assert stream.state_tensors()[0] is buffer
