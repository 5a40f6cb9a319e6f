"""asyncio glue between QuicLink and MoqtSession: a relay server and a client connection.

ALPN picks the draft: `moqt-16` is draft-16, `moq-00` is draft-14 (whose version is then
confirmed in CLIENT_SETUP/SERVER_SETUP).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit

from aioquic.asyncio import connect, serve

from ..quic.link import Limits, QuicLink, configuration
from . import messages as m
from .params import ALPN, LEGACY_ALPN, Version
from .relay import Relay
from .session import Closed, Event, MessageReceived, MoqtSession, Ready

if TYPE_CHECKING:
    from .kernel_path import KernelPath

log = logging.getLogger("fastrelay.moq")

ALPN_OF = {Version.DRAFT_16: ALPN[Version.DRAFT_16], Version.DRAFT_14: LEGACY_ALPN}
VERSION_OF = {alpn: v for v, alpn in ALPN_OF.items()}


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


async def serve_relay(relay: Relay, host: str, port: int, cert: str, key: str,
                      versions: tuple[Version, ...] = (Version.DRAFT_16, Version.DRAFT_14),
                      limits: Limits | None = None, plaintext: bool = False, kernel: KernelPath | None = None):
    """Accept MoQT sessions for `relay`; returns the aioquic server (close() to stop).
    `plaintext` offers the insecure plaintext mode (used only with peers that offer it too);
    `kernel` is the kernel data path, which sees every connection."""
    cfg = configuration(client=False, alpn=[ALPN_OF[v] for v in versions], cert=cert, key=key, limits=limits,
                        plaintext=plaintext)

    def factory(link: QuicLink) -> SessionGlue:
        def on_session(session: MoqtSession) -> Callable[[Event], None]:
            peer = relay.attach(session, f"{link.peer_address}")
            glue.on_input = lambda: relay.pump(peer)  # acknowledgements may have opened the window
            return lambda ev: relay.on_event(peer, ev)
        glue = SessionGlue(link, client=False, on_session=on_session)
        if kernel is not None:
            kernel.attach_link(link)
            glue.on_raw = lambda sid, data, fin: kernel.upstream_data(link, sid, data, fin)
        return glue

    return await serve(host, port, configuration=cfg,
                       create_protocol=lambda *a, **k: QuicLink(*a, handler_factory=factory, **k))


class MoqtClient:
    """A client session as an async context manager with an event queue and request helpers."""

    def __init__(self, url: str, version: Version = Version.DRAFT_16, *, verify: bool = False,
                 limits: Limits | None = None, plaintext: bool = False) -> None:
        self.url = MoqtUrl.parse(url)
        self.version = version
        self._cfg = configuration(client=True, alpn=[ALPN_OF[version]], verify=verify, limits=limits,
                                  server_name=self.url.host, plaintext=plaintext)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._waiters: dict[int, asyncio.Future[m.Message]] = {}
        self.session: MoqtSession | None = None
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

        self._cm = connect(self.url.host, self.url.port, configuration=self._cfg,
                           create_protocol=lambda *a, **k: QuicLink(*a, handler_factory=factory, **k))
        self.link = await self._cm.__aenter__()
        await asyncio.wait_for(self._ready.wait(), 10)
        if self.closed:
            raise ConnectionError(f"MoQT setup failed: {self.closed.reason}")
        return self

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
