"""The OSC server over real UDP on loopback: changes, queries, errors, feedback, security."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from pythonosc.udp_client import SimpleUDPClient

from bridge.control import (
    OscClient,
    OscPortInUseError,
    OscServer,
    ParamStore,
    osc_server,
    parse_allow,
    parse_target,
)
from bridge.control.osc_server import MAX_SUBSCRIBERS, SUBSCRIPTION_SECONDS
from bridge.control.params import PARAMS, Kind, Param, Value
from tests.control.helpers import exchange, receive_all, wait_until


def changed_value(param: Param) -> Value:
    """A valid value other than the default, exactly representable as a 32-bit float."""
    if param.kind is Kind.FLOAT:
        return 0.5 if param.maximum_exclusive else float(param.maximum or 0)
    if param.kind is Kind.INT:
        top = int(param.maximum or 0)
        return top if top != param.default else top - 1
    if param.kind is Kind.BOOL:
        return not param.default
    if param.kind is Kind.STRING:
        return "a forest at dawn, oil on canvas"
    if param.kind is Kind.CHOICE:
        return next(choice for choice in param.choices if choice != param.default)
    return (3, 7, 11)


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: p.name)
def test_each_address_sets_its_param(param: Param, store: ParamStore, client: OscClient) -> None:
    value = changed_value(param)
    assert value != param.default
    client.send(param.address, *param.to_osc(value))
    assert client.get(param.address) == param.to_osc(value)
    assert store.get(param.name) == value


def test_true_and_false_tags_set_booleans(store: ParamStore, client: OscClient) -> None:
    client.send("/sd/filter/enable", True)
    assert client.get("/sd/filter/enable") == [1]
    client.send("/sd/filter/enable", False)
    assert client.get("/sd/filter/enable") == [0]
    assert store.get("similarity_filter") is False


def test_t_index_accepts_an_osc_array(store: ParamStore, client: OscClient) -> None:
    client.send("/sd/t_index", [10, 20, 30])
    assert client.get("t_index_list") == [10, 20, 30]


def test_get_by_name_answers_with_the_address(client: OscClient) -> None:
    client.send("/sd/get", "delta")
    assert client.receive() == ("/sd/value", ["/sd/delta", 1.0])


def test_bare_get_answers_every_param(client: OscClient) -> None:
    client.send("/sd/get")
    replies = receive_all(client)
    assert [args[0] for _, args in replies] == [p.address for p in PARAMS]
    assert {address for address, _ in replies} == {"/sd/value"}


def test_list_describes_every_param_for_a_ui(client: OscClient) -> None:
    client.send("/sd/list")
    described = {args[0]: args[1:] for address, args in receive_all(client)}
    assert list(described) == [p.address for p in PARAMS]
    assert described["/sd/delta"] == ["f", 0.0, 5.0, 1.0]
    assert described["/sd/seed"] == ["i", 0, 2**31 - 1, 2]
    assert described["/sd/pause"] == ["i", 0, 1, 0]
    assert described["/sd/cfg"] == ["s", "none|full|self|initialize", "self"]
    assert described["/sd/prompt"][:3] == ["s", 0, 1000]
    assert described["/sd/t_index"] == ["i+", 0, 49, 32, 45]
    assert 0.99 < described["/sd/filter/threshold"][2] < 1.0


def test_list_bounds_t_index_by_the_current_step_count(client: OscClient) -> None:
    client.send_bundle([("/sd/num_inference_steps", [20]), ("/sd/t_index", [4, 12])])
    client.send("/sd/list")
    described = {args[0]: args[1:] for _, args in receive_all(client)}
    assert described["/sd/t_index"][:3] == ["i+", 0, 19]


def test_a_burst_keeps_its_order(store: ParamStore, server: OscServer) -> None:
    sender = SimpleUDPClient(*server.address)
    for seed in range(1000, 1200):
        sender.send_message("/sd/seed", seed)
    assert wait_until(lambda: server.stats.received == 200)
    assert store.get("seed") == 1199
    assert store.version == 200


def test_a_bundle_is_stored_as_one_change(store: ParamStore, client: OscClient) -> None:
    # Alone, the first message would be refused: 45 is not below 30.
    client.send_bundle(
        [("/sd/num_inference_steps", [30]), ("/sd/t_index", [10, 25]), ("/sd/delta", [0.25])]
    )
    assert client.get("/sd/t_index") == [10, 25]
    assert store.version == 1
    assert store.snapshot().changed_since(0) == {"num_inference_steps", "t_index_list", "delta"}


def test_a_bad_message_in_a_bundle_is_refused_alone(store: ParamStore, client: OscClient) -> None:
    client.send_bundle([("/sd/delta", [9.0]), ("/sd/seed", [77])])
    replies = exchange(client, "/sd/get", [], "/sd/seed")
    assert ("/sd/error", ["/sd/delta", "/sd/delta got 9.0; send a float from 0.0 to 5.0."]) in (
        replies
    )
    assert (store.get("seed"), store.get("delta")) == (77, 1.0)


def test_queries_in_a_bundle_see_its_changes(client: OscClient) -> None:
    client.send_bundle([("/sd/get", ["/sd/seed"]), ("/sd/seed", [12])])
    assert client.receive() == ("/sd/value", ["/sd/seed", 12])


@pytest.mark.parametrize(
    ("address", "args", "blamed", "fragment"),
    [
        ("/sd/delta", [float("nan")], "/sd/delta", "got nan"),
        ("/sd/guidance", [float("inf")], "/sd/guidance", "got inf"),
        ("/sd/seed", [-5], "/sd/seed", "an int from 0 to 2147483647"),
        ("/sd/seed", ["five"], "/sd/seed", "got 'five'"),
        ("/sd/seed", [1.5], "/sd/seed", "got 1.5"),
        ("/sd/seed", [], "/sd/seed", "got no argument"),
        ("/sd/seed", [1, 2], "/sd/seed", "got 2 arguments"),
        ("/sd/cfg", ["half"], "/sd/cfg", "none, full, self, initialize"),
        ("/sd/prompt", ["p" * 1001], "/sd/prompt", "1001-character string"),
        ("/sd/t_index", [45, 32], "/sd/t_index", "strictly increasing"),
        ("/sd/t_index", [10, 60], "/sd/t_index", "each from 0 to num_inference_steps - 1"),
        ("/sd/num_inference_steps", [40], "/sd/num_inference_steps", "needs at least 46"),
        ("/sd/strength", [0.5], "/sd/strength", "unknown OSC address /sd/strength"),
        ("/sd/get", ["/sd/strength"], "/sd/get", "send one parameter address"),
        ("/sd/list", [1], "/sd/list", "send it bare"),
        ("/sd/subscribe", ["9000"], "/sd/subscribe", "send the port"),
        ("/sd/subscribe", [70000], "/sd/subscribe", "send the port"),
    ],
)
def test_refused_messages_are_answered_with_one_sentence(
    address, args, blamed, fragment, store: ParamStore, server: OscServer, client: OscClient
) -> None:
    before = store.snapshot()
    replies = exchange(client, address, args, "/sd/seed")
    errors = [reply_args for reply, reply_args in replies if reply == "/sd/error"]
    assert len(errors) == 1
    assert errors[0][0] == blamed
    assert fragment in errors[0][1]
    assert errors[0][1].endswith(".") and "\n" not in errors[0][1]
    assert store.snapshot() is before
    assert server.stats.errors == 1


def test_a_failing_handler_does_not_stop_the_server(
    store: ParamStore, server: OscServer, client: OscClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(changes: object) -> None:
        raise RuntimeError("engine bug")

    monkeypatch.setattr(store, "set_many", broken)
    client.send("/sd/seed", 3)
    assert client.get("/sd/seed") == [2]
    assert server.stats.errors == 1


def test_subscribers_get_the_four_status_messages(
    server: OscServer, client: OscClient, listener: OscClient
) -> None:
    client.send("/sd/subscribe", listener.local_address[1])
    client.get("/sd/seed")
    assert server.subscribers == (listener.local_address,)
    server.publish_status(np.float32(29.5), np.float64(12.25), np.int64(3), np.int32(4))
    assert receive_all(listener) == [
        ("/sd/status/fps", [29.5]),
        ("/sd/status/latency_ms", [12.25]),
        ("/sd/status/drops", [3]),
        ("/sd/status/skips", [4]),
    ]


def test_subscribers_get_reported_errors(
    server: OscServer, client: OscClient, listener: OscClient
) -> None:
    client.send("/sd/subscribe", listener.local_address[1])
    client.get("/sd/seed")
    server.report_error("/sd/prompt", "the prompt could not be encoded; send a shorter one.")
    assert listener.receive() == (
        "/sd/error",
        ["/sd/prompt", "the prompt could not be encoded; send a shorter one."],
    )


def test_unsubscribe_stops_feedback(
    server: OscServer, client: OscClient, listener: OscClient
) -> None:
    port = listener.local_address[1]
    client.send("/sd/subscribe", port)
    client.send("/sd/subscribe", port)
    client.send("/sd/unsubscribe", port)
    client.get("/sd/seed")
    assert server.subscribers == ()
    server.publish_status(30.0, 10.0, 0, 0)
    assert listener.receive(0.2) is None


def test_subscriptions_are_capped(server: OscServer, client: OscClient) -> None:
    for port in range(20000, 20000 + MAX_SUBSCRIBERS):
        client.send("/sd/subscribe", port)
    replies = exchange(client, "/sd/subscribe", [30000], "/sd/seed")
    assert replies[0][0] == "/sd/error"
    assert "unsubscribe" in replies[0][1][1]
    assert len(server.subscribers) == MAX_SUBSCRIBERS


def test_configured_feedback_targets_need_no_subscription(
    store: ParamStore, listener: OscClient
) -> None:
    with OscServer(store, port=0, feedback=[listener.local_address]) as server:
        server.publish_status(60.0, 8.0, 1, 2)
        assert [address for address, _ in receive_all(listener)] == [
            "/sd/status/fps",
            "/sd/status/latency_ms",
            "/sd/status/drops",
            "/sd/status/skips",
        ]


def test_a_port_in_use_raises_a_sentence_naming_the_port_and_the_flag(store: ParamStore) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(OscPortInUseError) as raised:
            OscServer(store, port=port).start()
    assert str(port) in str(raised.value)
    assert "--osc-port" in str(raised.value)


def test_stop_releases_the_port(store: ParamStore) -> None:
    server = OscServer(store, port=0)
    server.start()
    port = server.address[1]
    server.stop()
    with OscServer(store, port=port) as again:
        assert again.address == ("127.0.0.1", port)


def test_binding_beyond_loopback_needs_an_allow_list(store: ParamStore) -> None:
    with pytest.raises(ValueError, match="--osc-allow"):
        OscServer(store, host="0.0.0.0")


@pytest.mark.parametrize(
    ("host", "allow"), [("127.0.0.1", ["127.0.0.1"]), ("0.0.0.0", ["127.0.0.0/31"])]
)
def test_the_allow_list_drops_other_senders(host: str, allow: list[str], store: ParamStore) -> None:
    with OscServer(store, host=host, port=0, allow=allow) as server:
        port = server.address[1]
        with OscClient("127.0.0.1", port, local_host="127.0.0.2", timeout=0.3) as outsider:
            outsider.send("/sd/seed", 7)
            outsider.send("/sd/get", "/sd/seed")
            assert wait_until(lambda: server.stats.refused_sender == 2)
            assert outsider.receive() is None
        assert store.get("seed") == 2
        with OscClient("127.0.0.1", port, local_host="127.0.0.1") as insider:
            insider.send("/sd/seed", 7)
            assert insider.get("/sd/seed") == [7]
        assert server.stats.refused_sender == 2


def test_the_default_loopback_bind_serves_any_loopback_sender(server: OscServer) -> None:
    with OscClient(*server.address, local_host="127.0.0.2") as other:
        assert other.get("/sd/seed") == [2]
    assert server.stats.refused_sender == 0


def test_feedback_targets_parse_from_host_colon_port() -> None:
    assert parse_target("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_target("[::1]:9000") == ("::1", 9000)
    for bad in ("9000", "host:", "host:99999", "host:port"):
        with pytest.raises(ValueError, match="host:port"):
            parse_target(bad)


def test_allow_entries_parse_as_addresses_networks_or_hosts() -> None:
    networks = parse_allow(["192.168.1.0/24", "10.0.0.5", "localhost"])
    assert str(networks[0]) == "192.168.1.0/24"
    assert str(networks[1]) == "10.0.0.5/32"
    assert any(net.network_address.is_loopback for net in networks[2:])
    with pytest.raises(ValueError, match="192.168.1.0/24"):
        parse_allow(["not a host!"])


def test_a_flood_of_bad_datagrams_is_logged_at_a_bounded_rate(server, client, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="sd_bridge"):
        for index in range(300):
            client.send_raw(b"\x00garbage")
            if index % 50 == 49:
                time.sleep(0.02)  # stay within the socket's receive buffer
        client.send("/sd/delta", 9.0)
        reply = client.receive(5.0)
        assert reply is not None and reply[0] == "/sd/error"  # the server read past the flood
    shown = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert 1 <= len(shown) <= 20
    assert server.stats.malformed == 300


@pytest.mark.parametrize(
    ("asked", "address"),
    [
        ("guidance", "/sd/guidance"),
        ("guidance_scale", "/sd/guidance"),
        ("/sd/guidance", "/sd/guidance"),
        ("filter/enable", "/sd/filter/enable"),
        ("filter_enable", "/sd/filter/enable"),
        ("similarity_filter", "/sd/filter/enable"),
        ("t_index", "/sd/t_index"),
    ],
)
def test_get_takes_every_name_a_user_knows(asked: str, address: str, client: OscClient) -> None:
    client.send("/sd/get", asked)
    reply = client.receive(10.0)
    assert reply is not None and reply[0] == "/sd/value" and reply[1][0] == address


def test_subscribe_takes_a_whole_float_port_as_pure_data_sends_it(
    server: OscServer, client: OscClient, listener: OscClient
) -> None:
    client.send("/sd/subscribe", float(listener.local_address[1]))
    client.send("/sd/subscribe", 9000.5)
    reply = client.receive(10.0)
    assert reply is not None and reply[1][0] == "/sd/subscribe"
    assert server.subscribers == (listener.local_address,)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_subscriptions_expire_unless_renewed(store: ParamStore) -> None:
    clock = FakeClock()
    with OscServer(store, port=0, clock=clock) as server, OscClient(*server.address) as client:
        client.send("/sd/subscribe", 20001)
        client.send("/sd/subscribe", 20002)
        client.get("/sd/seed", timeout=10.0)
        clock.now += SUBSCRIPTION_SECONDS - 1
        client.send("/sd/subscribe", 20002)
        client.get("/sd/seed", timeout=10.0)
        clock.now += 2
        assert server.subscribers == (("127.0.0.1", 20002),)
        clock.now += SUBSCRIPTION_SECONDS
        assert server.subscribers == ()


def test_expired_subscriptions_free_their_places(store: ParamStore) -> None:
    clock = FakeClock()
    with OscServer(store, port=0, clock=clock) as server, OscClient(*server.address) as client:
        for port in range(20000, 20000 + MAX_SUBSCRIBERS):
            client.send("/sd/subscribe", port)
        client.get("/sd/seed", timeout=10.0)
        assert len(server.subscribers) == MAX_SUBSCRIBERS
        clock.now += SUBSCRIPTION_SECONDS
        client.send("/sd/subscribe", 30000)
        client.get("/sd/seed", timeout=10.0)
        assert server.subscribers == (("127.0.0.1", 30000),)


def test_a_port_out_of_range_is_refused_naming_the_range_and_zero(store: ParamStore) -> None:
    with pytest.raises(ValueError, match="from 1 to 65535, or 0 to let the system pick"):
        OscServer(store, port=65536)


def test_stop_returns_even_when_a_handler_is_stuck(
    store: ParamStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    entered = threading.Event()

    def stuck(changes: object) -> None:
        entered.set()
        release.wait(30)

    monkeypatch.setattr(store, "set_many", stuck)
    monkeypatch.setattr(osc_server, "STOP_TIMEOUT", 0.2)
    server = OscServer(store, port=0)
    server.start()
    try:
        with OscClient(*server.address) as client:
            client.send("/sd/seed", 3)
            assert entered.wait(10)
        server.stop()
        assert server.address[1] == 0  # stopped and released although the thread still runs
    finally:
        release.set()


def test_receive_with_no_wait_returns_a_reply_that_has_already_arrived(client: OscClient) -> None:
    client.send("/sd/get", "seed")
    reply = None
    for _ in range(2000):  # polling as a frame loop does; at most about 10 s
        reply = client.receive(0)
        if reply is not None:
            break
        time.sleep(0.005)
    assert reply is not None and reply[0] == "/sd/value" and reply[1][0] == "/sd/seed"
