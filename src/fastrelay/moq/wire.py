"""MoQT wire primitives (draft-ietf-moq-transport-16 section 1.4): QUIC varints, bounded
byte fields, Locations, delta-encoded Key-Value-Pairs, reason phrases, namespaces.

Sans-I/O: a Reader walks a bytes-like object and raises ProtocolError (never IndexError,
struct.error or UnicodeDecodeError) on anything malformed or truncated; a Writer builds
bytes. Nothing here knows about sockets or versions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import total_ordering

VARINT_MAX = (1 << 62) - 1
KVP_VALUE_MAX = 0xFFFF
REASON_MAX = 1024
NAMESPACE_FIELDS_MAX = 32
FULL_NAME_MAX = 4096


class ErrorCode(enum.IntEnum):
    """Session termination codes (draft-16 section 3.4)."""

    NO_ERROR = 0x0
    INTERNAL_ERROR = 0x1
    UNAUTHORIZED = 0x2
    PROTOCOL_VIOLATION = 0x3
    INVALID_REQUEST_ID = 0x4
    DUPLICATE_TRACK_ALIAS = 0x5
    KEY_VALUE_FORMATTING_ERROR = 0x6
    TOO_MANY_REQUESTS = 0x7
    INVALID_PATH = 0x8
    MALFORMED_PATH = 0x9
    GOAWAY_TIMEOUT = 0x10
    CONTROL_MESSAGE_TIMEOUT = 0x11
    DATA_STREAM_TIMEOUT = 0x12
    AUTH_TOKEN_CACHE_OVERFLOW = 0x13
    DUPLICATE_AUTH_TOKEN_ALIAS = 0x14
    VERSION_NEGOTIATION_FAILED = 0x15
    MALFORMED_AUTH_TOKEN = 0x16
    UNKNOWN_AUTH_TOKEN_ALIAS = 0x17
    EXPIRED_AUTH_TOKEN = 0x18
    INVALID_AUTHORITY = 0x19
    MALFORMED_AUTHORITY = 0x1A


class ProtocolError(Exception):
    """The peer sent something the draft forbids; the session closes with `code`."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason


def violation(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.PROTOCOL_VIOLATION, reason)


class NeedMore(Exception):
    """Not enough bytes yet (stream parsing): retry when more data has arrived."""


class Reader:
    """Reads MoQT fields from `data`. Truncation raises NeedMore if `partial`, else a
    PROTOCOL_VIOLATION (a complete message must contain all of its fields)."""

    __slots__ = ("_data", "_end", "_partial", "pos")

    def __init__(self, data: bytes | bytearray | memoryview, partial: bool = False) -> None:
        self._data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self.pos = 0
        self._end = len(data)
        self._partial = partial

    def _short(self, what: str) -> Exception:
        return NeedMore() if self._partial else violation(f"truncated {what}")

    @property
    def remaining(self) -> int:
        return self._end - self.pos

    def eof(self) -> bool:
        return self.pos >= self._end

    def varint(self, what: str = "varint") -> int:
        if self.pos >= self._end:
            raise self._short(what)
        first = self._data[self.pos]
        size = 1 << (first >> 6)
        if self.pos + size > self._end:
            raise self._short(what)
        value = first & 0x3F
        for i in range(1, size):
            value = (value << 8) | self._data[self.pos + i]
        self.pos += size
        return value

    def uint8(self, what: str = "byte") -> int:
        if self.pos >= self._end:
            raise self._short(what)
        value = self._data[self.pos]
        self.pos += 1
        return value

    def uint16(self, what: str = "uint16") -> int:
        return (self.uint8(what) << 8) | self.uint8(what)

    def bytes(self, n: int, what: str = "bytes") -> bytes:
        if n < 0 or self.pos + n > self._end:
            raise self._short(what)
        out = bytes(self._data[self.pos:self.pos + n])
        self.pos += n
        return out

    def rest(self) -> bytes:
        out = bytes(self._data[self.pos:self._end])
        self.pos = self._end
        return out

    def length_prefixed(self, what: str, limit: int | None = None) -> bytes:
        n = self.varint(f"{what} length")
        if limit is not None and n > limit:
            raise violation(f"{what} length {n} exceeds {limit}")
        return self.bytes(n, what)

    def location(self) -> Location:
        return Location(self.varint("group"), self.varint("object"))

    def reason(self) -> str:
        raw = self.length_prefixed("reason phrase", REASON_MAX)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise violation("reason phrase is not UTF-8") from None

    def namespace(self) -> tuple[bytes, ...]:
        n = self.varint("namespace field count")
        if n == 0 or n > NAMESPACE_FIELDS_MAX:
            raise violation(f"namespace has {n} fields (1..{NAMESPACE_FIELDS_MAX})")
        return tuple(self.length_prefixed("namespace field") for _ in range(n))

    def namespace_prefix(self) -> tuple[bytes, ...]:
        """A namespace that may be empty (SUBSCRIBE_NAMESPACE prefixes)."""
        n = self.varint("namespace field count")
        if n > NAMESPACE_FIELDS_MAX:
            raise violation(f"namespace prefix has {n} fields (max {NAMESPACE_FIELDS_MAX})")
        return tuple(self.length_prefixed("namespace field") for _ in range(n))

    def key_value_pairs(self, count: int) -> list[tuple[int, int | bytes]]:
        """`count` delta-encoded Key-Value-Pairs: [(type, int value | bytes value)]."""
        out: list[tuple[int, int | bytes]] = []
        kind = 0
        for _ in range(count):
            kind += self.varint("key-value type")
            if kind > (1 << 64) - 1:
                raise violation("key-value type overflows 2^64-1")
            if kind % 2 == 0:
                out.append((kind, self.varint("key-value value")))
            else:
                out.append((kind, self.length_prefixed("key-value value", KVP_VALUE_MAX)))
        return out


