"""Test patterns: right shape and format, moving, paced."""

from __future__ import annotations

import time
from itertools import pairwise

import numpy as np
import pytest

from bridge.io.base import TransportError
from bridge.io.pattern import PATTERNS, PatternSource


@pytest.mark.parametrize("kind", sorted(PATTERNS))
def test_every_pattern_moves_from_frame_to_frame(kind):
    with PatternSource(kind, 64, 48, fps=1000) as source:
        frames = [source.read(timeout=1.0) for _ in range(4)]
    for frame in frames:
        assert frame.pixels.shape == (48, 64, 3) and frame.pixel_format == "rgb"
    assert [frame.index for frame in frames] == [0, 1, 2, 3]
    for before, after in pairwise(frames):
        assert not np.array_equal(before.pixels, after.pixels)


def test_pattern_is_paced_at_its_frame_rate():
    with PatternSource("bars", 32, 32, fps=20) as source:
        source.read(timeout=1.0)
        started = time.perf_counter()
        for _ in range(5):
            assert source.read(timeout=1.0) is not None
        elapsed = time.perf_counter() - started
    assert 0.15 < elapsed < 1.0  # five periods of 50 ms


def test_read_returns_none_when_the_next_frame_is_beyond_the_timeout():
    with PatternSource("checker", 32, 32, fps=2) as source:
        assert source.read(timeout=1.0) is not None
        assert source.read(timeout=0.01) is None


def test_unknown_pattern_lists_the_known_ones():
    with pytest.raises(ValueError, match="use one of bars, checker, gradient, noise"):
        PatternSource("plasma", 8, 8)


def test_reading_a_closed_source_says_to_open_it():
    with pytest.raises(TransportError, match=r"is not open; call open\(\)"):
        PatternSource("bars", 8, 8).read()


def test_the_next_frame_is_drawn_before_its_tick_so_it_leaves_on_time():
    with PatternSource("bars", 32, 32, fps=4) as source:
        assert source.read(timeout=1.0).index == 0  # the first frame is due at once
        drawn: list[int] = []
        draw = source._draw
        source._draw = lambda index: drawn.append(index) or draw(index)
        assert source.read(timeout=0.0) is None  # frame 1 is not due yet ...
        assert drawn == [1]  # ... but is drawn already
        frame = source.read(timeout=2.0)
    assert frame.index == 1 and drawn == [1]  # handed over at its tick, no drawing then
    assert np.array_equal(frame.pixels, draw(1))
