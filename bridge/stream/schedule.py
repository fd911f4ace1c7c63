"""Per-step constants of the LCM schedule for the chosen `t_index_list`.

Everything the denoising loop needs is computed here once, when the steps change, so a frame
only multiplies by ready tensors:

- `timesteps`: the discrete training timestep of each chosen step;
- `alpha` and `beta`: sqrt(alphas_cumprod[t]) and sqrt(1 - alphas_cumprod[t]), so that a clean
  latent x0 noised to step t is `alpha * x0 + beta * noise`;
- `c_skip` and `c_out`: the LCM boundary-condition scalings, so that the consistency output is
  `c_out * x0_pred + c_skip * x_t`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import LCMScheduler

SIGMA_DATA = 0.5


@dataclass(frozen=True)
class StepSchedule:
    """Constants of k denoising steps, each a tensor of shape (k,)."""

    t_index_list: tuple[int, ...]
    timesteps: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    prediction_type: str

    @property
    def steps(self) -> int:
        """k, the number of steps."""
        return len(self.t_index_list)

    def per_slot(self, name: str, frames: int) -> torch.Tensor:
        """Constant `name` laid out for a stream batch: k blocks of f, shape (k*f, 1, 1, 1)."""
        values = getattr(self, name)
        return values.repeat_interleave(frames).view(-1, 1, 1, 1)


def build_schedule(
    scheduler: LCMScheduler,
    t_index_list: tuple[int, ...],
    num_inference_steps: int,
    device: torch.device,
    dtype: torch.dtype,
) -> StepSchedule:
    """Set the scheduler to `num_inference_steps` and gather the constants of the chosen steps."""
    distilled = scheduler.config.original_inference_steps
    if num_inference_steps > distilled:
        raise ValueError(
            f"num_inference_steps {num_inference_steps} is more than the {distilled} steps the "
            f"LCM schedule is drawn from; use at most {distilled}."
        )
    scheduler.set_timesteps(num_inference_steps)
    available = len(scheduler.timesteps)
    for index in t_index_list:
        if not 0 <= index < available:
            raise ValueError(
                f"t_index {index} is outside the scheduler's {available} timesteps; "
                f"use indices from 0 to {available - 1}."
            )
    timesteps = scheduler.timesteps[list(t_index_list)].to(torch.long)
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)[timesteps]
    scaled = timesteps.to(torch.float64) * scheduler.config.timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"prediction_type {prediction_type!r} is not supported; "
            "use a model trained for 'epsilon' or 'v_prediction'."
        )

    def ready(values: torch.Tensor) -> torch.Tensor:
        return values.to(device=device, dtype=dtype)

    return StepSchedule(
        t_index_list=tuple(t_index_list),
        timesteps=timesteps.to(device),
        alpha=ready(alphas_cumprod.sqrt()),
        beta=ready((1.0 - alphas_cumprod).sqrt()),
        c_skip=ready(c_skip),
        c_out=ready(c_out),
        prediction_type=prediction_type,
    )
