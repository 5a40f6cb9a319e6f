"""MoQT data plane codec (draft-ietf-moq-transport-16 section 10, draft-14 section 10):
subgroup streams, fetch streams, object datagrams, Object Status and Object Extension
Headers.

Sans-I/O. Encoders return bytes and raise ValueError for values the draft cannot carry.
Decoders raise ProtocolError for anything malformed, with the code the draft names
(PROTOCOL_VIOLATION unless stated otherwise). Two subclasses let a caller react at a
narrower scope than the session:

* MalformedTrack: the Object makes its Track malformed (draft-16 section 2.4.2), e.g. a
  duplicate Prior Group ID Gap. The draft asks for UNSUBSCRIBE / FETCH_CANCEL, or for a
  relay PUBLISH_DONE and a stream reset with MALFORMED_TRACK (0x12), not a session close.
* ObjectTooLarge: an Object exceeds the parser's local size bound (a resource limit,
  draft-16 section 12.1, where the stream, not the session, is cancelled).

Versions are plain ints (DRAFT_14, DRAFT_16) so this module has no import of params.py.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from fastrelay.moq.wire import (
    KVP_VALUE_MAX,
    VARINT_MAX,
    ErrorCode,
    NeedMore,
    ProtocolError,
    Reader,
    Writer,
    violation,
)

DRAFT_14 = 0xFF00000E
DRAFT_16 = 0xFF000010

FETCH_HEADER = 0x05
DEFAULT_MAX_OBJECT_SIZE = 16 << 20
MALFORMED_TRACK_RESET_CODE = 0x12

# Object Extension Header types with rules this codec enforces.
IMMUTABLE_EXTENSIONS = 0x0B
PRIOR_GROUP_ID_GAP = 0x3C
PRIOR_OBJECT_ID_GAP = 0x3E

# Type bits shared by SUBGROUP_HEADER and OBJECT_DATAGRAM.
_EXTENSIONS_BIT = 0x01
# SUBGROUP_HEADER bits.
_SUBGROUP_BASE = 0x10
_SUBGROUP_ID_MASK = 0x06
_SUBGROUP_END_OF_GROUP = 0x08
_SUBGROUP_DEFAULT_PRIORITY = 0x20
# OBJECT_DATAGRAM bits.
_DG_END_OF_GROUP = 0x02
_DG_ZERO_OBJECT_ID = 0x04
_DG_DEFAULT_PRIORITY = 0x08
_DG_STATUS = 0x20
# draft-16 FETCH Serialization Flags.
_F_SUBGROUP_MASK = 0x03
_F_OBJECT_ID = 0x04
_F_GROUP_ID = 0x08
_F_PRIORITY = 0x10
_F_EXTENSIONS = 0x20
_F_DATAGRAM = 0x40
_F_END_OF_NON_EXISTENT_RANGE = 0x8C
_F_END_OF_UNKNOWN_RANGE = 0x10C

_KVP_TYPE_MAX = (1 << 64) - 1

Extensions = list[tuple[int, int | bytes]]


class MalformedTrack(ProtocolError):
    """The Object makes its Track malformed; reset fetch streams with `reset_code`."""

    reset_code = MALFORMED_TRACK_RESET_CODE

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.PROTOCOL_VIOLATION, f"malformed track: {reason}")


class ObjectTooLarge(ProtocolError):
    """An Object exceeds the parser's size bound; cancel the stream (STOP_SENDING)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(ErrorCode.PROTOCOL_VIOLATION, f"object of {size} bytes exceeds {limit}")


class ObjectStatus(enum.IntEnum):
    """Object Status values; DOES_NOT_EXIST exists only in draft-14."""

    NORMAL = 0x0
    DOES_NOT_EXIST = 0x1
    END_OF_GROUP = 0x3
    END_OF_TRACK = 0x4


class SubgroupIdMode(enum.IntEnum):
    """SUBGROUP_ID_MODE, bits 1-2 of the SUBGROUP_HEADER type (0b11 is reserved)."""

    ZERO = 0
    FIRST_OBJECT = 1
    EXPLICIT = 2


