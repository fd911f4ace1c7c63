"""The OSC server: takes parameter changes and queries over UDP and answers the sender.

One thread reads datagrams and handles them one at a time, so changes apply in the order they
were sent. Datagrams are read with the bounded reader of `osc_datagram`, never by python-osc's
parser. Each message is validated against the schema and stored in the `ParamStore`; the server
never touches the GPU. Anything wrong with a message is answered with `/sd/error <address>
<sentence>` to its sender and logged through a throttle; a datagram that cannot be read at all is
counted and dropped.

A flood must not cost the messages after it: the socket asks for a receive buffer of
`RECEIVE_BUFFER` bytes, and the thread empties the socket into a bounded backlog before it
handles each datagram, so the kernel's buffer stays free for what comes next.
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
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType

from pythonosc.osc_message_builder import OscMessageBuilder

from bridge.control.osc_datagram import MAX_DATAGRAM, Incoming, OscDatagramError, read_datagram
from bridge.control.params import Kind, Param, ParamError, Value, describe
from bridge.control.store import ParamStore

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7000
MAX_SUBSCRIBERS = 16
SUBSCRIPTION_SECONDS = 30.0
"""How long a subscription lasts unless the subscriber sends `/sd/subscribe` again."""
RECEIVE_BUFFER = 8 * 1024 * 1024
"""Bytes of socket receive buffer asked for; the OS may grant less (Linux: net.core.rmem_max)."""
MAX_BACKLOG = 100_000
"""Datagrams read from the socket and not yet handled, at most; more are dropped and counted."""
MAX_BACKLOG_BYTES = 32 * 1024 * 1024
STOP_TIMEOUT = 2.0
"""Seconds `stop` waits for the server thread."""
MAX_SHOWN_ADDRESS = 64
"""Characters of a received address that a reply or a log line repeats."""
_DRAIN_BATCH = 256

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
    """Datagram counters: every one `received`, then those dropped or answered with an error.

    `overflowed` counts datagrams dropped because the backlog was full; they are not `received`.
    """

    received: int = 0
    refused_sender: int = 0
    malformed: int = 0
    errors: int = 0
    overflowed: int = 0


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

    The server thread and the threads that publish feedback share it, hence the lock.
    """

    def __init__(self, per_second: int = 10) -> None:
        self.per_second = per_second
        self._lock = threading.Lock()
        self._window = 0.0
        self._shown = 0
        self._suppressed = 0

    def warning(self, message: str, *args: object, exc_info: bool = False) -> None:
        with self._lock:
            self._warning(message, args, exc_info)

    def _warning(self, message: str, args: tuple[object, ...], exc_info: bool) -> None:
        at = time.monotonic()
        if at - self._window >= 1.0:
            if self._suppressed:
                log.warning("%d more OSC warnings in the last second not shown", self._suppressed)
            self._window, self._shown, self._suppressed = at, 0, 0
        if self._shown < self.per_second:
            self._shown += 1
            log.warning(message, *args, exc_info=exc_info)
        else:
            self._suppressed += 1


