"""The `sd-bridge run` command line of the component, with URIs matching its transport.

Plain Python without TouchDesigner. The command runs `<python> -m bridge.cli run ...` with the
Python of the environment where streamdiffusion-bridge is installed (TouchDesigner's own Python
cannot run the bridge); `sdb_supervisor` starts and stops it.
"""

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

TRANSPORTS = ("auto", "spout", "shm", "ndi")
ACCELS = ("auto", "none", "cudagraph", "compile")
_STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}")


def resolve_transport(choice: str, platform: str = sys.platform) -> str:
    """`spout`, `shm` or `ndi` for a Transport menu choice; `auto` is Spout on Windows only."""
    if choice == "auto":
        return "spout" if platform == "win32" else "shm"
    if choice not in TRANSPORTS:
        raise ValueError(f"Transport {choice!r} is unknown; pick one of {', '.join(TRANSPORTS)}.")
    return choice


def stream_uris(transport: str, name: str) -> tuple[str, str]:
    """The bridge's input and output URIs for a stream name: `<transport>:<name>-in` / `-out`."""
    if not _STREAM_NAME.fullmatch(name):
        raise ValueError(
            f"Stream name {name!r} must be 1 to 16 characters from A-Z a-z 0-9 _ -, "
            "starting with a letter or digit."
        )
    return f"{transport}:{name}-in", f"{transport}:{name}-out"


@dataclass(frozen=True)
class BridgeSettings:
    """Everything `sd-bridge run` is started with."""

    python: str
    input_uri: str
    output_uri: str
    model: str
    width: int
    height: int
    tiny_vae: bool
    accel: str
    osc_port: int
    feedback_port: int
    prompt: str
    negative_prompt: str
    t_index: Sequence[int]
    cfg: str
    guidance: float
    delta: float
    seed: int
    similarity_filter: bool
    similarity_threshold: float
    max_skip_frames: int
    loras: Sequence[tuple[str, float]] = ()
    """LoRA files and their start scales; their scales then change live."""
    ip_adapter: str = ""
    """IP-Adapter weights file; empty: none."""
    ip_adapter_image: str = ""
    """The picture it follows: a file, or a source URI such as `spout:Style`."""
    ip_adapter_scale: float = 0.6
    """Its start scale, which then changes live."""
    precision: str = "default"
    """The UNet's matrix products: "default" (the model's dtype) or "fp8" (Ada, Hopper GPUs)."""
    compile_scope: str = "model"
    """What accel compile compiles: "model" (each network whole) or "blocks" (repeated blocks)."""
    live_compile: bool = True
    """Compile a live change's new shapes (a pause) rather than run them uncompiled."""
    background_compile: bool = False
    """Send uncompiled frames while compiling, rather than none until the compile is done."""
    feature_bank_size: int = 0
    """Frames of the feature bank at start: it changes the UNet's shapes, so it goes on the
    command line, where the first compile sees it, and not only over OSC just after."""
    controlnets: Sequence[str] = ()
    """`controlnet` entries, MODEL@SOURCE@SCALE; their values then change live."""


def bridge_command(settings: BridgeSettings) -> list[str]:
    """The command line that starts the bridge with `settings`, as a list of arguments.

    Values are joined to their flags (`--prompt=-blurry`), so text starting with a dash stays a
    value.
    """
    command = [
        settings.python,
        "-m",
        "bridge.cli",
        "run",
        f"--input={settings.input_uri}",
        f"--output={settings.output_uri}",
        f"--model={settings.model}",
        f"--vae={'tiny' if settings.tiny_vae else 'model'}",
        f"--width={settings.width}",
        f"--height={settings.height}",
        f"--accel={settings.accel}",
        f"--precision={settings.precision}",
        f"--compile-scope={settings.compile_scope}",
        f"--feature-bank-size={settings.feature_bank_size}",
        "--osc-host=127.0.0.1",
        f"--osc-port={settings.osc_port}",
        f"--osc-feedback=127.0.0.1:{settings.feedback_port}",
        f"--prompt={settings.prompt}",
        f"--t-index={','.join(str(index) for index in settings.t_index)}",
        f"--cfg={settings.cfg}",
        f"--guidance={settings.guidance}",
        f"--delta={settings.delta}",
        f"--seed={settings.seed}",
        f"--similarity-threshold={settings.similarity_threshold}",
        f"--max-skip-frames={settings.max_skip_frames}",
    ]
    if settings.negative_prompt:
        command.append(f"--negative-prompt={settings.negative_prompt}")
    if settings.similarity_filter:
        command.append("--similarity-filter")
    if not settings.live_compile:
        command.append("--no-live-compile")
    if settings.background_compile:
        command.append("--background-compile")
    command += [f"--lora={path}:{scale}" for path, scale in settings.loras]
    if settings.ip_adapter:
        command += [
            f"--ip-adapter={settings.ip_adapter}",
            f"--ip-adapter-image={settings.ip_adapter_image}",
            f"--ip-adapter-scale={settings.ip_adapter_scale}",
        ]
    command += [f"--controlnet={entry}" for entry in settings.controlnets]
    return command
