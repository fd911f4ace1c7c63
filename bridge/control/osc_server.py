"""The OSC server: takes parameter changes and queries over UDP and answers the sender.

One thread reads datagrams one at a time, so changes apply in the order they were sent. Each
message is validated against the schema and stored in the `ParamStore`; the server never touches
the GPU. Anything wrong with a message is answered with `/sd/error <address> <sentence>` to its
sender and logged; a datagram that cannot be parsed at all is counted and dropped.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import numbers
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType

from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

from bridge.control.params import (
    PARAMS,
    PARAMS_BY_ADDRESS,
    PARAMS_BY_NAME,
    Kind,
    Param,
    ParamError,
    Value,
    describe,
)
from bridge.control.store import ParamStore

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7000
MAX_SUBSCRIBERS = 16
_MAX_DATAGRAM = 65535

Target = tuple[str, int]
"""A host and UDP port that replies or feedback go to."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)

log = logging.getLogger(__name__)


class OscServerError(Exception):
    """The OSC server cannot start; the message says why and what to change."""


class OscPortInUseError(OscServerError):
    """Another program already holds the OSC port."""


@dataclass(frozen=True)
class OscStats:
    """Datagram counters: every one `received`, then those dropped or answered with an error."""

    received: int = 0
    refused_sender: int = 0
    malformed: int = 0
    errors: int = 0


def parse_target(text: str) -> Target:
    """Parse a feedback target written `host:port` (`[::1]:9000` for IPv6)."""
    host, _, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(
            f"OSC feedback target {text!r} is not host:port; write it like 127.0.0.1:9000."
        )
    return host, int(port_text)


