"""The engine loop: the only place where transports, parameters and the pipeline meet.

Between two frames the engine takes one snapshot of the parameter store and applies what
changed, so a burst of OSC messages never leaves the pipeline half-updated. Prompts are encoded
on a worker thread and swapped in when ready; fades move a little every frame.

With `frame_buffer_size` f > 1 a step takes f input frames. The batch fills across loop
iterations, one frame per look at the input slot, so a live source at any rate fills it; a
partial batch is thrown away (and counted as drops) only when the input goes away or the frame
size changes. Whether the input is gone is judged on frames arriving, not on batches launched.

Frames leave as soon as the GPU is done with them: a delivery thread (delivery.py) waits on each
launched step and hands its frames to the sinks, in launch order, while this loop goes back to
the input. The loop launches the next step at once when the GPU is free, and otherwise when the
running step is about to end, so that the GPU stays busy without frames queueing behind it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from bridge.control import ParamStore, Snapshot
from bridge.control.params import LORA_SCALES, STREAM_PARAMS
from bridge.io import Frame, Sink, Source, now
from bridge.stream import StreamDiffusion

from .delivery import Delivery
from .metrics import Metrics, Status
from .prompts import Fade, PromptWorker
from .transfer import HostTransfer, PendingFrames
from .workers import CountingSlot, SinkWorker, SourceWorker, join_while_progressing

if TYPE_CHECKING:
    from bridge.models.live_lora import LiveLoras

    from .controlnets import ControlInputs
    from .image_prompt import ImagePromptInput

log = logging.getLogger("sd_bridge")

JOIN_SECONDS = 1.0
# How long one look for the moment to launch may keep the loop from changes and the stop event.
LAUNCH_WAIT = 0.05
# A sink that writes nothing for this long while finishing is left behind (a recording is
# given as long as it needs, provided it makes progress).
SINK_STALL_SECONDS = 2.0


INPUT_LOSS_POLICIES = ("last", "black")
MAX_FAILED_STEPS = 20


@dataclass
class EngineHooks:
    """Where the engine reports to: the status line and the OSC feedback, all optional.

    `error(address, sentence)` shows and sends a sentence; without it the engine logs the
    sentence itself, so each is printed once. `input_state` gets "waiting" (no frame since the
    start), "lost" (no frame for `input_loss_after` seconds) and "ok" (frames arrive again).
    """

    status: Callable[[Status], None] | None = None
    error: Callable[[str, str], None] | None = None
    input_state: Callable[[str], None] | None = None


class Engine:
    """Runs the pipeline on frames from one source and hands results to every sink.

    `loras` are the LoRA adapters loaded live; their scales follow the store's
    `lora_<index>_scale` values. `image_prompt` is the IP-Adapter's picture and scale, which
    follow its source and the store's `ip_adapter_scale`.
    `controls` drives the pipeline's ControlNets: their live values,
    and the newest frame of each control input, copied in before each launch.
    """

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
        loras: LiveLoras | None = None,
        image_prompt: ImagePromptInput | None = None,
        controls: ControlInputs | None = None,
    ) -> None:
        if source is None and stream.config.mode != "txt2img":
            raise ValueError('img2img needs a source; pass one, or use mode="txt2img".')
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
        self.loras = loras
        self._lora_names = {
            LORA_SCALES.name.format(index=index): index for index in range(len(loras or ()))
        }
        self.image_prompt = image_prompt
        self.controls = controls
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
        self._delivery = Delivery(self._deliver)
        self._finish = threading.Event()
        self._batch: list[Frame] = []
        self._delivered = 0
        self._last_frame: Frame | None = None
        self._last_input_at = now()
        self._input_state = "starting"
        self._next_hold = 0.0
        self._good = stream.config
        self._failed_steps = 0

    def run(self, stop: threading.Event, max_frames: int | None = None) -> int:
        """Process frames until `stop` is set or after `max_frames` outputs; return the count.

        On return every sink has written every frame counted (unless it stalled for
        SINK_STALL_SECONDS) and is closed.
        """
        self._finish.clear()
        self._sink_workers = [SinkWorker(sink, self.metrics, self._finish) for sink in self.sinks]
        workers: list[threading.Thread] = []
        if self.source is not None:
            workers.append(SourceWorker(self.source, self.input_slot, stop))
        self._prompts.start()
        if self.image_prompt is not None:
            self.image_prompt.start(stop)
        for worker in [*self._sink_workers, *workers]:
            worker.start()
        self._delivery.start()
        if self.controls is not None:
            self.controls.start(stop, self._report_error)
        self._last_input_at = now()
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
                    if self.image_prompt is not None:
                        self.image_prompt.advance()
                    if self.controls is not None:
                        self.controls.poll()
                except ValueError as error:  # a change the store allowed but the stream refused
                    self._prompt_fade = self._noise_fade = None
                    self._report_error("/sd", str(error))
                room = None if max_frames is None else max_frames - produced
                produced += self._step(room)
                if now() >= next_status:
                    self._report_status()
                    next_status = now() + self.status_interval
        finally:
            self._delivery.finish(SINK_STALL_SECONDS)
            stop.set()
            self._prompts.stop()
            if self.image_prompt is not None:
                self.image_prompt.stop()
            self._finish_sinks()
            deadline = now() + JOIN_SECONDS
            for worker in workers:
                worker.join(max(0.0, deadline - now()))
            if self.controls is not None:
                self.controls.join()
        return produced

    def apply(self, snapshot: Snapshot) -> None:
        """Bring the pipeline in line with a snapshot of the store."""
        first = self._applied < 0
        changed = set(snapshot.values) if first else snapshot.changed_since(self._applied)
        self._applied = snapshot.version
        self.paused = bool(snapshot["pause"])
        # The seed is the one pipeline field that goes through a fade of its own.
        settings = {
            name: snapshot[name] for name in STREAM_PARAMS if name in changed and name != "seed"
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
        if self.image_prompt is not None and "ip_adapter_scale" in changed:
            self.image_prompt.set_scale(float(snapshot["ip_adapter_scale"]))
        if "seed" in changed:
            self._change_seed(int(snapshot["seed"]), 0.0 if first else float(snapshot["seed_fade"]))
        retext = False
        for name in changed & self._lora_names.keys():
            retext |= self.loras.set_scale(self._lora_names[name], float(snapshot[name]))
        if retext:
            # A LoRA on the text encoder moved: cached embeddings are stale, and the prompt is
            # encoded again off the hot path, like a prompt change, and cut to when ready.
            self.stream.prompts.forget()
        if self.controls is not None:
            self.controls.apply(snapshot, changed)
        if retext or changed & {"prompt", "negative_prompt"}:
            fade = 0.0 if first or retext else float(snapshot["prompt_fade"])
            self._prompts.request(str(snapshot["prompt"]), str(snapshot["negative_prompt"]), fade)

    def _change_seed(self, seed: int, fade_seconds: float) -> None:
        # Fresh and drifting noise replace the noise every frame, so a fade would go nowhere.
        if fade_seconds <= 0 or self.stream.config.noise != "fixed":
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

    def _step(self, room: int | None = None) -> int:
        """Launch the next frames once the GPU is free or about to be; return how many.

        The delivery thread hands them to the sinks when the GPU is done with them. At most
        `room` frames are launched (the rest are dropped).
        """
        if self._delivery.error is not None:
            raise self._delivery.error
        if self.paused:
            time.sleep(0.01)
            return 0
        if self._may_launch() and not self._delivery.wait_for_launch(LAUNCH_WAIT):
            return 0
        launched = self._launch_guarded()
        if launched is None:
            if self.source is not None:
                self._watch_input()
            return 0
        if room is not None and len(launched.capture_times) > room:
            self.metrics.count(drops=len(launched.capture_times) - room)
            launched.capture_times = launched.capture_times[:room]
        self._delivery.put(launched, now() - launched.started)
        return len(launched.capture_times)

    def _may_launch(self) -> bool:
        """Whether the next look at the input may launch a step, not just add to a batch.

        A frame that only joins a filling batch is taken at once, so no input frame is lost
        while a step runs; the frame that completes a batch waits for the moment to launch.
        """
        config = self.stream.config
        return config.mode == "txt2img" or len(self._batch) + 1 >= config.frame_buffer_size

    def _launch_guarded(self) -> PendingFrames | None:
        """A frame step that fails (out of GPU memory after a change, say) is not the end.

        Any exception counts, a bug included: one bad configuration must not end a set. Only
        `MAX_FAILED_STEPS` failures in a row stop the engine.
        """
        try:
            launched = self._launch()
        except Exception as error:
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
        restored = {name: getattr(good, name) for name in STREAM_PARAMS}
        self.stream.update(**restored)
        self.store.set_many(restored)
        self._applied = self.store.version
        self._report_error("/sd", f"{error}; back to the last settings that worked.")

    def _watch_input(self) -> None:
        """No batch this time: say when the input is missing and keep the outputs alive."""
        at = now()
        if at - self._last_input_at < self.input_loss_after:
            return
        if self._batch:  # too old to finish: it would join frames from before and after a gap
            self.metrics.count(drops=len(self._batch))
            self._batch = []
        name = self.source.describe()
        if self._input_state == "starting":
            self._set_input_state("waiting", f"waiting for input {name}; no frame yet.")
        elif self._input_state == "ok":
            what = "the last frame" if self.on_input_loss == "last" else "black"
            self._set_input_state("lost", f"input {name} is gone; sending {what} until it returns.")
        if self._last_frame is None or at < self._next_hold:
            return
        self._next_hold = at + self.hold_period
        held = self._last_frame
        pixels = held.pixels if self.on_input_loss == "last" else _black_like(held)
        # A held frame keeps its capture time: it shows the same moment again, so latency
        # statistics skip it. Recordings get only the frames the engine made.
        frame = Frame(pixels, held.pixel_format, held.capture_time, held.index)
        for worker in self._sink_workers:
            if not worker.sink.keeps_every_frame:
                worker.slot.put(frame)

    def _set_input_state(self, state: str, sentence: str) -> None:
        self._input_state = state
        self._report_error("/sd/input", sentence)
        if self.hooks.input_state is not None:
            self.hooks.input_state(state)

    def _input_arrived(self) -> None:
        """A frame came from the source: note when, and say so if it had been missing."""
        self._last_input_at = now()
        if self._input_state in ("ok", "starting"):
            self._input_state = "ok"
            return
        came = "is back" if self._input_state == "lost" else "delivers frames"
        self._input_state = "ok"
        log.warning("input %s %s.", self.source.describe(), came)
        if self.hooks.input_state is not None:
            self.hooks.input_state("ok")

    def _launch(self) -> PendingFrames | None:
        if self.stream.config.mode == "txt2img":
            started = now()
            output = self.stream.txt2img()
            return self.transfer.download(output, [started], "rgb", started)
        batch = self._take_input()
        if batch is None:
            return None
        started = now()
        pixel_format = batch[0].pixel_format
        stacked = np.stack([f.pixels for f in batch]) if len(batch) > 1 else batch[0].pixels
        output = self.stream.img2img(self.transfer.upload(stacked), pixel_format)
        times = [f.capture_time for f in batch]
        return self.transfer.download(output, times, pixel_format, started)

    def _deliver(self, pending: PendingFrames, step_seconds: float) -> None:
        """Hand a finished step's frames to every sink; runs on the delivery thread."""
        pixels = pending.result()[: len(pending.capture_times)]
        self.metrics.frame_done(step_seconds, len(pending.capture_times))
        for capture_time, image in zip(pending.capture_times, pixels, strict=True):
            frame = Frame(image, pending.pixel_format, capture_time, self._delivered)
            self._delivered += 1
            for worker in self._sink_workers:
                worker.slot.put(frame)
            self._last_frame = frame

    def _take_input(self) -> list[Frame] | None:
        """The next full batch of `frame_buffer_size` frames, or None while it is filling.

        Takes at most one frame per call, so the loop goes on applying changes and watching the
        input between two frames of one batch.
        """
        frame = self.input_slot.take(timeout=min(0.05, self.hold_period / 2))
        if frame is None:
            return None
        self._input_arrived()
        batch = self._batch
        if batch and frame.pixels.shape[:2] != batch[0].pixels.shape[:2]:
            self.metrics.count(drops=len(batch))  # a new size cannot share a step with the old
            batch.clear()
        if batch and frame.pixel_format != batch[0].pixel_format:
            frame = frame.to(batch[0].pixel_format)
        batch.append(frame)
        wanted = self.stream.config.frame_buffer_size
        if len(batch) > wanted:  # frame_buffer_size went down: keep the newest frames
            self.metrics.count(drops=len(batch) - wanted)
            del batch[:-wanted]
        if len(batch) < wanted:
            return None
        self._batch = []
        return batch

    def _report_status(self) -> None:
        skips = self.stream.frames_skipped - self._reported_skips
        if skips:
            self.metrics.count(skips=skips)
            self._reported_skips = self.stream.frames_skipped
        if self.hooks.status is not None:
            self.hooks.status(self.metrics.status())

    def _report_error(self, address: str, sentence: str) -> None:
        if self.hooks.error is not None:
            self.hooks.error(address, sentence)
        else:
            log.warning("%s", sentence)

    def _finish_sinks(self) -> None:
        """Let every sink write what it was given and close; wait while each makes progress."""
        self._finish.set()
        for worker in self._sink_workers:
            if not join_while_progressing(
                worker, lambda worker=worker: worker.written, SINK_STALL_SECONDS
            ):
                log.warning(
                    "output %s wrote nothing for %.0f s while stopping; its last frames are lost.",
                    worker.sink.describe(),
                    SINK_STALL_SECONDS,
                )


def _black_like(frame: Frame) -> np.ndarray:
    """A black picture of the frame's size and format, opaque where there is alpha."""
    pixels = np.zeros_like(frame.pixels)
    if frame.pixels.shape[2] == 4:
        pixels[..., 3] = 255
    return pixels
