"""Resolving file names from the network only inside the configured folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.control import UserFileError, resolve_user_file


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two allowed folders with files in them, and a secret file outside both."""
    loras, models = tmp_path / "loras", tmp_path / "models"
    (loras / "styles").mkdir(parents=True)
    models.mkdir()
    (loras / "ink.safetensors").write_bytes(b"x")
    (loras / "styles" / "oil.safetensors").write_bytes(b"x")
    (models / "turbo.safetensors").write_bytes(b"x")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    return loras, models, secret


def test_a_name_resolves_inside_the_first_folder_holding_it(folders) -> None:
    loras, models, _ = folders
    assert (
        resolve_user_file("ink.safetensors", [loras, models])
        == (loras / "ink.safetensors").resolve()
    )
    assert (
        resolve_user_file("turbo.safetensors", [loras, models])
        == (models / "turbo.safetensors").resolve()
    )
    assert resolve_user_file("styles/oil.safetensors", [loras]).name == "oil.safetensors"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/etc/passwd",
        "\\\\server\\share\\x",
        "C:\\Windows\\win.ini",
        "c:ink.safetensors",
        "../secret.txt",
        "styles/../../secret.txt",
        "styles\\..\\..\\secret.txt",
        "./ink.safetensors",
        "styles//oil.safetensors",
        "ink.safetensors\x00.png",
        "x" * 300,
    ],
)
def test_paths_and_climbing_out_are_refused(name: str, folders) -> None:
    loras, _, _ = folders
    with pytest.raises(UserFileError):
        resolve_user_file(name, [loras])


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_a_link_leading_out_of_the_folder_is_refused(folders) -> None:
    loras, _, secret = folders
    (loras / "escape.safetensors").symlink_to(secret)
    (loras / "alias.safetensors").symlink_to(loras / "ink.safetensors")
    with pytest.raises(UserFileError, match="through a link"):
        resolve_user_file("escape.safetensors", [loras])
    assert resolve_user_file("alias.safetensors", [loras]) == (loras / "ink.safetensors").resolve()


def test_missing_files_and_missing_folders_are_refused_with_the_fix(folders) -> None:
    loras, _, _ = folders
    with pytest.raises(UserFileError, match="copy it there"):
        resolve_user_file("nope.safetensors", [loras])
    with pytest.raises(UserFileError, match="no folder is configured"):
        resolve_user_file("ink.safetensors", [])
    with pytest.raises(UserFileError, match="copy it there"):
        resolve_user_file("styles", [loras])
