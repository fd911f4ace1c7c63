"""Model acceleration: CUDA graphs, torch.compile with a persistent cache, memory layout, and
float8 matrix products for the UNet (fp8.py)."""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from bridge.stream import StreamDiffusion

from .background import BackgroundCompile, CompiledNetworks
from .cudagraph import GraphedFrameStep
from .fp8 import quantize_unet
from .regions import compile_regions
from .text_graph import GraphedTextEncoders, graph_text_encoders

ACCEL_MODES = ("none", "cudagraph", "compile")
PRECISIONS = ("default", "fp8")
COMPILE_SCOPES = ("model", "blocks")

__all__ = [
    "ACCEL_MODES",
    "COMPILE_SCOPES",
    "PRECISIONS",
    "GraphedFrameStep",
    "GraphedTextEncoders",
    "accelerate",
    "default_compile_cache",
    "set_compile_stance",
    "use_compile_cache",
]

log = logging.getLogger(__name__)


def default_compile_cache() -> Path:
    """Where compiled kernels are kept between runs, so a second start skips most compilation."""
    root = os.environ.get("SD_BRIDGE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "sd-bridge"
    return base / "inductor"


def accelerate(
    stream: StreamDiffusion,
    mode: str = "cudagraph",
    *,
    precision: str = "default",
    compile_mode: str = "default",
    compile_scope: str = "model",
    live_compile: bool = True,
    compile_in_background: bool = False,
    say: Callable[[str], None] | None = None,
    cache_dir: Path | None = None,
) -> StreamDiffusion:
    """Make `stream` faster in place and return it.

    - "none": eager PyTorch (channels-last memory layout on CUDA).
    - "cudagraph": the frame step captured as one CUDA graph, replayed every frame, and the
      text encoders as another, replayed for each new prompt.
    - "compile": the UNet, ControlNets and VAE compiled by torch.compile (kernels cached in
      `cache_dir`), then captured as CUDA graphs as above.

    `precision` "fp8" turns the UNet's large linear layers into float8 products (fp8.py) before
    anything is compiled or captured; it needs an NVIDIA GPU of compute capability 8.9 or newer
    and an fp16 or bf16 model, and is refused in one sentence otherwise. "default" keeps the
    model's dtype.

    `compile_scope` says what "compile" compiles: "model", each network whole, or "blocks", each
    network's repeated blocks on their own (regions.py), which traces and compiles less.

    Under "compile", what the first frame step runs is compiled; a later live change that brings
    shapes or branches not compiled yet (the feature bank, the number of steps, the size) makes
    torch.compile trace and compile again before the next frame, a pause of seconds. With
    `live_compile` False such code runs uncompiled instead, inside the CUDA graph: no pause, a
    slower frame until the compiled shapes return. This is PyTorch's "eager_on_recompile" stance,
    set for the whole process once the first frame step is captured; so settings that change the
    shapes belong in the start settings then, not in OSC messages sent just after the start.

    With `compile_in_background` the first frames do not wait for the compile: they run
    uncompiled in a CUDA graph while a thread compiles (background.py), and the compiled networks
    take over between two frames once it is done; `say` is then told so in one sentence. A change
    of shapes made before that waits for the compile to finish. A feature bank at the start
    makes the first frame wait for the compile, as without `compile_in_background`.
    """
    if mode not in ACCEL_MODES:
        raise ValueError(f"accel mode {mode!r} is unknown; use one of {', '.join(ACCEL_MODES)}.")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}.")
    if compile_scope not in COMPILE_SCOPES:
        raise ValueError(
            f"compile scope {compile_scope!r} is unknown; use one of {', '.join(COMPILE_SCOPES)}."
        )
    if mode != "none" and stream.device.type != "cuda":
        raise ValueError(
            f'accel="{mode}" needs a CUDA GPU, but the pipeline runs on {stream.device}; '
            'use accel="none".'
        )
    if stream.device.type == "cuda":
        # Shapes are fixed while streaming, so cuDNN may pick the fastest convolutions once.
        torch.backends.cudnn.benchmark = True
        stream.unet.to(memory_format=torch.channels_last)
        stream.vae.to(memory_format=torch.channels_last)
        for controlnet in _controlnets(stream):
            controlnet.model.to(memory_format=torch.channels_last)
    if precision == "fp8":
        plan = quantize_unet(stream)
        log.info(plan.line())
    after_first_capture = None
    background = None
    if mode == "compile":
        # A stance left by an earlier pipeline of this process would stop this one compiling.
        set_compile_stance("default")
        cache_dir = cache_dir or default_compile_cache()
        networks = _compiled_networks(stream, compile_mode, compile_scope, cache_dir)
        if compile_in_background:
            background = BackgroundCompile(networks, stream.device)
        else:
            networks.install()
        if not live_compile:
            after_first_capture = functools.partial(set_compile_stance, "eager_on_recompile")
    if mode in ("cudagraph", "compile"):
        stream.accelerator = GraphedFrameStep(
            stream, after_first_capture=after_first_capture, background=background, say=say
        )
        graph_text_encoders(stream.prompts)
    return stream


def use_compile_cache(cache_dir: Path | None = None) -> None:
    """Keep what torch.compile makes in `cache_dir` (the default cache when None).

    Call it before anything is compiled in this process: Inductor reads its cache location from
    the environment when it first compiles.
    """
    cache_dir = cache_dir or default_compile_cache()
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def _compiled_networks(
    stream: StreamDiffusion, compile_mode: str, scope: str, cache_dir: Path
) -> CompiledNetworks:
    """Compiled stand-ins for the pipeline's UNet, ControlNets and VAE; their first calls compile.

    Nothing of the pipeline changes until `install`; other pipelines sharing the components keep
    running the networks as they are, since every stand-in is a new object (the VAE a copy).
    """
    use_compile_cache(cache_dir)
    options = {"mode": compile_mode, "fullgraph": False, "dynamic": False}
    controlnets = _controlnets(stream)
    if scope == "blocks":
        unet, blocks = compile_regions(stream.unet, **options)
        models = []
        for controlnet in controlnets:
            model, more = compile_regions(controlnet.model, **options)
            models.append(model)
            blocks += more
        vae, more = compile_regions(stream.vae, **options)
        log.info("compiling %d blocks", blocks + more)
        encoder, decoder = vae.encoder, vae.decoder
    else:
        unet = torch.compile(stream.unet, **options)
        models = [torch.compile(controlnet.model, **options) for controlnet in controlnets]
        vae = copy.deepcopy(stream.vae)
        encoder = vae.encoder = torch.compile(vae.encoder, **options)
        decoder = vae.decoder = torch.compile(vae.decoder, **options)
    pairs = [(stream.unet, unet), (stream.vae.encoder, encoder), (stream.vae.decoder, decoder)]
    pairs += [(c.model, model) for c, model in zip(controlnets, models, strict=True)]

    def install() -> None:
        stream.unet, stream.vae = unet, vae
        for controlnet, model in zip(controlnets, models, strict=True):
            controlnet.model = model

    return CompiledNetworks(pairs, install)


def set_compile_stance(stance: str) -> None:
    """torch.compile's stance for the whole process ("default", "eager_on_recompile", ...);
    PyTorch before 2.6 has none and always compiles."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is not None:
        set_stance(stance)


def _controlnets(stream: StreamDiffusion) -> list:
    """The pipeline's ControlNets (each with its `model`), none without any."""
    return [] if stream.controlnets is None else stream.controlnets.controlnets