@dataclass(frozen=True, slots=True)
class SubgroupHeader:
    """SUBGROUP_HEADER. `subgroup_id` is 0 in mode ZERO, None in mode FIRST_OBJECT (the
    Objects carry the resolved ID), the header field in mode EXPLICIT.
    `publisher_priority` None sets DEFAULT_PRIORITY (draft-16 only): the priority is
    inherited from the control message that established the subscription."""

    track_alias: int
    group_id: int
    subgroup_id: int | None
    subgroup_id_mode: SubgroupIdMode
    publisher_priority: int | None
    extensions: bool = False
    end_of_group: bool = False

    @property
    def stream_type(self) -> int:
        return (_SUBGROUP_BASE | (_EXTENSIONS_BIT if self.extensions else 0) | (self.subgroup_id_mode << 1)
                | (_SUBGROUP_END_OF_GROUP if self.end_of_group else 0)
                | (_SUBGROUP_DEFAULT_PRIORITY if self.publisher_priority is None else 0))


@dataclass(frozen=True, slots=True)
class FetchHeader:
    """FETCH_HEADER."""

    request_id: int


@dataclass(slots=True)
class Object:
    """One Object. `subgroup_id` None: Forwarding Preference Datagram. `publisher_priority`
    None: inherited from the subscription (DEFAULT_PRIORITY). `offset`, set by the stream
    parser, is the stream offset of the Object's first byte; it takes no part in equality."""

    group_id: int
    subgroup_id: int | None
    object_id: int
    publisher_priority: int | None
    status: ObjectStatus = ObjectStatus.NORMAL
    extensions: Extensions = field(default_factory=list)
    payload: bytes = b""
    offset: int | None = field(default=None, compare=False)


@dataclass(slots=True)
class EndOfRange:
    """draft-16 FETCH End of Range (0x8C, or 0x10C when `unknown`): Objects after the
    previous one up to and including {group_id, object_id} do not exist / are unknown."""

    group_id: int
    object_id: int
    unknown: bool = False
    offset: int | None = field(default=None, compare=False)


@dataclass(slots=True)
class ObjectDatagram:
    """OBJECT_DATAGRAM; `object.subgroup_id` is None. The wire type is derived from the
    fields by datagram_type()."""

    track_alias: int
    object: Object
    end_of_group: bool = False


Event = SubgroupHeader | FetchHeader | Object | EndOfRange


def _check_version(version: int) -> None:
    if version not in (DRAFT_14, DRAFT_16):
        raise ValueError(f"unsupported MoQT version {version:#x}")


def _valid_subgroup_type(t: int, version: int) -> bool:
    allowed = 0x3F if version == DRAFT_16 else 0x1F
    return t & ~allowed == 0 and t & _SUBGROUP_BASE != 0 and t & _SUBGROUP_ID_MASK != _SUBGROUP_ID_MASK


def _valid_datagram_type(t: int, version: int) -> bool:
    if version == DRAFT_14:
        return t <= 0x07 or t in (0x20, 0x21)
    return t & ~0x2F == 0 and not (t & _DG_STATUS and t & _DG_END_OF_GROUP)


def known_stream_type(first_bytes: bytes, version: int = DRAFT_16) -> Literal["subgroup", "fetch"] | None:
    """Classify a unidirectional stream by its leading type varint; None if the type is
    unknown (the draft then requires closing the session). Raises NeedMore if
    `first_bytes` does not yet hold the whole varint."""
    _check_version(version)
    t = Reader(first_bytes, partial=True).varint("stream type")
    if t == FETCH_HEADER:
        return "fetch"
    return "subgroup" if _valid_subgroup_type(t, version) else None


# --- Key-Value-Pairs and Object Extension Headers -------------------------------------


def _write_kvps(w: Writer, pairs: Extensions, version: int) -> None:
    if version == DRAFT_16:
        w.key_value_pairs(pairs)  # delta-encoded types; must be sorted
    else:
        for pair in pairs:  # draft-14 types are absolute, in any order
            w.key_value_pairs([pair])


def _read_kvps(block: bytes, version: int) -> Extensions:
    """A whole block of Key-Value-Pairs (delta types in draft-16, absolute in draft-14)."""
    r = Reader(block)
    out: Extensions = []
    kind = 0
    while not r.eof():
        delta = r.varint("extension type")
        kind = kind + delta if version == DRAFT_16 else delta
        if kind > _KVP_TYPE_MAX:
            raise violation("extension type overflows 2^64-1")
        if kind % 2 == 0:
            out.append((kind, r.varint("extension value")))
        else:
            out.append((kind, r.length_prefixed("extension value", KVP_VALUE_MAX)))
    return out


