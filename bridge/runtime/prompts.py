"""Prompt encoding off the frame path, and cross-fades of embeddings and noise."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class EncodedPrompt:
    """Embeddings of a prompt pair, ready once `ready` (a CUDA event, or None) has passed."""

    prompt: str
    negative_prompt: str
    cond: torch.Tensor
    uncond: torch.Tensor
    fade_seconds: float
    ready: torch.cuda.Event | None

    def wait(self) -> None:
        """Make the caller's CUDA stream wait for the encoding; a no-op on the CPU."""
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)


class NewestRequestWorker(threading.Thread, Generic[RequestT, ResultT]):
    """A thread that works on the newest request only, on a CUDA stream of its own on CUDA.

    A request made while another is worked on replaces any request still waiting; `take` hands
    out the newest result once. Subclasses say what the work is in `_work`, which returns None
    when there is nothing to hand out.
    """

    def __init__(self, name: str, device: torch.device) -> None:
        super().__init__(name=name, daemon=True)
        self._cuda_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._condition = threading.Condition()
        self._request: RequestT | None = None
        self._result: ResultT | None = None
        self._stopped = False
        self.results = 0

    def _ask(self, request: RequestT) -> None:
        with self._condition:
            self._request = request
            self._condition.notify()

    def take(self) -> ResultT | None:
        """The newest finished result, once."""
        with self._condition:
            result, self._result = self._result, None
            return result

    def stop(self) -> None:
        """End the thread after the work in progress."""
        with self._condition:
            self._stopped = True
            self._condition.notify()

    def run(self) -> None:
        while True:
            with self._condition:
                while self._request is None and not self._stopped:
                    self._condition.wait()
                if self._stopped:
                    return
                request, self._request = self._request, None
            result = self._work(request)
            if result is not None:
                with self._condition:
                    self._result = result
                    self.results += 1

    def _work(self, request: RequestT) -> ResultT | None:
        raise NotImplementedError


class PromptWorker(NewestRequestWorker[tuple[str, str, float], EncodedPrompt]):
    """Runs the text encoder on its own thread (and CUDA stream) so frames never wait for it.

    Only the newest request matters: a prompt sent while another is being encoded replaces any
    request still waiting. `encode(prompt, negative=...)` encodes as
    `StreamDiffusion.encode_prompt` does, a negative prompt with `negative=True`.
    """

    def __init__(self, encode: Callable[..., torch.Tensor], device: torch.device) -> None:
        super().__init__("prompt encoder", device)
        self._encode = encode

    def request(self, prompt: str, negative_prompt: str, fade_seconds: float) -> None:
        """Ask for a prompt pair to be encoded; replaces a request not yet started."""
        self._ask((prompt, negative_prompt, fade_seconds))

    def _work(self, request: tuple[str, str, float]) -> EncodedPrompt:
        return self._run_encoding(*request)

    def _run_encoding(self, prompt: str, negative: str, fade: float) -> EncodedPrompt:
        with torch.inference_mode():
            if self._cuda_stream is None:
                return EncodedPrompt(
                    prompt,
                    negative,
                    self._encode(prompt),
                    self._encode(negative, negative=True),
                    fade,
                    None,
                )
            with torch.cuda.stream(self._cuda_stream):
                cond = self._encode(prompt).clone()
                uncond = self._encode(negative, negative=True).clone()
                ready = torch.cuda.Event()
                ready.record(self._cuda_stream)
            return EncodedPrompt(prompt, negative, cond, uncond, fade, ready)


class Fade:
    """A transition from one tensor to another over `seconds`, sampled by wall-clock time."""

    def __init__(
        self, start: torch.Tensor, end: torch.Tensor, seconds: float, began: float, spherical: bool
    ) -> None:
        self.start = start.clone()
        self.end = end
        self.seconds = seconds
        self.began = began
        self.spherical = spherical

    def progress(self, at: float) -> float:
        """0 at the start, 1 when done."""
        if self.seconds <= 0:
            return 1.0
        return min(1.0, max(0.0, (at - self.began) / self.seconds))

    def value(self, at: float) -> torch.Tensor:
        """The blend at time `at`: linear for embeddings, spherical for Gaussian noise."""
        t = self.progress(at)
        if t >= 1.0:
            return self.end
        if self.spherical:
            return slerp(self.start, self.end, t)
        return torch.lerp(self.start, self.end, t)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation per leading slot, which keeps blended noise at unit variance."""
    flat_a = a.reshape(a.shape[0], -1).float()
    flat_b = b.reshape(b.shape[0], -1).float()
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1)).clamp_min(1e-8)
    theta = torch.arccos(cos.clamp(-1.0, 1.0)).unsqueeze(1)
    sin = torch.sin(theta)
    linear = sin.abs() < 1e-4
    weight_a = torch.where(linear, torch.full_like(theta, 1 - t), torch.sin((1 - t) * theta) / sin)
    weight_b = torch.where(linear, torch.full_like(theta, t), torch.sin(t * theta) / sin)
    mixed = weight_a * flat_a + weight_b * flat_b
    return mixed.reshape(a.shape).to(a.dtype)
