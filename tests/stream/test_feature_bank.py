"""Feature bank and latent feedback: the maths by hand, nothing changed while off, stream batch.

The processor tests run one diffusers `Attention` layer against attention written out with
matmul and softmax; the pipeline tests run the synthetic tiny UNet on 64x64 latents.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from bridge.stream import StreamConfig, StreamDiffusion
from bridge.stream.feature_bank import BankedSelfAttention, BankSwitch, FeatureBank
from tests.stream.helpers import SIZE, latents

HEADS, HEAD_DIM, WIDTH, TOKENS = 4, 8, 32, 16


def layer(inject: bool) -> tuple[Attention, Attention, BankSwitch]:
    """A self-attention layer with a banked processor, a plain copy of it, and its switch."""
    torch.manual_seed(0)
    banked = Attention(query_dim=WIDTH, heads=HEADS, dim_head=HEAD_DIM).eval()
    plain = Attention(query_dim=WIDTH, heads=HEADS, dim_head=HEAD_DIM).eval()
    plain.load_state_dict(banked.state_dict())
    switch = BankSwitch()
    banked.set_processor(BankedSelfAttention(AttnProcessor2_0(), switch, "layer", inject))
    return banked, plain, switch


def bank(size: int, strength: float = 0.0, threshold: float = 0.0) -> FeatureBank:
    return FeatureBank(size, 1, torch.tensor(strength), torch.tensor(threshold))


def tokens(seed: int) -> torch.Tensor:
    return torch.randn((1, TOKENS, WIDTH), generator=torch.Generator().manual_seed(seed))


def reference_attention(attn: Attention, x: torch.Tensor, frames: list[torch.Tensor]):
    """softmax(q K^T / sqrt(d)) V per head, K and V the keys and values of all `frames`."""
    keys = torch.cat([attn.to_k(frame) for frame in frames], dim=1)
    values = torch.cat([attn.to_v(frame) for frame in frames], dim=1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, HEADS, HEAD_DIM).transpose(1, 2)

    weights = (heads(attn.to_q(x)) @ heads(keys).transpose(-1, -2) / math.sqrt(HEAD_DIM)).softmax(
        -1
    )
    out = (weights @ heads(values)).transpose(1, 2).reshape(1, -1, HEADS * HEAD_DIM)
    return attn.to_out[0](out)


def reference_injection(out, banked, strength: float, threshold: float) -> torch.Tensor:
    """Each token moved by `strength` towards its most similar banked token, if similar enough."""
    similarity = F.cosine_similarity(out[0][:, None], banked[0][None], dim=-1)
    best, index = similarity.max(dim=-1)
    moved = out[0] + strength * (banked[0][index] - out[0])
    return torch.where((best >= threshold)[:, None], moved, out[0])[None]


def run(attn: Attention, switch: BankSwitch, held: FeatureBank, x: torch.Tensor) -> torch.Tensor:
    with switch.serve(held):
        return attn(x)


@torch.no_grad()
def test_an_empty_bank_gives_the_plain_attention_bit_for_bit():
    attn, plain, switch = layer(inject=True)
    held = bank(3, strength=0.9)
    assert torch.equal(run(attn, switch, held, tokens(1)), plain(tokens(1)))
    held.empty()
    assert torch.equal(run(attn, switch, held, tokens(2)), plain(tokens(2)))


@torch.no_grad()
def test_without_a_bank_served_the_layer_runs_its_original_processor():
    attn, plain, _ = layer(inject=True)
    assert torch.equal(attn(tokens(1)), plain(tokens(1)))


@torch.no_grad()
def test_a_bank_holding_the_frame_itself_gives_the_hand_written_attention():
    attn, plain, switch = layer(inject=False)
    held = bank(2)
    x = tokens(1)
    run(attn, switch, held, x)
    out = run(attn, switch, held, x)
    torch.testing.assert_close(out, reference_attention(attn, x, [x, x, x]), rtol=0, atol=1e-6)
    # Keys repeated give the attention of keys given once.
    torch.testing.assert_close(out, plain(x), rtol=0, atol=1e-6)


@torch.no_grad()
def test_the_ring_holds_the_current_frame_and_the_last_n():
    attn, _, switch = layer(inject=False)
    held = bank(2)
    a, b, c, d = (tokens(seed) for seed in range(4))
    run(attn, switch, held, a)
    expected = {b: [b, a, a], c: [c, b, a], d: [d, c, b]}
    for x, frames in expected.items():
        out = run(attn, switch, held, x)
        torch.testing.assert_close(out, reference_attention(attn, x, frames), rtol=0, atol=1e-6)
        assert not torch.allclose(out, reference_attention(attn, x, [x]), atol=1e-3)


@torch.no_grad()
def test_injection_at_strength_zero_changes_nothing_bit_for_bit():
    injecting, _, switch = layer(inject=True)
    extended_only, _, other_switch = layer(inject=False)
    held, other = bank(2, strength=0.0), bank(2, strength=0.0)
    for seed in range(4):
        x = tokens(seed)
        assert torch.equal(
            run(injecting, switch, held, x), run(extended_only, other_switch, other, x)
        )


@torch.no_grad()
@pytest.mark.parametrize(("strength", "threshold"), [(0.6, 0.0), (1.0, 0.2), (0.5, 0.99)])
def test_injection_blends_towards_the_most_similar_banked_output(strength, threshold):
    attn, plain, switch = layer(inject=True)
    held = bank(2, strength, threshold)
    a, b, c = tokens(1), tokens(2), tokens(3)
    run(attn, switch, held, a)
    run(attn, switch, held, b)
    out = run(attn, switch, held, c)
    extended = reference_attention(attn, c, [c, b, a])
    # The outputs kept are the attention's own, before injection: a's plain one, b's extended.
    banked = torch.cat([reference_attention(attn, b, [b, a, a]), plain(a)], dim=1)
    expected = reference_injection(extended, banked, strength, threshold)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ in the pipeline

BANK = {"feature_bank_size": 2, "feature_bank_strength": 0.8, "feature_bank_threshold": 0.0}
STEP_LISTS = {1: (45,), 2: (32, 45), 3: (16, 32, 45)}


@pytest.fixture(scope="module")
def attentive(tiny):
    """synthetic:tiny with a UNet of plain random weights.

    The see-through weights of the synthetic models route the picture around self-attention
    (bridge/models/passthrough.py), so there a bank could not change a frame; here it does.
    """
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(tiny.unet.config).eval().requires_grad_(False)
    return dataclasses.replace(tiny, unet=unet)


@pytest.fixture
def make_stream(attentive):
    """Build a 64x64 pipeline on the attentive tiny model with some settings changed."""

    def make(**settings) -> StreamDiffusion:
        config = StreamConfig(width=SIZE, height=SIZE, **settings)
        return StreamDiffusion(attentive, config, prompt="a red fox", negative_prompt="blurry")

    return make


def inputs(count: int) -> list[torch.Tensor]:
    return [latents(seed) for seed in range(1, count + 1)]


@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
def test_the_first_frame_with_a_bank_is_the_frame_without_one_bit_for_bit(make_stream, cfg_type):
    banked = make_stream(t_index_list=STEP_LISTS[2], cfg_type=cfg_type, **BANK)
    plain = make_stream(t_index_list=STEP_LISTS[2], cfg_type=cfg_type)
    assert torch.equal(banked.denoise(latents(1)), plain.denoise(latents(1)))


def test_later_frames_attend_to_the_bank(make_stream):
    # At strength 0 only the extended attention can move the frames.
    attention_only = {**BANK, "feature_bank_strength": 0.0}
    banked = make_stream(t_index_list=(45,), **attention_only)
    plain = make_stream(t_index_list=(45,))
    for x in inputs(3):
        out, expected = banked.denoise(x), plain.denoise(x)
    assert (out - expected).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("k", "cfg_type"), [(2, "none"), (2, "full"), (2, "initialize"), (3, "self")]
)
def test_stream_batch_with_a_bank_matches_the_sequential_steps(make_stream, k, cfg_type):
    settings = {"t_index_list": STEP_LISTS[k], "cfg_type": cfg_type, **BANK}
    batched = make_stream(**settings)
    sequential = make_stream(use_denoising_batch=False, **settings)
    without = make_stream(t_index_list=STEP_LISTS[k], cfg_type=cfg_type, use_denoising_batch=False)
    frames = inputs(k + 2)
    expected = [sequential.denoise(x) for x in frames]
    unbanked = [without.denoise(x) for x in frames]
    # Output lags input by k - 1 calls; the first call also fills the buffer with frame 0.
    outputs = [batched.denoise(x) for x in frames]
    for call, out in enumerate(outputs):
        finished = max(0, call - (k - 1))
        torch.testing.assert_close(out, expected[finished], rtol=1e-4, atol=1e-4)
    assert max((e - u).abs().max().item() for e, u in zip(expected, unbanked, strict=True)) > 1e-3


def test_frame_buffer_size_two_with_a_bank_matches_the_sequential_steps(make_stream):
    settings = {"t_index_list": STEP_LISTS[2], "frame_buffer_size": 2, **BANK}
    batched, sequential = (
        make_stream(**settings),
        make_stream(use_denoising_batch=False, **settings),
    )
    pairs = [torch.cat([latents(2 * i), latents(2 * i + 1)]) for i in range(4)]
    expected = [sequential.denoise(pair) for pair in pairs]
    outputs = [batched.denoise(pair) for pair in pairs]
    for call, out in enumerate(outputs):
        torch.testing.assert_close(out, expected[max(0, call - 1)], rtol=1e-4, atol=1e-4)


def test_at_strength_zero_the_threshold_changes_nothing_bit_for_bit(make_stream):
    settings = {"t_index_list": STEP_LISTS[2], "feature_bank_size": 2}
    low = make_stream(feature_bank_strength=0.0, feature_bank_threshold=0.0, **settings)
    high = make_stream(feature_bank_strength=0.0, feature_bank_threshold=0.9, **settings)
    injected = make_stream(feature_bank_strength=0.8, feature_bank_threshold=0.0, **settings)
    for x in inputs(3):
        out = low.denoise(x)
        assert torch.equal(out, high.denoise(x))
        moved = injected.denoise(x)
    assert (moved - out).abs().max() > 1e-3


def test_strength_and_threshold_change_live_as_if_set_from_the_start(make_stream):
    live = make_stream(t_index_list=(45,), feature_bank_size=1)
    fixed = make_stream(
        t_index_list=(45,),
        feature_bank_size=1,
        feature_bank_strength=0.3,
        feature_bank_threshold=0.5,
    )
    frames = inputs(4)
    for x in frames[:2]:
        live.denoise(x)
        fixed.denoise(x)
    live.update(feature_bank_strength=0.3, feature_bank_threshold=0.5)
    # With one step the bank holds the same frames in both; from here they compute alike.
    live.reset()
    fixed.reset()
    for x in frames[2:]:
        assert torch.equal(live.denoise(x), fixed.denoise(x))


def test_a_reset_or_a_new_size_empties_the_bank(make_stream):
    stream, plain = make_stream(t_index_list=(45,), **BANK), make_stream(t_index_list=(45,))
    a, b = inputs(2)
    stream.denoise(a)
    stream.reset()
    assert torch.equal(stream.denoise(b), plain.denoise(b))
    stream.update(feature_bank_size=3)
    assert torch.equal(stream.denoise(a), plain.denoise(a))
    assert not torch.allclose(stream.denoise(b), plain.denoise(b), atol=1e-3)
    stream.update(feature_bank_size=0)
    assert torch.equal(stream.denoise(b), plain.denoise(b))


def test_latent_feedback_zero_leaves_each_frame_its_own_bit_for_bit(make_stream):
    stream = make_stream(t_index_list=(45,), latent_feedback=0.5)
    fresh = make_stream(t_index_list=(45,))
    a, b = inputs(2)
    stream.denoise(a)
    stream.update(latent_feedback=0.0)
    assert torch.equal(stream.denoise(b), fresh.denoise(b))


def test_latent_feedback_blends_the_last_finished_latent_into_the_input(make_stream):
    stream = make_stream(t_index_list=(45,), latent_feedback=0.5)
    reference = make_stream(t_index_list=(45,))
    a, b = inputs(2)
    out_a = stream.denoise(a)
    torch.testing.assert_close(out_a, reference.denoise(a), rtol=0, atol=0)
    out_b = stream.denoise(b)
    blended = b + 0.5 * (out_a - b)
    torch.testing.assert_close(out_b, reference.denoise(blended), rtol=0, atol=1e-6)
    stream.reset()
    assert torch.equal(stream.denoise(b), reference.denoise(b))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("feature_bank_size", 9),
        ("feature_bank_size", -1),
        ("feature_bank_strength", 1.5),
        ("feature_bank_threshold", float("nan")),
        ("latent_feedback", -0.1),
    ],
)
def test_out_of_range_settings_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        StreamConfig(**{name: value})


@pytest.mark.slow
def test_the_temporal_bench_measures_every_case_and_feedback_steadies_the_output(tmp_path):
    path = Path(__file__).resolve().parents[2] / "scripts" / "temporal_bench.py"
    spec = importlib.util.spec_from_file_location("temporal_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "models")]
    assert bench.main([*argv, "--device", "cpu", "--frames", "4", "--warmup", "1"]) == 0
    report = json.loads((tmp_path / "out" / "temporal.json").read_text())
    cases = report["cases"]
    assert list(cases) == ["off", "feedback", "bank1", "bank4"]
    assert {case["input_change"] for case in cases.values()} == {cases["off"]["input_change"]}
    assert cases["off"]["input_change"] > 1.0
    assert all(case["fps"] > 0 for case in cases.values())
    assert cases["feedback"]["output_change"] < cases["off"]["output_change"]


def test_state_tensors_hold_all_the_bank_and_feedback_state_a_graph_warm_up_restores(make_stream):
    # A graph capture runs warm-up steps, then puts back `state_tensors()` and the generators:
    # whatever they leave out would leak the warm-up into the frames that follow.
    settings = {"t_index_list": STEP_LISTS[2], "latent_feedback": 0.3, "noise": "fresh", **BANK}
    warmed, straight = make_stream(**settings), make_stream(**settings)
    frames = inputs(6)
    for x in frames[:3]:
        warmed.denoise(x)
        straight.denoise(x)
    saved = [tensor.clone() for tensor in warmed.state_tensors()]
    generators = [generator.get_state() for generator in warmed.generators()]
    for x in frames[3:5]:
        warmed.denoise(x)
    with torch.inference_mode():  # as where the graph captures: inside the pipeline's call
        for tensor, copy in zip(warmed.state_tensors(), saved, strict=True):
            tensor.copy_(copy)
    for generator, state in zip(warmed.generators(), generators, strict=True):
        generator.set_state(state)
    for x in frames[3:]:
        assert torch.equal(warmed.denoise(x), straight.denoise(x))


@pytest.mark.parametrize(("before", "after"), [("self", "initialize"), ("none", "full")])
def test_a_live_cfg_type_change_gives_the_bank_a_row_per_unet_latent(make_stream, before, after):
    stream = make_stream(t_index_list=(27, 38), cfg_type=before, feature_bank_size=3)
    for frame in inputs(2):
        stream.denoise(frame)
    stream.update(cfg_type=after)
    for frame in inputs(3):  # the batch grew: frames must keep coming, not fail on the bank
        stream.denoise(frame)
    assert stream._bank is not None and stream._bank.rows == stream.unet_batch_size
