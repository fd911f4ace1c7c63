"""One schema entry per setting: its flag, TOML key, OSC address, docs line and pipeline field."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.cli import build_parser, in_cli_words
from bridge.control.params import PARAMS, SETTINGS, STREAM_PARAMS, Kind
from bridge.runtime.settings import (
    RunSettings,
    load_config,
    merge,
    parse_lora,
    settings_table_markdown,
)
from tests.runtime.helpers import first_answer, free_port

ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> RunSettings:
    args = build_parser().parse_args(["run", *argv])
    return merge({}, {p.name: getattr(args, p.name) for p in SETTINGS})


def test_every_setting_is_one_field_one_flag_and_one_help_line_with_its_default() -> None:
    names = [field.name for field in dataclasses.fields(RunSettings)]
    assert names == [p.name for p in SETTINGS]
    help_text = " ".join(
        build_parser()._subparsers._group_actions[0].choices["run"].format_help().split()
    )
    for param in SETTINGS:
        assert "--" + param.name.replace("_", "-") in help_text
        assert " ".join(param.effect.split()) in help_text
    assert "Default: 1.2." in help_text  # guidance_scale
    assert "Default: pattern:bars." in help_text


def test_every_live_pipeline_setting_is_a_stream_config_field_of_the_same_name() -> None:
    from bridge.stream import StreamConfig

    fields = {field.name for field in dataclasses.fields(StreamConfig)}
    assert set(STREAM_PARAMS) <= fields
    assert {p.name for p in SETTINGS if p.stream} <= fields
    config = parse("--guidance", "2", "--t-index", "20,30", "--filter").stream_config()
    assert (config.guidance_scale, config.t_index_list, config.similarity_filter) == (
        2.0,
        (20, 30),
        True,
    )


def test_an_old_spelling_and_the_name_set_the_same_setting_on_the_command_line() -> None:
    assert (
        parse("--guidance", "1.7").guidance_scale == parse("--guidance-scale", "1.7").guidance_scale
    )
    assert parse("--cfg", "full").cfg_type == "full"
    assert parse("--t-index", "10,20").t_index_list == (10, 20)
    assert parse("--filter-max-skip", "4").max_skip_frames == 4
    assert parse("--no-osc").osc is False
    settings = parse("--prompt-fade", "2", "--seed-fade", "1", "--pause")
    values = settings.store_values()
    assert (values["prompt_fade"], values["seed_fade"], values["pause"]) == (2.0, 1.0, True)


def test_a_toml_file_takes_names_and_old_spellings_and_the_command_line_wins(tmp_path) -> None:
    config = tmp_path / "stage.toml"
    config.write_text(
        'guidance = 2\nt_index_list = [20]\nfilter = true\noutput = ["null", "shm:x"]\n'
        "width = 256\n"
    )
    values = load_config(config)
    assert values == {
        "guidance_scale": 2.0,
        "t_index_list": (20,),
        "similarity_filter": True,
        "output": ("null", "shm:x"),
        "width": 256,
    }
    args = build_parser().parse_args(["run", "--width", "128"])
    settings = merge(values, {p.name: getattr(args, p.name) for p in SETTINGS})
    assert (settings.width, settings.guidance_scale, settings.output) == (
        128,
        2.0,
        ("null", "shm:x"),
    )


def test_a_toml_file_with_bad_values_names_each_key_and_what_is_allowed(tmp_path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('width = 100\ncfg = "double"\nspeed = 3\n')
    with pytest.raises(ValueError) as refused:
        load_config(config)
    lines = str(refused.value).splitlines()
    assert lines == [
        f"{config}: width got 100; use an int from 8 to 4096, a multiple of 8.",
        f"{config}: cfg got 'double'; use one of none, full, self, initialize.",
        f"{config}: unknown setting 'speed'; see `sd-bridge run --help`.",
    ]


def test_steps_and_t_index_that_contradict_are_refused_before_start() -> None:
    with pytest.raises(
        ValueError, match="t_index_list=10 indexes past the schedule of num_inference_steps=4"
    ):
        parse("--t-index", "10", "--num-inference-steps", "4")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("style.safetensors", ("style.safetensors", 1.0)),
        ("style.safetensors:0.8", ("style.safetensors", 0.8)),
        ("C:\\loras\\style.safetensors", ("C:\\loras\\style.safetensors", 1.0)),
        ("C:\\loras\\style.safetensors:0.5", ("C:\\loras\\style.safetensors", 0.5)),
    ],
)
def test_a_lora_entry_splits_into_path_and_scale(text, expected) -> None:
    assert parse_lora(text) == expected


def test_a_lora_scale_that_is_not_a_number_is_refused_not_taken_as_the_path() -> None:
    with pytest.raises(ValueError, match="ends in scale 'O.8', which is not a number"):
        parse_lora("style.safetensors:O.8")


def test_a_lora_file_whose_name_has_a_colon_is_a_path(tmp_path) -> None:
    odd = tmp_path / "style:v2"
    odd.write_bytes(b"")
    assert parse_lora(str(odd)) == (str(odd), 1.0)


def test_library_messages_are_translated_into_flags() -> None:
    assert in_cli_words('accel="cudagraph" needs a CUDA GPU; use accel="none".') == (
        "--accel cudagraph needs a CUDA GPU; use --accel none."
    )
    assert in_cli_words("frame_buffer_size=2 and t_index=3, not x=1") == (
        "--frame-buffer-size 2 and --t-index 3, not x=1"
    )
    assert in_cli_words("unless asked (download=True); or osc=False") == (
        "unless asked (--download); or --no-osc"
    )


def test_settings_doc_is_the_generated_table() -> None:
    text = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert settings_table_markdown() in text
    rows = settings_table_markdown().splitlines()[2:]
    assert len(rows) == len(SETTINGS)
    for row, param in zip(rows, SETTINGS, strict=True):
        assert row.startswith(f"| `{param.name}`")
        assert (f"`{param.address}`" if param.live else "start only") in row


def test_live_settings_are_exactly_the_osc_parameters() -> None:
    assert [p for p in SETTINGS if p.live] == list(PARAMS)
    assert all(p.address.startswith("/sd/") for p in PARAMS)
    assert all(p.kind is not Kind.STRING_LIST for p in PARAMS)


def run_cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`sd-bridge` in a fresh interpreter that also reports whether torch was imported."""
    code = (
        "import sys; from bridge.cli import main; code = main(sys.argv[1:]); "
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(code)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_a_bad_uri_fails_before_torch_or_the_model_load() -> None:
    result = run_cli("run", "--model", "synthetic:tiny", "--input", "rtsp:cam")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "sd-bridge: Unknown source 'rtsp' in 'rtsp:cam'; sources are spout, cam, shm, file, "
        "pattern, ndi, syphon."
    )
    assert result.stdout.strip() == "torch not loaded"


