"""Resolving file names received over the network inside folders the user configured.

Nothing sent over OSC may name a path: a parameter that selects a file (a LoRA, a model) takes a
name, and only `resolve_user_file` turns it into a path, inside one of the allowed folders.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

MAX_NAME_CHARS = 255

_SEPARATORS = re.compile(r"[\\/]")


class UserFileError(ValueError):
    """A file name that does not resolve to a file inside the allowed folders."""


def resolve_user_file(name: str, allowed_dirs: Iterable[str | Path]) -> Path:
    """Return the real path of the file `name` inside the first allowed folder holding it.

    `name` may hold subfolders (`styles/ink.safetensors`) but no absolute path, drive, `..`
    component or control character; a symlink is followed only if its target stays inside the
    folder it was found in. Raise `UserFileError` otherwise or when no folder holds the file.
    """
    parts = _checked_parts(name)
    folders = [Path(folder) for folder in allowed_dirs]
    if not folders:
        raise UserFileError(
            f"file {name!r} was asked for but no folder is configured for it; "
            "add the folder that holds it to the configuration."
        )
    for folder in folders:
        root = folder.resolve()
        candidate = root.joinpath(*parts).resolve()
        if not candidate.is_relative_to(root):
            raise UserFileError(
                f"file {name!r} leads outside {folder} through a link; "
                "put the file itself inside the folder."
            )
        if candidate.is_file():
            return candidate
    listed = ", ".join(str(folder) for folder in folders)
    raise UserFileError(f"no file {name!r} in {listed}; copy it there or check the name.")


def _checked_parts(name: str) -> list[str]:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        raise UserFileError(
            f"file name {name!r} is empty or too long; send a name of 1 to {MAX_NAME_CHARS} "
            "characters."
        )
    if any(ord(char) < 32 for char in name) or ":" in name:
        raise UserFileError(
            f"file name {name!r} holds a drive or control character; send a plain file name."
        )
    parts = _SEPARATORS.split(name)
    if parts[0] == "" or any(part in ("", ".", "..") for part in parts):
        raise UserFileError(
            f"file name {name!r} is absolute or climbs out with '..'; send a name relative "
            "to the configured folder."
        )
    return parts
