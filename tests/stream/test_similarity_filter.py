"""The stochastic similarity filter: skip rate, limits and reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bridge.stream import SimilarityFilter, skip_probability
from tests.stream.helpers import frame


def pair_with_similarity(similarity: float, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Two vectors whose cosine similarity is exactly `similarity`."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, generator=generator)
    a = a / a.norm()
    other = torch.randn(size, generator=generator)
    other = other - (other @ a) * a
    other = other / other.norm()
    b = similarity * a + math.sqrt(1 - similarity**2) * other
    return a, b


def test_skip_probability_formula():
    assert skip_probability(1.0, 0.9) == 1.0
    assert skip_probability(0.95, 0.9) == pytest.approx(0.5)
    assert skip_probability(0.9, 0.9) == pytest.approx(0.0)
    assert skip_probability(0.5, 0.9) == 0.0


@pytest.mark.parametrize("similarity", [0.93, 0.95, 0.98])
def test_similar_frames_are_skipped_at_the_rate_the_formula_gives(similarity):
    threshold, trials = 0.9, 4000
    a, b = pair_with_similarity(similarity)
    filt = SimilarityFilter(threshold=threshold, max_skip_frames=10, seed=1)
    skips = 0
    for _ in range(trials):
        filt.reset()
        assert not filt.should_skip(a)
        skips += filt.should_skip(b)
    p = skip_probability(similarity, threshold)
    tolerance = 4 * math.sqrt(p * (1 - p) / trials)
    assert abs(skips / trials - p) < tolerance


def test_identical_frames_are_skipped_at_most_max_skip_frames_in_a_row():
    filt = SimilarityFilter(threshold=0.5, max_skip_frames=3, seed=0)
    a = torch.ones(64)
    decisions = [filt.should_skip(a) for _ in range(13)]
    assert decisions == [False] + [True, True, True, False] * 3


def test_different_frames_are_never_skipped():
    a, b = pair_with_similarity(0.6)
    filt = SimilarityFilter(threshold=0.9, max_skip_frames=100, seed=0)
    assert not any(filt.should_skip(x) for x in [a, b] * 200)


def test_the_same_seed_makes_the_same_decisions():
    a, b = pair_with_similarity(0.95)
    runs = []
    for _ in range(2):
        filt = SimilarityFilter(threshold=0.9, max_skip_frames=5, seed=42)
        runs.append([filt.should_skip(x) for x in [a, b, b, b, a, a, b] * 30])
    assert runs[0] == runs[1]
    assert any(runs[0]) and not all(runs[0][1:])


def test_a_skipped_frame_returns_the_previous_output_without_a_unet_pass(make_stream):
    stream = make_stream(similarity_filter=True, similarity_threshold=0.5, max_skip_frames=4)
    still = frame(1)
    first = stream(still)
    calls = stream.unet_calls
    repeated = [stream(still) for _ in range(4)]
    assert stream.unet_calls == calls
    assert stream.frames_skipped == 4
    for out in repeated:
        np.testing.assert_array_equal(out, first)
    stream(still)
    assert stream.unet_calls == calls + 1


def test_a_changed_frame_is_processed_with_the_filter_on(make_stream):
    stream = make_stream(similarity_filter=True, similarity_threshold=0.98, max_skip_frames=10)
    stream(frame(1))
    calls = stream.unet_calls
    stream(frame(2))
    assert stream.unet_calls == calls + 1
    assert stream.frames_skipped == 0


def test_live_filter_settings_change_the_filter_in_place_and_switching_off_drops_it(make_stream):
    stream = make_stream(similarity_filter=True, similarity_threshold=0.5, max_skip_frames=1)
    still = frame(1)
    filt = stream._filter
    stream(still)
    stream(still)
    assert stream.frames_skipped == 1
    stream.update(max_skip_frames=3, similarity_threshold=0.6)
    # The same filter, so the same reference: the still frame keeps being skipped, now up to
    # three in a row, after the one processed when the run of one ended.
    assert stream._filter is filt
    assert (filt.threshold, filt.max_skip_frames) == (0.6, 3)
    calls = stream.unet_calls
    for _ in range(4):
        stream(still)
    assert stream.unet_calls == calls + 1
    assert stream.frames_skipped == 4
    stream.update(similarity_filter=False)
    assert stream._filter is None
    stream(still)
    assert stream.unet_calls == calls + 2


def checkerboard(side: int) -> torch.Tensor:
    """+1 and -1 on alternate pixels: detail finer than any pooled cell."""
    rows = torch.arange(side).view(-1, 1)
    return ((rows + torch.arange(side)) % 2 * 2 - 1).float().expand(1, 3, side, side)


def test_large_pictures_are_compared_pooled_so_pixel_fine_detail_weighs_little():
    generator = torch.Generator().manual_seed(0)
    blocks = torch.rand((1, 3, 8, 8), generator=generator) * 2 - 1
    picture = blocks.repeat_interleave(32, 2).repeat_interleave(32, 3)  # 256x256
    grainy = picture + 0.5 * checkerboard(256)
    whole = torch.nn.functional.cosine_similarity(picture.reshape(1, -1), grainy.reshape(1, -1))
    assert whole.item() < 0.9  # compared whole, the grain alone would stop any skip
    filt = SimilarityFilter(threshold=0.98, max_skip_frames=10, seed=0)
    filt.should_skip(picture)
    filt.should_skip(grainy)
    assert filt.last_similarity > 0.9999


def test_changes_at_the_scale_of_the_latent_grid_weigh_as_on_the_whole_picture():
    generator = torch.Generator().manual_seed(1)
    a, b = (torch.rand((1, 3, 32, 32), generator=generator) * 2 - 1 for _ in range(2))
    big_a, big_b = (x.repeat_interleave(8, 2).repeat_interleave(8, 3) for x in (a, b))
    whole = torch.nn.functional.cosine_similarity(big_a.reshape(1, -1), big_b.reshape(1, -1))
    filt = SimilarityFilter(threshold=0.98, max_skip_frames=10, seed=0)
    filt.should_skip(big_a)
    filt.should_skip(big_b)
    assert filt.last_similarity == pytest.approx(whole.item(), abs=1e-5)


def test_frames_are_compared_as_the_pictures_the_vae_takes_not_as_bytes():
    # Cosine similarity changes with an offset: bytes in [0, 255] would all look alike.
    dark, bright = frame(1) // 4, frame(2) // 4 + 190
    filt = SimilarityFilter(threshold=0.98, max_skip_frames=10, seed=0)
    for pixels in (dark, bright):
        filt.should_skip_pixels(torch.from_numpy(pixels)[None], "rgb")
    images = [torch.from_numpy(p).permute(2, 0, 1).float() / 127.5 - 1 for p in (dark, bright)]
    expected = torch.nn.functional.cosine_similarity(
        images[0].reshape(1, -1), images[1].reshape(1, -1)
    )
    assert filt.last_similarity == pytest.approx(expected.item(), abs=1e-5)
    assert filt.last_similarity < 0
