"""asyncio glue between QuicLink and MoqtSession: a relay server and a client connection.

ALPN picks the draft: `moqt-16` is draft-16, `moq-00` is draft-14 (whose version is then
confirmed in CLIENT_SETUP/SERVER_SETUP).

A client that cannot reach a session raises ConnectFailed, whose ConnectFailure says how (no
answer, certificate refused, draft refused, SETUP failed): one line for the user, one exit code.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

from aioquic.asyncio import connect
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import AlertDescription

from ..moq import messages as m
from ..moq.params import ALPN, LEGACY_ALPN, Version
from ..moq.relay import Peer, Relay
from ..moq.session import Closed, Event, MessageReceived, MoqtSession, Ready
from ..moq.wire import ErrorCode
from ..quic.link import Limits, LinkServer, QuicLink, configuration, serve, size_socket_buffers

if TYPE_CHECKING:
    from ..datapath.kernel.path import KernelDatapath

log = logging.getLogger("fastrelay.moq")

ALPN_OF = {Version.DRAFT_16: ALPN[Version.DRAFT_16], Version.DRAFT_14: LEGACY_ALPN}
VERSION_OF = {alpn: v for v, alpn in ALPN_OF.items()}
CONNECT_TIMEOUT_S = 5.0  # default wait for the QUIC handshake, then again for SERVER_SETUP


class ConnectFailure(enum.IntEnum):
    """How connecting a client to a relay failed. The values are the exit codes of `fastrelay
    publish` and `subscribe` (next to 1, any other error, and 2, bad arguments)."""

    NO_ANSWER = 3
    CERTIFICATE_REFUSED = 4
    VERSION_REFUSED = 5
    SETUP_FAILED = 6
    HANDSHAKE_FAILED = 7


CONNECT_FAILURE_HELP = {
    ConnectFailure.NO_ANSWER: "no QUIC answer from the relay within --connect-timeout",
    ConnectFailure.CERTIFICATE_REFUSED: "the relay's TLS certificate was refused (--verify-cert, --ca)",
    ConnectFailure.VERSION_REFUSED: "the relay does not speak our MoQT draft (ALPN refused; see --draft)",
    ConnectFailure.SETUP_FAILED: "the relay ended the session during MoQT SETUP, or sent no SERVER_SETUP in time",
    ConnectFailure.HANDSHAKE_FAILED: "any other QUIC/TLS handshake failure",
}


class ConnectFailed(ConnectionError):
    """A client could not get a MoQT session: `failure` says how, str() is one line for the user."""

    def __init__(self, failure: ConnectFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure


# alerts our TLS client raises when it refuses the server's certificate (the relay asks for no
# client certificate, so it never sends these)
_CERTIFICATE_ALERTS = {AlertDescription.bad_certificate, AlertDescription.unsupported_certificate,
                       AlertDescription.certificate_revoked, AlertDescription.certificate_expired,
                       AlertDescription.certificate_unknown, AlertDescription.unknown_ca}


@dataclass(frozen=True)
class MoqtUrl:
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, text: str) -> MoqtUrl:
        u = urlsplit(text)
        if u.scheme != "moqt":
            raise ValueError(f"{text!r}: expected moqt://HOST:PORT (WebTransport is not supported yet)")
        if not u.hostname or not u.port:
            raise ValueError(f"{text!r}: host and port are required")
        return cls(u.hostname, u.port, u.path)

    @property
    def address(self) -> str:
        """HOST:PORT ([HOST]:PORT for IPv6), for messages."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class SessionGlue:
    """LinkHandler that creates the MoqtSession once ALPN is known and forwards everything."""

    def __init__(self, link: QuicLink, *, client: bool, on_session: Callable[[MoqtSession], Callable[[Event], None]],
                 version: Version | None = None) -> None:
        self.link = link
        self.client = client
        self.version = version
        self.session: MoqtSession | None = None
        self._on_session = on_session
        self.on_input: Callable[[], None] | None = None
        self.on_raw: Callable[[int, bytes, bool], None] | None = None  # stream bytes before parsing

    def handshake_completed(self, link: QuicLink, alpn: str | None) -> None:
        version = VERSION_OF.get(alpn or "")
        if version is None:
            link.close(0x15, f"unsupported ALPN {alpn!r}")  # VERSION_NEGOTIATION_FAILED
            return
        holder: dict[str, Callable[[Event], None]] = {}
        self.session = MoqtSession(link, client=self.client, version=version,
                                   on_event=lambda ev: holder["cb"](ev))
        holder["cb"] = self._on_session(self.session)
        self.session.start()

    def stream_data(self, stream_id: int, data: bytes, fin: bool) -> None:
        if self.on_raw is not None:
            self.on_raw(stream_id, data, fin)
        if self.session:
            self.session.stream_data(stream_id, data, fin)

    def stream_reset(self, stream_id: int, code: int) -> None:
        if self.session:
            self.session.stream_reset(stream_id, code)

    def stop_sending(self, stream_id: int, code: int) -> None:
        if self.session:
            self.session.stop_sending(stream_id, code)

    def datagram(self, data: bytes) -> None:
        if self.session:
            self.session.datagram(data)

    def terminated(self, code: int, reason: str) -> None:
        if self.session:
            self.session.terminated(code, reason)

    def input_processed(self) -> None:
        if self.session and self.on_input:
            self.on_input()


