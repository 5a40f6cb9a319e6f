"""aioquic glue: one QuicConnectionProtocol subclass that hands QUIC events to a handler and
gives it a small, typed way to send, and the server socket that routes datagrams to them.
Protocol logic (MoQT) lives in the handler, sans-I/O where it can be; this module only moves
bytes and events.

What one peer does never raises in another's code path: a write on a stream the peer stopped
(STOP_SENDING) or that was reset is dropped and counted. The server keeps what unsolicited
datagrams cost bounded: junk is dropped before any connection state exists, connections that
have not completed their handshake are capped (past a threshold new ones must first prove
their address with a Retry), and what was ignored is counted by reason and logged once per
interval. Sockets get receive/send buffers of several MB, as QUIC servers size them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.crypto import (
    INITIAL_CIPHER_SUITE,
    INITIAL_SALT_VERSION_1,
    INITIAL_SALT_VERSION_2,
    CryptoContext,
    CryptoError,
)
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import (
    CONNECTION_ID_MAX_SIZE,
    QuicHeader,
    QuicPacketType,
    QuicProtocolVersion,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler
from aioquic.tls import cipher_suite_hash, hkdf_expand_label, hkdf_extract

from . import plaintext as plaintext_mode
from .internals import (
    bytes_in_flight,
    congestion_window,
    is_stream_open,
    max_datagram_size,
    route_connection,
    send_backlog,
    send_stream_closed,
)

log = logging.getLogger("fastrelay.quic")

MAX_DATAGRAM_FRAME = 65536
# a burst of datagrams waits in the receive buffer while the event loop is busy elsewhere: the
# kernel's default (about 200 KiB, some 90 full-size datagrams) overflows at a few thousand
# objects per second; QUIC servers ask for several MB
SOCKET_BUFFER = 8 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # Linux (socket.h); not exported by Python's socket module
RETRY_ABOVE = 32  # half-open connections past which a new one must first prove its address (Retry)
MAX_HALF_OPEN = 256  # half-open connections past which new Initials are dropped
SUMMARY_INTERVAL_S = 10.0  # ignored datagrams are logged at most once per interval, as one summary
FLOOD_WARNING = 1000  # ignored datagrams (and Retry sent) in one interval that make its summary a warning


@dataclass
class EndpointStats:
    """What one QUIC endpoint (a server socket and its connections, or a client) did not handle."""

    dropped_writes: int = 0  # stream writes dropped: the peer had stopped the stream, or it was reset
    ignored: Counter[str] = field(default_factory=Counter)  # datagrams no connection took, by reason
    retries: int = 0  # Retry packets sent (address validation while many connections are half-open)
    version_negotiations: int = 0  # Version Negotiation packets sent


@dataclass(frozen=True)
class SocketBuffers:
    """A socket's buffer sizes in bytes, as asked (the kernel reports twice that: its bookkeeping)."""

    receive: int
    send: int
    forced: bool  # set past net.core.{r,w}mem_max (CAP_NET_ADMIN)


def size_socket_buffers(sock: socket.socket, want: int = SOCKET_BUFFER) -> SocketBuffers:
    """Give `sock` receive and send buffers of `want` bytes: beyond the sysctl ceilings
    (SO_RCVBUFFORCE/SO_SNDBUFFORCE) with CAP_NET_ADMIN, otherwise as far as net.core.rmem_max /
    wmem_max allow, with one log line saying what was granted."""
    forced = True
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, want)
        except PermissionError:
            forced = False
            sock.setsockopt(socket.SOL_SOCKET, plain, want)
    granted = SocketBuffers(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2,
                            sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2, forced)
    if min(granted.receive, granted.send) < want:
        log.info("UDP socket buffers: receive %d, send %d bytes granted of %d asked (net.core.rmem_max %s, "
                 "wmem_max %s; raise them or run with CAP_NET_ADMIN)", granted.receive, granted.send, want,
                 sysctl("net.core.rmem_max"), sysctl("net.core.wmem_max"))
    return granted