def _encode_extension_block(w: Writer, pairs: Extensions, version: int) -> None:
    inner = Writer()
    _write_kvps(inner, pairs, version)
    w.length_prefixed(inner.buf)


def _extensions_allowed(status: ObjectStatus, version: int) -> bool:
    """draft-16: only Normal Objects have extensions; draft-14: all but Does Not Exist."""
    return status is ObjectStatus.NORMAL if version == DRAFT_16 else status is not ObjectStatus.DOES_NOT_EXIST


def _validate_received(obj: Object, version: int) -> None:
    """Status/extension rules, Immutable Extensions and Prior Gap rules on a parsed Object."""
    if obj.extensions and not _extensions_allowed(obj.status, version):
        raise violation(f"extension headers on an object with status {obj.status.name}")
    everything = list(obj.extensions)
    immutables = [v for kind, v in obj.extensions if kind == IMMUTABLE_EXTENSIONS and isinstance(v, bytes)]
    if version == DRAFT_16 and len(immutables) > 1:
        raise MalformedTrack("more than one Immutable Extensions header")
    for value in immutables:
        try:
            inner = _read_kvps(value, version)
        except ProtocolError as e:
            raise ProtocolError(ErrorCode.KEY_VALUE_FORMATTING_ERROR,
                                f"Immutable Extensions: {e.reason}") from None
        if any(kind == IMMUTABLE_EXTENSIONS for kind, _ in inner):
            raise MalformedTrack("Immutable Extensions nested in Immutable Extensions")
        everything += inner
    for kind, name, limit in ((PRIOR_GROUP_ID_GAP, "Prior Group ID Gap", obj.group_id),
                              (PRIOR_OBJECT_ID_GAP, "Prior Object ID Gap", obj.object_id)):
        gaps = [value for k, value in everything if k == kind and isinstance(value, int)]  # even type
        if len(gaps) > 1:
            raise MalformedTrack(f"more than one {name}")
        if gaps and gaps[0] > limit:
            raise MalformedTrack(f"{name} {gaps[0]} exceeds {limit}")


def _status(value: int, version: int) -> ObjectStatus:
    try:
        status = ObjectStatus(value)
    except ValueError:
        raise violation(f"unknown object status {value:#x}") from None
    if status is ObjectStatus.DOES_NOT_EXIST and version == DRAFT_16:
        raise violation("object status 0x1 does not exist in draft-16")
    return status


def _check_object(obj: Object, version: int, *, need_priority: bool) -> None:
    """Raise ValueError if `obj` cannot be encoded in `version`."""
    if obj.publisher_priority is None:
        if need_priority:
            raise ValueError("publisher priority required")
    elif not 0 <= obj.publisher_priority <= 255:
        raise ValueError(f"publisher priority {obj.publisher_priority} out of range")
    if obj.status is ObjectStatus.DOES_NOT_EXIST and version == DRAFT_16:
        raise ValueError("Object Does Not Exist status is draft-14 only")
    if obj.status is not ObjectStatus.NORMAL and obj.payload:
        raise ValueError("an object with a non-Normal status has an empty payload")
    if obj.extensions and not _extensions_allowed(obj.status, version):
        raise ValueError(f"extension headers not allowed with status {obj.status.name}")


def _write_length_status_payload(w: Writer, obj: Object) -> None:
    """Object Payload Length, then the Object Status (only if the length is 0), payload."""
    w.varint(len(obj.payload))
    if obj.payload:
        w.raw(obj.payload)
    else:
        w.varint(obj.status)


# --- Encoders -----------------------------------------------------------------------


def subgroup_header_for(track_alias: int, group_id: int, subgroup_id: int, first_object_id: int, *,
                        publisher_priority: int, version: int, default_priority: int | None = None,
                        extensions: bool = False, end_of_group: bool = False) -> SubgroupHeader:
    """The most compact SUBGROUP_HEADER for a subgroup whose first Object is
    `first_object_id`. In draft-16 the priority is omitted if it equals
    `default_priority` (the one from the control message establishing the subscription)."""
    _check_version(version)
    if subgroup_id == 0:
        mode, sid = SubgroupIdMode.ZERO, 0
    elif subgroup_id == first_object_id:
        mode, sid = SubgroupIdMode.FIRST_OBJECT, None
    else:
        mode, sid = SubgroupIdMode.EXPLICIT, subgroup_id
    inherit = version == DRAFT_16 and publisher_priority == default_priority
    return SubgroupHeader(track_alias, group_id, sid, mode, None if inherit else publisher_priority,
                          extensions, end_of_group)


