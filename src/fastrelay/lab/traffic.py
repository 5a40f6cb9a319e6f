"""Tagged UDP test traffic: the payload format, a fast sendmmsg(2) source and a verifying sink.

Every payload starts with the tag ``struct.pack("<IIQ", MAGIC, stream, seq)`` (``struct fr_tag``
in ``bpf/include/fastrelay.h``), followed by ``size - 16`` pattern bytes: the start of
``SHAKE128(struct.pack("<III", stream, seq % 64, size))``, so a receiver can verify every byte.

Command line: ``python -m fastrelay.lab.traffic send|sink --help``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import json
import math
import os
import selectors
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from ..kernel.abi import FR_TAG_MAGIC

MAGIC = FR_TAG_MAGIC
TAG = struct.Struct("<IIQ")
MIN_SIZE = TAG.size
MAX_SIZE = 65507
MAX_STREAM = 0xFFFF_FFFF
MAX_SEQ = 0xFFFF_FFFF_FFFF_FFFF
MAX_GSO_SEGMENTS = 64
SOL_UDP = 17
UDP_SEGMENT = 103
SO_RCVBUFFORCE = 33  # Linux; not exported by the socket module

_RING = 64  # messages per sendmmsg(2) ring; _RING * segments is a multiple of the 64 patterns
_SPIN = 0.001  # pacing: sleep only when the next batch is due later than this
_DRAIN = 256  # datagrams read from one socket before looking at the others
_SEQ = struct.Struct("<Q")
_SEQ_OFFSET = 8

Address = tuple[str, int]


class PayloadError(ValueError):
    """A datagram is not a valid tagged payload."""


@functools.lru_cache(maxsize=256)
def _pattern(stream: int, phase: int, size: int) -> bytes:
    return hashlib.shake_128(struct.pack("<III", stream, phase, size)).digest(size - MIN_SIZE)


def payload(stream: int, seq: int, size: int) -> bytes:
    """Return the size-byte tagged payload of datagram seq of stream."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be {MIN_SIZE}..{MAX_SIZE}, not {size}")
    if not 0 <= stream <= MAX_STREAM:
        raise ValueError(f"stream must be 0..{MAX_STREAM}, not {stream}")
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"seq must be 0..{MAX_SEQ}, not {seq}")
    return TAG.pack(MAGIC, stream, seq) + _pattern(stream, seq % 64, size)


def check(data: bytes | bytearray | memoryview, stream: int | None = None) -> int:
    """Verify a tagged payload (of the given stream, if not None) byte by byte; return its seq."""
    size = len(data)
    if size < MIN_SIZE:
        raise PayloadError(f"payload of {size} bytes is shorter than the {MIN_SIZE}-byte tag")
    if size > MAX_SIZE:
        raise PayloadError(f"payload of {size} bytes is longer than the maximum {MAX_SIZE}")
    magic, got_stream, seq = TAG.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError(f"bad magic 0x{magic:08x}, expected 0x{MAGIC:08x}")
    if stream is not None and got_stream != stream:
        raise PayloadError(f"stream {got_stream}, expected {stream} (seq {seq})")
    expected = _pattern(got_stream, seq % 64, size)
    body = memoryview(data)[MIN_SIZE:]
    if body != expected:
        at = MIN_SIZE + next(i for i, (a, b) in enumerate(zip(body, expected, strict=True)) if a != b)
        raise PayloadError(
            f"stream {got_stream} seq {seq}: pattern mismatch at byte {at} of {size}"
            " (corrupted, or not the length that was sent)"
        )
    return seq


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """Return the family and socket address of an IPv4/IPv6 literal."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, OverflowError) as e:
        raise ValueError(f"not an IP address and port: {host!r} {port!r}") from e
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _format_address(sockaddr: tuple[Any, ...]) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sockaddr_bytes(family: socket.AddressFamily, sockaddr: tuple[Any, ...]) -> bytes:
    """Return sockaddr as the C struct sockaddr_in / sockaddr_in6."""
    host = sockaddr[0].partition("%")[0]
    head = struct.pack("=H", family)
    if family == socket.AF_INET:
        return head + struct.pack("!H", sockaddr[1]) + socket.inet_pton(family, host) + bytes(8)
    _, port, flowinfo, scope_id = sockaddr
    return (
        head
        + struct.pack("!HI", port, flowinfo)
        + socket.inet_pton(family, host)
        + struct.pack("=I", scope_id)
    )


def _set_rcvbuf(sock: socket.socket, size: int) -> None:
    """Set the receive buffer size, beyond net.core.rmem_max when privileged."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int


