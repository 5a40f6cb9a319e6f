"""aioquic glue: one QuicConnectionProtocol subclass that hands QUIC events to a handler and
gives it a small, typed way to send. Protocol logic (MoQT) lives in the handler, sans-I/O
where it can be; this module only moves bytes and events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)

from . import plaintext as plaintext_mode
from .internals import bytes_in_flight, congestion_window, max_datagram_size, send_backlog

log = logging.getLogger("fastrelay.quic")

MAX_DATAGRAM_FRAME = 65536


class LinkHandler(Protocol):
    """What a QuicLink reports; every method is called from the event loop."""

    def handshake_completed(self, link: QuicLink, alpn: str | None) -> None: ...
    def stream_data(self, stream_id: int, data: bytes, fin: bool) -> None: ...
    def stream_reset(self, stream_id: int, code: int) -> None: ...
    def stop_sending(self, stream_id: int, code: int) -> None: ...
    def datagram(self, data: bytes) -> None: ...
    def terminated(self, code: int, reason: str) -> None: ...
    def input_processed(self) -> None: ...  # a datagram was handled (ACKs may have freed the window)


@dataclass
class Limits:
    """Flow-control windows and timeouts offered to the peer."""

    max_data: int = 16 << 20
    max_stream_data: int = 4 << 20
    idle_timeout: float = 30.0


@dataclass
class LinkConfiguration(QuicConfiguration):
    """QuicConfiguration plus fastrelay's own options (it is shared by every connection of a server)."""

    plaintext: bool = False  # offer plaintext 1-RTT packets (INSECURE, kernel fast path): see quic/plaintext.py


def configuration(*, client: bool, alpn: list[str], cert: str | None = None, key: str | None = None,
                  verify: bool = True, limits: Limits | None = None,
                  server_name: str | None = None, plaintext: bool = False) -> LinkConfiguration:
    """A QuicConfiguration for fastrelay endpoints (datagrams enabled). `plaintext=True` offers the
    insecure plaintext packet protection mode; a connection uses it only if its peer offers it too."""
    limits = limits or Limits()
    cfg = LinkConfiguration(is_client=client, alpn_protocols=alpn, max_datagram_frame_size=MAX_DATAGRAM_FRAME,
                            max_data=limits.max_data, max_stream_data=limits.max_stream_data,
                            idle_timeout=limits.idle_timeout, server_name=server_name, plaintext=plaintext)
    if cert and key:
        cfg.load_cert_chain(cert, key)
    if client and not verify:
        import ssl

        cfg.verify_mode = ssl.CERT_NONE
    return cfg


class QuicLink(QuicConnectionProtocol):
    """A QUIC connection whose events go to `handler` (set by the factory or later).

    aioquic builds the connection before this protocol and starts it only afterwards (client:
    `connect()`, server: the first datagram), so the plaintext offer is installed here in time."""

    def __init__(self, *args: Any, handler_factory: Callable[[QuicLink], LinkHandler] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self._quic.configuration
        if isinstance(cfg, LinkConfiguration) and cfg.plaintext:
            plaintext_mode.install(self._quic)
        self.closed = asyncio.get_event_loop().create_future()
        self._transmit_scheduled = False
        # kernel data path hooks (moq/kernel_path.py): records drained before input, budgets
        # published after it, stream ids from a counter shared with the kernel; set by the
        # handler factory, so they exist before it runs
        self.before_input: Callable[[QuicLink], None] | None = None
        self.after_input: Callable[[QuicLink], None] | None = None
        self.stream_allocator: Callable[[], int] | None = None
        self.send_limited = False
        self.handler: LinkHandler | None = handler_factory(self) if handler_factory else None

    # ---- events in
    def datagram_received(self, data: bytes | str, addr: tuple) -> None:
        if self.before_input is not None:
            self.before_input(self)
        super().datagram_received(data, addr)
        if self.after_input is not None:
            self.after_input(self)
        if self.handler is not None:
            self.handler.input_processed()

    def quic_event_received(self, event: QuicEvent) -> None:
        h = self.handler
        if h is None:
            return
        if isinstance(event, StreamDataReceived):
            h.stream_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, DatagramFrameReceived):
            h.datagram(event.data)
        elif isinstance(event, HandshakeCompleted):
            h.handshake_completed(self, event.alpn_protocol)
        elif isinstance(event, StreamReset):
            h.stream_reset(event.stream_id, event.error_code)
        elif isinstance(event, StopSendingReceived):
            h.stop_sending(event.stream_id, event.error_code)
        elif isinstance(event, ConnectionTerminated):
            if not self.closed.done():
                self.closed.set_result((event.error_code, event.reason_phrase))
            h.terminated(event.error_code, event.reason_phrase)

    # ---- actions out: transmission is batched once per event-loop turn, so many writes share
    # packets (a transmit per write would build one packet per object per subscriber)
    def _schedule_transmit(self) -> None:
        if not self._transmit_scheduled:
            self._transmit_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._transmit_scheduled = False
        self.transmit()

    @property
    def plaintext(self) -> bool:
        """Whether this connection's 1-RTT packets travel without protection (both ends offered it)."""
        return plaintext_mode.is_plaintext(self._quic)

    @property
    def peer_address(self) -> tuple[str, int] | None:
        addr = self._quic._network_paths[0].addr if self._quic._network_paths else None
        return (addr[0], addr[1]) if addr else None

    def backlog(self) -> int:
        """Bytes written and not yet acknowledged by the peer."""
        return send_backlog(self._quic)

    def send_window(self) -> int:
        """How much it is useful to have written ahead: twice the congestion window."""
        return 2 * congestion_window(self._quic)

    @property
    def quic(self) -> QuicConnection:
        """The aioquic connection."""
        return self._quic

    def open_stream(self, unidirectional: bool) -> int:
        if unidirectional and self.stream_allocator is not None:
            return self.stream_allocator()
        return self._quic.get_next_available_stream_id(is_unidirectional=unidirectional)

    def send(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        self._quic.send_stream_data(stream_id, data, end_stream=fin)
        self._schedule_transmit()

    def send_datagram(self, data: bytes) -> None:
        self._quic.send_datagram_frame(data)
        self._schedule_transmit()

    def reset(self, stream_id: int, code: int) -> None:
        self._quic.reset_stream(stream_id, code)
        self._schedule_transmit()

    def stop(self, stream_id: int, code: int) -> None:
        self._quic.stop_stream(stream_id, code)
        self._schedule_transmit()

    def transmit(self) -> None:
        """aioquic's transmit(), then note whether it stopped short of a full congestion window
        or for pacing (`send_limited`): until the next transmit, something that frees the window
        may let queued frames go."""
        super().transmit()
        quic = self._quic
        self.send_limited = (quic._pacing_at is not None
                             or bytes_in_flight(quic) + max_datagram_size(quic) > congestion_window(quic))

    def rearm_timer(self) -> None:
        """After a change that gives aioquic nothing new to send but moves its deadlines (packets
        registered or acknowledged from outside aioquic): what transmit() does after sending,
        without building packets."""
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at == timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(timer_at, self._handle_timer) if timer_at is not None else None
        self._timer_at = timer_at

    def close(self, code: int = 0, reason: str = "") -> None:  # type: ignore[override]
        self._quic.close(error_code=code, reason_phrase=reason)
        self.transmit()