def encode_subgroup_header(h: SubgroupHeader, version: int) -> bytes:
    _check_version(version)
    expected_none = h.subgroup_id_mode is SubgroupIdMode.FIRST_OBJECT
    if (h.subgroup_id is None) != expected_none or (h.subgroup_id_mode is SubgroupIdMode.ZERO and h.subgroup_id):
        raise ValueError(f"subgroup_id {h.subgroup_id} does not fit mode {h.subgroup_id_mode.name}")
    if h.publisher_priority is None and version == DRAFT_14:
        raise ValueError("draft-14 SUBGROUP_HEADER always carries a publisher priority")
    w = Writer().varint(h.stream_type).varint(h.track_alias).varint(h.group_id)
    if h.subgroup_id_mode is SubgroupIdMode.EXPLICIT:
        w.varint(h.subgroup_id)  # type: ignore[arg-type]
    if h.publisher_priority is not None:
        if not 0 <= h.publisher_priority <= 255:
            raise ValueError(f"publisher priority {h.publisher_priority} out of range")
        w.uint8(h.publisher_priority)
    return bytes(w)


def encode_subgroup_object(obj: Object, header: SubgroupHeader, prev_object_id: int | None, version: int) -> bytes:
    """One Object on a subgroup stream; `prev_object_id` is that of the previous Object on
    the stream (None for the first). Object IDs are delta-encoded (delta = id - prev - 1)."""
    _check_version(version)
    _check_object(obj, version, need_priority=version == DRAFT_14)
    if obj.group_id != header.group_id or obj.publisher_priority != header.publisher_priority:
        raise ValueError("object group or priority differs from its SUBGROUP_HEADER")
    if header.subgroup_id_mode is SubgroupIdMode.FIRST_OBJECT:
        if prev_object_id is None and obj.subgroup_id != obj.object_id:
            raise ValueError("first object's ID must be the subgroup ID in mode FIRST_OBJECT")
    elif obj.subgroup_id != header.subgroup_id:
        raise ValueError("object subgroup differs from its SUBGROUP_HEADER")
    if obj.extensions and not header.extensions:
        raise ValueError("SUBGROUP_HEADER type has no extensions")
    if prev_object_id is None:
        delta = obj.object_id
    elif obj.object_id > prev_object_id:
        delta = obj.object_id - prev_object_id - 1
    else:
        raise ValueError("object IDs on a subgroup stream must increase")
    w = Writer().varint(delta)
    if header.extensions:
        _encode_extension_block(w, obj.extensions, version)
    _write_length_status_payload(w, obj)
    return bytes(w)


def encode_fetch_header(h: FetchHeader) -> bytes:
    return bytes(Writer().varint(FETCH_HEADER).varint(h.request_id))


