"""Hugging Face ids: read from the local cache, fetched only when the caller asks."""

from __future__ import annotations

import shutil
import socket
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch

from bridge.models import hub, load_components, resolve_model_path
from bridge.models.hub import PIPELINE_FILES, fetch_command, hf_hub_cache, is_hf_id
from tests.models.helpers import add_to_hf_cache

REPO = "stabilityai/sd-turbo"


def test_an_id_in_the_cache_loads_offline(tiny_folder, hf_cache, run_tiny):
    snapshot = add_to_hf_cache(hf_cache, REPO, tiny_folder)

    components = load_components(REPO)

    assert resolve_model_path(REPO) == snapshot
    assert str(snapshot) in components.source
    expected = run_tiny(load_components(str(tiny_folder)))
    for reference, actual in zip(expected, run_tiny(components), strict=True):
        assert torch.equal(reference, actual)


def test_cache_dir_overrides_the_environment(tiny_folder, tmp_path):
    other = tmp_path / "other-cache"
    snapshot = add_to_hf_cache(other, REPO, tiny_folder)
    assert resolve_model_path(REPO, cache_dir=other) == snapshot
    with pytest.raises(FileNotFoundError):
        resolve_model_path(REPO)


def test_hf_home_is_used_when_hf_hub_cache_is_not_set(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_hub_cache() == tmp_path / "home" / "hub"


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any name look-up or connection, with HF_HUB_OFFLINE unset."""
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def refuse(*args, **kwargs):
        pytest.fail(f"a network call was made: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_a_missing_id_fails_at_once_without_network_naming_the_id_and_the_fix(no_network, hf_cache):
    with pytest.raises(FileNotFoundError) as error:
        load_components("someone/missing-model")
    message = str(error.value)
    assert "'someone/missing-model'" in message
    assert str(hf_cache) in message
    assert "`hf download someone/missing-model --include " in message
    # One sentence.
    assert message.count(". ") == 0 and message.endswith(".")


def test_a_missing_tiny_vae_fails_without_network(no_network, tiny_folder, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model, ignore=shutil.ignore_patterns("taesd"))
    with pytest.raises(FileNotFoundError, match="hf download madebyollin/taesd"):
        load_components(model, vae="tiny")


def test_a_missing_id_with_hf_hub_offline_and_download_says_so(hf_cache):
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE forbids downloading"):
        load_components("someone/missing-model", download=True)


def test_a_missing_id_online_downloads_only_the_pipeline_files(monkeypatch, tiny_folder, hf_cache):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fake_download(repo_id: str, **kwargs) -> str:
        calls.append((repo_id, kwargs))
        if kwargs.get("local_files_only"):
            raise FileNotFoundError("not cached")
        return str(add_to_hf_cache(Path(kwargs["cache_dir"]), repo_id, tiny_folder))

    monkeypatch.setattr(hub, "snapshot_download", fake_download)

    components = load_components(REPO, download=True)

    assert [call[1].get("local_files_only", False) for call in calls] == [True, False]
    assert calls[1][1]["allow_patterns"] == list(PIPELINE_FILES)
    assert calls[1][1]["cache_dir"] == hf_cache
    assert components.family == "sd15"


def test_a_failed_download_says_how_to_fetch_by_hand(monkeypatch, hf_cache):
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(repo_id: str, **kwargs) -> str:
        if kwargs.get("local_files_only"):
            raise FileNotFoundError("not cached")
        raise ConnectionError("no route to host")

    monkeypatch.setattr(hub, "snapshot_download", unreachable)
    with pytest.raises(
        FileNotFoundError, match="ConnectionError.*hf download stabilityai/sd-turbo"
    ):
        load_components(REPO, download=True)


def test_pipeline_files_leave_out_single_file_checkpoints_and_fp16_copies():
    wanted = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ]
    unwanted = [
        "sd_turbo.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
    ]
    for name in wanted:
        assert any(fnmatch(name, pattern) for pattern in PIPELINE_FILES), name
    for name in unwanted:
        assert not any(fnmatch(name, pattern) for pattern in PIPELINE_FILES), name


def test_ids_and_paths_are_told_apart():
    assert is_hf_id("stabilityai/sd-turbo")
    assert is_hf_id("madebyollin/taesd")
    assert not is_hf_id("./models/sd-turbo")
    assert not is_hf_id("/models/sd-turbo")
    assert not is_hf_id("models/sd/turbo")
    assert not is_hf_id("sd-turbo")


def test_fetch_command_quotes_each_pattern():
    assert fetch_command("a/b") == "hf download a/b"
    assert fetch_command("a/b", ["*.json", "*.txt"]) == 'hf download a/b --include "*.json" "*.txt"'