def test_an_osc_port_in_use_fails_before_torch_or_the_model_load() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = run_cli("run", "--model", "synthetic:tiny", "--osc-port", str(port))
    assert result.returncode == 2
    assert f"{port}" in result.stderr and "in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout.strip() == "torch not loaded"


def test_a_bad_width_fails_with_one_sentence_naming_the_flag() -> None:
    result = run_cli("run", "--width", "100")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "sd-bridge run: argument --width: got '100'; use an int from 8 to 4096, "
        "a multiple of 8; see sd-bridge run --help."
    )


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child is POSIX here")
def test_ctrl_c_during_start_up_stops_quietly(tmp_path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bridge.cli",
            "run",
            "--model",
            "synthetic:tiny",
            "--width",
            "64",
            "--height",
            "64",
            "--output",
            "null",
            "--no-osc",
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    first = process.stderr.readline()
    assert first.startswith("loading synthetic:tiny")
    process.send_signal(signal.SIGINT)
    try:
        rest = process.stderr.read()
        process.wait(timeout=120)
    finally:
        process.kill()
    assert "Traceback" not in rest
    if "running:" in rest:  # the signal came after start-up: an ordinary stop
        assert process.returncode == 0
    else:
        assert process.returncode == 130
        assert rest.strip().endswith("stopped during start-up.")


# A value for each live setting that differs from its default, as flags and as the bridge says it.
LIVE_FLAGS = {
    "prompt": (["--prompt", "a glass forest"], ["a glass forest"]),
    "negative_prompt": (["--negative-prompt", "fog"], ["fog"]),
    "guidance_scale": (["--guidance", "1.5"], [1.5]),
    "delta": (["--delta", "0.5"], [0.5]),
    "cfg_type": (["--cfg", "none"], ["none"]),
    "num_inference_steps": (["--num-inference-steps", "40"], [40]),
    "t_index_list": (["--t-index-list", "20,30"], [20, 30]),
    "seed": (["--seed", "77"], [77]),
    "do_add_noise": (["--no-do-add-noise"], [0]),
    "noise": (["--noise", "drift"], ["drift"]),
    "noise_drift": (["--noise-drift", "0.2"], [0.2]),
    "similarity_filter": (["--filter"], [1]),
    "similarity_threshold": (["--similarity-threshold", "0.9"], [0.9]),
    "max_skip_frames": (["--filter-max-skip", "3"], [3]),
    "feature_bank_size": (["--feature-bank-size", "2"], [2]),
    "feature_bank_strength": (["--feature-bank-strength", "0.5"], [0.5]),
    "feature_bank_threshold": (["--feature-bank-threshold", "0.9"], [0.9]),
    "latent_feedback": (["--latent-feedback", "0.25"], [0.25]),
    "ip_adapter_scale": (["--ip-adapter-scale", "1.5"], [1.5]),
    "pause": (["--pause"], [1]),
    "prompt_fade": (["--prompt-fade", "2"], [2.0]),
    "seed_fade": (["--seed-fade", "1.5"], [1.5]),
}


def test_every_live_setting_given_at_start_is_what_the_running_bridge_reports(bridge_process):
    from bridge.control import OscClient

    assert set(LIVE_FLAGS) == {p.name for p in PARAMS}, "give each live setting a flag here"
    port = free_port()
    flags = [flag for given, _ in LIVE_FLAGS.values() for flag in given]
    process = bridge_process(
        "--model", "synthetic:tiny", "--width", "64", "--height", "64", "--output", "null",
        "--osc-port", str(port), "--quiet", *flags,
    )  # fmt: skip
    with OscClient("127.0.0.1", port, timeout=1.0) as client:
        assert first_answer(client, process, "prompt") is not None
        for name, (_, expected) in LIVE_FLAGS.items():
            got = client.get(name)
            assert got == pytest.approx(expected), name
