"""Start a whole bridge from its settings: the one place that joins models, accel, stream, io and
control.

What can be checked without torch is checked first (values, URIs, the OSC port), so a typo is
reported in a second rather than after the model has loaded. Errors raised here name Python
settings (`accel="none"`); the CLI translates them into flags.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from bridge.control import OscServer, OscServerError, ParamStore
from bridge.control.osc_server import parse_target
from bridge.control.params import LORA_SCALES
from bridge.io import Sink, Source, TransportError, now, open_sink, open_source
from bridge.io.transports import check_uri
from bridge.runtime.controlnets import (
    ControlInputs,
    check_controlnets,
    controlnet_families,
    load_controlnets,
)
from bridge.runtime.image_prompt import IMAGE_TOPIC, check_image_prompt, load_image_prompt
from bridge.runtime.settings import parse_lora

if TYPE_CHECKING:
    from bridge.accel.choice import AccelChoice

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class StartError(ValueError):
    """The bridge could not start, told as one sentence naming the setting and the fix."""


def pick_device(name: str = "auto") -> Any:
    """The torch device `name` names; "auto" is CUDA, then Apple's MPS, then the CPU."""
    import torch

    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError:
            raise StartError(
                f"device={name!r} is not a device; use cuda, cuda:1, mps, cpu or auto."
            ) from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: Any) -> Any:
    """The torch dtype `name` names; "auto" is fp16 on CUDA and fp32 elsewhere."""
    import torch

    if name == "auto":
        name = "fp16" if device.type == "cuda" else "fp32"
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in dtypes:
        raise StartError(f"dtype={name!r} is unknown; use one of {', '.join(dtypes)}.")
    return dtypes[name]


def pick_accel(name: str, device: Any) -> AccelChoice:
    """The acceleration mode to run `device` with, and why; "auto" is the fastest that works.

    See `bridge.accel.choice`: compile where CUDA and a matching Triton are present and a test
    kernel compiles, else cudagraph on CUDA, else none. Triton is only looked for, and the test
    kernel only tried, where compile could be used.
    """
    import torch

    from bridge.accel.choice import choose_accel, compile_support, find_triton, try_compile

    version, platform = torch.__version__, sys.platform
    looks = device.type == "cuda" and name in ("auto", "compile")
    triton = find_triton() if looks else None
    kernel_error = None
    if looks and compile_support(True, triton, version, platform)[0]:
        kernel_error = try_compile(device)
    try:
        return choose_accel(name, device.type, triton, version, platform, kernel_error)
    except ValueError as error:
        raise StartError(str(error)) from None


def check_settings(settings: Any) -> list[tuple[str, float]]:
    """Check what can be checked before anything opens; return the parsed LoRA entries."""
    if settings.mode == "img2img":
        check_uri(settings.input, "source")
    for uri in settings.output:
        check_uri(uri, "sink")
    for target in settings.osc_feedback:
        parse_target(target)
    check_image_prompt(settings)
    return [parse_lora(text) for text in settings.lora]


