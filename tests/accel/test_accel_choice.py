"""Which acceleration a start picks, and the reason it gives: decided on the CPU, from stand-ins
for CUDA and Triton, so every branch is checked here and not only on a GPU machine."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from bridge.accel.choice import (
    TritonState,
    choose_accel,
    compile_support,
    find_triton,
    required_triton,
    try_compile,
)
from bridge.cli import main
from bridge.runtime.launch import StartError, pick_accel

FOUND = TritonState(installed=True, version="3.4.0")
MISSING = TritonState(installed=False)
BROKEN = TritonState(installed=True, error="ImportError: DLL load failed while importing libtriton")
NO_COMPILER = "CalledProcessError: the C compiler exited with status 1"


def test_auto_compiles_where_cuda_and_the_matching_triton_are_found():
    choice = choose_accel("auto", "cuda", FOUND, "2.8.0+cu128", "win32")
    assert choice.mode == "compile"
    assert choice.line() == (
        "accel: compile (Triton 3.4.0 found; first start compiles for about a minute, "
        "later starts use the cache)"
    )


@pytest.mark.parametrize(
    ("platform", "command"),
    [("win32", 'pip install "triton-windows<3.5"'), ("linux", 'pip install "triton==3.4.*"')],
)
def test_auto_graphs_without_triton_and_says_what_to_install(platform, command):
    choice = choose_accel("auto", "cuda", MISSING, "2.8.0+cu128", platform)
    assert choice.line() == f"accel: cudagraph (Triton is not installed: {command} for compile)"


def test_auto_graphs_when_triton_does_not_import_and_quotes_the_error():
    choice = choose_accel("auto", "cuda", BROKEN, "2.8.0", "win32")
    assert choice.mode == "cudagraph"
    assert "does not import (ImportError: DLL load failed while importing libtriton)" in (
        choice.reason
    )


def test_auto_graphs_when_triton_imports_but_cannot_build_a_kernel():
    choice = choose_accel("auto", "cuda", FOUND, "2.8.0", "win32", kernel_error=NO_COMPILER)
    assert choice.line() == (
        "accel: cudagraph (Triton 3.4.0 imports but a test kernel failed "
        f"({NO_COMPILER}) for compile)"
    )


@pytest.mark.parametrize("found", ["3.2.0", "3.6.0"])
def test_auto_graphs_with_a_triton_of_another_release_than_pytorch_was_built_with(found):
    choice = choose_accel("auto", "cuda", TritonState(True, found), "2.8.0", "win32")
    assert choice.mode == "cudagraph"
    assert choice.reason == (
        f"Triton {found} does not match PyTorch 2.8, which was built with Triton 3.4: "
        'pip install "triton-windows<3.5" for compile'
    )


def test_a_pytorch_newer_than_the_known_pairings_takes_that_triton_or_newer():
    assert required_triton("2.10.0") == ((3, 6), True)
    assert required_triton("2.13.0+cpu") == ((3, 6), False)
    assert choose_accel("auto", "cuda", TritonState(True, "3.9.1"), "2.13.0", "linux").mode == (
        "compile"
    )
    older = choose_accel("auto", "cuda", TritonState(True, "3.5.0"), "2.13.0", "win32")
    assert older.mode == "cudagraph"
    assert older.reason.startswith("Triton 3.5.0 is older than the 3.6 that PyTorch 2.13 needs")
    assert "pip install -U triton-windows" in older.reason


def test_auto_runs_eagerly_without_cuda_and_says_so():
    choice = choose_accel("auto", "cpu", None, "2.8.0", "win32")
    assert choice.line() == (
        "accel: none (the pipeline runs on cpu; CUDA graphs and compile need a CUDA GPU)"
    )


def test_a_mode_asked_for_is_kept_and_said_as_asked_for():
    assert choose_accel("none", "cuda", FOUND, "2.8.0", "linux").line() == "accel: none (asked for)"
    graphed = choose_accel("cudagraph", "cuda", FOUND, "2.8.0", "linux")
    assert graphed.line() == "accel: cudagraph (asked for)"
    assert choose_accel("compile", "cuda", FOUND, "2.8.0", "linux").reason.startswith(
        "asked for; Triton 3.4.0 found"
    )


def test_compile_asked_for_without_a_working_triton_is_one_sentence_before_the_model_loads():
    with pytest.raises(ValueError) as raised:
        choose_accel("compile", "cuda", MISSING, "2.8.0", "win32")
    assert str(raised.value) == (
        'accel="compile" cannot run here: Triton is not installed: '
        'pip install "triton-windows<3.5"; use accel="cudagraph".'
    )
    with pytest.raises(ValueError, match="does not import"):
        choose_accel("compile", "cuda", BROKEN, "2.8.0", "win32")
    with pytest.raises(ValueError, match="a test kernel failed"):
        choose_accel("compile", "cuda", FOUND, "2.8.0", "win32", kernel_error=NO_COMPILER)


def test_compile_asked_for_with_another_triton_release_runs_with_a_warning():
    choice = choose_accel("compile", "cuda", TritonState(True, "3.2.0"), "2.8.0", "win32")
    assert choice.mode == "compile"
    assert choice.reason.startswith("asked for, though Triton 3.2.0 does not match PyTorch 2.8")


@pytest.mark.parametrize("mode", ["cudagraph", "compile"])
def test_a_gpu_mode_asked_for_on_the_cpu_is_refused_before_the_model_loads(mode):
    with pytest.raises(StartError) as raised:
        pick_accel(mode, torch.device("cpu"))
    assert str(raised.value) == (
        f'accel="{mode}" needs a CUDA GPU, but the pipeline runs on cpu; use accel="none".'
    )


def test_compile_support_says_no_cuda_first():
    assert compile_support(False, FOUND, "2.8.0", "win32") == (
        False,
        "no CUDA GPU; compile and CUDA graphs need one",
    )


def stand_in_triton(version: str) -> types.ModuleType:
    module = types.ModuleType("triton")
    module.__version__ = version
    return module


def matching_version() -> str:
    """A Triton version the installed PyTorch accepts, whichever PyTorch runs these tests."""
    (major, minor), _ = required_triton(torch.__version__)
    return f"{major}.{minor}.0"


def test_find_triton_reads_the_version_of_the_module_that_imports(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", stand_in_triton("3.6.0"))
    assert find_triton() == TritonState(installed=True, version="3.6.0")


def test_find_triton_tells_a_missing_module_from_one_that_fails_to_import(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "triton", None)
    assert find_triton() == TritonState(installed=False)
    package = tmp_path / "triton"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('DLL load failed: libtriton.pyd')\n")
    monkeypatch.delitem(sys.modules, "triton")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = find_triton()
    assert (found.installed, found.version) == (True, None)
    assert found.error == "ImportError: DLL load failed: libtriton.pyd"


def test_try_compile_says_in_one_line_what_the_compiler_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("SD_BRIDGE_CACHE", str(tmp_path))
    for name in ("CACHE_DIR", "FX_GRAPH_CACHE", "AUTOGRAD_CACHE"):  # put back after the test
        monkeypatch.setenv(f"TORCHINDUCTOR_{name}", "")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("the C compiler exited with status 1\n  (long log follows)")

    monkeypatch.setattr(torch, "compile", no_compiler)
    assert try_compile(torch.device("cpu")) == "RuntimeError: the C compiler exited with status 1"


def test_pick_accel_compiles_on_a_cuda_device_where_triton_builds_a_kernel(monkeypatch):
    cuda = torch.device("cuda")
    tried: list[object] = []
    kernel_error: list[str | None] = [None]

    def stand_in_try_compile(device):
        tried.append(device)
        return kernel_error[0]

    monkeypatch.setattr("bridge.accel.choice.try_compile", stand_in_try_compile)
    monkeypatch.setitem(sys.modules, "triton", stand_in_triton(matching_version()))
    assert pick_accel("auto", cuda).mode == "compile"
    assert tried == [cuda]
    kernel_error[0] = NO_COMPILER
    assert pick_accel("auto", cuda).mode == "cudagraph"
    monkeypatch.setitem(sys.modules, "triton", None)
    choice = pick_accel("auto", cuda)
    assert choice.mode == "cudagraph"
    assert choice.reason.startswith("Triton is not installed")
    assert len(tried) == 2  # no test kernel without a Triton to build it


def test_doctor_says_whether_compile_works_and_why_not(monkeypatch, capsys):
    monkeypatch.setattr("bridge.cli.cmd_list", lambda args: 0)
    monkeypatch.setattr("bridge.accel.choice.try_compile", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["doctor"]) == 0
    assert "compile      no: no CUDA GPU; compile and CUDA graphs need one\n" in (
        capsys.readouterr().out
    )
    # A stand-in CUDA machine with no GPU to list, without and then with Triton.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setitem(sys.modules, "triton", None)
    assert main(["doctor"]) == 0
    assert "compile      no: Triton is not installed: pip install" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "triton", stand_in_triton(matching_version()))
    assert main(["doctor"]) == 0
    assert f"compile      yes: Triton {matching_version()} found;" in capsys.readouterr().out


@pytest.mark.gpu
def test_on_a_cuda_machine_with_the_triton_pytorch_brought_auto_compiles():
    assert try_compile(torch.device("cuda")) is None
    choice = pick_accel("auto", torch.device("cuda"))
    assert choice.mode == "compile", choice.reason
    assert find_triton().version in choice.reason
