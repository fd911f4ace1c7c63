"""Residual classifier-free guidance: batch layouts and the formulas, checked by hand."""

from __future__ import annotations

import pytest
import torch

from bridge.stream import CFG_TYPES, unet_batch_size
from tests.stream.helpers import UNetSpy, latents


@torch.inference_mode()
def unet_eps(stream, x, step, context):
    """The noise estimate of the stream's UNet at one of its steps."""
    t = stream._schedule.timesteps[step].reshape(1).expand(x.shape[0])
    return stream.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


def constants(stream, step):
    s = stream._schedule
    return s.alpha[step], s.beta[step], s.c_skip[step], s.c_out[step]


def consistency(eps, x_t, step, stream):
    alpha, beta, c_skip, c_out = constants(stream, step)
    return c_out * (x_t - beta * eps) / alpha + c_skip * x_t


@pytest.mark.parametrize("steps", [(45,), (32, 45), (0, 16, 32, 45)])
@pytest.mark.parametrize("frames", [1, 2])
def test_unet_batch_is_k_2k_k_and_k_plus_one_per_frame(make_stream, steps, frames):
    k = len(steps)
    expected = {"none": k, "full": 2 * k, "self": k, "initialize": k + 1}
    for cfg_type, per_frame in expected.items():
        stream = make_stream(t_index_list=steps, cfg_type=cfg_type, frame_buffer_size=frames)
        stream.denoise(latents(1, frames))
        spy = UNetSpy(stream.unet)
        try:
            stream.denoise(latents(2, frames))
        finally:
            spy.close()
        assert spy.batches == [per_frame * frames]
        assert stream.unet_batch_size == per_frame * frames
        assert unet_batch_size(cfg_type, k, frames) == per_frame * frames


def test_full_guidance_at_one_equals_no_guidance(make_stream):
    full = make_stream(cfg_type="full", guidance_scale=1.0)
    none = make_stream(cfg_type="none", guidance_scale=1.0)
    for seed in (1, 2, 3):
        torch.testing.assert_close(
            full.denoise(latents(seed)), none.denoise(latents(seed)), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_guidance_at_or_below_one_is_no_guidance_for_every_cfg_type(make_stream, cfg_type):
    settings = {"t_index_list": (32, 45), "delta": 0.8}
    half = make_stream(cfg_type=cfg_type, guidance_scale=0.5, **settings)
    one = make_stream(cfg_type=cfg_type, guidance_scale=1.0, **settings)
    unguided = make_stream(cfg_type="none", guidance_scale=1.0, **settings)
    for seed in (1, 2, 3):
        out = one.denoise(latents(seed))
        assert torch.equal(half.denoise(latents(seed)), out)
        expected = unguided.denoise(latents(seed))
        if cfg_type == "self":
            # The same UNet batch as "none": g = 1 must give the conditional estimate exactly.
            assert torch.equal(out, expected)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg_type", ["full", "self", "initialize"])
def test_guidance_crosses_one_live_without_a_rebuild(make_stream, cfg_type):
    settings = {"t_index_list": (32, 45), "cfg_type": cfg_type}
    live = make_stream(guidance_scale=1.2, **settings)
    guided = make_stream(guidance_scale=1.2, **settings)
    unguided = make_stream(guidance_scale=1.0, **settings)
    buffer = live.state_tensors()[0]
    changes = {2: 0.5, 4: 1.2}
    for frame in range(6):
        if frame in changes:
            live.update(guidance_scale=changes[frame])
        out = live.denoise(latents(frame))
        with_guidance, without = guided.denoise(latents(frame)), unguided.denoise(latents(frame))
        # Output lags input by one frame here: frame 3 is the first made wholly below 1.0.
        if frame in (0, 1, 5):
            torch.testing.assert_close(out, with_guidance)
            assert not torch.allclose(out, without, atol=1e-3)
        if frame == 3:
            torch.testing.assert_close(out, without)
    assert live.state_tensors()[0] is buffer


def test_full_guidance_above_one_differs_from_no_guidance(make_stream):
    full = make_stream(cfg_type="full", guidance_scale=3.0)
    none = make_stream(cfg_type="none")
    assert not torch.allclose(full.denoise(latents(1)), none.denoise(latents(1)), atol=1e-4)


def test_self_negative_follows_the_residual_formula(make_stream):
    guidance, delta = 1.8, 0.7
    stream = make_stream(
        t_index_list=(32, 45),
        cfg_type="self",
        guidance_scale=guidance,
        delta=delta,
        use_denoising_batch=False,
    )
    x0_in = latents(3)
    noise = stream.noise_for_seed(stream.config.seed)
    cond = stream.encode_prompt(stream.prompt)

    def guided(x_t, step):
        alpha, beta, _, _ = constants(stream, step)
        residual = delta * (x_t - alpha * x0_in) / beta
        eps_cond = unet_eps(stream, x_t, step, cond)
        return residual + guidance * (eps_cond - residual)

    alpha0, beta0, _, _ = constants(stream, 0)
    x_t = alpha0 * x0_in + beta0 * noise[0:1]
    x0_pred = consistency(guided(x_t, 0), x_t, 0, stream)
    alpha1, beta1, _, _ = constants(stream, 1)
    x_t = alpha1 * x0_pred + beta1 * noise[1:2]
    expected = consistency(guided(x_t, 1), x_t, 1, stream)

    torch.testing.assert_close(stream.denoise(x0_in), expected, rtol=1e-4, atol=1e-4)


def test_initialize_uses_one_real_negative_pass_then_its_prediction_as_reference(make_stream):
    guidance, delta = 2.0, 0.9
    stream = make_stream(
        t_index_list=(32, 45),
        cfg_type="initialize",
        guidance_scale=guidance,
        delta=delta,
        use_denoising_batch=False,
    )
    x0_in = latents(4)
    noise = stream.noise_for_seed(stream.config.seed)
    cond = stream.encode_prompt(stream.prompt)
    uncond = stream.encode_prompt(stream.negative_prompt)

    alpha0, beta0, _, _ = constants(stream, 0)
    x_t = alpha0 * x0_in + beta0 * noise[0:1]
    eps_neg = unet_eps(stream, x_t, 0, uncond)
    reference = consistency(eps_neg, x_t, 0, stream)
    eps = delta * eps_neg + guidance * (unet_eps(stream, x_t, 0, cond) - delta * eps_neg)
    x0_pred = consistency(eps, x_t, 0, stream)

    alpha1, beta1, _, _ = constants(stream, 1)
    x_t = alpha1 * x0_pred + beta1 * noise[1:2]
    residual = delta * (x_t - alpha1 * reference) / beta1
    eps = residual + guidance * (unet_eps(stream, x_t, 1, cond) - residual)
    expected = consistency(eps, x_t, 1, stream)

    torch.testing.assert_close(stream.denoise(x0_in), expected, rtol=1e-4, atol=1e-4)


def test_delta_scales_the_residual_noise_and_changes_live(make_stream):
    weak = make_stream(cfg_type="self", guidance_scale=1.5, delta=0.2, t_index_list=(45,))
    strong = make_stream(cfg_type="self", guidance_scale=1.5, delta=1.0, t_index_list=(45,))
    assert not torch.allclose(weak.denoise(latents(1)), strong.denoise(latents(1)), atol=1e-4)
    strong.update(delta=0.2)
    torch.testing.assert_close(strong.denoise(latents(1)), weak.denoise(latents(1)))
