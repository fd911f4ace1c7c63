"""Finding a model on disk: synthetic names, local paths and Hugging Face ids, offline first.

A Hugging Face id is looked up in the local cache only: loading a model makes no network
connection unless the caller asks for one with ``download=True`` (and ``HF_HUB_OFFLINE`` is not
set). A download then fetches only the files a diffusers pipeline loads (repositories also carry
single-file checkpoints and fp16 copies worth gigabytes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

from huggingface_hub import snapshot_download

from bridge.models.synthetic import ensure_synthetic, synthetic_name

# What a Stable Diffusion pipeline in diffusers layout needs, in full precision (SDXL's second
# tokenizer and text encoder included; patterns a repository has no file for match nothing).
PIPELINE_FILES: tuple[str, ...] = (
    "model_index.json",
    "*/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "tokenizer_2/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
)
# A single autoencoder repository such as madebyollin/taesd.
AUTOENCODER_FILES: tuple[str, ...] = ("config.json", "diffusion_pytorch_model.safetensors")
# Configurations and tokenizer files only, to go with a single-file checkpoint.
CONFIG_FILES: tuple[str, ...] = ("*.json", "*.txt")

_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TRUE = {"1", "ON", "YES", "TRUE"}


def hf_hub_cache(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face hub cache folder: ``cache_dir``, else as huggingface_hub would choose it.

    The environment is read on each call (``HF_HUB_CACHE``, then ``HF_HOME``/hub, then
    ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub``), so a change made after
    huggingface_hub was imported still counts.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def hf_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids downloads."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def is_hf_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hugging Face repository id (``org/name``)."""
    return _HF_ID.fullmatch(name) is not None and not name.startswith(".")


def fetch_command(repo_id: str, files: Sequence[str] = ()) -> str:
    """The ``hf download`` command line that fetches ``files`` of ``repo_id`` (all when empty)."""
    include = "".join(f' "{pattern}"' for pattern in files)
    return f"hf download {repo_id}" + (f" --include{include}" if include else "")


def hf_snapshot(
    repo_id: str,
    files: Sequence[str],
    cache_dir: str | Path | None = None,
    *,
    context: str = "",
    download: bool = False,
) -> Path:
    """Local folder of ``repo_id`` from the cache; downloaded only if ``download`` is true.

    ``files`` are the glob patterns to download when the repository is not cached yet;
    ``context`` follows the id in the error message, to say why it was wanted.
    """
    cache = hf_hub_cache(cache_dir)
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except FileNotFoundError:
        pass
    fetch = fetch_command(repo_id, files)
    if not download:
        raise FileNotFoundError(
            f"{repo_id!r}{context} is not in the Hugging Face cache at {cache}, and models are "
            f"never downloaded unless asked (download=True); fetch it with `{fetch}`."
        )
    if hf_offline():
        raise FileNotFoundError(
            f"{repo_id!r}{context} is not in the Hugging Face cache at {cache}, and HF_HUB_OFFLINE "
            f"forbids downloading it; fetch it with `{fetch}`."
        )
    try:
        folder = snapshot_download(repo_id, cache_dir=cache, allow_patterns=list(files))
    except Exception as error:
        # Network, authentication and unknown-repository failures all leave the user with the
        # same choice: fix the id or fetch it by hand.
        raise FileNotFoundError(
            f"{repo_id!r}{context} is not in the Hugging Face cache at {cache}, and could not be "
            f"downloaded ({type(error).__name__}); check the id or fetch it with `{fetch}`."
        ) from error
    return Path(folder)


def resolve_path(
    name: str | PathLike[str],
    files: Sequence[str],
    cache_dir: str | Path | None = None,
    *,
    download: bool = False,
) -> Path:
    """Local path of ``name``: a ``synthetic:`` model, an existing file or folder, or a hub id.

    ``files`` are the patterns to download if ``name`` is a hub id that is not cached yet and
    ``download`` allows it. ``cache_dir``, when given, holds both the hub cache and a
    ``synthetic`` folder.
    """
    name = os.fspath(name)
    bare = synthetic_name(name)
    if bare is not None:
        root = Path(cache_dir) / "synthetic" if cache_dir is not None else None
        return ensure_synthetic(bare, root)
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve()
    if is_hf_id(name):
        context = f", which is no local path ({path.absolute()}),"
        return hf_snapshot(name, files, cache_dir, context=context, download=download)
    raise FileNotFoundError(
        f"No model at {name!r}: {path.absolute()} does not exist and {name!r} is not a "
        "Hugging Face id such as 'stabilityai/sd-turbo'."
    )


def resolve_model_path(
    model: str | PathLike[str], cache_dir: str | Path | None = None, *, download: bool = False
) -> Path:
    """Local path of a Stable Diffusion model: a synthetic name, a file or folder, or a hub id."""
    return resolve_path(model, PIPELINE_FILES, cache_dir, download=download)
