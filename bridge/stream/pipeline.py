"""StreamDiffusion: stream batch, residual CFG and the similarity filter on diffusers models.

One call takes `frame_buffer_size` (f) new frames and returns f finished ones. With
`t_index_list` of k steps, a frame needs k UNet evaluations; stream batch runs them for k
different frames in one UNet call of k*f latents: the new frames at the first step and the
frames of earlier calls at later steps, kept in a latent buffer between calls. The frame leaving
the buffer has passed all k steps, so output lags input by k - 1 calls; the buffer is filled from
the first frame on start and after a reset, so there is no warm-up of blank frames.

Each step predicts x0 from the noise estimate eps:
    x0_pred = c_out * (x_t - beta * eps) / alpha + c_skip * x_t
and a frame moves to the next step as alpha' * x0_pred + beta' * noise'.

Residual classifier-free guidance replaces the negative-prompt pass with a "virtual residual
noise": the noise that would take x_t back to a reference latent x0_ref,
    eps_ref = (x_t - alpha * x0_ref) / beta,    eps_neg = delta * eps_ref,
and guides with it as classifier-free guidance does with a real negative pass (the paper's
RCFG, Eq. 5-7: eps = eps_neg + g * (eps_cond - eps_neg)), written here as
    eps = eps_cond + (g - 1) * (eps_cond - eps_neg)
so that g = 1 gives eps_cond exactly, not to float error. For "self" x0_ref is the input frame's
latent (zeros in txt2img). For "initialize" a real negative-prompt pass is made once per frame,
at its first step: its noise stands in for eps_ref there and its x0 prediction becomes the
frame's x0_ref for the later steps. "full" runs the negative prompt at every step and uses its
noise as eps_neg; "none" uses eps_cond.

Guidance at or below 1 means no guidance, as in the original: g = max(guidance_scale, 1), so
every cfg_type then uses eps_cond alone. The batch layout does not follow g (the negative pass of
"full" and "initialize" still runs, and is weighted by g - 1 = 0), so a captured graph follows
guidance across 1.0 without a new capture; "initialize" keeps its references current meanwhile.

Noise. Each of the k*f stream-batch slots has its own noise n: a new frame starts from slot 0's
noise (txt2img) or is noised with it (img2img: alpha_0 * x0_in + beta_0 * n), and the later slots
re-noise frames between steps (`do_add_noise`). At the start of every frame step the noise moves:
    n <- keep * n + turn * u + new * z,
z newly drawn, u the part of z orthogonal to n scaled to n's norm, per slot. "fixed" is (1, 0, 0):
the seed's noise every frame. "fresh" is (0, 0, 1). "drift" is (cos a, sin a, 0) with a =
`noise_drift`: a step of a radians along the great circle from n towards z, which keeps the norm.
The weights are a tensor overwritten in place, so a change of mode needs no new capture; z comes
from the pipeline's own generator, which a captured graph registers so that every replay draws
anew. A change of seed or mode starts again from the seed's noise with that generator re-seeded:
one seed and mode give one sequence of frames (on one kind of device). The original's "stock
noise" needs no state of its own: eps_ref is computed from x_t, so in img2img it equals, at a
frame's first step, whatever noise the frame was given.

Temporal consistency. With a feature bank (`feature_bank_size` N > 0) every self-attention
layer of the UNet also attends to its keys and values of the last N frames, and the lower-
resolution ones blend their outputs towards the most similar banked ones (feature_bank.py derives
it). In stream batch a frame at step j looks at the frames that went through step j before it,
as the k steps one after the other do. Latent feedback blends the latest finished latent x0_prev
into each new input latent before it is noised (img2img):
    x0_in <- x0_in + w * (x0_prev - x0_in),
with w = 0 until a first frame is finished, so that w = 0 leaves x0_in as it was, bit for bit.

ControlNet. With `controlnets` every UNet call first runs them on its latents and adds their
scaled residuals to the UNet's skip connections (control.py). Each latent of the stream batch
reads its own frame's control image, kept per slot and moved on with the latent buffer, so stream
batch still equals the k steps one after the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .conditioning import check_resolution, prompt_conditioning
from .config import StreamConfig
from .control import ControlNet, ControlStack
from .feature_bank import FeatureBank, install
from .frames import (
    PixelArray,
    check_frame,
    from_model_output,
    like_input,
    to_device_pixels,
    to_model_input,
    upload_event,
)
from .ip_adapter import image_prompt_of
from .schedule import StepSchedule, build_schedule
from .similarity import SimilarityFilter

_RESHAPING_FIELDS = frozenset(
    {
        "width",
        "height",
        "t_index_list",
        "num_inference_steps",
        "frame_buffer_size",
        "use_denoising_batch",
        "mode",
    }
)
_FILTER_FIELDS = frozenset({"similarity_filter", "similarity_threshold", "max_skip_frames"})
_NOISE_RESTART_FIELDS = frozenset({"seed", "noise"})
# Later draws come from the seed moved by a fixed odd constant, so that they never repeat the
# seed's own noise (which a drift step would then have no direction to turn to).
_DRAW_SEED_OFFSET = 0x9E3779B97F4A7C15
_TINY = torch.finfo(torch.float32).tiny


def unet_batch_size(cfg_type: str, steps: int, frames: int = 1) -> int:
    """Latents per UNet call in stream-batch mode: k, 2k, k or k+1 per frame."""
    per_frame = {"none": steps, "full": 2 * steps, "self": steps, "initialize": steps + 1}
    return per_frame[cfg_type] * frames


def effective_guidance(guidance_scale: float) -> float:
    """The guidance the steps apply: `guidance_scale`, or 1 (none) at or below 1."""
    return max(guidance_scale, 1.0)


def noise_weights(config: StreamConfig) -> tuple[float, float, float]:
    """(keep, turn, new) of the per-frame noise move n <- keep * n + turn * u + new * z."""
    if config.noise == "fresh":
        return 0.0, 0.0, 1.0
    if config.noise == "drift":
        return math.cos(config.noise_drift), math.sin(config.noise_drift), 0.0
    return 1.0, 0.0, 0.0


class StreamDiffusion:
    """The StreamDiffusion algorithm: frames in, frames out, nothing else.

    `components` is anything with `unet`, `vae`, `text_encoder`, `tokenizer` and an LCM
    `scheduler` (see `bridge.models.load_components`), and for an SDXL UNet `text_encoder_2` and
    `tokenizer_2` too (conditioning.py). Models must already sit on their device.
    `controlnets` condition every frame on control images (control.py); their live values are
    set through `self.controlnets`, None without any.
    """

    def __init__(
        self,
        components: Any,
        config: StreamConfig | None = None,
        *,
        prompt: str = "",
        negative_prompt: str = "",
        prompt_cache_size: int = 32,
        controlnets: Sequence[ControlNet] = (),
    ) -> None:
        self.unet = components.unet
        self.vae = components.vae
        self.scheduler = components.scheduler
        self.device = self.unet.device
        self.dtype = self.unet.dtype
        # SDXL's pooled text embedding travels packed with the tokens (conditioning.py), so a
        # prompt is one tensor for every family; its size ids live in `self.conditioning`.
        self.prompts, self.conditioning = prompt_conditioning(
            components, self.device, self.dtype, cache_size=prompt_cache_size
        )
        self.config = config if config is not None else StreamConfig()
        check_resolution(self.unet.config, self.config.width, self.config.height)
        self.unet_calls = 0
        self.frames_processed = 0
        self.frames_skipped = 0
        self.last_unet_batch = 0
        self.accelerator: Callable[[torch.Tensor, str], torch.Tensor] | None = None
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        # State the frame step reads is kept in tensors that live changes overwrite in place,
        # so a CUDA graph captured over the step sees every change without re-capture.
        self._cond = self._embed(prompt).clone()
        self._uncond = self._embed(negative_prompt, negative=True).clone()
        self._guidance_minus_one = torch.tensor(
            effective_guidance(self.config.guidance_scale) - 1.0, device=self.device
        )
        self._delta = torch.tensor(self.config.delta, device=self.device)
        self._noise_weights = torch.tensor(noise_weights(self.config), device=self.device)
        self._generator = torch.Generator(device=self.device)
        self._last_output: torch.Tensor | None = None
        self._last_format = ""
        self._bank_strength = torch.tensor(self.config.feature_bank_strength, device=self.device)
        self._bank_threshold = torch.tensor(self.config.feature_bank_threshold, device=self.device)
        self._bank: FeatureBank | None = None
        self._latent_feedback = torch.tensor(self.config.latent_feedback, device=self.device)
        # 0 until a frame is finished after a reset, then 1: feedback never blends in a stale frame.
        self._feedback_ready = torch.zeros((), device=self.device)
        # An IP-Adapter put on the UNet (ip_adapter.py): told each call's conditional rows.
        self.image_prompt = image_prompt_of(self.unet)
        self.controlnets = (
            ControlStack(controlnets, self.unet.config, self.device, self.dtype)
            if controlnets
            else None
        )
        self._rebuild()

    # ----------------------------------------------------------------- live changes

    def set_prompt(self, prompt: str, negative_prompt: str | None = None) -> None:
        """Use a new prompt (and negative prompt) from the next frame on, for every cfg_type."""
        self._cond.copy_(self._embed(prompt))
        self.prompt = prompt
        if negative_prompt is not None:
            self._uncond.copy_(self._embed(negative_prompt, negative=True))
            self.negative_prompt = negative_prompt

    def encode_prompt(self, prompt: str, *, negative: bool = False) -> torch.Tensor:
        """The cached (1, tokens, width) embedding of a prompt, in the pipeline's dtype; with
        `negative`, of a negative prompt (zeros for "" where the model asks, conditioning.py)."""
        return self._embed(prompt, negative=negative)

    def set_embeddings(self, cond: torch.Tensor, uncond: torch.Tensor | None = None) -> None:
        """Use ready embeddings, e.g. a blend of two prompts during a cross-fade."""
        self._cond.copy_(self._check_embedding(cond))
        if uncond is not None:
            self._uncond.copy_(self._check_embedding(uncond))

    def current_embedding(self) -> torch.Tensor:
        """A copy of the prompt embedding in use."""
        return self._cond.clone()

    def current_noise(self) -> torch.Tensor:
        """A copy of the per-slot noise in use."""
        return self._noise.clone()

    def noise_for_seed(self, seed: int) -> torch.Tensor:
        """The per-slot noise a seed gives: (k*f, 4, h/8, w/8), the same on every device."""
        cfg = self.config
        generator = torch.Generator("cpu").manual_seed(seed)
        channels = self.unet.config.in_channels
        shape = (cfg.denoising_steps * cfg.frame_buffer_size, channels, *cfg.latent_size)
        return torch.randn(shape, generator=generator).to(self.device, self.dtype)

    def set_noise(self, noise: torch.Tensor) -> None:
        """Use ready per-slot noise, e.g. a blend of two seeds during a cross-fade."""
        if noise.shape != self._noise.shape:
            raise ValueError(
                f"noise of shape {tuple(noise.shape)} does not fit the stream; "
                f"it needs {tuple(self._noise.shape)}."
            )
        self._noise.copy_(noise)

    def update(self, **changes: Any) -> None:
        """Change settings live; shapes are rebuilt only when a shape-changing setting moves."""
        config = self.config.with_changes(**changes)
        check_resolution(self.unet.config, config.width, config.height)
        moved = {name for name in changes if getattr(config, name) != getattr(self.config, name)}
        self.config = config
        self._guidance_minus_one.fill_(effective_guidance(config.guidance_scale) - 1.0)
        self._delta.fill_(config.delta)
        self._noise_weights.copy_(torch.tensor(noise_weights(config)))
        self._bank_strength.fill_(config.feature_bank_strength)
        self._bank_threshold.fill_(config.feature_bank_threshold)
        self._latent_feedback.fill_(config.latent_feedback)
        if moved & _RESHAPING_FIELDS:
            self._rebuild()
            return
        if moved & _NOISE_RESTART_FIELDS:
            self._restart_noise()
        if moved & _FILTER_FIELDS:
            self._update_filter()
        if moved & {"feature_bank_size", "cfg_type"}:  # the bank has a row per UNet latent
            self._sync_bank()

    def reset(self) -> None:
        """Drop the frames in flight; the next frame refills the buffer."""
        self.primed = self._schedule.steps == 1 or not self.config.use_denoising_batch
        self._last_output = None
        if self._filter is not None:
            self._filter.reset()
        self._feedback_ready.zero_()
        if self._bank is not None:
            self._bank.empty()

    def graph_key(self, pixels: torch.Tensor, pixel_format: str) -> tuple:
        """What fixes the shapes and branches of `frame_step`; a captured graph is valid per key."""
        cfg = self.config
        return (
            tuple(pixels.shape),
            pixels.device,
            pixel_format,
            cfg.width,
            cfg.height,
            cfg.denoising_steps,
            cfg.frame_buffer_size,
            cfg.cfg_type,
            cfg.use_denoising_batch,
            cfg.do_add_noise,
            cfg.mode,
            cfg.feature_bank_size,
            None if self.controlnets is None else self.controlnets.graph_key(),
        )

    def state_tensors(self) -> list[torch.Tensor]:
        """The tensors a frame step advances; saved and restored around graph warm-up."""
        banked = [] if self._bank is None else self._bank.state_tensors()
        feedback = [self._feedback, self._feedback_ready]
        controls = [] if self.controlnets is None else self.controlnets.state_tensors()
        return [self._buffer, self._ref_buffer, self._noise, *feedback, *banked, *controls]

    def generators(self) -> list[torch.Generator]:
        """The generators a frame step draws from: a graph registers them, warm-up restores them."""
        return [self._generator]

    @property
    def unet_batch_size(self) -> int:
        """Latents per UNet call in the current configuration (stream-batch mode)."""
        cfg = self.config
        return unet_batch_size(cfg.cfg_type, cfg.denoising_steps, cfg.frame_buffer_size)

    # ------------------------------------------------------------------- frames

    @torch.inference_mode()
    def __call__(self, frame: PixelArray | None = None, pixel_format: str = "rgb") -> PixelArray:
        """Diffuse the next frame(s): uint8 (H, W, C) or (f, H, W, C), returned the same way.

        In txt2img mode `frame` is None and a (H, W, C) tensor on the device is returned
        (use `txt2img` for other output containers).
        """
        if self.config.mode == "txt2img":
            if frame is not None:
                raise ValueError("txt2img mode takes no input frame; call with frame=None.")
            return self.txt2img(pixel_format)[0]
        if frame is None:
            raise ValueError("img2img mode needs an input frame; pass a uint8 HxWxC frame.")
        return self.img2img(frame, pixel_format)

    @torch.inference_mode()
    def img2img(self, frame: PixelArray, pixel_format: str = "rgb") -> PixelArray:
        """Diffuse input frame(s) and return the finished ones in the same layout and container."""
        cfg = self.config
        check_frame(frame, pixel_format, cfg.height, cfg.width, cfg.frame_buffer_size)
        pixels = to_device_pixels(frame, self.device)
        if self._filter is not None:
            # An uploaded frame is compared once its copy lands, not after the step before it.
            skip = self._filter.should_skip_pixels(pixels, pixel_format, upload_event(frame))
            if skip and self._may_reuse(pixel_format):
                self.frames_skipped += 1
                return like_input(self._last_output, frame)
        return like_input(self._run(pixels, pixel_format), frame)

    def _run(self, pixels: torch.Tensor, pixel_format: str) -> torch.Tensor:
        # A filling bank makes its layers' tensors; the graph is captured after, never over it.
        filling = self._bank is not None and self._bank.filling
        if self.accelerator is not None and self.primed and not filling:
            output = self.accelerator(pixels, pixel_format)
        else:
            self._settle_accelerator()
            output = self.frame_step(pixels, pixel_format)
        self._last_output, self._last_format = output, pixel_format
        self.frames_processed += 1
        return output

    def frame_step(self, pixels: torch.Tensor, pixel_format: str) -> torch.Tensor:
        """uint8 (f, H, W, C) on the device in, uint8 out: all tensor work, no host decisions.

        Once the buffer is primed this is what a CUDA graph captures and replays.
        """
        images = None
        if self.config.mode == "txt2img":
            cfg = self.config
            shape = (cfg.frame_buffer_size, self.unet.config.in_channels, *cfg.latent_size)
            x0_in = torch.zeros(shape, device=self.device, dtype=self.dtype)
        else:
            images = to_model_input(pixels, pixel_format, self.dtype)
            x0_in = self.encode(images)
        if self.controlnets is not None:
            self.controlnets.new_frames(images, fill=not self.primed)
        return from_model_output(self.decode(self.denoise(x0_in)), pixel_format)

    def _settle_accelerator(self) -> None:
        """Let an accelerator compiling the networks on another thread finish first, before the
        networks run outside its graph or change: they read Python state, such as the bank's
        switch and processors, that the frame step and `update` set."""
        settle = getattr(self.accelerator, "settle", None)
        if settle is not None:
            settle()

    def _may_reuse(self, pixel_format: str) -> bool:
        return self._last_output is not None and self._last_format == pixel_format

    @torch.inference_mode()
    def txt2img(self, pixel_format: str = "rgb") -> torch.Tensor:
        """Generate f frames from the prompt alone: uint8 (f, H, W, C) on the device."""
        if self.config.mode != "txt2img":
            raise ValueError("txt2img needs mode='txt2img'; change it with update(mode='txt2img').")
        placeholder = torch.empty(
            (self.config.frame_buffer_size, 0, 0, 0), dtype=torch.uint8, device=self.device
        )
        return self._run(placeholder, pixel_format).clone()

    # ------------------------------------------------------------------ latents

    @torch.inference_mode()
    def denoise(self, x0_in: torch.Tensor) -> torch.Tensor:
        """Latents in, latents out: f input latents (zeros in txt2img) to f finished ones."""
        expected = (self.config.frame_buffer_size, self.unet.config.in_channels)
        expected += self.config.latent_size
        if tuple(x0_in.shape) != expected:
            raise ValueError(f"latents of shape {tuple(x0_in.shape)} do not fit; need {expected}.")
        if self.config.mode == "img2img":
            gain = self._latent_feedback * self._feedback_ready
            x0_in = x0_in + gain * (self._feedback - x0_in)
        if self._bank is None:
            x0_out = self._denoise(x0_in)
        else:
            with self._bank_switch.serve(self._bank):
                x0_out = self._denoise(x0_in)
        self._feedback.copy_(x0_out[-1:])
        self._feedback_ready.fill_(1.0)
        return x0_out

    def _denoise(self, x0_in: torch.Tensor) -> torch.Tensor:
        """One call's UNet work: stream batch, or the k steps one after the other."""
        frames = self.config.frame_buffer_size
        self._advance_noise()
        x_new = self._first_state(x0_in)
        if not self.config.use_denoising_batch:
            return self._denoise_sequentially(x_new, x0_in)
        if self._schedule.steps == 1:
            x0_pred, _ = self._predict(x_new, self._slot_steps, x0_in, fresh=frames)
            return x0_pred
        if not self.primed:
            self._prefill(x_new, x0_in)
            self.primed = True
        x_t = torch.cat([x_new, self._buffer])
        x0_ref = torch.cat([x0_in, self._ref_buffer])
        x0_pred, x0_ref = self._predict(x_t, self._slot_steps, x0_ref, fresh=frames)
        self._buffer.copy_(self._renoise_slots(x0_pred[:-frames]))
        self._ref_buffer.copy_(x0_ref[:-frames])
        return x0_pred[-frames:]

    def _denoise_sequentially(self, x_t: torch.Tensor, x0_ref: torch.Tensor) -> torch.Tensor:
        """The k steps one after the other: the reference that stream batch must reproduce."""
        frames = self.config.frame_buffer_size
        last = self._schedule.steps - 1
        for step in range(last + 1):
            steps = torch.full((frames,), step, device=self.device, dtype=torch.long)
            x0_pred, x0_ref = self._predict(x_t, steps, x0_ref, fresh=frames if step == 0 else 0)
            if step < last:
                x_t = self._renoise(x0_pred, step + 1)
        return x0_pred

    def _prefill(self, x_new: torch.Tensor, x0_in: torch.Tensor) -> None:
        """Fill the buffer as if the first frame had been streaming all along."""
        frames = self.config.frame_buffer_size
        states, refs = [], []
        x_t, x0_ref = x_new, x0_in
        for step in range(self._schedule.steps - 1):
            steps = torch.full((frames,), step, device=self.device, dtype=torch.long)
            x0_pred, x0_ref = self._predict(x_t, steps, x0_ref, fresh=frames if step == 0 else 0)
            x_t = self._renoise(x0_pred, step + 1)
            states.append(x_t)
            refs.append(x0_ref)
        self._buffer.copy_(torch.cat(states))
        self._ref_buffer.copy_(torch.cat(refs))

    def _advance_noise(self) -> None:
        """Move the per-slot noise on by one frame, in place: keep * n + turn * u + new * z.

        Computed in float32, whatever the pipeline's dtype: the per-slot sums of squares would
        overflow float16 at 512x512 and above.
        """
        noise = self._noise.float()
        drawn = torch.randn(noise.shape, generator=self._generator, device=self.device)
        dims = (1, 2, 3)
        radius = torch.linalg.vector_norm(noise, dim=dims, keepdim=True)
        along = (drawn * noise).sum(dims, keepdim=True) / (radius * radius).clamp_min(_TINY)
        across = drawn - along * noise
        # Scaled in this order so that a vanishing `across` stays finite (radius / tiny is inf).
        length = torch.linalg.vector_norm(across, dim=dims, keepdim=True).clamp_min(_TINY)
        across = across * radius / length
        keep, turn, new = self._noise_weights
        self._noise.copy_(keep * noise + turn * across + new * drawn)

    def _restart_noise(self) -> None:
        """Back to the seed's noise, and the generator of later draws re-seeded in place."""
        self._noise.copy_(self.noise_for_seed(self.config.seed))
        self._generator.manual_seed((self.config.seed + _DRAW_SEED_OFFSET) % 2**64)

    def _first_state(self, x0_in: torch.Tensor) -> torch.Tensor:
        noise = self._noise[: self.config.frame_buffer_size]
        if self.config.mode == "txt2img":
            return noise
        schedule = self._schedule
        return schedule.alpha[0] * x0_in + schedule.beta[0] * noise

    def _renoise(self, x0_pred: torch.Tensor, step: int) -> torch.Tensor:
        """Move predictions to `step`: alpha * x0 (+ beta * that step's noise)."""
        frames = self.config.frame_buffer_size
        moved = self._schedule.alpha[step] * x0_pred
        if self.config.do_add_noise:
            noise = self._noise[step * frames : (step + 1) * frames]
            moved = moved + self._schedule.beta[step] * noise
        return moved

    def _renoise_slots(self, x0_pred: torch.Tensor) -> torch.Tensor:
        """Move the predictions of slots 0..k-2 to steps 1..k-1 in one go."""
        frames = self.config.frame_buffer_size
        moved = self._slot_alpha[frames:] * x0_pred
        if self.config.do_add_noise:
            moved = moved + self._slot_beta[frames:] * self._noise[frames:]
        return moved

    def _predict(
        self, x_t: torch.Tensor, steps: torch.Tensor, x0_ref: torch.Tensor, fresh: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One UNet call over latents at `steps`; returns x0 predictions and updated references.

        The first `fresh` latents are new frames at their first step: under "initialize" they get
        the real negative-prompt pass, whose x0 prediction becomes their reference.
        """
        if self._bank is not None:
            self._bank.select(self._bank_rows(steps, fresh))
        s = self._schedule
        alpha = s.alpha[steps].view(-1, 1, 1, 1)
        beta = s.beta[steps].view(-1, 1, 1, 1)
        t = s.timesteps[steps]
        count = x_t.shape[0]
        if self.image_prompt is not None:  # negative-prompt passes come first, then `count`
            self.image_prompt.select(count)
        if self.controlnets is not None:
            self.controlnets.select(count)
        cfg = self.config
        cond = self._cond.expand(count, -1, -1)

        if cfg.cfg_type == "full":
            uncond = self._uncond.expand(count, -1, -1)
            x_both = torch.cat([x_t, x_t])
            out = self._unet(x_both, torch.cat([t, t]), torch.cat([uncond, cond]))
            both = self._as_eps(out, x_both, alpha.repeat(2, 1, 1, 1), beta.repeat(2, 1, 1, 1))
            eps_neg, eps_cond = both.chunk(2)
            eps = self._guide(eps_cond, eps_neg)
        elif cfg.cfg_type == "initialize" and fresh:
            uncond = self._uncond.expand(fresh, -1, -1)
            x_all = torch.cat([x_t[:fresh], x_t])
            out = self._unet(x_all, torch.cat([t[:fresh], t]), torch.cat([uncond, cond]))
            alpha_all = torch.cat([alpha[:fresh], alpha])
            eps_all = self._as_eps(out, x_all, alpha_all, torch.cat([beta[:fresh], beta]))
            eps_neg_fresh, eps_cond = eps_all[:fresh], eps_all[fresh:]
            ref_fresh = self._x0(eps_neg_fresh, x_t[:fresh], steps[:fresh])
            x0_ref = torch.cat([ref_fresh, x0_ref[fresh:]])
            eps_later = self._virtual_noise(x_t, x0_ref, alpha, beta)[fresh:]
            eps_neg = self._delta * torch.cat([eps_neg_fresh, eps_later])
            eps = self._guide(eps_cond, eps_neg)
        else:
            out = self._unet(x_t, t, cond)
            eps_cond = self._as_eps(out, x_t, alpha, beta)
            if cfg.cfg_type == "none":
                eps = eps_cond
            else:
                eps_ref = self._virtual_noise(x_t, x0_ref, alpha, beta)
                eps = self._guide(eps_cond, self._delta * eps_ref)
        return self._x0(eps, x_t, steps), x0_ref

    def _guide(self, eps_cond: torch.Tensor, eps_neg: torch.Tensor) -> torch.Tensor:
        """eps_neg + g * (eps_cond - eps_neg), written so that g = 1 gives eps_cond exactly."""
        return eps_cond + self._guidance_minus_one * (eps_cond - eps_neg)

    @staticmethod
    def _virtual_noise(
        x_t: torch.Tensor, x0_ref: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """The noise that would take x_t back to x0_ref: (x_t - alpha * x0_ref) / beta."""
        return (x_t - alpha * x0_ref) / beta

    def _x0(self, eps: torch.Tensor, x_t: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The LCM consistency output: c_out * (x_t - beta * eps) / alpha + c_skip * x_t."""
        s = self._schedule
        alpha = s.alpha[steps].view(-1, 1, 1, 1)
        beta = s.beta[steps].view(-1, 1, 1, 1)
        c_skip = s.c_skip[steps].view(-1, 1, 1, 1)
        c_out = s.c_out[steps].view(-1, 1, 1, 1)
        return c_out * (x_t - beta * eps) / alpha + c_skip * x_t

    def _as_eps(
        self, out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """UNet output as a noise estimate, whatever the model was trained to predict."""
        if self._schedule.prediction_type == "v_prediction":
            return alpha * out + beta * x_t
        return out

    def _unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.unet_calls += 1
        self.last_unet_batch = x.shape[0]
        if self.conditioning is None:
            kwargs: dict[str, Any] = {"encoder_hidden_states": context}
        else:
            kwargs = self.conditioning.unet_kwargs(context)
        if self.controlnets is not None:
            kwargs.update(self.controlnets.residuals(x, t, kwargs))
        return self.unet(x, t, **kwargs, return_dict=False)[0]

    # ------------------------------------------------------------------- helpers

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] to scaled latents."""
        encoded = self.vae.encode(images.to(self.vae.dtype))
        latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mean
        return (latents * self.vae.config.scaling_factor).to(self.dtype)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents to (N, 3, H, W) images in [-1, 1]."""
        scaled = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        return self.vae.decode(scaled, return_dict=False)[0]

    def _embed(self, prompt: str, *, negative: bool = False) -> torch.Tensor:
        encode = self.prompts.negative if negative else self.prompts
        return encode(prompt).to(self.device, self.dtype)

    def _check_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        if embedding.shape != self._cond.shape:
            raise ValueError(
                f"an embedding of shape {tuple(embedding.shape)} does not fit this text encoder; "
                f"it needs {tuple(self._cond.shape)}."
            )
        return embedding.to(self.device, self.dtype)

    def _bank_rows(self, steps: torch.Tensor, fresh: int) -> torch.Tensor | None:
        """The feature-bank row of each latent of the UNet call `_predict` makes for `steps`.

        Row j*f + i is the frame in buffer position i at step j; the negative-prompt passes of
        "full" and "initialize" take the rows after those, in the same order. None means every
        row in order: the stream-batch call of "none" and "self", which needs no gather.
        """
        cfg = self.config
        if steps is self._slot_steps and cfg.cfg_type in ("none", "self"):
            return None
        frames = cfg.frame_buffer_size
        slots = steps * frames + torch.arange(steps.shape[0], device=self.device) % frames
        negative = slots + cfg.denoising_steps * frames
        if cfg.cfg_type == "full":
            return torch.cat([negative, slots])
        if cfg.cfg_type == "initialize" and fresh:
            return torch.cat([negative[:fresh], slots])
        return slots

    def _sync_bank(self) -> None:
        """Drop, keep or make the feature bank to fit the settings; a new one starts empty.

        A bank of the same size and rows is kept, so that a graph captured over its tensors stays
        valid; `reset` empties it.
        """
        size, rows = self.config.feature_bank_size, self.unet_batch_size
        if size == 0:
            self._bank = None
        elif self._bank is None or (self._bank.size, self._bank.rows) != (size, rows):
            self._settle_accelerator()
            self._bank_switch = install(self.unet)
            self._bank = FeatureBank(size, rows, self._bank_strength, self._bank_threshold)

    @property
    def similarity_filter(self) -> SimilarityFilter | None:
        """The similarity filter deciding on frames, None while it is off."""
        return self._filter

    def _update_filter(self) -> None:
        """Follow the filter settings: a new threshold or run length changes the filter in
        place (its reference and captured comparison stay); switching it off drops it."""
        cfg = self.config
        if self._filter is not None and cfg.similarity_filter:
            self._filter.configure(cfg.similarity_threshold, cfg.max_skip_frames)
            return
        if self._filter is not None:
            self._filter.close()
        self._filter = self._make_filter()

    def _make_filter(self) -> SimilarityFilter | None:
        cfg = self.config
        if not cfg.similarity_filter:
            return None
        return SimilarityFilter(cfg.similarity_threshold, cfg.max_skip_frames, seed=cfg.seed)

    def _rebuild(self) -> None:
        """Recompute what depends on shapes or steps, in place where shapes allow."""
        cfg = self.config
        schedule = build_schedule(
            self.scheduler, cfg.t_index_list, cfg.num_inference_steps, self.device, self.dtype
        )
        frames = cfg.frame_buffer_size
        latent_shape = (self.unet.config.in_channels, *cfg.latent_size)
        buffer_shape = ((cfg.denoising_steps - 1) * frames, *latent_shape)
        noise_shape = (cfg.denoising_steps * frames, *latent_shape)
        fresh = {
            "_schedule": schedule,
            "_slot_steps": torch.arange(cfg.denoising_steps, device=self.device).repeat_interleave(
                frames
            ),
            "_slot_alpha": schedule.per_slot("alpha", frames),
            "_slot_beta": schedule.per_slot("beta", frames),
            "_noise": torch.zeros(noise_shape, device=self.device, dtype=self.dtype),
            "_buffer": torch.zeros(buffer_shape, device=self.device, dtype=self.dtype),
            "_ref_buffer": torch.zeros(buffer_shape, device=self.device, dtype=self.dtype),
            "_feedback": torch.zeros((1, *latent_shape), device=self.device, dtype=self.dtype),
        }
        for name, value in fresh.items():
            _assign(self, name, value)
        if self.conditioning is not None:
            self.conditioning.set_size(cfg.width, cfg.height)
        self._restart_noise()
        self._filter = self._make_filter()
        self._sync_bank()
        if self.controlnets is not None:
            self.controlnets.reshape(cfg.denoising_steps, frames, cfg.height, cfg.width, cfg.mode)
        self.reset()


def _assign(owner: object, name: str, value: Any) -> None:
    """Set an attribute, copying into the existing tensors when the shapes still match."""
    current = getattr(owner, name, None)
    if isinstance(value, StepSchedule) and isinstance(current, StepSchedule):
        if current.steps == value.steps:
            for field in ("timesteps", "alpha", "beta", "c_skip", "c_out"):
                getattr(current, field).copy_(getattr(value, field))
            object.__setattr__(current, "t_index_list", value.t_index_list)
            return
    elif isinstance(current, torch.Tensor) and current.shape == value.shape:
        current.copy_(value)
        return
    setattr(owner, name, value)