def run_bridge(
    settings: Any,
    *,
    say: Callable[[str], None] | None = None,
    status: Callable[[Any], None] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run a bridge with `settings` (a `RunSettings`) until stopped; return the exit code.

    `say` prints one line for the user (standard error by default); `status` receives each
    status report. Start-up problems are said in one sentence and give exit code 2; Ctrl-C
    during start-up stops quietly with 130.
    """
    started = now()
    say = say or _say
    stop = stop or threading.Event()
    _show_logs(logging.WARNING if settings.quiet else logging.INFO)
    source: Source | None = None
    sinks: list[Sink] = []
    osc: OscServer | None = None
    controls: ControlInputs | None = None
    try:
        try:
            loras = check_settings(settings)
            controlnets = check_controlnets(settings.controlnet, settings.mode)
            live_scales = [] if settings.fuse_loras else [scale for _, scale in loras]
            families = {LORA_SCALES: live_scales, **controlnet_families(controlnets)}
            store = ParamStore(settings.store_values(), families=families)
            osc = _start_osc(settings, store, stop)
            if settings.mode == "img2img":
                source = open_source(
                    settings.input, width=settings.width, height=settings.height, fps=settings.fps
                )
            for uri in settings.output:
                sinks.append(
                    open_sink(uri, width=settings.width, height=settings.height, fps=settings.fps)
                )
            controls = ControlInputs.open(
                controlnets, settings.width, settings.height, settings.fps
            )
            engine = _build_engine(
                settings, loras, store, source, sinks, osc, say, status, controls, started
            )
        except (ValueError, FileNotFoundError, TransportError, OscServerError) as error:
            say(f"sd-bridge: {error}")
            _close_all(source, sinks, osc)
            if controls is not None:
                controls.close()
            return EXIT_USAGE
    except KeyboardInterrupt:
        say("sd-bridge: stopped during start-up.")
        _close_all(source, sinks, osc)
        if controls is not None:
            controls.close()
        return EXIT_INTERRUPTED
    return _serve(engine, settings, source, osc, stop, say)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _show_logs(level: int) -> None:
    """Print the bridge's own log lines (engine, transports, OSC) bare on standard error."""
    for name in ("sd_bridge", "bridge"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(handler, "sd_bridge", False) for handler in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler.sd_bridge = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.propagate = False


def _start_osc(settings: Any, store: ParamStore, stop: threading.Event) -> OscServer | None:
    if not settings.osc:
        return None
    osc = OscServer(
        store,
        settings.osc_host,
        settings.osc_port,
        allow=list(settings.osc_allow),
        feedback=[parse_target(target) for target in settings.osc_feedback],
        on_quit=stop.set,
    )
    osc.start()
    return osc


def _build_engine(
    settings: Any,
    loras: Sequence[tuple[str, float]],
    store: ParamStore,
    source: Source | None,
    sinks: Sequence[Sink],
    osc: OscServer | None,
    say: Callable[[str], None],
    status: Callable[[Any], None] | None,
    controls: ControlInputs,
    started: float,
) -> Any:
    """Load the model and prepare the accelerated stream: the slow part of start-up.

    The engine's metrics count from `started`, so that the first frame out says how long the
    whole start took (model load, compile, capture), the number a warm compile cache shortens.
    """
    import torch

    from bridge.accel import accelerate
    from bridge.accel.fp8 import check_fp8
    from bridge.runtime.engine import Engine, EngineHooks
    from bridge.runtime.metrics import Metrics
    from bridge.stream import StreamDiffusion

    config = settings.stream_config()
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    accel = pick_accel(settings.accel, device)
    if settings.precision == "fp8":
        # Before the model loads: a GPU without float8 products is told so at once.
        check_fp8(device, dtype)
    if not settings.quiet:
        say(f"loading {settings.model} on {device} ({str(dtype).removeprefix('torch.')})")
    components, live_loras = load_model(settings, loras, device, dtype)
    if live_loras is not None and not settings.quiet:
        for index, adapter in enumerate(live_loras.adapters):
            address = LORA_SCALES.address.format(index=index)
            say(f"LoRA {adapter.path.name} at scale {live_loras.scale(index)}, live at {address}")
    # The IP-Adapter goes on the UNet before the pipeline is built, which finds it there.
    image_prompt = load_image_prompt(
        settings,
        components,
        say=None if osc is None else lambda sentence: osc.report_error(IMAGE_TOPIC, sentence),
    )
    if image_prompt is not None and not settings.quiet:
        say(image_prompt.describe())
    controlnets = load_controlnets(
        controls.entries,
        components,
        device=device,
        dtype=dtype,
        download=settings.download,
        say=None if settings.quiet else say,
    )
    if not settings.quiet:
        precision = "" if settings.precision == "default" else f", precision {settings.precision}"
        scope = ""
        if settings.compile_scope != "model" and accel.mode == "compile":
            scope = f", compiling {settings.compile_scope}"
        say(accel.line() + precision + scope)
        unused = []  # settings that only torch.compile reads
        if settings.compile_scope != "model":
            unused.append(f'compile scope "{settings.compile_scope}"')
        if not settings.live_compile:
            unused.append("live compile off")
        if settings.background_compile:
            unused.append("background compile on")
        if unused and accel.mode != "compile":
            verb = "has" if len(unused) == 1 else "have"
            named = unused[0] if len(unused) == 1 else f"{', '.join(unused[:-1])} and {unused[-1]}"
            say(f"note: {named} {verb} no effect: accel is {accel.mode}, not compile.")
    with torch.inference_mode():
        stream = accelerate(
            StreamDiffusion(
                components,
                config,
                prompt=settings.prompt,
                negative_prompt=settings.negative_prompt,
                controlnets=controlnets,
            ),
            accel.mode,
            precision=settings.precision,
            compile_scope=settings.compile_scope,
            live_compile=settings.live_compile,
            compile_in_background=settings.background_compile,
            say=None if settings.quiet else say,
        )
    controls.attach(stream.controlnets)

    def report(report_status: Any) -> None:
        if status is not None:
            status(report_status)
        elif not settings.quiet:
            say(report_status.line())
        if osc is not None:
            osc.publish_status(
                report_status.fps,
                report_status.latency_ms,
                report_status.drops,
                report_status.skips,
            )

    def first_frame(seconds: float) -> None:
        say(f"first frame after {seconds:.1f} s")

    hooks = EngineHooks(
        status=report,
        error=osc.report_error if osc is not None else None,
        input_state=osc.publish_input if osc is not None else None,
    )
    return Engine(
        stream,
        store,
        source,
        sinks,
        hooks=hooks,
        metrics=Metrics(started=started, on_first_frame=None if settings.quiet else first_frame),
        on_input_loss=settings.on_input_loss,
        hold_fps=settings.fps,
        loras=live_loras,
        image_prompt=image_prompt,
        controls=controls if controlnets else None,
    )


def load_model(
    settings: Any, loras: Sequence[tuple[str, float]], device: Any, dtype: Any
) -> tuple[Any, Any]:
    """Load the model and its LoRA files: fused at their scales with `fuse_loras`, else live.

    Returns the components and their live LoRAs (None when there are none).
    """
    from bridge.models import load_components
    from bridge.models.live_lora import load_live_loras
    from bridge.models.lora import check_loras

    # Checked before the model loads, so a missing file is named at once.
    live = [] if settings.fuse_loras else check_loras(loras)
    components = load_components(
        settings.model,
        vae=None if settings.vae == "model" else settings.vae,
        loras=list(loras) if settings.fuse_loras else [],
        lcm_lora=settings.lcm_lora or None,
        device=device,
        dtype=dtype,
        download=settings.download,
    )
    return components, load_live_loras(components, live)


def _serve(
    engine: Any,
    settings: Any,
    source: Source | None,
    osc: OscServer | None,
    stop: threading.Event,
    say: Callable[[str], None],
) -> int:
    import torch

    from bridge.runtime.signals import stop_on_signals

    where = f"OSC on {settings.osc_host}:{osc.address[1]}" if osc else "OSC off"
    frm = settings.input if source is not None else "txt2img"
    say(f"running: {frm} -> {', '.join(settings.output)} | {where} | Ctrl-C stops")
    with stop_on_signals(stop), torch.inference_mode():
        produced = engine.run(stop, max_frames=settings.frames or None)
    _close_all(None, [], osc)
    say(f"stopped after {produced} frames; output went to {', '.join(settings.output)}.")
    return 0


def _close_all(source: Source | None, sinks: Sequence[Sink], osc: OscServer | None) -> None:
    for transport in [source, *sinks]:
        if transport is not None:
            transport.close()
    if osc is not None:
        osc.stop()