# the servers of each relay, for its metrics (endpoints/metrics.py)
_SERVERS: weakref.WeakKeyDictionary[Relay, list[LinkServer]] = weakref.WeakKeyDictionary()


def servers_of(relay: Relay) -> list[LinkServer]:
    """The sockets serve_relay() opened for `relay` (closed ones included)."""
    return _SERVERS.get(relay, [])


async def serve_relay(relay: Relay, host: str, port: int, cert: str, key: str,
                      versions: tuple[Version, ...] = (Version.DRAFT_16, Version.DRAFT_14),
                      limits: Limits | None = None, plaintext: bool = False,
                      kernel: KernelDatapath | None = None) -> LinkServer:
    """Accept MoQT sessions for `relay`; returns the server (close() to stop; LinkServer says what
    it does with junk). `plaintext` offers the insecure plaintext mode (used only with peers that
    offer it too); `kernel` is the kernel data path, which sees every connection."""
    cfg = configuration(client=False, alpn=[ALPN_OF[v] for v in versions], cert=cert, key=key, limits=limits,
                        plaintext=plaintext)

    def factory(link: QuicLink) -> SessionGlue:
        def on_session(session: MoqtSession) -> Callable[[Event], None]:
            peer = relay.attach(session, f"{link.peer_address}")
            glue.on_input = lambda: _pump(relay, peer)  # acknowledgements may have opened the window
            return lambda ev: relay.on_event(peer, ev)
        glue = SessionGlue(link, client=False, on_session=on_session)
        if kernel is not None:
            kernel.attach_link(link)
            glue.on_raw = lambda sid, data, fin: kernel.upstream_data(link, sid, data, fin)
        return glue

    server = await serve(host, port, cfg, lambda quic: QuicLink(quic, handler_factory=factory))
    _SERVERS.setdefault(relay, []).append(server)
    return server


def _pump(relay: Relay, peer: Peer) -> None:
    """relay.pump() after input, under the same guard as the relay's event handling: a failure
    closes that session only (INTERNAL_ERROR), it never escapes into the socket's read loop."""
    try:
        relay.pump(peer)
    except Exception as exc:
        log.exception("session %s: internal error sending", peer.name)
        peer.session.fail(ErrorCode.INTERNAL_ERROR, f"relay error: {exc}")