def parse_allow(entries: Iterable[str]) -> tuple[Network, ...]:
    """Parse an allow list of addresses, CIDR networks or host names into networks."""
    networks: list[Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(entry.strip(), None, type=socket.SOCK_DGRAM)
        except (socket.gaierror, UnicodeError):
            raise ValueError(
                f"OSC allow entry {entry!r} is not an address, a network or a known host; "
                "write it like 192.168.1.20 or 192.168.1.0/24."
            ) from None
        networks.extend(ipaddress.ip_network(info[4][0].split("%", 1)[0]) for info in infos)
    return tuple(networks)


class _ThrottledLog:
    """At most `per_second` warnings a second; a flood of bad datagrams is summarised instead.

    Only the server thread logs through it, so it needs no lock.
    """

    def __init__(self, per_second: int = 10) -> None:
        self.per_second = per_second
        self._window = 0.0
        self._shown = 0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        at = time.monotonic()
        if at - self._window >= 1.0:
            if self._suppressed:
                log.warning("%d more OSC warnings in the last second not shown", self._suppressed)
            self._window, self._shown, self._suppressed = at, 0, 0
        if self._shown < self.per_second:
            self._shown += 1
            log.warning(message, *args)
        else:
            self._suppressed += 1


class OscServer:
    """Serves the parameter store over OSC on one UDP port, from its own thread.

    Binds `host` (default 127.0.0.1, loopback only) and `port` (default 7000; 0 picks a free
    one). Binding any other address needs `allow`: addresses, networks or host names whose
    datagrams are served; everyone else's are dropped and counted. `feedback` lists targets
    that always receive status and errors, besides those that `/sd/subscribe`. `/sd/quit`
    calls `on_quit` (a plugin's clean way to stop the bridge where it cannot send a signal).
    """

    def __init__(
        self,
        store: ParamStore,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        allow: Iterable[str] = (),
        feedback: Iterable[Target] = (),
        on_quit: Callable[[], None] | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"OSC port {port} is out of range; pick one from 1 to 65535.")
        allowed = parse_allow(allow)
        if not allowed:
            if not _is_loopback(host):
                raise ValueError(
                    f"binding the OSC server to {host} opens it to the network; pass an allow "
                    "list (--osc-allow) naming the controllers' addresses or networks."
                )
            allowed = _LOOPBACK
        self._store = store
        self._host = host
        self._port = port
        self._allowed = allowed
        self._feedback = tuple(feedback)
        self._subscribers: list[Target] = []
        self._stats = OscStats()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._commands: dict[str, Callable[[Sequence[object], Target], None]] = {
            "/sd/get": self._get,
            "/sd/list": self._list,
            "/sd/subscribe": self._subscribe,
            "/sd/unsubscribe": self._unsubscribe,
            "/sd/quit": self._quit,
        }
        self._on_quit = on_quit
        self._warnings = _ThrottledLog()

    @property
    def address(self) -> Target:
        """The host and port the server is bound to (the real port when started with 0)."""
        if self._sock is None:
            return self._host, self._port
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def stats(self) -> OscStats:
        """The datagram counters so far."""
        with self._lock:
            return self._stats

    @property
    def subscribers(self) -> tuple[Target, ...]:
        """The feedback targets: the configured ones, then those that subscribed."""
        with self._lock:
            return self._feedback + tuple(self._subscribers)

    def start(self) -> None:
        """Bind the port and start serving; raise `OscServerError` if the port can't be bound."""
        if self._thread is not None:
            return
        try:
            family = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_DGRAM)[0][0]
        except socket.gaierror:
            raise OscServerError(
                f"OSC host {self._host!r} does not resolve; pass an address with --osc-host."
            ) from None
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
            # Windows otherwise lets a second program bind the same port and steal datagrams.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError as error:
            sock.close()
            if error.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", None)):
                raise OscPortInUseError(
                    f"OSC port {self._port} on {self._host} is already in use; stop the other "
                    "program or pick another port with --osc-port."
                ) from None
            raise OscServerError(
                f"cannot bind the OSC server to {self._host}:{self._port} ({error.strerror}); "
                "pass a local address with --osc-host or another port with --osc-port."
            ) from None
        self._sock = sock
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="osc-server", daemon=True)
        self._thread.start()
        log.info("OSC server listening on %s:%d", *self.address)

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._thread is None or self._wake is None or self._sock is None:
            return
        self._wake[1].send(b"\0")
        self._thread.join()
        self._sock.close()
        for end in self._wake:
            end.close()
        self._thread = self._wake = self._sock = None

    def __enter__(self) -> OscServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def publish_status(self, fps: float, latency_ms: float, drops: int, skips: int) -> None:
        """Send `/sd/status/fps`, `latency_ms`, `drops` and `skips` to every feedback target."""
        for target in self.subscribers:
            self._send(target, "/sd/status/fps", float(fps))
            self._send(target, "/sd/status/latency_ms", float(latency_ms))
            self._send(target, "/sd/status/drops", int(drops))
            self._send(target, "/sd/status/skips", int(skips))

    def publish_input(self, state: str) -> None:
        """Send `/sd/status/input <state>` ("lost" or "ok") to every feedback target."""
        for target in self.subscribers:
            self._send(target, "/sd/status/input", state)

    def report_error(self, address: str, sentence: str) -> None:
        """Send `/sd/error <address> <sentence>` to every feedback target and log it."""
        log.warning("%s", sentence)
        for target in self.subscribers:
            self._send(target, "/sd/error", address, sentence)

    def _serve(self) -> None:
        assert self._sock is not None and self._wake is not None
        while True:
            ready, _, _ = select.select([self._sock, self._wake[0]], [], [])
            if self._wake[0] in ready:
                return
            try:
                data, sender = self._sock.recvfrom(_MAX_DATAGRAM)
            except OSError:
                # Windows reports an earlier reply's "port unreachable" on the next read.
                continue
            try:
                self._handle(data, (sender[0], sender[1]))
            except Exception:
                # A bug must not end the thread that every controller depends on.
                log.exception("OSC datagram from %s:%d was not handled", *sender[:2])
                self._count(errors=1)

    def _handle(self, data: bytes, sender: Target) -> None:
        self._count(received=1)
        if not self._is_allowed(sender[0]):
            self._count(refused_sender=1)
            self._warnings.warning("OSC datagram from %s dropped: not in the allow list", sender[0])
            return
        try:
            messages = [timed.message for timed in OscPacket(data).messages]
        except Exception as error:
            # python-osc's parser raises ParseError, UnicodeDecodeError, RecursionError and
            # others on hostile input; all of them mean the same: an unreadable datagram.
            self._count(malformed=1)
            self._warnings.warning(
                "OSC datagram of %d bytes from %s:%d dropped: %s",
                len(data),
                sender[0],
                sender[1],
                type(error).__name__,
            )
            return
        self._apply(messages, sender)

    def _apply(self, messages: Sequence[OscMessage], sender: Target) -> None:
        """Store a datagram's changes as one, then answer its queries in order."""
        changes: dict[str, Value] = {}
        queries: list[tuple[Callable[[Sequence[object], Target], None], list[object]]] = []
        for message in messages:
            address = message.address
            param = PARAMS_BY_ADDRESS.get(address)
            if param is not None:
                try:
                    changes[param.name] = param.from_osc(message.params)
                except ParamError as error:
                    self._refuse(sender, error.address, error.sentence)
            elif address in self._commands:
                queries.append((self._commands[address], message.params))
            else:
                self._refuse(
                    sender,
                    address,
                    f"unknown OSC address {address}; send /sd/list to get every address "
                    "this server takes.",
                )
        while changes:
            try:
                self._store.set_many(changes)
                break
            except ParamError as error:
                self._refuse(sender, error.address, error.sentence)
                blamed = PARAMS_BY_ADDRESS.get(error.address)
                if blamed is None or changes.pop(blamed.name, None) is None:
                    break
        for query, args in queries:
            query(args, sender)

    def _get(self, args: Sequence[object], sender: Target) -> None:
        if not args:
            for param in PARAMS:
                self._send_value(sender, param)
            return
        key = args[0]
        param = None
        if len(args) == 1 and isinstance(key, str):
            param = PARAMS_BY_ADDRESS.get(key) or PARAMS_BY_NAME.get(key)
        if param is None:
            self._refuse(
                sender,
                "/sd/get",
                f"/sd/get got {describe(list(args))}; send one parameter address or name, "
                "or nothing for all of them.",
            )
            return
        self._send_value(sender, param)

    def _send_value(self, target: Target, param: Param) -> None:
        self._send(target, "/sd/value", param.address, *param.to_osc(self._store.get(param.name)))

    def _list(self, args: Sequence[object], sender: Target) -> None:
        if args:
            self._refuse(sender, "/sd/list", f"/sd/list got {describe(list(args))}; send it bare.")
            return
        for param in PARAMS:
            self._send(sender, "/sd/param", param.address, *self._describe_param(param))

    def _describe_param(self, param: Param) -> list[int | float | str]:
        """Return a param's type tag, range (or choices) and default for `/sd/param`."""
        default = param.to_osc(param.default)
        if param.kind is Kind.FLOAT:
            assert param.minimum is not None and param.maximum is not None
            upper = _float32_below(param.maximum) if param.maximum_exclusive else param.maximum
            return ["f", float(param.minimum), upper, *default]
        if param.kind is Kind.INT:
            return ["i", int(param.minimum or 0), int(param.maximum or 0), *default]
        if param.kind is Kind.BOOL:
            return ["i", 0, 1, *default]
        if param.kind is Kind.STRING:
            return ["s", 0, param.max_length, *default]
        if param.kind is Kind.CHOICE:
            return ["s", "|".join(param.choices), *default]
        steps = self._store.get("num_inference_steps")
        assert isinstance(steps, int)
        return ["i+", int(param.minimum or 0), steps - 1, *default]

    def _subscribe(self, args: Sequence[object], sender: Target) -> None:
        port = self._port_argument("/sd/subscribe", args, sender)
        if port is None:
            return
        target = (sender[0], port)
        with self._lock:
            if target in self._subscribers:
                return
            if len(self._subscribers) < MAX_SUBSCRIBERS:
                self._subscribers.append(target)
                return
        self._refuse(
            sender,
            "/sd/subscribe",
            f"/sd/subscribe refused: {MAX_SUBSCRIBERS} targets already subscribed; "
            "send /sd/unsubscribe from one you no longer use.",
        )

    def _quit(self, args: Sequence[object], sender: Target) -> None:
        if args:
            self._refuse(sender, "/sd/quit", "/sd/quit takes no arguments; send it bare.")
            return
        if self._on_quit is None:
            self._refuse(sender, "/sd/quit", "this server cannot stop its process.")
            return
        log.info("stopping: /sd/quit from %s:%d", *sender)
        self._on_quit()

    def _unsubscribe(self, args: Sequence[object], sender: Target) -> None:
        port = self._port_argument("/sd/unsubscribe", args, sender)
        if port is None:
            return
        with self._lock:
            if (sender[0], port) in self._subscribers:
                self._subscribers.remove((sender[0], port))

    def _port_argument(self, address: str, args: Sequence[object], sender: Target) -> int | None:
        if len(args) == 1 and isinstance(args[0], int) and not isinstance(args[0], bool):
            if 1 <= args[0] <= 65535:
                return args[0]
        self._refuse(
            sender,
            address,
            f"{address} got {describe(list(args))}; send the port (1 to 65535) to send to.",
        )
        return None

    def _refuse(self, sender: Target, address: str, sentence: str) -> None:
        self._count(errors=1)
        self._warnings.warning("OSC from %s:%d refused: %s", sender[0], sender[1], sentence)
        self._send(sender, "/sd/error", address, sentence)

    def _send(self, target: Target, address: str, *args: object) -> None:
        sock = self._sock
        if sock is None:
            return
        builder = OscMessageBuilder(address=address)
        for arg in args:
            builder.add_arg(_plain(arg))
        try:
            sock.sendto(builder.build().dgram, target)
        except OSError as error:
            log.debug("OSC reply to %s:%d not sent: %s", target[0], target[1], error)

    def _is_allowed(self, host: str) -> bool:
        address = ipaddress.ip_address(host.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._allowed)

    def _count(self, **increments: int) -> None:
        with self._lock:
            self._stats = replace(
                self._stats,
                **{name: getattr(self._stats, name) + n for name, n in increments.items()},
            )


def _plain(value: object) -> int | float | str:
    """Convert numpy scalars and bools to the plain types python-osc can encode."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"cannot send {value!r} over OSC; send an int, a float or a string.")


def _float32_below(limit: float) -> float:
    """Return the largest 32-bit float below `limit`, the top a UI may send for `< limit`."""
    (bits,) = struct.unpack(">I", struct.pack(">f", limit))
    (below,) = struct.unpack(">f", struct.pack(">I", bits - 1))
    return float(below)


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%", 1)[0]).is_loopback for info in infos)
