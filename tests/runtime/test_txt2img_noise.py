"""txt2img through `sd-bridge run`: the noise setting decides whether frames repeat."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.mark.parametrize(("noise", "repeats"), [("fixed", True), ("fresh", False)])
def test_txt2img_repeats_its_picture_only_with_fixed_noise(
    bridge_process, tmp_path, noise, repeats
):
    out = tmp_path / "frame_%03d.png"
    process = bridge_process(
        "--model", "synthetic:tiny", "--width", "64", "--height", "64", "--mode", "txt2img",
        "--t-index", "45", "--cfg", "none", "--noise", noise, "--output", f"file:{out}",
        "--frames", "3", "--no-osc", "--quiet",
    )  # fmt: skip
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    frames = [np.asarray(Image.open(path)) for path in sorted(tmp_path.glob("frame_*.png"))]
    assert len(frames) >= 2
    same = all(np.array_equal(frames[0], frame) for frame in frames[1:])
    assert same is repeats
