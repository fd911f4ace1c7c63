"""The settings of a stream pipeline, checked once so the hot path never has to."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

CFG_TYPES = ("none", "full", "self", "initialize")
MODES = ("img2img", "txt2img")
NOISE_MODES = ("fixed", "fresh", "drift")
MAX_SIDE = 4096
# A quarter turn (pi/2, written rounded up so that the documented 1.5708 is accepted): at that
# angle a drift step lands on noise orthogonal to the last, as far as one step can usefully go.
MAX_NOISE_DRIFT = 1.5708
# Most frames a feature bank holds: the attention of the largest layers grows with each frame.
MAX_FEATURE_BANK = 8


@dataclass(frozen=True)
class StreamConfig:
    """Everything that shapes the per-frame computation of `StreamDiffusion`.

    `t_index_list` picks k steps out of an LCM schedule of `num_inference_steps`; the UNet sees
    k * `frame_buffer_size` latents per call in stream-batch mode. `cfg_type` selects residual
    classifier-free guidance: "none" (batch k), "full" (2k, true negative prompt), "self" (k,
    the input itself as the negative) or "initialize" (k + 1, one real negative pass per frame).
    `guidance_scale` at or below 1.0 turns guidance off for every cfg_type: each step uses the
    conditional noise estimate alone (the batch layout, and so a captured graph, stays as it is).

    `noise` says how the per-slot noise moves from frame to frame: "fixed" uses the seed's noise
    every frame, "fresh" draws new noise every frame, "drift" turns the noise by `noise_drift`
    radians a frame along the great circle towards newly drawn noise, keeping its norm. The same
    noise serves both uses: the noise added to a new frame's latent (img2img) or that the frame
    starts from (txt2img), and the re-noising between steps (`do_add_noise`). A change of `noise`
    or `seed` starts again from the seed's noise; none of the three needs a new graph capture.

    `feature_bank_size` N > 0 lets every self-attention layer attend to the last N frames too
    (see `feature_bank`); `feature_bank_strength` blends the outputs of the lower-resolution
    layers towards their most similar banked features whose cosine similarity reaches
    `feature_bank_threshold`. `latent_feedback` blends the latest finished latent into each new
    input latent (img2img). Strength, threshold and feedback change without a new capture; a
    change of N starts an empty bank and captures the graph again.
    """

    width: int = 512
    height: int = 512
    t_index_list: tuple[int, ...] = (32, 45)
    num_inference_steps: int = 50
    frame_buffer_size: int = 1
    cfg_type: str = "self"
    guidance_scale: float = 1.2
    delta: float = 1.0
    use_denoising_batch: bool = True
    do_add_noise: bool = True
    seed: int = 2
    noise: str = "fixed"
    noise_drift: float = 0.05
    mode: str = "img2img"
    similarity_filter: bool = False
    similarity_threshold: float = 0.98
    max_skip_frames: int = 10
    feature_bank_size: int = 0
    feature_bank_strength: float = 0.8
    feature_bank_threshold: float = 0.98
    latent_feedback: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "t_index_list", tuple(self.t_index_list))
        validate(self)

    @property
    def denoising_steps(self) -> int:
        """k, the number of denoising steps each frame goes through."""
        return len(self.t_index_list)

    @property
    def latent_size(self) -> tuple[int, int]:
        """(height, width) of the latents: one eighth of the image."""
        return self.height // 8, self.width // 8

    def with_changes(self, **changes: object) -> StreamConfig:
        """A copy with some fields changed, validated like a new one."""
        return replace(self, **changes)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}.")


def _check_float(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}.")


def validate(config: StreamConfig) -> None:
    """Raise ValueError naming the first setting that is out of bounds and what is allowed."""
    for name in ("width", "height"):
        value = getattr(config, name)
        _check_int(name, value, 8, MAX_SIDE)
        if value % 8:
            raise ValueError(
                f"{name} must be a multiple of 8 (the VAE works on 8x8 blocks), got {value}; "
                f"try {value - value % 8} or {value - value % 8 + 8}."
            )
    _check_int("num_inference_steps", config.num_inference_steps, 1, 50)
    _check_int("frame_buffer_size", config.frame_buffer_size, 1, 64)
    steps = config.t_index_list
    if not 1 <= len(steps) <= 50:
        raise ValueError(f"t_index_list must hold 1 to 50 step indices, got {list(steps)}.")
    for index in steps:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"t_index_list must hold integers, got {list(steps)}.")
        if not 0 <= index < config.num_inference_steps:
            raise ValueError(
                f"t_index {index} is outside the schedule of {config.num_inference_steps} steps; "
                f"use indices from 0 to {config.num_inference_steps - 1}."
            )
    if any(b <= a for a, b in zip(steps[:-1], steps[1:], strict=True)):
        raise ValueError(f"t_index_list must be strictly increasing, got {list(steps)}.")
    if config.cfg_type not in CFG_TYPES:
        raise ValueError(
            f"cfg_type must be one of {', '.join(CFG_TYPES)}, got {config.cfg_type!r}."
        )
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {config.mode!r}.")
    if config.noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_MODES)}, got {config.noise!r}.")
    _check_float("noise_drift", config.noise_drift, 0.0, MAX_NOISE_DRIFT)
    _check_float("guidance_scale", config.guidance_scale, 0.0, 50.0)
    _check_float("delta", config.delta, 0.0, 10.0)
    _check_int("seed", config.seed, 0, 2**63 - 1)
    threshold = config.similarity_threshold
    _check_float("similarity_threshold", threshold, 0.0, 1.0)
    if threshold >= 1.0:
        raise ValueError(f"similarity_threshold must be below 1.0, got {threshold}.")
    _check_int("max_skip_frames", config.max_skip_frames, 0, 10_000)
    _check_int("feature_bank_size", config.feature_bank_size, 0, MAX_FEATURE_BANK)
    _check_float("feature_bank_strength", config.feature_bank_strength, 0.0, 1.0)
    _check_float("feature_bank_threshold", config.feature_bank_threshold, 0.0, 1.0)
    _check_float("latent_feedback", config.latent_feedback, 0.0, 1.0)
