"""Replay the text encoders as one CUDA graph, so that a new prompt costs less than a frame.

Eagerly, CLIP's text encoder at batch 1 is a few hundred small kernels, each launched from Python:
on a fast GPU the launches, not the maths, set the time, and SDXL runs two such encoders. The
token ids always have the tokenizer's fixed length (77 for CLIP), so every shape is known in
advance: the encoders' forward (through `PromptEncoder.embed_ids`, SDXL's packing included) is
captured once at start, on a stream of its own, and each new prompt only copies its ids into the
graph's input and replays it. The tokenizer stays on the host.

Prompts are encoded on the prompt worker's thread and stream, and at times on the main thread
(`StreamDiffusion.set_prompt`). A replay writes the graph's one output tensor, so replays are
taken one at a time, and each waits on the GPU for the copy-out of the replay before it, which
may have been queued on another stream.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Sequence

import torch

from bridge.stream import PromptEncoder

log = logging.getLogger(__name__)


class GraphedTextEncoders:
    """A drop-in for `PromptEncoder.embed_ids` that captures it once and replays it."""

    def __init__(self, encoder: PromptEncoder, warmup_steps: int = 2) -> None:
        device = encoder.device
        if device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need the text encoder on a CUDA device, it is on {device}; "
                'use accel="none" on this machine.'
            )
        self.encoder = encoder
        self.device = device
        self.replays = 0
        self._lock = threading.Lock()
        self._copied_out = torch.cuda.Event()
        self._static_ids = [ids.to(device) for ids in encoder.token_ids("")]
        self._graph, self._static_out = self._capture(warmup_steps)

    @torch.inference_mode()
    def __call__(self, ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """The embedding of `ids`, a new tensor; ids of another shape run eagerly."""
        if [tuple(t.shape) for t in ids] != [tuple(t.shape) for t in self._static_ids]:
            return self.encoder.embed_ids(ids)
        stream = torch.cuda.current_stream(self.device)
        with self._lock:
            stream.wait_event(self._copied_out)
            for static, new in zip(self._static_ids, ids, strict=True):
                static.copy_(new, non_blocking=True)
            self._graph.replay()
            embedding = self._static_out.clone()
            self._copied_out.record(stream)
            self.replays += 1
        return embedding

    @torch.inference_mode()
    def _capture(self, warmup_steps: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        # Warm-up runs lazy initialisation (cuBLAS handles, attention kernels) outside the graph.
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self.encoder.embed_ids(self._static_ids)
        side.synchronize()
        graph = torch.cuda.CUDAGraph()
        # As for the frame step (cudagraph.py): a graph freed during capture breaks it.
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, stream=side):
                static_out = self.encoder.embed_ids(self._static_ids)
        finally:
            if collecting:
                gc.enable()
        return graph, static_out


def graph_text_encoders(encoder: PromptEncoder) -> bool:
    """Have `encoder` replay its text encoders as a CUDA graph; True if it now does.

    Off CUDA it stays eager. So does it, with a warning, when the capture fails (a text encoder
    of some library version that reads a value back mid-forward): slower prompts, not no start.
    """
    if encoder.device.type != "cuda":
        return False
    try:
        encoder.accelerator = GraphedTextEncoders(encoder)
    except RuntimeError as error:
        log.warning("prompts are encoded eagerly: capturing the text encoders failed (%s).", error)
        return False
    return True
