"""ndi: rules that need no NDI runtime: names, addresses, capture times, options and messages."""

from __future__ import annotations

import sys

import pytest

import bridge.io.ndi as ndi_module
from bridge.io import TransportError, open_sink, open_source
from bridge.io.ndi import (
    MAX_AGE,
    capture_metadata,
    capture_time_of,
    parse_capture_metadata,
    pick_source,
    stream_name,
)
from bridge.io.transports import check_uri

FOUND = [("VJ-PC (TouchDesigner)", "10.0.0.5:5961"), ("GPU-BOX (sd-out)", "10.0.0.9:5962")]


def test_a_sender_is_picked_by_full_name_or_by_the_name_in_brackets():
    assert stream_name("VJ-PC (TouchDesigner (NDI Out))") == "TouchDesigner (NDI Out)"
    assert stream_name("no brackets") == "no brackets"
    assert pick_source("GPU-BOX (sd-out)", FOUND) == FOUND[1]
    assert pick_source("TouchDesigner", FOUND) == FOUND[0]
    assert pick_source("Resolume", FOUND) is None


def test_a_name_two_machines_share_asks_for_the_full_name():
    found = [("A (cam)", "10.0.0.1:5961"), ("B (cam)", "10.0.0.2:5961")]
    with pytest.raises(TransportError, match=r"matches 'A \(cam\)' and 'B \(cam\)'.*ndi:A \(cam\)"):
        pick_source("cam", found)


def test_capture_time_is_exact_from_this_machine_and_aged_by_wall_clock_from_others():
    metadata = capture_metadata(100.0, 7, host="here")
    fields = parse_capture_metadata(metadata)
    assert fields["capture_time"] == "100.000000" and fields["index"] == "7"
    receipt = {"received": 100.05, "wall_received": 5000.0}
    assert capture_time_of(metadata, None, host="here", **receipt) == 100.0
    elsewhere = '<sd_bridge capture_time="3.0" wall_time="4999.98" host="there"/>'
    assert capture_time_of(elsewhere, None, host="here", **receipt) == pytest.approx(100.03)
    # NDI's own send timestamp (100 ns units) stands in when a sender writes no metadata.
    stamp = int(4999.99 * 1e7)
    assert capture_time_of(None, stamp, host="here", **receipt) == pytest.approx(100.04)


def test_clocks_that_disagree_or_bad_metadata_give_the_time_of_receipt():
    receipt = {"received": 100.0, "wall_received": 5000.0, "host": "here"}
    ahead = '<sd_bridge wall_time="5000.5" host="there"/>'
    behind = f'<sd_bridge wall_time="{5000.0 - MAX_AGE - 1}" host="there"/>'
    garbled = '<sd_bridge capture_time="soon" host="here"/>'
    for metadata in (ahead, behind, garbled, "<other/>", ""):
        assert capture_time_of(metadata, None, **receipt) == 100.0
    assert parse_capture_metadata('<sd_bridge a="1"/><x/>') == {}


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ndi:td?bandwidth=low", "bandwidth='low' is unknown; use highest, or lowest"),
        ("ndi:td?url=10.0.0.5", "url='10.0.0.5' must be host:port, e.g. url=192.168.1.20:5961."),
        ("ndi:td?url=10.0.0.5:99999", "must be host:port"),
        ("ndi:", "An NDI source needs a sender name, e.g. ndi:TouchDesigner"),
    ],
)
def test_bad_source_options_are_one_sentence_before_anything_opens(uri, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        open_source(uri, width=8, height=8)


def test_option_names_are_checked_per_role():
    assert check_uri("ndi:td?url=10.0.0.5:5961&bandwidth=lowest&ips=10.0.0.7", "source")
    with pytest.raises(ValueError, match="'url' is not understood by ndi: as a sink; it takes fps"):
        check_uri("ndi:out?url=10.0.0.5:5961", "sink")
    with pytest.raises(ValueError, match="ndi: needs a name, e.g. ndi:sd-bridge"):
        open_sink("ndi:", width=8, height=8)


def test_without_ndi_python_the_message_names_the_extra(monkeypatch):
    monkeypatch.setattr(ndi_module, "_module", None)
    monkeypatch.setitem(sys.modules, "NDIlib", None)  # import NDIlib now raises ImportError
    expected = (
        "NDI needs ndi-python, which is not installed; run pip install streamdiffusion-bridge[ndi]."
    )
    with pytest.raises(TransportError) as as_source:
        open_source("ndi:td", width=8, height=8)
    with pytest.raises(TransportError) as as_sink:
        open_sink("ndi:out", width=8, height=8)
    assert str(as_source.value) == str(as_sink.value) == expected
