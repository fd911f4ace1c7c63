"""Replay the whole per-frame step of a stream pipeline as one CUDA graph.

Eager PyTorch spends most of a small UNet's frame launching kernels from Python. A CUDA graph
records the launches of one frame step (pixel conversion, VAE encode, the UNet, the scheduler
update, VAE decode, conversion back) once and replays them with a single call. Everything the
step reads (prompt embeddings, noise, guidance, schedule constants, the latent buffer, the
feature bank's rings and their positions) lives in tensors that live changes overwrite in place,
so only a change of shapes or branches needs a new capture; `StreamDiffusion.graph_key` says which
changes those are. A feature bank that is empty is filled by an eager frame step before any
capture, so that its tensors exist and the graph never records the filling. The generators the
step draws noise from are registered with the graph, so each replay draws new numbers from where
the generator stands (a re-seed between replays takes effect), as the eager step would.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import nullcontext

import torch

from bridge.stream import StreamDiffusion

from .background import BackgroundCompile, adopted


class GraphedFrameStep:
    """A drop-in for `StreamDiffusion.frame_step` that captures it once and replays it."""

    def __init__(
        self,
        stream: StreamDiffusion,
        warmup_steps: int = 2,
        after_first_capture: Callable[[], None] | None = None,
        background: BackgroundCompile | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        """`after_first_capture` is called once, when the first capture is made, or with a
        `background` compile, the first capture of the compiled networks. `say` hears when those
        took over."""
        if stream.device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need the pipeline on a CUDA device, it is on {stream.device}; "
                'use accel="none" on this machine.'
            )
        self.stream = stream
        self.warmup_steps = warmup_steps
        self.after_first_capture = after_first_capture
        self.background = background
        self.say = say
        self._compile_here_if_banked()
        self.captures = 0
        self._key: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: torch.Tensor | None = None
        self._static_out: torch.Tensor | None = None
        self._unet_calls_per_step = 0

    @property
    def compiling(self) -> bool:
        """True while a background compile is pending or running."""
        return self.background is not None

    def settle(self) -> None:
        """Before the networks run outside the graph: wait for a background compile to finish
        and put its networks in place (background.py says why)."""
        if self.background is not None and self.background.started:
            self.background.wait()
            self._adopt()

    def __call__(self, pixels: torch.Tensor, pixel_format: str) -> torch.Tensor:
        if self.background is not None and self.background.done:
            self._adopt()
        key = self.stream.graph_key(pixels, pixel_format)
        if key != self._key:
            self.settle()
            self._capture(pixels, pixel_format, key)
        self._static_in.copy_(pixels, non_blocking=True)
        self._graph.replay()
        self.stream.unet_calls += self._unet_calls_per_step
        return self._static_out

    def _capture(self, pixels: torch.Tensor, pixel_format: str, key: tuple) -> None:
        stream = self.stream
        self._graph = None
        self._key = None  # a capture that fails leaves nothing to replay
        self._static_in = pixels.clone()
        saved = [tensor.clone() for tensor in stream.state_tensors()]
        generators = stream.generators()
        saved_rng = [generator.get_state() for generator in generators]
        # Warm-up runs on a side stream (as capture requires) and lets lazy initialisation and
        # torch.compile happen outside the graph; the state it advanced is put back afterwards.
        self._compile_here_if_banked()
        side = torch.cuda.Stream(device=stream.device)
        side.wait_stream(torch.cuda.current_stream(stream.device))
        record = self.background is not None and not self.background.started
        with torch.cuda.stream(side):
            for step in range(self.warmup_steps):
                with self.background.recording() if record and step == 0 else nullcontext():
                    stream.frame_step(self._static_in, pixel_format)
        torch.cuda.current_stream(stream.device).wait_stream(side)
        for tensor, copy in zip(stream.state_tensors(), saved, strict=True):
            tensor.copy_(copy)
        for generator, state in zip(generators, saved_rng, strict=True):
            generator.set_state(state)
        calls_before = stream.unet_calls
        graph = torch.cuda.CUDAGraph()
        # Without registration a draw during capture fails, and replays would repeat one draw.
        for generator in generators:
            graph.register_generator_state(generator)
        # A graph freed during capture (a dropped pipeline's, found by the cycle collector)
        # invalidates the capture: collect now, and keep the collector off while capturing.
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            # Only this thread's CUDA calls are checked against the capture: the prompt and
            # picture encoders go on working on their own threads and streams meanwhile.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._static_out = stream.frame_step(self._static_in, pixel_format)
        finally:
            if collecting:
                gc.enable()
        self._unet_calls_per_step = stream.unet_calls - calls_before
        stream.unet_calls = calls_before
        self._graph = graph
        self._key = key
        self.captures += 1
        if record:
            self.background.start()
        elif self.background is None and self.after_first_capture is not None:
            self.after_first_capture()
            self.after_first_capture = None

    def _compile_here_if_banked(self) -> None:
        """With a feature bank before the thread started (at the start, or switched on before the
        first capture), put the compiled networks in place now, to compile in the capture's
        warm-up as without the thread: its calls would read and write the live bank."""
        job = self.background
        if job is not None and not job.started and self.stream.config.feature_bank_size:
            job.networks.install()
            self.background = None

    def _adopt(self) -> None:
        """Put the background compile's networks in place; the next frame captures them."""
        job, self.background = self.background, None
        if adopted(job, self.say):
            self._key = None
            # The thread compiled the start's shapes already; a change made since then is new
            # code, which the stance must find in place when the next capture meets it.
            if self.after_first_capture is not None:
                self.after_first_capture()
        self.after_first_capture = None