class Writer:
    """Builds MoQT fields into a bytearray."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def varint(self, value: int) -> Writer:
        if value < 0 or value > VARINT_MAX:
            raise ValueError(f"varint out of range: {value}")
        if value < 0x40:
            self.buf.append(value)
        elif value < 0x4000:
            self.buf += (value | 0x4000).to_bytes(2, "big")
        elif value < 0x40000000:
            self.buf += (value | 0x80000000).to_bytes(4, "big")
        else:
            self.buf += (value | 0xC000000000000000).to_bytes(8, "big")
        return self

    def uint8(self, value: int) -> Writer:
        self.buf.append(value)
        return self

    def uint16(self, value: int) -> Writer:
        self.buf += value.to_bytes(2, "big")
        return self

    def raw(self, data: bytes | bytearray | memoryview) -> Writer:
        self.buf += data
        return self

    def length_prefixed(self, data: bytes | bytearray | memoryview) -> Writer:
        return self.varint(len(data)).raw(data)

    def location(self, loc: Location) -> Writer:
        return self.varint(loc.group).varint(loc.object)

    def reason(self, text: str) -> Writer:
        raw = text.encode()
        if len(raw) > REASON_MAX:
            raise ValueError("reason phrase longer than 1024 bytes")
        return self.length_prefixed(raw)

    def namespace(self, ns: tuple[bytes, ...]) -> Writer:
        self.varint(len(ns))
        for field in ns:
            self.length_prefixed(field)
        return self

    def key_value_pairs(self, pairs: list[tuple[int, int | bytes]]) -> Writer:
        """Delta-encode pairs; they must be sorted by type (duplicates allowed)."""
        prev = 0
        for kind, value in pairs:
            if kind < prev:
                raise ValueError("key-value pairs must be sorted by type")
            self.varint(kind - prev)
            prev = kind
            if kind % 2 == 0:
                if not isinstance(value, int):
                    raise ValueError(f"even key-value type {kind} takes an integer")
                self.varint(value)
            else:
                if not isinstance(value, bytes | bytearray) or len(value) > KVP_VALUE_MAX:
                    raise ValueError(f"odd key-value type {kind} takes bytes of at most {KVP_VALUE_MAX}")
                self.length_prefixed(value)
        return self

    def __bytes__(self) -> bytes:
        return bytes(self.buf)


def varint_size(value: int) -> int:
    return 1 if value < 0x40 else 2 if value < 0x4000 else 4 if value < 0x40000000 else 8


@total_ordering
@dataclass(frozen=True, slots=True)
class Location:
    """{Group, Object}; ordered as the draft orders Locations."""

    group: int
    object: int

    def __lt__(self, other: Location) -> bool:
        return (self.group, self.object) < (other.group, other.object)


def render_name(namespace: tuple[bytes, ...], track: bytes | None = None) -> str:
    """The draft's recommended printable form: 'example.2enet-team2--report'."""

    def safe(field: bytes) -> str:
        return "".join(chr(b) if chr(b).isascii() and (chr(b).isalnum() or b == 0x5F) else f".{b:02x}"
                       for b in field)

    text = "-".join(safe(f) for f in namespace)
    return text if track is None else f"{text}--{safe(track)}"
