"""Canny edges on the GPU, as fixed tensor work a CUDA graph can capture.

The classic detector, step by step, on (N, 3, H, W) pictures in [0, 1]:

1. Luma, 0.299 R + 0.587 G + 0.114 B, on OpenCV's 0-255 scale, so that the thresholds mean
   what they mean to ``cv2.Canny`` (ControlNet's canny annotator uses 100 and 200).
2. A 5x5 Gaussian blur (sigma 1), which keeps sensor noise from becoming edges.
3. Sobel gradients gx and gy (3x3) and their L1 magnitude |gx| + |gy|, OpenCV's default.
4. Non-maximum suppression: a pixel stays only where its magnitude is a maximum along its
   gradient direction, rounded to one of four (0, 45, 90, 135 degrees): edges one pixel thin.
5. Double threshold: magnitudes above ``high`` are edges; those above ``low`` are edges only
   where they connect to one. Exact hysteresis follows chains of any length, a loop whose length
   depends on the picture; here it is a fixed number of 3x3 dilations
   (``HYSTERESIS_STEPS``), so a weak chain joins up to that many pixels from a strong edge.

Every step is a fixed sequence of tensor operations: no loop whose length depends on the data
and no value read back to the host. ``low`` and ``high`` are tensors, so a captured graph follows
their changes. The result is white edges on black in three channels, as ControlNets trained on
canny maps expect.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

HYSTERESIS_STEPS = 8
BLUR_SIGMA = 1.0
BLUR_SIZE = 5
LUMA = (0.299, 0.587, 0.114)
# tan(22.5 degrees): below it a gradient counts as horizontal (or vertical), above as diagonal.
_TAN_22_5 = 0.41421356


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    return torch.outer(weights, weights).view(1, 1, size, size)


@cache
def _constants(device: torch.device) -> tuple[torch.Tensor, ...]:
    """Luma weights, blur and Sobel kernels on `device`, made once: a copy from the host cannot
    happen while a CUDA graph is being captured, and the warm-up before a capture makes them."""
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    constants = (
        torch.tensor(LUMA).view(1, 3, 1, 1),
        _gaussian(BLUR_SIZE, BLUR_SIGMA),
        sobel_x,
        sobel_x.transpose(2, 3).contiguous(),
    )
    return tuple(constant.to(device) for constant in constants)


def _filter(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve (N, 1, H, W) with a square kernel, mirroring the border as OpenCV does."""
    pad = kernel.shape[-1] // 2
    return F.conv2d(F.pad(image, (pad, pad, pad, pad), mode="reflect"), kernel)


def canny(
    images: torch.Tensor,
    low: torch.Tensor | float,
    high: torch.Tensor | float,
    steps: int = HYSTERESIS_STEPS,
) -> torch.Tensor:
    """(N, 3, H, W) pictures in [0, 1] to (N, 3, H, W) edge maps of 0 and 1, in float32.

    ``low`` and ``high`` are gradient magnitudes on the 0-255 scale of ``cv2.Canny``.
    """
    luma, blur, sobel_x, sobel_y = _constants(images.device)
    gray = (images.float() * luma).sum(1, keepdim=True) * 255.0
    smooth = _filter(gray, blur)
    gx, gy = _filter(smooth, sobel_x), _filter(smooth, sobel_y)
    ax, ay = gx.abs(), gy.abs()
    magnitude = ax + ay

    # The eight neighbours of every pixel, zero beyond the border.
    height, width = magnitude.shape[-2:]
    padded = F.pad(magnitude, (1, 1, 1, 1))

    def neighbour(dy: int, dx: int) -> torch.Tensor:
        return padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    horizontal = ay <= _TAN_22_5 * ax  # the gradient runs along x: the edge is vertical
    vertical = ax <= _TAN_22_5 * ay
    falling = (gx * gy) > 0  # down and right in image coordinates: the main diagonal
    ahead = torch.where(
        horizontal,
        neighbour(0, 1),
        torch.where(
            vertical, neighbour(1, 0), torch.where(falling, neighbour(1, 1), neighbour(1, -1))
        ),
    )
    behind = torch.where(
        horizontal,
        neighbour(0, -1),
        torch.where(
            vertical, neighbour(-1, 0), torch.where(falling, neighbour(-1, -1), neighbour(-1, 1))
        ),
    )
    # Strictly above one side and at least the other, so a plateau two pixels wide keeps one.
    thin = (magnitude > behind) & (magnitude >= ahead)

    weak = thin & (magnitude > low)
    edges = thin & (magnitude > high)
    for _ in range(steps):
        grown = F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0
        edges = edges | (weak & grown)
    return edges.float().expand(-1, 3, -1, -1)