class OscServer:
    """Serves the parameter store over OSC on one UDP port, from its own thread.

    Binds `host` (default 127.0.0.1, loopback only) and `port` (default 7000; 0 picks a free
    one). Binding any other address needs `allow`: addresses, networks or host names whose
    datagrams are served; everyone else's are dropped and counted. `feedback` lists targets
    that always receive status and errors, besides those that `/sd/subscribe` (a subscription
    lasts `SUBSCRIPTION_SECONDS` unless renewed; `clock` tells the time for it). `/sd/quit`
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(
                f"OSC port {port} is out of range; pick one from 1 to 65535, or 0 to let the "
                "system pick a free one."
            )
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
        self._subscribers: dict[Target, float] = {}
        self._clock = clock
        self._stats = OscStats()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
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
        """The feedback targets: the configured ones, then those whose subscription is current."""
        with self._lock:
            self._drop_expired()
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
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
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
        sock.setblocking(False)
        self._sock = sock
        self._wake = socket.socketpair()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="osc-server", daemon=True)
        self._thread.start()
        log.debug("OSC server listening on %s:%d", *self.address)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if granted < RECEIVE_BUFFER // 2:
            # Linux reports twice what it grants; anything under half the request was capped.
            log.info(
                "OSC receive buffer is %d KiB of the %d KiB asked for; raise the system's "
                "limit (Linux: sysctl net.core.rmem_max) to ride out longer floods",
                granted // 1024,
                RECEIVE_BUFFER // 1024,
            )

    def stop(self) -> None:
        """Stop serving and release the port, waiting at most `STOP_TIMEOUT` for the thread."""
        if self._thread is None or self._wake is None or self._sock is None:
            return
        self._stopping.set()
        self._wake[1].send(b"\0")
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():
            log.warning(
                "the OSC server thread did not stop within %.0f s; left behind", STOP_TIMEOUT
            )
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
        """Send `/sd/status/input <state>` ("waiting", "lost" or "ok") to every feedback target."""
        for target in self.subscribers:
            self._send(target, "/sd/status/input", state)

    def report_error(self, address: str, sentence: str) -> None:
        """Send `/sd/error <address> <sentence>` to every feedback target and log it."""
        log.warning("%s", sentence)
        for target in self.subscribers:
            self._send(target, "/sd/error", address, sentence)

    def _serve(self) -> None:
        assert self._sock is not None and self._wake is not None
        sock, wake = self._sock, self._wake[0]
        backlog: deque[tuple[bytes, Target]] = deque()
        backlog_bytes = 0
        while not self._stopping.is_set():
            if not backlog:
                ready, _, _ = select.select([sock, wake], [], [])
                if wake in ready:
                    return
            # Empty the socket before each datagram is handled: handling is slower than the
            # kernel receives, and what its buffer cannot hold is lost without a trace.
            for _ in range(_DRAIN_BATCH):
                try:
                    data, sender = sock.recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError:
                    # Windows reports an earlier reply's "port unreachable" on the next read.
                    continue
                if len(backlog) >= MAX_BACKLOG or backlog_bytes + len(data) > MAX_BACKLOG_BYTES:
                    self._count(overflowed=1)
                    self._warnings.warning("OSC datagram dropped: %d waiting already", len(backlog))
                    continue
                backlog.append((data, (sender[0], sender[1])))
                backlog_bytes += len(data)
            if backlog:
                data, sender = backlog.popleft()
                backlog_bytes -= len(data)
                try:
                    self._handle(data, sender)
                except Exception:
                    # A bug must not end the thread that every controller depends on.
                    self._warnings.warning(
                        "OSC datagram from %s:%d was not handled", *sender, exc_info=True
                    )
                    self._count(errors=1)

    def _handle(self, data: bytes, sender: Target) -> None:
        self._count(received=1)
        if not self._is_allowed(sender[0]):
            self._count(refused_sender=1)
            self._warnings.warning("OSC datagram from %s dropped: not in the allow list", sender[0])
            return
        try:
            messages = read_datagram(data)
        except OscDatagramError as error:
            self._count(malformed=1)
            self._warnings.warning(
                "OSC datagram of %d bytes from %s:%d dropped: %s",
                len(data),
                sender[0],
                sender[1],
                error,
            )
            return
        self._apply(messages, sender)

    def _apply(self, messages: Sequence[Incoming], sender: Target) -> None:
        """Store a datagram's changes as one, then answer its queries in order."""
        changes: dict[str, Value] = {}
        queries: list[tuple[Callable[[Sequence[object], Target], None], tuple[object, ...]]] = []
        for message in messages:
            address = message.address
            param = self._store.param_at(address)
            known = param is not None or address in self._commands
            if known and message.problem:
                self._refuse(
                    sender,
                    address,
                    f"{address} could not be read: {message.problem}; send type tags that "
                    "match the data (OSC 1.0).",
                )
            elif param is not None:
                try:
                    changes[param.name] = param.from_osc(message.args)
                except ParamError as error:
                    self._refuse(sender, error.address, error.sentence)
            elif address in self._commands:
                queries.append((self._commands[address], message.args))
            elif (refusal := self._store.refusal(address)) is not None:
                self._refuse(sender, refusal.address, refusal.sentence)
            else:
                shown = shown_address(address)
                self._refuse(
                    sender,
                    shown,
                    f"unknown OSC address {shown}; send /sd/list to get every address "
                    "this server takes.",
                )
        while changes:
            try:
                self._store.set_many(changes)
                break
            except ParamError as error:
                self._refuse(sender, error.address, error.sentence)
                blamed = self._store.param_at(error.address)
                if blamed is None or changes.pop(blamed.name, None) is None:
                    break
        for query, args in queries:
            query(args, sender)

    def _get(self, args: Sequence[object], sender: Target) -> None:
        if not args:
            for param in self._store.params:
                self._send_value(sender, param)
            return
        key = args[0]
        param = self._store.find(key) if len(args) == 1 and isinstance(key, str) else None
        refusal = self._store.refusal(key) if len(args) == 1 and isinstance(key, str) else None
        if refusal is not None:
            self._refuse(sender, "/sd/get", refusal.sentence)
            return
        if param is None:
            self._refuse(
                sender,
                "/sd/get",
                f"/sd/get got {describe(list(args))}; send one parameter address (/sd/guidance) "
                "or its name (guidance), or nothing for all of them.",
            )
            return
        self._send_value(sender, param)

    def _send_value(self, target: Target, param: Param) -> None:
        self._send(target, "/sd/value", param.address, *param.to_osc(self._store.get(param.name)))

    def _list(self, args: Sequence[object], sender: Target) -> None:
        if args:
            self._refuse(sender, "/sd/list", f"/sd/list got {describe(list(args))}; send it bare.")
            return
        for param in self._store.params:
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
            self._drop_expired()
            if target in self._subscribers or len(self._subscribers) < MAX_SUBSCRIBERS:
                self._subscribers[target] = self._clock() + SUBSCRIPTION_SECONDS
                return
        self._refuse(
            sender,
            "/sd/subscribe",
            f"/sd/subscribe refused: {MAX_SUBSCRIBERS} targets already subscribed; "
            "send /sd/unsubscribe from one you no longer use, or wait "
            f"{SUBSCRIPTION_SECONDS:.0f} s for a silent one to expire.",
        )

    def _drop_expired(self) -> None:
        """Forget subscriptions that were not renewed in time; call with the lock held."""
        now = self._clock()
        for target in [t for t, expires in self._subscribers.items() if expires <= now]:
            del self._subscribers[target]

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
            self._subscribers.pop((sender[0], port), None)

    def _port_argument(self, address: str, args: Sequence[object], sender: Target) -> int | None:
        # Pure Data's oscformat sends every number as a float: a whole one is a port too.
        port = args[0] if len(args) == 1 else None
        if isinstance(port, float) and port.is_integer():
            port = int(port)
        if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
            return port
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
        except BlockingIOError:
            self._warnings.warning("OSC reply to %s:%d dropped: send buffer full", *target)
        except OSError as error:
            self._warnings.warning("OSC reply to %s:%d not sent: %s", *target, error)

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


def shown_address(address: str) -> str:
    """`address` safe to log and to echo: control characters escaped, at most a few dozen kept."""
    escaped = (
        address.encode("unicode_escape").decode("ascii") if not address.isprintable() else address
    )
    if len(escaped) > MAX_SHOWN_ADDRESS:
        return escaped[: MAX_SHOWN_ADDRESS - 3] + "..."
    return escaped


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
