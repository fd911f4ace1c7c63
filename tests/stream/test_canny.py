"""Canny on the device: edges where the picture changes, none in flat areas; thresholds count."""

from __future__ import annotations

import torch

from bridge.stream.canny import HYSTERESIS_STEPS, canny

SIZE = 48
INSIDE = slice(14, 34)  # the square covers rows and columns 14..33


def square(level: float, background: float = 0.0) -> torch.Tensor:
    """A (1, 3, SIZE, SIZE) picture in [0, 1]: a square of `level` on `background`."""
    picture = torch.full((1, 3, SIZE, SIZE), background)
    picture[..., INSIDE, INSIDE] = level
    return picture


def edge_map(picture: torch.Tensor, low: float = 100.0, high: float = 200.0) -> torch.Tensor:
    edges = canny(picture, torch.tensor(low), torch.tensor(high))
    assert edges.shape == (1, 3, SIZE, SIZE)
    assert torch.equal(edges[:, 0], edges[:, 2])  # the same map in every channel
    return edges[0, 0]


def test_a_white_square_on_black_has_edges_on_its_border_and_none_inside_or_far_outside():
    edges = edge_map(square(1.0))
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    assert edges[17:31, 17:31].sum() == 0  # inside, three pixels from the border and more
    assert edges[:11].sum() == 0 and edges[37:].sum() == 0
    assert edges[:, :11].sum() == 0 and edges[:, 37:].sum() == 0
    middle = slice(18, 30)
    for side in (edges[12:16, middle], edges[32:36, middle]):  # top and bottom, across a row
        assert (side.sum(0) == 1).all(), "one thin edge pixel across the border at each column"
    for side in (edges[middle, 12:16], edges[middle, 32:36]):
        assert (side.sum(1) == 1).all()


def test_the_thresholds_decide_which_contrast_counts_as_an_edge():
    faint = square(0.25)  # a step of 64 levels: a gradient of a few hundred on cv2's scale
    assert edge_map(faint, low=50.0, high=100.0).sum() > 4 * 12
    assert edge_map(faint, low=50.0, high=400.0).sum() == 0
    bright = square(1.0)
    assert edge_map(bright, low=50.0, high=400.0).sum() > 4 * 12
    assert edge_map(bright, low=2000.0, high=2040.0).sum() == 0


def test_a_weak_edge_counts_within_the_hysteresis_reach_of_a_strong_one_and_not_alone():
    # A vertical border whose contrast fades from full at the top to none at the bottom: strong
    # above some row, weak for many rows below it.
    fade = torch.linspace(1.0, 0.0, SIZE).view(1, 1, SIZE, 1).expand(1, 3, SIZE, SIZE // 2)
    picture = torch.zeros((1, 3, SIZE, SIZE))
    picture[..., SIZE // 2 :] = fade
    border = slice(20, 28)
    strong = edge_map(picture, low=400.0, high=400.0)[:, border].sum(1)
    joined = edge_map(picture, low=100.0, high=400.0)[:, border].sum(1)
    last_strong = int(strong.nonzero().max())
    assert (strong[4:last_strong] == 1).all()
    reach = slice(last_strong + 1, last_strong + 1 + HYSTERESIS_STEPS)
    assert (joined[reach] == 1).all(), "the weak part joins the strong one near it"
    assert joined[reach.stop :].sum() == 0, "but no further than the reach"
    weak_only = picture * 0.5  # the same border at half the contrast: nowhere strong
    assert edge_map(weak_only, low=100.0, high=400.0).sum() == 0
    assert edge_map(weak_only, low=100.0, high=100.0)[:, border].sum() > 4
