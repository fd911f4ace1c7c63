"""Stream batch must compute exactly what the k steps one after the other compute."""

from __future__ import annotations

import pytest
import torch

from tests.stream.helpers import latents

STEP_LISTS = {1: (45,), 2: (32, 45), 4: (0, 16, 32, 45)}


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
def test_stream_batch_matches_sequential_steps_on_static_input(make_stream, k, cfg_type):
    batched = make_stream(t_index_list=STEP_LISTS[k], cfg_type=cfg_type)
    sequential = make_stream(
        t_index_list=STEP_LISTS[k], cfg_type=cfg_type, use_denoising_batch=False
    )
    x0 = latents(1)
    expected = sequential.denoise(x0)
    for _ in range(k + 1):
        torch.testing.assert_close(batched.denoise(x0), expected, rtol=1e-4, atol=1e-4)


def test_stream_batch_runs_one_unet_call_per_frame_and_sequential_runs_k(make_stream):
    batched = make_stream(t_index_list=STEP_LISTS[4], cfg_type="self")
    sequential = make_stream(t_index_list=STEP_LISTS[4], cfg_type="self", use_denoising_batch=False)
    batched.denoise(latents(1))  # the first frame also fills the buffer
    before_b, before_s = batched.unet_calls, sequential.unet_calls
    for _ in range(3):
        batched.denoise(latents(1))
        sequential.denoise(latents(1))
    assert batched.unet_calls - before_b == 3
    assert sequential.unet_calls - before_s == 12


def test_output_lags_input_by_k_minus_one_frames_and_the_first_frame_is_finished(make_stream):
    steps = STEP_LISTS[2]
    batched = make_stream(t_index_list=steps)
    reference = make_stream(t_index_list=steps, use_denoising_batch=False)
    a, b = latents(1), latents(2)
    finished_a, finished_b = reference.denoise(a), reference.denoise(b)
    torch.testing.assert_close(batched.denoise(a), finished_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched.denoise(b), finished_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched.denoise(b), finished_b, rtol=1e-4, atol=1e-4)


def test_frame_buffer_size_two_matches_two_separate_sequential_frames(make_stream):
    steps = STEP_LISTS[2]
    batched = make_stream(t_index_list=steps, frame_buffer_size=2)
    sequential = make_stream(t_index_list=steps, frame_buffer_size=2, use_denoising_batch=False)
    pair = torch.cat([latents(1), latents(2)])
    expected = sequential.denoise(pair)
    batched.denoise(pair)
    torch.testing.assert_close(batched.denoise(pair), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected[0], expected[1])


def test_do_add_noise_off_changes_the_later_steps(make_stream):
    with_noise = make_stream(t_index_list=STEP_LISTS[2])
    without = make_stream(t_index_list=STEP_LISTS[2], do_add_noise=False)
    assert not torch.allclose(with_noise.denoise(latents(1)), without.denoise(latents(1)))


def test_seed_fixes_the_noise_and_a_new_seed_redraws_it(make_stream):
    first, second = make_stream(seed=7), make_stream(seed=7)
    torch.testing.assert_close(first.denoise(latents(1)), second.denoise(latents(1)))
    noise_before = first.noise_for_seed(7)
    first.update(seed=8)
    assert not torch.allclose(first.noise_for_seed(8), noise_before)
    # The frame already in flight keeps its noise; the next one entering uses the new seed.
    torch.testing.assert_close(first.denoise(latents(1)), second.denoise(latents(1)))
    assert not torch.allclose(first.denoise(latents(1)), second.denoise(latents(1)))


def test_changing_the_steps_live_rebuilds_the_schedule_and_batch(make_stream):
    stream = make_stream(t_index_list=(32, 45), cfg_type="none")
    stream.denoise(latents(1))
    stream.update(t_index_list=(10, 20, 30))
    reference = make_stream(t_index_list=(10, 20, 30), cfg_type="none", use_denoising_batch=False)
    out = stream.denoise(latents(1))
    assert stream.last_unet_batch == 3
    torch.testing.assert_close(out, reference.denoise(latents(1)), rtol=1e-4, atol=1e-4)


def test_txt2img_makes_frames_from_noise_and_follows_the_prompt(make_stream):
    stream = make_stream(mode="txt2img", t_index_list=(0, 16, 32, 45), cfg_type="none")
    first = stream.txt2img()
    assert first.shape == (1, 64, 64, 3) and first.dtype == torch.uint8
    before = stream.denoise(torch.zeros_like(latents(0)))
    stream.set_prompt("an entirely different prompt")
    after = stream.denoise(torch.zeros_like(latents(0)))
    assert not torch.allclose(before, after)
