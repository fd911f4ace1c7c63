"""The engine loop: the only place where transports, parameters and the pipeline meet.

Between two frames the engine takes one snapshot of the parameter store and applies what
changed, so a burst of OSC messages never leaves the pipeline half-updated. Prompts are encoded
on a worker thread and swapped in when ready; fades move a little every frame.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bridge.control import ParamStore, Snapshot
from bridge.io import Frame, Sink, Source, now
from bridge.stream import StreamDiffusion

from .metrics import Metrics, Status
from .prompts import Fade, PromptWorker
from .transfer import HostTransfer, PendingFrames
from .workers import CountingSlot, SinkWorker, SourceWorker

log = logging.getLogger("sd_bridge")

# Store names and the pipeline settings they drive.
STREAM_SETTINGS = {
    "guidance_scale": "guidance_scale",
    "delta": "delta",
    "cfg_type": "cfg_type",
    "t_index_list": "t_index_list",
    "num_inference_steps": "num_inference_steps",
    "do_add_noise": "do_add_noise",
    "filter_enable": "similarity_filter",
    "filter_threshold": "similarity_threshold",
    "filter_max_skip": "max_skip_frames",
}
JOIN_SECONDS = 1.0


INPUT_LOSS_POLICIES = ("last", "black")
MAX_FAILED_STEPS = 20


@dataclass
class EngineHooks:
    """Where the engine reports to: the status line and the OSC feedback, all optional."""

    status: Callable[[Status], None] | None = None
    error: Callable[[str, str], None] | None = None
    input_state: Callable[[str], None] | None = None


class Engine:
    """Runs the pipeline on frames from one source and hands results to every sink."""

    def __init__(
        self,
        stream: StreamDiffusion,
        store: ParamStore,
        source: Source | None,
        sinks: Sequence[Sink],
        *,
        hooks: EngineHooks | None = None,
        metrics: Metrics | None = None,
        status_interval: float = 1.0,
        on_input_loss: str = "last",
        input_loss_after: float = 0.5,
        hold_fps: float = 30.0,
    ) -> None:
        if source is None and stream.config.mode != "txt2img":
            raise ValueError("img2img needs an input; give --input or use --mode txt2img.")
        if on_input_loss not in INPUT_LOSS_POLICIES:
            raise ValueError(
                f"on_input_loss must be one of {', '.join(INPUT_LOSS_POLICIES)}, "
                f"got {on_input_loss!r}."
            )
        self.on_input_loss = on_input_loss
        self.input_loss_after = input_loss_after
        self.hold_period = 1.0 / hold_fps
        self.stream = stream
        self.store = store
        self.source = source
        self.sinks = list(sinks)
        self.hooks = hooks or EngineHooks()
        self.metrics = metrics or Metrics()
        self.status_interval = status_interval
        self.transfer = HostTransfer(stream.device)
        self.input_slot = CountingSlot(lambda: self.metrics.count(drops=1))
        self.paused = False
        self._applied = -1
        self._prompt_fade: Fade | None = None
        self._noise_fade: Fade | None = None
        self._pending_seed: int | None = None
        self._prompts = PromptWorker(stream.encode_prompt, stream.device)
        self._reported_skips = 0
        self._sink_workers: list[SinkWorker] = []
        self._pending: PendingFrames | None = None
        self._last_frame: Frame | None = None
        self._last_input_at: float | None = None
        self._input_lost = False
        self._next_hold = 0.0
        self._good = stream.config
        self._failed_steps = 0

    def run(self, stop: threading.Event, max_frames: int | None = None) -> int:
        """Process frames until `stop` is set or after `max_frames` outputs; return the count."""
        self._sink_workers = [SinkWorker(sink, self.metrics, stop) for sink in self.sinks]
        workers: list[threading.Thread] = list(self._sink_workers)
        if self.source is not None:
            workers.append(SourceWorker(self.source, self.input_slot, stop))
        self._prompts.start()
        for worker in workers:
            worker.start()
        self.apply(self.store.snapshot())
        produced = 0
        next_status = now() + self.status_interval
        try:
            while not stop.is_set() and (max_frames is None or produced < max_frames):
                snapshot = self.store.snapshot()
                try:
                    if snapshot.version != self._applied:
                        self.apply(snapshot)
                    self._advance_fades()
                except ValueError as error:  # a change the store allowed but the stream refused
                    self._prompt_fade = self._noise_fade = None
                    self._report_error("/sd", str(error))
                if self._step():
                    produced += 1
                if now() >= next_status:
                    self._report_status()
                    next_status = now() + self.status_interval
        finally:
            if self._pending is not None:
                self._deliver(self._pending)
                self._pending = None
            self._wait_for_sinks()
            stop.set()
            self._prompts.stop()
            deadline = now() + JOIN_SECONDS
            for worker in workers:
                worker.join(max(0.0, deadline - now()))
        return produced

    def apply(self, snapshot: Snapshot) -> None:
        """Bring the pipeline in line with a snapshot of the store."""
        first = self._applied < 0
        changed = set(snapshot.values) if first else snapshot.changed_since(self._applied)
        self._applied = snapshot.version
        self.paused = bool(snapshot["pause"])
        settings = {
            target: snapshot[name] for name, target in STREAM_SETTINGS.items() if name in changed
        }
        if settings:
            try:
                self.stream.update(**settings)
            except (ValueError, RuntimeError) as error:
                self._fall_back(error)
            if self._noise_fade is not None and self._noise_fade.end.shape != (
                self.stream.current_noise().shape
            ):
                # The slots changed under a seed fade: land on its seed at once.
                self._noise_fade = None
                self.stream.update(seed=self._pending_seed)
        if "seed" in changed:
            self._change_seed(int(snapshot["seed"]), 0.0 if first else float(snapshot["seed_fade"]))
        if changed & {"prompt", "negative_prompt"}:
            fade = 0.0 if first else float(snapshot["prompt_fade"])
            self._prompts.request(str(snapshot["prompt"]), str(snapshot["negative_prompt"]), fade)

    def _change_seed(self, seed: int, fade_seconds: float) -> None:
        if fade_seconds <= 0:
            self._noise_fade = None
            self.stream.update(seed=seed)
            return
        target = self.stream.noise_for_seed(seed)
        self._noise_fade = Fade(self.stream.current_noise(), target, fade_seconds, now(), True)
        self._pending_seed = seed

    def _advance_fades(self) -> None:
        encoded = self._prompts.take()
        if encoded is not None:
            encoded.wait()
            if encoded.fade_seconds > 0:
                start = self.stream.current_embedding()
                self._prompt_fade = Fade(start, encoded.cond, encoded.fade_seconds, now(), False)
                self.stream.set_embeddings(self.stream.current_embedding(), encoded.uncond)
            else:
                self._prompt_fade = None
                self.stream.set_embeddings(encoded.cond, encoded.uncond)
        at = now()
        if self._prompt_fade is not None:
            self.stream.set_embeddings(self._prompt_fade.value(at))
            if self._prompt_fade.progress(at) >= 1.0:
                self._prompt_fade = None
        if self._noise_fade is not None:
            self.stream.set_noise(self._noise_fade.value(at))
            if self._noise_fade.progress(at) >= 1.0:
                self._noise_fade = None
                self.stream.update(seed=self._pending_seed)

    def _step(self) -> bool:
        """Launch the next frame, then deliver the previous one while the GPU works."""
        launched = None if self.paused else self._launch_guarded()
        if self._pending is not None:
            self._deliver(self._pending)
        self._pending = launched
        if self.paused:
            time.sleep(0.01)
        elif launched is None and self.source is not None:
            self._hold_output()
        return launched is not None

    def _launch_guarded(self) -> PendingFrames | None:
        """A frame step that fails (out of GPU memory after a change, say) is not the end."""
        try:
            launched = self._launch()
        except RuntimeError as error:
            self._failed_steps += 1
            if self._failed_steps > MAX_FAILED_STEPS:
                raise
            if self.stream.config != self._good:
                self._fall_back(error)
            else:
                self._report_error("/sd", f"a frame failed: {error}")
            return None
        if launched is not None:
            self._failed_steps = 0
            self._good = self.stream.config
        return launched

    def _fall_back(self, error: Exception) -> None:
        """Return to the last settings that produced frames, in the pipeline and the store."""
        good = self._good
        if self.stream.device.type == "cuda":
            torch.cuda.empty_cache()
        self.stream.update(**{target: getattr(good, target) for target in STREAM_SETTINGS.values()})
        self.store.set_many(
            {name: getattr(good, target) for name, target in STREAM_SETTINGS.items()}
        )
        self._applied = self.store.version
        self._report_error("/sd", f"{error}; back to the last settings that worked.")

    def _hold_output(self) -> None:
        """While the input is gone, keep the outputs alive with the last frame or black."""
        at = now()
        if self._last_frame is None or self._last_input_at is None:
            return
        if at - self._last_input_at < self.input_loss_after:
            return
        if not self._input_lost:
            self._input_lost = True
            what = "the last frame" if self.on_input_loss == "last" else "black"
            name = self.source.describe()
            self._report_error(
                "/sd/input", f"input {name} is gone; sending {what} until it returns."
            )
            if self.hooks.input_state is not None:
                self.hooks.input_state("lost")
        if at < self._next_hold:
            return
        self._next_hold = at + self.hold_period
        held = self._last_frame
        pixels = held.pixels if self.on_input_loss == "last" else _black_like(held)
        frame = Frame(pixels, held.pixel_format, at, held.index)
        for worker in self._sink_workers:
            worker.slot.put(frame)

    def _launch(self) -> PendingFrames | None:
        if self.stream.config.mode == "txt2img":
            started = now()
            output = self.stream.txt2img()
            return self.transfer.download(output, [started], "rgb", started)
        batch = self._take_input()
        if batch is None:
            return None
        started = self._last_input_at = now()
        if self._input_lost:
            self._input_lost = False
            log.info("input %s is back", self.source.describe())
            if self.hooks.input_state is not None:
                self.hooks.input_state("ok")
        pixel_format = batch[0].pixel_format
        stacked = np.stack([f.pixels for f in batch]) if len(batch) > 1 else batch[0].pixels
        output = self.stream.img2img(self.transfer.upload(stacked), pixel_format)
        times = [f.capture_time for f in batch]
        return self.transfer.download(output, times, pixel_format, started)

    def _deliver(self, pending: PendingFrames) -> None:
        pixels = pending.result()
        self.metrics.frame_done(now() - pending.started)
        for capture_time, image in zip(pending.capture_times, pixels, strict=True):
            frame = Frame(image, pending.pixel_format, capture_time, self.metrics.frames)
            for worker in self._sink_workers:
                worker.slot.put(frame)
            self._last_frame = frame

    def _take_input(self) -> list[Frame] | None:
        wanted = self.stream.config.frame_buffer_size
        batch: list[Frame] = []
        while len(batch) < wanted:
            frame = self.input_slot.take(timeout=min(0.05, self.hold_period / 2))
            if frame is None:
                return None
            if batch and frame.pixel_format != batch[0].pixel_format:
                frame = frame.to(batch[0].pixel_format)
            batch.append(frame)
        return batch

    def _report_status(self) -> None:
        skips = self.stream.frames_skipped - self._reported_skips
        if skips:
            self.metrics.count(skips=skips)
            self._reported_skips = self.stream.frames_skipped
        if self.hooks.status is not None:
            self.hooks.status(self.metrics.status())

    def _report_error(self, address: str, sentence: str) -> None:
        log.error("%s: %s", address, sentence)
        if self.hooks.error is not None:
            self.hooks.error(address, sentence)

    def _wait_for_sinks(self) -> None:
        """Give sinks a moment to write the last frames before they are stopped."""
        deadline = now() + 0.3
        for worker in self._sink_workers:
            while worker.slot.has_unread() and now() < deadline:
                time.sleep(0.005)


def _black_like(frame: Frame) -> np.ndarray:
    """A black picture of the frame's size and format, opaque where there is alpha."""
    pixels = np.zeros_like(frame.pixels)
    if frame.pixels.shape[2] == 4:
        pixels[..., 3] = 255
    return pixels
