"""bridge.io stays a transport layer: no diffusion code, optional libraries only when used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]


def modules_after(statement: str) -> set[str]:
    script = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPOSITORY, capture_output=True, text=True, check=True
    )
    return set(json.loads(result.stdout))


def test_importing_transports_loads_no_diffusion_code_and_no_optional_library():
    loaded = modules_after("import bridge.io")
    forbidden = {"torch", "diffusers", "bridge.stream", "cv2", "av", "SpoutGL", "pyvirtualcam"}
    assert not forbidden & loaded


def test_protocol_file_works_alone_with_only_the_standard_library_and_numpy(tmp_path):
    # Copied into a folder of its own, as into a TouchDesigner project, away from the package.
    copy = tmp_path / "shm_protocol.py"
    copy.write_text((REPOSITORY / "bridge" / "io" / "shm_protocol.py").read_text())
    script = (
        "import sys, json\n"
        "before = set(sys.modules)\n"
        "import shm_protocol\n"
        "added = {name.split('.')[0] for name in set(sys.modules) - before}\n"
        "print(json.dumps(sorted(added - set(sys.stdlib_module_names) - {'__mp_main__'})))"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n{script}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert set(json.loads(result.stdout)) <= {"numpy", "shm_protocol"}
