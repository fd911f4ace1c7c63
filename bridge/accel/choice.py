"""Which acceleration this machine can run, and why: the decision behind `accel="auto"` and the
compile line of `sd-bridge doctor`.

torch.compile turns the UNet and VAE into kernels written in Triton, so it needs a CUDA GPU and a
Triton that imports and matches the PyTorch in use. On Linux the CUDA build of PyTorch brings
its Triton (pinned to the release it was built with); on Windows PyTorch ships none, and the
`triton-windows` package provides it. Each PyTorch release from 2.4 on was built with one Triton
minor release, 2.4 with 3.0 up to 2.10 with 3.6, and a Triton of another minor release fails when
the first kernel compiles, not when it imports: that is why the version is checked here.

A Triton that imports may still fail to build its first kernel (no C compiler it can use, no
Python headers in an embedded Python): `try_compile` compiles one tiny kernel to find out,
before the model loads, rather than when the first frame would need the UNet compiled.

The decision is a pure function of what was found (`choose_accel`, `compile_support`); only
`find_triton` and `try_compile` look at the machine, so every branch is testable without a GPU.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

ACCEL_CHOICES = ("auto", "none", "cudagraph", "compile")
# The Triton each PyTorch minor release was built with (its wheels pin it on Linux).
_PAIRED_TRITON = {(2, minor): (2, minor) for minor in (1, 2, 3)} | {
    (2, minor): (3, minor - 4) for minor in range(4, 11)
}
_COMPILE_COST = "first start compiles for about a minute, later starts use the cache"


@dataclass(frozen=True)
class TritonState:
    """What importing Triton gave: its version, or the error that stopped the import.

    `installed` is False when there is no module named triton at all.
    """

    installed: bool
    version: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class AccelChoice:
    """The acceleration mode a bridge runs with and the reason, said in one line at start."""

    mode: str
    reason: str

    def line(self) -> str:
        """'accel: compile (Triton 3.4.0 found; ...)'."""
        return f"accel: {self.mode} ({self.reason})"


def find_triton() -> TritonState:
    """Import Triton and say what happened; never raises."""
    try:
        module = importlib.import_module("triton")
    except ModuleNotFoundError as error:
        if error.name == "triton":
            return TritonState(installed=False)
        return TritonState(installed=True, error=f"{type(error).__name__}: {error}")
    except Exception as error:  # a DLL that will not load, a broken install: said, not raised
        return TritonState(installed=True, error=f"{type(error).__name__}: {error}")
    return TritonState(installed=True, version=str(getattr(module, "__version__", "unknown")))


def try_compile(device: Any) -> str | None:
    """Compile and run one tiny kernel with torch.compile on `device`: None if it worked, else
    the error's first line."""
    import torch

    from bridge.accel import set_compile_stance, use_compile_cache

    def double_plus_one(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    use_compile_cache()
    # An earlier pipeline of this process may have left a stance that does not compile.
    set_compile_stance("default")
    try:
        x = torch.arange(8, device=device, dtype=torch.float32)
        result = torch.compile(double_plus_one, dynamic=False)(x)
        right = torch.equal(result.cpu(), double_plus_one(x).cpu())
    except Exception as error:  # whatever the compiler chain raised, said in a line
        return f"{type(error).__name__}: {_first_line(str(error))}"
    return None if right else "a test kernel gave wrong numbers"


def required_triton(torch_version: str) -> tuple[tuple[int, int], bool] | None:
    """The Triton (major, minor) a PyTorch version needs, and whether exactly that one.

    Known releases need the Triton they were built with; a PyTorch newer than those known needs
    at least the newest known pairing's Triton. None when the version cannot be read.
    """
    release = _major_minor(torch_version)
    if release is None:
        return None
    if release in _PAIRED_TRITON:
        return _PAIRED_TRITON[release], True
    newest = max(_PAIRED_TRITON)
    if release > newest:
        return _PAIRED_TRITON[newest], False
    return None


def install_hint(torch_version: str, platform: str) -> str:
    """The pip command that installs a Triton for this PyTorch on this system."""
    needed = required_triton(torch_version)
    if platform != "win32":
        if needed is not None and needed[1]:
            return f'pip install "triton=={needed[0][0]}.{needed[0][1]}.*"'
        return "pip install triton"
    if needed is not None and needed[1]:
        (major, minor), _ = needed
        return f'pip install "triton-windows<{major}.{minor + 1}"'
    return "pip install -U triton-windows"


def compile_support(
    cuda: bool,
    triton: TritonState | None,
    torch_version: str,
    platform: str,
    kernel_error: str | None = None,
) -> tuple[bool, str]:
    """Whether torch.compile can run here, and the reason in a few words.

    `triton` may be None where there is no CUDA (it is then not looked for); `kernel_error` is
    what `try_compile` said, None when the test kernel worked or was not tried.
    """
    if not cuda:
        return False, "no CUDA GPU; compile and CUDA graphs need one"
    if triton is None or not triton.installed:
        return False, f"Triton is not installed: {install_hint(torch_version, platform)}"
    if triton.error is not None:
        return False, f"Triton is installed but does not import ({triton.error})"
    mismatch = _mismatch(triton.version or "", torch_version)
    if mismatch is not None:
        return False, f"{mismatch}: {install_hint(torch_version, platform)}"
    if kernel_error is not None:
        return False, f"Triton {triton.version} imports but a test kernel failed ({kernel_error})"
    return True, f"Triton {triton.version} found; {_COMPILE_COST}"


def choose_accel(
    requested: str,
    device_type: str,
    triton: TritonState | None,
    torch_version: str,
    platform: str,
    kernel_error: str | None = None,
) -> AccelChoice:
    """The mode to run: "auto" is the fastest that works here, anything else is checked.

    "auto" is compile where CUDA and a matching Triton are present (and a test kernel, if one
    was tried, compiled), else cudagraph on CUDA, else none. A mode this machine cannot run
    raises ValueError naming the setting and the fix, before the model loads; compile with a
    Triton of another release only warns, since a PyTorch newer than this module knows may
    accept it.
    """
    if requested not in ACCEL_CHOICES:
        raise ValueError(f"accel={requested!r} is unknown; use one of {', '.join(ACCEL_CHOICES)}.")
    cuda = device_type == "cuda"
    if requested == "none":
        return AccelChoice("none", "asked for")
    if not cuda:
        if requested == "auto":
            reason = f"the pipeline runs on {device_type}; CUDA graphs and compile need a CUDA GPU"
            return AccelChoice("none", reason)
        raise ValueError(
            f'accel="{requested}" needs a CUDA GPU, but the pipeline runs on {device_type}; '
            'use accel="none".'
        )
    usable, reason = compile_support(cuda, triton, torch_version, platform, kernel_error)
    if requested == "auto":
        if usable:
            return AccelChoice("compile", reason)
        return AccelChoice("cudagraph", f"{reason} for compile")
    if requested == "cudagraph":
        return AccelChoice("cudagraph", "asked for")
    if usable:
        return AccelChoice("compile", f"asked for; {reason}")
    imports = triton is not None and triton.installed and triton.error is None
    if not imports or kernel_error is not None:
        raise ValueError(f'accel="compile" cannot run here: {reason}; use accel="cudagraph".')
    return AccelChoice("compile", f"asked for, though {reason}")


def _mismatch(triton_version: str, torch_version: str) -> str | None:
    """Why this Triton does not fit this PyTorch, or None when it does (or nobody knows)."""
    needed = required_triton(torch_version)
    found = _major_minor(triton_version)
    if needed is None or found is None:
        return None
    (wanted, exact), torch_release = needed, _release(torch_version)
    if exact and found != wanted:
        return (
            f"Triton {triton_version} does not match PyTorch {torch_release}, which was built "
            f"with Triton {wanted[0]}.{wanted[1]}"
        )
    if not exact and found < wanted:
        return (
            f"Triton {triton_version} is older than the {wanted[0]}.{wanted[1]} that PyTorch "
            f"{torch_release} needs at least"
        )
    return None


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no message"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _release(version: str) -> str:
    """'2.8.0+cu128' as '2.8'."""
    found = _major_minor(version)
    return f"{found[0]}.{found[1]}" if found else version