def encode_fetch_object(obj: Object, prev: Object | EndOfRange | None, version: int, *,
                        last_object: Object | None = None) -> bytes:
    """One Object on a fetch stream. `prev` is the previous item on the stream (None for
    the first); draft-16 omits fields derivable from it. If `prev` is an EndOfRange, the
    prior Group/Object IDs are its end and the prior Subgroup ID and priority are those of
    `last_object`, the last Object before it (written explicitly if None). Draft-14 writes
    every field, a Datagram Object's Subgroup ID as its Object ID, and the status if the
    payload is empty. Draft-16 fetch Objects carry no status (section 10.2.1.1): leave an End
    of Group / End of Track object out, the gap it leaves says those objects do not exist
    (section 9.16.3) and FETCH_OK says End Of Track; ValueError if given one."""
    _check_version(version)
    _check_object(obj, version, need_priority=True)
    w = Writer()
    if version == DRAFT_14:
        w.varint(obj.group_id).varint(obj.object_id if obj.subgroup_id is None else obj.subgroup_id)
        w.varint(obj.object_id).uint8(obj.publisher_priority)  # type: ignore[arg-type]
        _encode_extension_block(w, obj.extensions, version)
        _write_length_status_payload(w, obj)
        return bytes(w)
    if obj.status is not ObjectStatus.NORMAL:
        raise ValueError("draft-16 fetch objects carry no Object Status")
    prior = prev if isinstance(prev, Object) else last_object
    flags = _F_EXTENSIONS if obj.extensions else 0
    if prev is None or obj.group_id != prev.group_id:
        flags |= _F_GROUP_ID
    if prev is None or obj.object_id != prev.object_id + 1:
        flags |= _F_OBJECT_ID
    if prior is None or obj.publisher_priority != prior.publisher_priority:
        flags |= _F_PRIORITY
    if obj.subgroup_id is None:
        flags |= _F_DATAGRAM
    elif obj.subgroup_id == 0:
        pass
    elif prior is not None and prior.subgroup_id == obj.subgroup_id:
        flags |= 0x01
    elif prior is not None and prior.subgroup_id is not None and prior.subgroup_id + 1 == obj.subgroup_id:
        flags |= 0x02
    else:
        flags |= 0x03
    w.varint(flags)
    if flags & _F_GROUP_ID:
        w.varint(obj.group_id)
    if flags & _F_SUBGROUP_MASK == 0x03:
        w.varint(obj.subgroup_id)  # type: ignore[arg-type]
    if flags & _F_OBJECT_ID:
        w.varint(obj.object_id)
    if flags & _F_PRIORITY:
        w.uint8(obj.publisher_priority)  # type: ignore[arg-type]
    if obj.extensions:
        _encode_extension_block(w, obj.extensions, version)
    w.varint(len(obj.payload)).raw(obj.payload)
    return bytes(w)


def encode_end_of_range(end: EndOfRange, version: int) -> bytes:
    """draft-16 End of Range: flags 0x8C/0x10C, absolute Group ID and Object ID."""
    if version != DRAFT_16:
        raise ValueError("End of Range exists only in draft-16 fetch streams")
    flags = _F_END_OF_UNKNOWN_RANGE if end.unknown else _F_END_OF_NON_EXISTENT_RANGE
    return bytes(Writer().varint(flags).varint(end.group_id).varint(end.object_id))


def datagram_type(dg: ObjectDatagram, version: int) -> int:
    """The most compact OBJECT_DATAGRAM type for `dg` (an empty Normal Object is sent as
    an empty payload, not as a status)."""
    _check_version(version)
    obj = dg.object
    status = obj.status is not ObjectStatus.NORMAL
    if obj.publisher_priority is None and version == DRAFT_14:
        raise ValueError("draft-14 datagrams always carry a publisher priority")
    if status and dg.end_of_group:
        raise ValueError("a status datagram cannot signal end of group")
    t = (_EXTENSIONS_BIT if obj.extensions else 0) | (_DG_END_OF_GROUP if dg.end_of_group else 0)
    if status:
        t |= _DG_STATUS
    if obj.object_id == 0 and not (status and version == DRAFT_14):
        t |= _DG_ZERO_OBJECT_ID
    if obj.publisher_priority is None:
        t |= _DG_DEFAULT_PRIORITY
    return t


def encode_datagram(dg: ObjectDatagram, version: int) -> bytes:
    obj = dg.object
    _check_object(obj, version, need_priority=version == DRAFT_14)
    if obj.subgroup_id is not None:
        raise ValueError("datagram objects have no subgroup ID")
    t = datagram_type(dg, version)
    w = Writer().varint(t).varint(dg.track_alias).varint(obj.group_id)
    if not t & _DG_ZERO_OBJECT_ID:
        w.varint(obj.object_id)
    if obj.publisher_priority is not None:
        w.uint8(obj.publisher_priority)
    if obj.extensions:
        _encode_extension_block(w, obj.extensions, version)
    if t & _DG_STATUS:
        w.varint(obj.status)
    else:
        w.raw(obj.payload)
    return bytes(w)


# --- Decoders -----------------------------------------------------------------------