def sysctl(name: str) -> int | None:
    """A numeric sysctl (None if unreadable)."""
    try:
        with open(f"/proc/sys/{name.replace('.', '/')}") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def udp_socket_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped for this UDP socket (its receive buffer was full, or a bad
    checksum): the `drops` column of /proc/net/udp{,6} for the socket's inode. None if not listed.
    (SO_RXQ_OVFL would carry the same count on every recvmsg(), but asyncio reads with recvfrom.)"""
    inode = str(os.fstat(sock.fileno()).st_ino)
    table = "/proc/net/udp6" if sock.family == socket.AF_INET6 else "/proc/net/udp"
    with open(table) as f:
        next(f)  # the header line
        for line in f:
            fields = line.split()
            if fields[9] == inode:
                return int(fields[-1])
    return None


class LinkHandler(Protocol):
    """What a QuicLink reports; every method is called from the event loop."""

    def handshake_completed(self, link: QuicLink, alpn: str | None) -> None: ...
    def stream_data(self, stream_id: int, data: bytes, fin: bool) -> None: ...
    def stream_reset(self, stream_id: int, code: int) -> None: ...
    def stop_sending(self, stream_id: int, code: int) -> None: ...
    def datagram(self, data: bytes) -> None: ...
    def terminated(self, code: int, reason: str) -> None: ...
    def input_processed(self) -> None: ...  # a datagram was handled (ACKs may have freed the window)


class LinkObserver(Protocol):
    """Sees a link's input around aioquic and may hand out its stream ids: the kernel data path
    (datapath/kernel/path.py) drains its records before input, publishes budgets after it, and
    gives its subscriber connections stream ids from a counter shared with the kernel.
    Registered with QuicLink.observe(); a link has at most one."""

    def before_input(self, link: QuicLink) -> None: ...
    def after_input(self, link: QuicLink) -> None: ...
    def allocate_uni_stream(self, link: QuicLink) -> int | None: ...  # None: aioquic allocates it


@dataclass
class Limits:
    """Flow-control windows and timeouts offered to the peer."""

    max_data: int = 16 << 20
    max_stream_data: int = 4 << 20
    idle_timeout: float = 30.0


@dataclass
class LinkConfiguration(QuicConfiguration):
    """QuicConfiguration plus fastrelay's own options (it is shared by every connection of a server)."""

    plaintext: bool = False  # offer plaintext 1-RTT packets (INSECURE, kernel data path): see quic/plaintext.py


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
        # registered by the handler factory (observe()), so it exists before it runs
        self._observer: LinkObserver | None = None
        self.send_limited = False
        # set by the server that accepted the connection: its counters, and who is told when the
        # handshake completes (connections not there yet are capped)
        self.stats = EndpointStats()
        self.handshake_done: Callable[[QuicLink], None] | None = None
        self._write_drop_logged = False
        self.handler: LinkHandler | None = handler_factory(self) if handler_factory else None

    def observe(self, observer: LinkObserver) -> None:
        """Register the link's one observer (see LinkObserver); a second one is refused."""
        if self._observer is not None and self._observer is not observer:
            raise ValueError("this link already has an observer")
        self._observer = observer

    # ---- events in
    def datagram_received(self, data: bytes | str, addr: tuple) -> None:
        if self._observer is not None:
            self._observer.before_input(self)
        super().datagram_received(data, addr)
        if self._observer is not None:
            self._observer.after_input(self)
        if self.handler is not None:
            self.handler.input_processed()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted) and self.handshake_done is not None:
            self.handshake_done(self)
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
        if unidirectional and self._observer is not None:
            sid = self._observer.allocate_uni_stream(self)
            if sid is not None:
                return sid
        return self._quic.get_next_available_stream_id(is_unidirectional=unidirectional)

    @property
    def socket(self) -> socket.socket:
        """The UDP socket under this connection (a server's is shared by all of its connections)."""
        return self._transport.get_extra_info("socket")

    def send(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        """Write on a stream; a no-op (counted) once the peer stopped it or it was reset: what the
        peer does to its streams must not raise in the writer, which may be serving others."""
        if send_stream_closed(self._quic, stream_id):
            self.stats.dropped_writes += 1
            if not self._write_drop_logged:
                self._write_drop_logged = True
                log.info("%s stopped stream %d (or it was reset): writes on such streams are dropped, counted",
                         self.peer_address, stream_id)
            return
        self._quic.send_stream_data(stream_id, data, end_stream=fin)
        self._schedule_transmit()

    def send_datagram(self, data: bytes) -> None:
        self._quic.send_datagram_frame(data)
        self._schedule_transmit()

    def reset(self, stream_id: int, code: int) -> None:
        self._quic.reset_stream(stream_id, code)
        self._schedule_transmit()

    def stop(self, stream_id: int, code: int) -> None:
        """STOP_SENDING on a stream the peer sends on; nothing once the stream is over."""
        if is_stream_open(self._quic, stream_id):
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


class LinkServer(asyncio.DatagramProtocol):
    """A QUIC server socket: routes each datagram to its connection by destination connection id,
    as aioquic's QuicServer does, and opens a connection (a `create_protocol(QuicConnection)`
    QuicLink) only for an Initial that decrypts, while fewer than `max_half_open` connections
    are half-open (handshake not completed). Past `retry_above` half-open connections a new
    client is first sent a Retry: only one that receives at its address comes back with the
    token, so spoofed Initials open nothing. Everything else is ignored, counted by reason in
    `stats.ignored` and summarised in one log line per `summary_interval` seconds."""

    def __init__(self, configuration: QuicConfiguration, create_protocol: Callable[[QuicConnection], QuicLink], *,
                 retry_above: int = RETRY_ABOVE, max_half_open: int = MAX_HALF_OPEN,
                 summary_interval: float = SUMMARY_INTERVAL_S) -> None:
        self._configuration = configuration
        self._create_protocol = create_protocol
        self._loop = asyncio.get_running_loop()
        self._links: dict[bytes, QuicLink] = {}  # every connection id in use -> its connection
        self._tokens = QuicRetryTokenHandler()
        self.retry_above = retry_above
        self.max_half_open = max_half_open
        self.half_open: set[QuicLink] = set()
        self.stats = EndpointStats()
        self.transport: asyncio.DatagramTransport | None = None
        self.buffers: SocketBuffers | None = None
        self._summary_interval = summary_interval
        self._summary: asyncio.TimerHandle | None = None
        self._summarised: Counter[str] = Counter()  # stats.ignored at the last summary
        self._summarised_retries = 0

    @property
    def socket(self) -> socket.socket:
        return self.transport.get_extra_info("socket")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffers = size_socket_buffers(self.socket)

    def close(self) -> None:
        """Close every connection and the socket."""
        for link in set(self._links.values()):
            link.close()
        self._links.clear()
        self.half_open.clear()
        if self._summary is not None:
            self._summary.cancel()
        self.transport.close()

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        reason = self._route(data, addr)
        if reason is not None:
            self.stats.ignored[reason] += 1
            self._schedule_summary()

    def _route(self, data: bytes, addr: NetworkAddress) -> str | None:
        """Hand the datagram to its connection, open one, or answer statelessly; else why it was ignored."""
        unsupported = self._unsupported_version(data, addr)
        if unsupported is not None:
            return unsupported
        buf = Buffer(data=data)
        try:
            header = pull_quic_header(buf, host_cid_length=self._configuration.connection_id_length)
        except ValueError:
            return "unparsable"
        link = self._links.get(header.destination_cid)
        if link is not None:
            link.datagram_received(data, addr)
            return None
        if header.packet_type != QuicPacketType.INITIAL:
            return "unknown_connection"
        if len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            return "short_initial"  # RFC 9000 section 14.1
        if not _initial_decrypts(data, header, buf.tell()):
            return "undecryptable_initial"
        if len(self.half_open) >= self.max_half_open:
            return "half_open_limit"
        original_cid, retry_cid = header.destination_cid, None
        if header.token:
            try:
                original_cid = self._tokens.validate_token(address=addr, destination_cid=header.destination_cid,
                                                           token=header.token, now=self._loop.time())
            except ValueError:
                return "invalid_token"  # none of ours (aioquic issues no NEW_TOKEN), or stale
            retry_cid = header.destination_cid
        elif len(self.half_open) >= self.retry_above:
            self._retry(header, addr)
            return None
        self._accept(data, addr, header.destination_cid, original_cid, retry_cid)
        return None

    def _unsupported_version(self, data: bytes, addr: NetworkAddress) -> str | None:
        """A long-header packet of a version we do not speak (read from the header fields every
        version has, RFC 8999: the rest is that version's own): the reason to ignore it, after a
        Version Negotiation answer if it is full-size (RFC 9000 section 6.1: only what could
        open a connection gets one, so the answer is smaller than what it answers). None otherwise."""
        if not data or not data[0] & 0x80:
            return None
        if len(data) < 7 or len(data) < 7 + data[5] or len(data) < 7 + data[5] + data[6 + data[5]]:
            return "unparsable"
        version = int.from_bytes(data[1:5], "big")
        if version == 0:
            return "version_negotiation"  # never answered: two servers would answer each other forever
        if version in self._configuration.supported_versions:
            return None
        dcid_end = 6 + data[5]
        dcid, scid = data[6:dcid_end], data[dcid_end + 1: dcid_end + 1 + data[dcid_end]]
        # connection ids longer than any version we speak allows cannot be echoed by our encoder
        if len(data) >= SMALLEST_MAX_DATAGRAM_SIZE and max(len(dcid), len(scid)) <= CONNECTION_ID_MAX_SIZE:
            self.transport.sendto(encode_quic_version_negotiation(
                source_cid=dcid, destination_cid=scid, supported_versions=self._configuration.supported_versions),
                addr)
            self.stats.version_negotiations += 1
        return "unsupported_version"

    def _retry(self, header: QuicHeader, addr: NetworkAddress) -> None:
        """Answer with a Retry carrying a token bound to the client's address (RFC 9000 section 8.1.2)."""
        source_cid = os.urandom(8)
        token = self._tokens.create_token(address=addr, original_destination_connection_id=header.destination_cid,
                                          retry_source_connection_id=source_cid, now=self._loop.time())
        self.transport.sendto(encode_quic_retry(version=header.version, source_cid=source_cid,
                                                destination_cid=header.source_cid,
                                                original_destination_cid=header.destination_cid,
                                                retry_token=token), addr)
        self.stats.retries += 1
        self._schedule_summary()

    def _accept(self, data: bytes, addr: NetworkAddress, destination_cid: bytes, original_cid: bytes,
                retry_cid: bytes | None) -> None:
        connection = QuicConnection(configuration=self._configuration,
                                    original_destination_connection_id=original_cid,
                                    retry_source_connection_id=retry_cid)
        link = self._create_protocol(connection)
        link.connection_made(self.transport)
        link.stats = self.stats
        link.handshake_done = self.half_open.discard
        route_connection(link, issued=lambda cid: self._links.__setitem__(cid, link),
                         retired=lambda cid: self._links.pop(cid, None), terminated=lambda: self._gone(link))
        self._links[destination_cid] = self._links[connection.host_cid] = link
        self.half_open.add(link)
        link.datagram_received(data, addr)

    def _gone(self, link: QuicLink) -> None:
        self.half_open.discard(link)
        for cid in [cid for cid, other in self._links.items() if other is link]:
            del self._links[cid]

    def _schedule_summary(self) -> None:
        if self._summary is None:
            self._summary = self._loop.call_later(self._summary_interval, self._log_summary)

    def _log_summary(self) -> None:
        """One line for what was ignored (and Retry sent) since the last one: never one per datagram."""
        self._summary = None
        ignored = self.stats.ignored - self._summarised
        retries = self.stats.retries - self._summarised_retries
        self._summarised, self._summarised_retries = self.stats.ignored.copy(), self.stats.retries
        reasons = ", ".join(f"{reason} {n}" for reason, n in ignored.most_common())
        # a few strays are routine (a closed connection's last packets): only a flood is a warning
        level = logging.WARNING if ignored.total() + retries >= FLOOD_WARNING else logging.INFO
        log.log(level, "ignored %d datagrams in %g s (%s); %d Retry sent; %d connections half-open",
                ignored.total(), self._summary_interval, reasons or "none", retries, len(self.half_open))


def _initial_decrypts(data: bytes, header: QuicHeader, encrypted_offset: int) -> bool:
    """Whether the datagram's first packet, an Initial, opens with the keys its destination
    connection id gives: junk is told from a client before any connection state exists. Only the
    client's direction is derived (CryptoPair.setup_initial derives both: twice the cost per junk)."""
    salt = INITIAL_SALT_VERSION_2 if header.version == QuicProtocolVersion.VERSION_2 else INITIAL_SALT_VERSION_1
    algorithm = cipher_suite_hash(INITIAL_CIPHER_SUITE)
    secret = hkdf_expand_label(algorithm, hkdf_extract(algorithm, salt, header.destination_cid), b"client in", b"",
                               algorithm.digest_size)
    crypto = CryptoContext()
    crypto.setup(cipher_suite=INITIAL_CIPHER_SUITE, secret=secret, version=header.version)
    try:
        crypto.decrypt_packet(data[:header.packet_length], encrypted_offset, 0)
    except (CryptoError, ValueError):
        return False
    return True


async def serve(host: str, port: int, configuration: QuicConfiguration,
                create_protocol: Callable[[QuicConnection], QuicLink], **limits: Any) -> LinkServer:
    """A LinkServer listening on (host, port); `limits` are its keyword arguments."""
    _, server = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: LinkServer(configuration, create_protocol, **limits), local_addr=(host, port))
    return server
