"""Compile the networks on a thread of their own while the uncompiled frame step serves frames.

Under torch.compile a start waits for its first frame even with a warm compile cache: Dynamo
traces the networks' Python code again on every start (about 10 s for SD 2.1 on an H200,
docs/benchmarks.md, "Start-up"), and with an empty cache Inductor compiles for a minute or more.
With the compile in the background the frame step is captured uncompiled at once, and frames flow
at CUDA-graph speed meanwhile. The warm-up before that capture records each network call the
frame step makes (its arguments, copied), and a thread makes the same calls on the compiled
stand-ins, on a CUDA stream of its own, which traces and compiles them or loads them from the
cache. When it is done, the frame step puts the compiled networks in place between two frames
and captures again. The recorded arguments have the shapes, dtypes, strides and Python values of
the real calls, so that capture finds them compiled and traces nothing.

The thread and the frames share the networks' weights, which neither writes, and nothing else:
the arguments are copies and the thread's outputs are dropped. Python state that a network reads
while it runs (the feature bank's switch, torch.compile's stance while a bank fills) is set only
when the networks run outside a graph, so `GraphedFrameStep` lets no such run start while the
thread works (`settle`): a change of shapes made during the compile waits for its end.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

log = logging.getLogger(__name__)

# Calls recorded per network; a frame step makes one to four (stream batch, guidance, ControlNet).
MAX_CALLS = 8
# Python's thread switch interval while the thread compiles, in seconds. Tracing holds the GIL for
# the whole default interval (5 ms) each time, and a frame gives the GIL up several times (each
# wait for the GPU), so at the default every frame waited about that long again to go on.
SWITCH_INTERVAL = 0.0005


@dataclass
class CompiledNetworks:
    """Compiled stand-ins for a pipeline's networks, not in place yet.

    `pairs` holds each network the frame step calls now with the compiled callable that takes the
    same arguments; `install` puts all of them in place.
    """

    pairs: list[tuple[nn.Module, Callable[..., Any]]]
    install: Callable[[], None]


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    inference: bool
    grad: bool


class BackgroundCompile:
    """Records the networks' calls once, then makes them on the compiled stand-ins on a thread.

    Life: `recording()` around one eager frame step, `start()`, then `done` tells when the
    thread has finished; `wait()` blocks until then. `error` is what stopped it, if anything;
    `seconds` how long it worked.
    """

    def __init__(self, networks: CompiledNetworks, device: torch.device) -> None:
        self.networks = networks
        self.device = device
        self.calls: list[list[_Call]] = [[] for _ in networks.pairs]
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def recorded(self) -> int:
        return sum(len(calls) for calls in self.calls)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record (copies of) the arguments of the networks' calls made inside."""
        handles = []
        for (network, _), calls in zip(self.networks.pairs, self.calls, strict=True):

            def keep(module: nn.Module, args: tuple, kwargs: dict, calls=calls) -> None:
                if len(calls) < MAX_CALLS:
                    copied_args, copied_kwargs = _copied((args, kwargs))
                    grad = torch.is_grad_enabled()
                    inference = torch.is_inference_mode_enabled()
                    calls.append(_Call(copied_args, copied_kwargs, inference, grad))

            handles.append(network.register_forward_pre_hook(keep, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def start(self) -> None:
        """Start the thread; the recorded copies are ordered after the work queued so far."""
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        thread = threading.Thread(
            target=self._run, args=(ready,), name="background compile", daemon=True
        )
        _switch_faster(True)
        try:
            thread.start()
        except BaseException:
            _switch_faster(False)
            raise
        self._thread = thread

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the thread has finished (True) or `timeout` seconds passed (False)."""
        return self._finished.wait(timeout)

    def _run(self, ready: torch.cuda.Event | None) -> None:
        started = time.perf_counter()
        side = None
        try:
            if self.device.type == "cuda":
                side = torch.cuda.Stream(self.device)
                side.wait_event(ready)
                with torch.cuda.device(self.device), torch.cuda.stream(side):
                    self._make_calls()
            else:
                self._make_calls()
        except BaseException as error:  # reported by whoever adopts the result
            self.error = error
        finally:
            # The copies go back to the allocator only once no kernel of the thread reads them.
            if side is not None:
                with suppress(RuntimeError):
                    side.synchronize()
            self.calls = [[] for _ in self.networks.pairs]
            self.seconds = time.perf_counter() - started
            _switch_faster(False)
            self._finished.set()

    def _make_calls(self) -> None:
        for (_, compiled), calls in zip(self.networks.pairs, self.calls, strict=True):
            for call in calls:
                with torch.inference_mode(call.inference), torch.set_grad_enabled(call.grad):
                    compiled(*call.args, **call.kwargs)


_switching = threading.Lock()
_compiling = 0  # threads compiling now
_usual_interval = 0.0  # the switch interval before the first of them started


def _switch_faster(on: bool) -> None:
    """Lower Python's thread switch interval while any thread compiles; put it back after the
    last one ends."""
    global _compiling, _usual_interval
    with _switching:
        if on:
            if _compiling == 0:
                _usual_interval = sys.getswitchinterval()
                sys.setswitchinterval(min(SWITCH_INTERVAL, _usual_interval))
            _compiling += 1
        else:
            _compiling -= 1
            if _compiling == 0:
                sys.setswitchinterval(_usual_interval)


def _copied(tree: Any) -> Any:
    """`tree` with each tensor replaced by a copy of the same shape, dtype, device and strides,
    an inference tensor where it was one.

    A tensor whose elements overlap in memory (an expanded view) cannot be copied stride for
    stride, and is kept as it is: the thread only reads it. Tensors that appear twice stay one.
    """
    memo: dict[int, Any] = {}

    def copy(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) not in memo:
            # Dynamo tells inference tensors from others (the prompt's embeddings are not one).
            with torch.inference_mode(value.is_inference()):
                fresh = torch.empty_strided(
                    value.shape, value.stride(), dtype=value.dtype, device=value.device
                )
                try:
                    fresh.copy_(value)
                except RuntimeError:
                    fresh = value
            memo[id(value)] = fresh
        return memo[id(value)]

    return tree_map(copy, tree)


def adopted(job: BackgroundCompile, say: Callable[[str], None] | None) -> bool:
    """Put a finished `job`'s compiled networks in place; False, with a warning, if it failed."""
    if job.error is not None:
        log.warning(
            "compiling in the background failed (%s: %s); frames stay uncompiled, replayed as a "
            "CUDA graph. Compile with compile_in_background off to see where it fails.",
            type(job.error).__name__,
            job.error,
        )
        return False
    job.networks.install()
    if say is not None:
        say(f"compiled in the background in {job.seconds:.1f} s; frames now run compiled")
    return True