def decode_datagram(data: bytes, version: int) -> ObjectDatagram:
    """Decode one whole OBJECT_DATAGRAM."""
    _check_version(version)
    r = Reader(data)
    t = r.varint("datagram type")
    if not _valid_datagram_type(t, version):
        raise violation(f"invalid datagram type {t:#x}")
    alias = r.varint("track alias")
    group = r.varint("group id")
    object_id = 0 if t & _DG_ZERO_OBJECT_ID else r.varint("object id")
    priority = None if t & _DG_DEFAULT_PRIORITY else r.uint8("publisher priority")
    extensions: Extensions = []
    if t & _EXTENSIONS_BIT:
        block = r.length_prefixed("extension headers")
        if not block:
            raise violation("datagram EXTENSIONS bit set with Extension Headers Length 0")
        extensions = _read_kvps(block, version)
    if t & _DG_STATUS:
        status = _status(r.varint("object status"), version)
        if not r.eof():
            raise violation("bytes after the Object Status of a status datagram")
        payload = b""
    else:
        status, payload = ObjectStatus.NORMAL, r.rest()
    obj = Object(group, None, object_id, priority, status, extensions, payload)
    _validate_received(obj, version)
    return ObjectDatagram(alias, obj, bool(t & _DG_END_OF_GROUP))