class _ClientLink(QuicLink):
    """QuicLink that says whether its handshake completed and keeps how its connection ended
    (handlers only see the code and reason)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handshake: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.ended: ConnectionTerminated | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.ended = event  # before the handshake's result: a failed one is read from it
        if isinstance(event, HandshakeCompleted | ConnectionTerminated) and not self.handshake.done():
            self.handshake.set_result(isinstance(event, HandshakeCompleted))
        super().quic_event_received(event)


class MoqtClient:
    """A client session as an async context manager with an event queue and request helpers.

    Entering it raises ConnectFailed if the relay gives no session: no QUIC handshake within
    `connect_timeout` seconds, a refused certificate (only checked with `verify` or `cafile`)
    or draft, a SETUP failure, or no SERVER_SETUP within `connect_timeout` more seconds."""

    def __init__(self, url: str, version: Version = Version.DRAFT_16, *, verify: bool = False,
                 cafile: str | None = None, limits: Limits | None = None, plaintext: bool = False,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.url = MoqtUrl.parse(url)
        self.version = version
        self.connect_timeout = connect_timeout
        limits = limits or Limits()
        # aioquic's idle timer runs during the handshake too: it must not cut a slow one short
        limits = replace(limits, idle_timeout=max(limits.idle_timeout, connect_timeout + 1))
        self._cfg = configuration(client=True, alpn=[ALPN_OF[version]], verify=verify or cafile is not None,
                                  limits=limits, server_name=self.url.host, plaintext=plaintext)
        if cafile is not None:
            self._cfg.load_verify_locations(cafile=cafile)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._waiters: dict[int, asyncio.Future[m.Message]] = {}
        self.session: MoqtSession | None = None
        self.link: _ClientLink | None = None
        self._cm = None
        self.closed: Closed | None = None

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, Ready):
            self._ready.set()
        elif isinstance(ev, Closed):
            self.closed = ev
            self._ready.set()
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"session closed: {ev.reason}"))
        elif isinstance(ev, MessageReceived):
            rid = getattr(ev.message, "request_id", None)
            fut = self._waiters.get(rid) if rid is not None else None
            if fut is not None and not fut.done() and not isinstance(ev.message, _PEER_REQUESTS):
                fut.set_result(ev.message)
                del self._waiters[rid]
                return
        self.events.put_nowait(ev)

    async def __aenter__(self) -> Self:
        def factory(link: QuicLink) -> SessionGlue:
            def on_session(session: MoqtSession) -> Callable[[Event], None]:
                self.session = session
                return self._on_event
            return SessionGlue(link, client=True, on_session=on_session)

        log.info("connecting to %s", self.url.address)
        # aioquic's own wait for the handshake cannot be given up cleanly (its future is left
        # with an exception nobody retrieves): the link's `handshake` future is awaited instead
        self._cm = connect(self.url.host, self.url.port, configuration=self._cfg, wait_connected=False,
                           create_protocol=lambda *a, **k: _ClientLink(*a, handler_factory=factory, **k))
        self.link = await self._cm.__aenter__()
        size_socket_buffers(self.link.socket)
        self.link.transmit()  # the first Initial: without wait_connected, connect() leaves it to us
        failure = await self._connect_failure()
        if failure is not None:
            await self._cm.__aexit__(None, None, None)
            raise failure
        return self

    async def _connect_failure(self) -> ConnectFailed | None:
        """Wait for the handshake, then for SETUP (`connect_timeout` each); None once the session is up."""
        address, timeout = self.url.address, self.connect_timeout
        try:
            completed = await asyncio.wait_for(self.link.handshake, timeout)
        except TimeoutError:
            return ConnectFailed(ConnectFailure.NO_ANSWER, f"no QUIC answer from {address} within {timeout:g} s")
        if not completed:
            return self._handshake_failure()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return ConnectFailed(ConnectFailure.SETUP_FAILED,
                                 f"relay {address} sent no SERVER_SETUP within {timeout:g} s")
        return self._setup_failure() if self.closed else None

    def _handshake_failure(self) -> ConnectFailed:
        """What ended the connection before its handshake completed, for the user."""
        address, ended = self.url.address, self.link.ended
        reason = _printable(ended.reason_phrase)
        alert = ended.error_code - QuicErrorCode.CRYPTO_ERROR
        if alert == AlertDescription.no_application_protocol:
            return ConnectFailed(ConnectFailure.VERSION_REFUSED,
                                 f"relay {address} refused MoQT draft-{self.version & 0xFF} "
                                 f"(ALPN {ALPN_OF[self.version]}): {reason!r}")
        if alert in _CERTIFICATE_ALERTS:  # raised by our own TLS client: the reason is not the peer's
            return ConnectFailed(ConnectFailure.CERTIFICATE_REFUSED,
                                 f"TLS certificate of relay {address} refused: {reason}")
        return ConnectFailed(ConnectFailure.HANDSHAKE_FAILED, f"QUIC handshake with {address} failed: "
                             f"{_close_code(ended.error_code, ended.frame_type)}" + (f" {reason!r}" if reason else ""))

    def _setup_failure(self) -> ConnectFailed:
        """The session closed during SETUP: by the relay, or by us for its SERVER_SETUP."""
        closed, ended = self.closed, self.link.ended
        if closed.by_peer:  # it came with the connection's end
            what = f"relay {self.url.address} closed the session during MoQT SETUP: " \
                   f"{_close_code(ended.error_code, ended.frame_type)}"
        else:  # our session closes with MoQT's codes
            what = f"MoQT SETUP with relay {self.url.address} failed: {_close_code(closed.code, None)}"
        reason = _printable(closed.reason)
        return ConnectFailed(ConnectFailure.SETUP_FAILED, what + (f" {reason!r}" if reason else ""))

    async def __aexit__(self, *exc: object) -> None:
        if self.session and not self.session.closed:
            self.session.close("bye")
        await self._cm.__aexit__(None, None, None)

    async def request(self, make: Callable[[int], m.Message], timeout: float = 10.0) -> m.Message:
        """Send a new request built by `make(request_id)` and wait for the reply to it."""
        rid = self.session.next_request_id()
        fut: asyncio.Future[m.Message] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        self.session.send(make(rid))
        return await asyncio.wait_for(fut, timeout)


# messages that carry a request ID but are the peer's own requests, not replies to ours
_PEER_REQUESTS = (m.Subscribe, m.Fetch, m.RequestUpdate, m.SubscribeNamespace, m.Publish, m.PublishNamespace,
                  m.TrackStatus, m.Unsubscribe, m.FetchCancel)


def _close_code(code: int, frame_type: int | None) -> str:
    """A close's error code, named: MoQT's for an application close (no frame type), else QUIC's."""
    prefix, names = ("", ErrorCode) if frame_type is None else ("QUIC ", QuicErrorCode)
    name = names(code).name if code in names._value2member_map_ else "error"
    return f"{prefix}{name} (0x{code:x})"


def _printable(text: str, limit: int = 200) -> str:
    """A peer's reason phrase made safe for one line of output: whitespace folded, control
    characters replaced, length bounded."""
    text = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    return text if len(text) <= limit else text[:limit] + "..."