class PayloadShape:
    """How a UdpSource lays out datagram seq of `size` bytes: `fill(buf, offset, seq)` writes it
    at buf[offset:offset + size] (the buffer is reused, so every varying byte must be written)."""

    size: int

    def fill(self, buf: bytearray, offset: int, seq: int) -> None:
        raise NotImplementedError


class UdpSource:
    """Sends datagrams 0, 1, ... of one stream to dest with sendmmsg(2), paced or as fast as possible.

    rate is in datagrams per second (None: as fast as possible); sending stops after duration
    seconds or count datagrams, whichever comes first. With gso_segments, each message carries
    that many size-byte datagrams as one UDP GSO send (UDP_SEGMENT). The socket is created and
    bound here, so a source constructed inside another network namespace sends from there.
    With a `shape`, datagrams are laid out by it (its size) instead of the tagged payload.
    """

    def __init__(
        self,
        dest: Address,
        *,
        rate: float | None = None,
        size: int = 1200,
        duration: float | None = None,
        count: int | None = None,
        stream: int = 0,
        gso_segments: int | None = None,
        bind: Address | None = None,
        shape: PayloadShape | None = None,
    ) -> None:
        if shape is not None:
            size = shape.size
        payload(stream, 0, size)  # validates stream and size
        if rate is not None and not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number of datagrams per second, not {rate}")
        if duration is None and count is None:
            raise ValueError("give a duration or a count")
        if duration is not None and not duration > 0:
            raise ValueError(f"duration must be positive, not {duration}")
        if count is not None and count <= 0:
            raise ValueError(f"count must be positive, not {count}")
        segments = gso_segments or 1
        if gso_segments is not None and not 1 <= gso_segments <= MAX_GSO_SEGMENTS:
            raise ValueError(f"gso_segments must be 1..{MAX_GSO_SEGMENTS}, not {gso_segments}")
        if size * segments > MAX_SIZE:
            raise ValueError(f"size * gso_segments = {size * segments} exceeds {MAX_SIZE}")
        family, sockaddr = _resolve(*dest)
        self._rate, self._size, self._duration, self._count = rate, size, duration, count
        self._stream, self._segments, self._shape = stream, segments, shape
        self._name = _sockaddr_bytes(family, sockaddr)
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if bind is not None:
                self._sock.bind(bind)
            if gso_segments is not None:
                self._sock.setsockopt(SOL_UDP, UDP_SEGMENT, size)
        except BaseException:
            self._sock.close()
            raise

    @property
    def local_address(self) -> tuple[Any, ...]:
        """The socket's own address (the source address receivers see)."""
        return self._sock.getsockname()

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self) -> dict[str, float]:
        """Send from seq 0; return datagrams "sent" and refused ("errors"), "seconds" and "pps".

        A message refused with ENOBUFS/EAGAIN is counted in errors and skipped, so its seqs are
        missing at the receivers; the rest of a partial sendmmsg is sent again.
        """
        segments, size, count = self._segments, self._size, self._count
        ring = bytearray(b"".join(payload(self._stream, q, size) for q in range(_RING * segments)))
        ring_c = (ctypes.c_char * len(ring)).from_buffer(ring)
        name = ctypes.create_string_buffer(self._name, len(self._name))
        iovs = (_Iovec * _RING)()
        msgs = (_Mmsghdr * _RING)()
        for j in range(_RING):
            iovs[j].iov_base = ctypes.addressof(ring_c) + j * segments * size
            iovs[j].iov_len = segments * size
            hdr = msgs[j].msg_hdr
            hdr.msg_name, hdr.msg_namelen = ctypes.addressof(name), len(self._name)
            hdr.msg_iov, hdr.msg_iovlen = ctypes.addressof(iovs[j]), 1
        msg_addr = [ctypes.addressof(msgs[j]) for j in range(_RING)]
        seq_offsets = range(_SEQ_OFFSET, len(ring), size)
        total = None if count is None else -(-count // segments)  # messages
        msg_rate = None if self._rate is None else self._rate / segments
        last_datagram = math.inf if count is None else count
        fd, pack = self._sock.fileno(), _SEQ.pack_into
        if self._shape is not None:
            fill = self._shape.fill

            def pack(buf: bytearray, offset: int, seq: int) -> None:
                fill(buf, offset - _SEQ_OFFSET, seq)
        sent = errors = m = 0
        t0 = time.perf_counter()
        deadline = math.inf if self._duration is None else t0 + self._duration
        while total is None or m < total:
            now = time.perf_counter()
            if now >= deadline:
                break
            if msg_rate is None:
                due = _RING
            else:
                due = int((now - t0) * msg_rate) + 1 - m
                if due <= 0:
                    ahead = min(t0 + m / msg_rate, deadline) - now
                    if ahead > _SPIN:
                        time.sleep(ahead - _SPIN / 2)
                    else:
                        os.sched_yield()
                    continue
            j = m % _RING
            n = min(due, _RING - j) if total is None else min(due, _RING - j, total - m)
            first = m * segments
            end = min((m + n) * segments, last_datagram)
            for offset, seq in zip(seq_offsets[j * segments :], range(first, end), strict=False):
                pack(ring, offset, seq)
            if m + n == total:
                iovs[j + n - 1].iov_len = (end - (total - 1) * segments) * size
            done = _sendmmsg(fd, msg_addr[j], n, 0)
            if done < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                if err not in (errno.ENOBUFS, errno.EAGAIN):
                    raise OSError(err, os.strerror(err))
                errors += min(first + segments, last_datagram) - first
                m += 1
            else:
                sent += min((m + done) * segments, last_datagram) - first
                m += done
        seconds = time.perf_counter() - t0
        return {"sent": sent, "errors": errors, "seconds": seconds, "pps": sent / seconds if seconds else 0.0}


@dataclass
class SinkStats:
    """What one sink socket has received; seqs assumes one stream per socket."""

    address: tuple[Any, ...]
    received: int = 0  # datagrams, valid or not
    bytes: int = 0  # their payload bytes
    seqs: set[int] = field(default_factory=set)  # distinct valid seqs
    duplicates: int = 0
    bad: int = 0
    first_error: str | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready counters; missing counts the seqs 0..max_seq not received."""
        top = max(self.seqs, default=-1)
        return {
            "address": _format_address(self.address),
            "received": self.received,
            "bytes": self.bytes,
            "unique": len(self.seqs),
            "duplicates": self.duplicates,
            "bad": self.bad,
            "first_error": self.first_error,
            "max_seq": top if self.seqs else None,
            "missing": top + 1 - len(self.seqs),
        }


class UdpSink:
    """Receives tagged datagrams on UDP sockets and verifies each with check().

    endpoints are (host, port) addresses to bind, or existing sockets (e.g. created inside
    another network namespace), which are made non-blocking and are not closed by close().
    Counters accumulate over collect() calls.
    """

    def __init__(
        self,
        endpoints: Iterable[socket.socket | Address],
        *,
        stream: int | None = None,
        rcvbuf: int = 8 << 20,
    ) -> None:
        self._stream = stream
        self._owned: list[socket.socket] = []
        self.sockets: list[socket.socket] = []
        try:
            for endpoint in endpoints:
                if isinstance(endpoint, socket.socket):
                    sock = endpoint
                else:
                    family, sockaddr = _resolve(*endpoint)
                    sock = socket.socket(family, socket.SOCK_DGRAM)
                    self._owned.append(sock)
                    sock.bind(sockaddr)
                _set_rcvbuf(sock, rcvbuf)
                sock.setblocking(False)
                self.sockets.append(sock)
        except BaseException:
            self.close()
            raise
        if not self.sockets:
            raise ValueError("UdpSink needs at least one socket or address")
        self.stats = [SinkStats(sock.getsockname()) for sock in self.sockets]
        self._buffer = bytearray(65536)

    def close(self) -> None:
        """Close the sockets this sink created."""
        for sock in self._owned:
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def collect(self, expected: int | None = None, timeout: float = 1.0) -> list[SinkStats]:
        """Receive until every socket has expected distinct valid seqs, or for timeout seconds."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            for sock, stats in zip(self.sockets, self.stats, strict=True):
                selector.register(sock, selectors.EVENT_READ, (sock, stats))
            while expected is None or any(len(stats.seqs) < expected for stats in self.stats):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in selector.select(remaining):
                    self._drain(*key.data)
        return self.stats

    def _drain(self, sock: socket.socket, stats: SinkStats) -> None:
        view = memoryview(self._buffer)
        for _ in range(_DRAIN):
            try:
                n = sock.recv_into(self._buffer)
            except BlockingIOError:
                return
            stats.received += 1
            stats.bytes += n
            try:
                seq = check(view[:n], self._stream)
            except PayloadError as e:
                stats.bad += 1
                if stats.first_error is None:
                    stats.first_error = str(e)
                continue
            if seq in stats.seqs:
                stats.duplicates += 1
            else:
                stats.seqs.add(seq)


def _address(text: str) -> Address:
    """argparse type: HOST:PORT with an IP literal, IPv6 as [HOST]:PORT."""
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdecimal() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (IP literal, port 0..65535), got {text!r}")
    try:
        _resolve(host, int(port))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return host, int(port)


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, got {value}")
        return value

    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastrelay.lab.traffic", description="Tagged UDP test traffic."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    send = commands.add_parser("send", help="send tagged datagrams; print the result as JSON")
    send.add_argument("--to", required=True, type=_address, metavar="HOST:PORT")
    send.add_argument("--rate", type=_positive, metavar="PPS", help="datagrams per second (default: max)")
    send.add_argument("--size", type=_int_range(MIN_SIZE, MAX_SIZE), default=1200, help="payload bytes")
    limit = send.add_mutually_exclusive_group(required=True)
    limit.add_argument("--duration", type=_positive, metavar="S")
    limit.add_argument("--count", type=_int_range(1, MAX_SEQ), metavar="N")
    send.add_argument("--stream", type=_int_range(0, MAX_STREAM), default=0, metavar="ID")
    send.add_argument("--gso", type=_int_range(1, MAX_GSO_SEGMENTS), metavar="N", help="UDP GSO segments")
    send.add_argument("--bind", type=_address, metavar="HOST:PORT")
    sink = commands.add_parser("sink", help="receive and verify tagged datagrams; print a JSON summary")
    sink.add_argument("--bind", required=True, action="append", type=_address, metavar="HOST:PORT")
    sink.add_argument("--timeout", required=True, type=_positive, metavar="S")
    sink.add_argument("--expect", type=_int_range(0, MAX_SEQ), metavar="N", help="datagrams per socket")
    sink.add_argument("--stream", type=_int_range(0, MAX_STREAM), metavar="ID")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; bad arguments exit with status 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "send":
            if args.to[1] == 0:
                parser.error("argument --to: port must be 1..65535")
            try:
                source = UdpSource(
                    args.to,
                    rate=args.rate,
                    size=args.size,
                    duration=args.duration,
                    count=args.count,
                    stream=args.stream,
                    gso_segments=args.gso,
                    bind=args.bind,
                )
            except ValueError as e:
                parser.error(str(e))
            with source:
                print(json.dumps(source.run()), flush=True)
        else:
            with UdpSink(args.bind, stream=args.stream) as sink:
                addresses = " ".join(_format_address(sock.getsockname()) for sock in sink.sockets)
                print(f"listening on {addresses}", file=sys.stderr, flush=True)
                stats = sink.collect(args.expect, args.timeout)
                print(json.dumps({"sockets": [s.summary() for s in stats]}), flush=True)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