class DataStreamParser:
    """Incremental parser for one unidirectional data stream (subgroup or fetch).

    feed() returns the header (once), then every complete Object (or, in draft-16 fetch
    streams, EndOfRange) in order, each with its stream `offset`. Only the current
    incomplete item is buffered. finish() is called at FIN. After a ProtocolError the
    parser is dead and re-raises it."""

    def __init__(self, version: int, max_object_size: int = DEFAULT_MAX_OBJECT_SIZE) -> None:
        _check_version(version)
        self.version = version
        self.max_object_size = max_object_size
        self.header: SubgroupHeader | FetchHeader | None = None
        self._buf = bytearray()
        self._consumed = 0
        self._need = 0  # buffer length below which parsing cannot progress
        self._error: ProtocolError | None = None
        # Subgroup streams: previous Object ID and the resolved Subgroup ID.
        self._prev_object_id: int | None = None
        self._subgroup_id: int | None = None
        # draft-16 fetch streams: prior Location (Object or End of Range) and last Object.
        self._prior_location: tuple[int, int] | None = None
        self._prior_object: Object | None = None

    @property
    def consumed(self) -> int:
        """Stream bytes parsed into returned events (the header and complete items)."""
        return self._consumed

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._error is not None:
            raise self._error
        self._buf += data
        if len(self._buf) < self._need:
            return []
        buf = bytes(self._buf)
        r = Reader(buf, partial=True)
        events: list[Event] = []
        done = 0
        try:
            while not r.eof():
                self._need = 0
                event = self._next(r)
                if isinstance(event, Object | EndOfRange):
                    event.offset = self._consumed + done
                events.append(event)
                done = r.pos
        except NeedMore:
            self._need = max(self._need, len(buf) + 1) - done
        except ProtocolError as e:
            self._error = e
            raise
        del self._buf[:done]
        self._consumed += done
        return events

    def finish(self) -> None:
        """The stream ended with FIN: it must have ended on an item boundary."""
        if self._error is not None:
            raise self._error
        if self.header is None:
            self._error = violation("stream ended before its header was complete")
        elif self._buf:
            self._error = violation("stream ended in the middle of an object")
        if self._error is not None:
            raise self._error

    def _next(self, r: Reader) -> Event:
        start = r.pos
        if self.header is None:
            self.header = self._header(r)
            return self.header
        if isinstance(self.header, SubgroupHeader):
            return self._subgroup_object(r, start, self.header)
        if self.version == DRAFT_14:
            return self._fetch_object14(r, start)
        return self._fetch_item16(r, start)

    def _header(self, r: Reader) -> SubgroupHeader | FetchHeader:
        t = r.varint("stream type")
        if t == FETCH_HEADER:
            return FetchHeader(r.varint("request id"))
        if not _valid_subgroup_type(t, self.version):
            raise violation(f"unknown stream type {t:#x}")
        alias = r.varint("track alias")
        group = r.varint("group id")
        mode = SubgroupIdMode((t & _SUBGROUP_ID_MASK) >> 1)
        subgroup: int | None = 0 if mode is SubgroupIdMode.ZERO else None
        if mode is SubgroupIdMode.EXPLICIT:
            subgroup = r.varint("subgroup id")
        priority = None if t & _SUBGROUP_DEFAULT_PRIORITY else r.uint8("publisher priority")
        self._subgroup_id = subgroup
        return SubgroupHeader(alias, group, subgroup, mode, priority, bool(t & _EXTENSIONS_BIT),
                              bool(t & _SUBGROUP_END_OF_GROUP))

    def _take(self, r: Reader, start: int, n: int, what: str) -> bytes:
        """`n` bytes of the item that began at `start`, enforcing the size bound."""
        size = r.pos - start + n
        if size > self.max_object_size:
            raise ObjectTooLarge(size, self.max_object_size)
        if r.remaining < n:
            self._need = r.pos + n
            raise NeedMore()
        return r.bytes(n, what)

    def _extensions(self, r: Reader, start: int) -> Extensions:
        return _read_kvps(self._take(r, start, r.varint("extension headers length"), "extension headers"),
                          self.version)

    def _length_status_payload(self, r: Reader, start: int) -> tuple[ObjectStatus, bytes]:
        n = r.varint("object payload length")
        if n == 0:
            return _status(r.varint("object status"), self.version), b""
        return ObjectStatus.NORMAL, self._take(r, start, n, "object payload")

    def _subgroup_object(self, r: Reader, start: int, h: SubgroupHeader) -> Object:
        delta = r.varint("object id delta")
        object_id = delta if self._prev_object_id is None else self._prev_object_id + delta + 1
        if object_id > VARINT_MAX:
            raise violation("object id exceeds 2^62-1")
        extensions = self._extensions(r, start) if h.extensions else []
        status, payload = self._length_status_payload(r, start)
        subgroup = object_id if self._subgroup_id is None else self._subgroup_id
        obj = Object(h.group_id, subgroup, object_id, h.publisher_priority, status, extensions, payload)
        _validate_received(obj, self.version)
        self._prev_object_id, self._subgroup_id = object_id, subgroup
        return obj

    def _fetch_object14(self, r: Reader, start: int) -> Object:
        group = r.varint("group id")
        subgroup = r.varint("subgroup id")
        object_id = r.varint("object id")
        priority = r.uint8("publisher priority")
        extensions = self._extensions(r, start)
        status, payload = self._length_status_payload(r, start)
        obj = Object(group, subgroup, object_id, priority, status, extensions, payload)
        _validate_received(obj, self.version)
        return obj

    def _fetch_item16(self, r: Reader, start: int) -> Object | EndOfRange:
        flags = r.varint("serialization flags")
        if flags in (_F_END_OF_NON_EXISTENT_RANGE, _F_END_OF_UNKNOWN_RANGE):
            end = EndOfRange(r.varint("group id"), r.varint("object id"), flags == _F_END_OF_UNKNOWN_RANGE)
            self._prior_location = (end.group_id, end.object_id)
            return end
        if flags >= 0x80:
            raise violation(f"invalid serialization flags {flags:#x}")
        location, prior = self._prior_location, self._prior_object

        def missing(what: str) -> ProtocolError:
            return violation(f"serialization flags {flags:#x} reference the prior object's {what}, "
                             "which does not exist")

        if flags & _F_GROUP_ID:
            group = r.varint("group id")
        elif location is None:
            raise missing("group id")
        else:
            group = location[0]
        subgroup: int | None = None
        if not flags & _F_DATAGRAM:
            mode = flags & _F_SUBGROUP_MASK
            if mode == 0x03:
                subgroup = r.varint("subgroup id")
            elif mode == 0x00:
                subgroup = 0
            elif prior is None or prior.subgroup_id is None:
                raise missing("subgroup id")
            else:
                subgroup = prior.subgroup_id + mode - 1
        if flags & _F_OBJECT_ID:
            object_id = r.varint("object id")
        elif location is None:
            raise missing("object id")
        else:
            object_id = location[1] + 1
        if flags & _F_PRIORITY:
            priority = r.uint8("publisher priority")
        elif prior is None:
            raise missing("publisher priority")
        else:
            priority = prior.publisher_priority  # type: ignore[assignment]
        if max(object_id, subgroup or 0) > VARINT_MAX:
            raise violation("implied id exceeds 2^62-1")
        extensions = self._extensions(r, start) if flags & _F_EXTENSIONS else []
        n = r.varint("object payload length")
        obj = Object(group, subgroup, object_id, priority, ObjectStatus.NORMAL, extensions,
                     self._take(r, start, n, "object payload"))
        _validate_received(obj, self.version)
        self._prior_location, self._prior_object = (group, object_id), obj
        return obj
