"""Sans-I/O codec for the MoQT control messages of draft-ietf-moq-transport-16 (section 9)
and draft-14 (section 9) behind one draft-16 shaped model.

Framing: Message Type (i), Message Length (16), Message Payload. `encode_message` builds it,
`decode_message` parses one payload, `ControlStreamParser` splits a stream. Anything
malformed, truncated, trailing, out of range or unknown raises ProtocolError
(PROTOCOL_VIOLATION unless the draft names another code); encoding a message that the
chosen version cannot carry raises ValueError.

Draft-14 <-> draft-16 mapping (class: draft-16 wire / draft-14 wire):

* ClientSetup: 0x20 params / 0x20 Supported Versions + params. `supported_versions` is
  draft-14 only (draft-16 negotiates by ALPN) and must be () for draft-16.
* ServerSetup: 0x21 params / 0x21 Selected Version + params; `selected_version` None in
  draft-16.
* Goaway 0x10, MaxRequestId 0x15, RequestsBlocked 0x1A, Unsubscribe 0xA, FetchCancel
  0x17: identical.
* Subscribe 0x3 and TrackStatus 0xD: draft-14's inline Subscriber Priority, Group Order,
  Forward, Filter Type/Start Location/End Group live in params.subscriber_priority,
  group_order, forward, subscription_filter. Decoding draft-14 always fills them, except
  Group Order 0 ("publisher's order") which is group_order None. Encoding draft-14
  writes None as the draft-16 defaults: priority 128, forward 1, filter AbsoluteStart
  {0,0} (draft-16: same as no filter).
* SubscribeOk 0x4: draft-14 inline Expires (0 = None), Content Exists + Largest Location
  -> params.expires, params.largest_object. Draft-14 inline Group Order and its
  DELIVERY_TIMEOUT / MAX_CACHE_DURATION parameters are track properties, which draft-16
  sends as Track Extensions -> track_extensions DEFAULT_PUBLISHER_GROUP_ORDER 0x22,
  DELIVERY_TIMEOUT 0x02, MAX_CACHE_DURATION 0x04 (group order: Ascending if absent).
  Other track extensions cannot be sent in draft-14.
* Publish 0x1D: the same for Group Order / DELIVERY_TIMEOUT / MAX_CACHE_DURATION;
  inline Content Exists + Largest Location and Forward -> params.largest_object/forward.
* PublishOk 0x1E: inline Forward, Subscriber Priority, Group Order (required: 0 is an
  error in draft-14), filter -> params.
* Fetch 0x16: inline Subscriber Priority / Group Order -> params. Group Order 0 is None,
  which draft-14 reads as "publisher's order" and draft-16 (omitted) as Ascending.
* FetchOk 0x18: inline Group Order -> track extension 0x22, MAX_CACHE_DURATION -> 0x04.
* RequestUpdate 0x2 = draft-14 SUBSCRIBE_UPDATE 0x2: Subscription Request ID ->
  existing_request_id; Start Location + End Group (+1, 0 = open) -> subscription_filter
  AbsoluteStart / AbsoluteRange; Subscriber Priority, Forward -> params (all required in
  draft-14, which cannot say "unchanged").
* RequestOk 0x7 = draft-14 PUBLISH_NAMESPACE_OK 0x7, SUBSCRIBE_NAMESPACE_OK 0x12,
  TRACK_STATUS_OK 0xE (SUBSCRIBE_OK layout: Track Alias 0, Expires and Largest Location ->
  params; its Group Order and parameters have no place in REQUEST_OK and are dropped,
  written as Ascending / none). `request_kind` selects the draft-14 message and is set
  when decoding draft-14; draft-16 ignores it.
* RequestError 0x5 = draft-14 SUBSCRIBE_ERROR 0x5, PUBLISH_ERROR 0x1F, FETCH_ERROR 0x19,
  TRACK_STATUS_ERROR 0xF, PUBLISH_NAMESPACE_ERROR 0x8, SUBSCRIBE_NAMESPACE_ERROR 0x13,
  chosen by `request_kind`. Draft-14 has no Retry Interval (must be 0). Error codes are
  translated to RequestErrorCode through the draft-14 tables (e.g. SUBSCRIBE_ERROR
  TRACK_DOES_NOT_EXIST 0x4 <-> DOES_NOT_EXIST 0x10, SUBSCRIBE_NAMESPACE_ERROR
  NAMESPACE_PREFIX_UNKNOWN 0x4 <-> DOES_NOT_EXIST); draft-14-only codes (FETCH_ERROR
  NO_OBJECTS 0x6, UNKNOWN_STATUS_IN_RANGE 0x8) and unregistered codes pass through as
  ints; a draft-16 code without a draft-14 counterpart whose value means something else
  in that draft-14 table is sent as INTERNAL_ERROR.
* PublishDone 0xB: same layout; status MALFORMED_TRACK is 0x7 in draft-14, 0x12 in -16.
* PublishNamespace 0x6: identical (AUTHORIZATION_TOKEN only).
* PublishNamespaceDone 0x9 / PublishNamespaceCancel 0xC: draft-16 names the namespace by
  `request_id`, draft-14 by `track_namespace`; encoding needs the one its version uses
  and ignores the other. Cancel codes use the PUBLISH_NAMESPACE_ERROR table.
* SubscribeNamespace 0x11: draft-14 has no Subscribe Options (it sends both namespaces
  and PUBLISHes: SubscribeOptions.BOTH) and needs a non-empty prefix.
* Namespace 0x8, NamespaceDone 0xE: draft-16 only.
* UnsubscribeNamespace 0x14: draft-14 only (draft-16 closes the SUBSCRIBE_NAMESPACE
  stream instead).

Per-message Message Parameters follow each parameter's "MAY appear in" list; a known
parameter in another message is validated then ignored on decoding and refused
(ValueError) on encoding. REQUEST_OK accepts EXPIRES as well as LARGEST_OBJECT (draft-16
"TODO: or REQUEST_OK", and TRACK_STATUS answers with SUBSCRIBE_OK's parameters).

Resolved ambiguities: Track Extensions have no count or length, so they run to the end of
the payload, delta-encoded from 0. Draft-14 PUBLISH / PUBLISH_OK / PUBLISH_ERROR show
"Length (i)" but the common framing is "Length (16)", which is used. A NAMESPACE /
NAMESPACE_DONE suffix may have 0 fields (namespace equal to the prefix). Subscribe
Options above 2, End Of Track / Content Exists above 1 are PROTOCOL_VIOLATION. Draft-14
namespaces may have empty fields and only the Full Track Name is capped at 4096 bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import ClassVar, Self

from fastrelay.moq.params import (
    UNFILTERED,
    AliasType,
    FilterType,
    GroupOrder,
    MessageParams,
    Pair,
    SetupParams,
    SubscriptionFilter,
    Version,
    decode_params,
    decode_setup_params,
    encode_params,
    encode_setup_params,
    enum_or_int,
    params_pairs,
    parse_params,
    read_key_value_pairs,
    write_key_value_pairs,
)
from fastrelay.moq.wire import (
    FULL_NAME_MAX,
    KVP_VALUE_MAX,
    NAMESPACE_FIELDS_MAX,
    REASON_MAX,
    Location,
    NeedMore,
    Reader,
    Writer,
    violation,
)

D14 = Version.DRAFT_14
D16 = Version.DRAFT_16
PAYLOAD_MAX = 0xFFFF
GOAWAY_URI_MAX = 8192
_VARINT = 8  # longest varint; non-minimal encodings are allowed
_REASON = _VARINT + REASON_MAX


class RequestErrorCode(enum.IntEnum):
    """REQUEST_ERROR codes (draft-16 section 13.4.2)."""

    INTERNAL_ERROR = 0x0
    UNAUTHORIZED = 0x1
    TIMEOUT = 0x2
    NOT_SUPPORTED = 0x3
    MALFORMED_AUTH_TOKEN = 0x4
    EXPIRED_AUTH_TOKEN = 0x5
    DOES_NOT_EXIST = 0x10
    INVALID_RANGE = 0x11
    MALFORMED_TRACK = 0x12
    DUPLICATE_SUBSCRIPTION = 0x19
    UNINTERESTED = 0x20
    PREFIX_OVERLAP = 0x30
    INVALID_JOINING_REQUEST_ID = 0x32


class PublishDoneCode(enum.IntEnum):
    """PUBLISH_DONE status codes (draft-16 section 13.4.3)."""

    INTERNAL_ERROR = 0x0
    UNAUTHORIZED = 0x1
    TRACK_ENDED = 0x2
    SUBSCRIPTION_ENDED = 0x3
    GOING_AWAY = 0x4
    EXPIRED = 0x5
    TOO_FAR_BEHIND = 0x6
    UPDATE_FAILED = 0x8
    MALFORMED_TRACK = 0x12


class FetchType(enum.IntEnum):
    STANDALONE = 0x1
    RELATIVE_JOINING = 0x2
    ABSOLUTE_JOINING = 0x3


class SubscribeOptions(enum.IntEnum):
    PUBLISH = 0x0
    NAMESPACE = 0x1
    BOTH = 0x2


class TrackExtension(enum.IntEnum):
    """Track Extension Header types the codec validates or maps (draft-16 section 11)."""

    DELIVERY_TIMEOUT = 0x02
    MAX_CACHE_DURATION = 0x04
    DEFAULT_PUBLISHER_PRIORITY = 0x0E
    DEFAULT_PUBLISHER_GROUP_ORDER = 0x22
    DYNAMIC_GROUPS = 0x30


class RequestKind(enum.Enum):
    """The request a RequestOk / RequestError answers; selects the draft-14 message."""

    SUBSCRIBE = enum.auto()
    PUBLISH = enum.auto()
    FETCH = enum.auto()
    TRACK_STATUS = enum.auto()
    PUBLISH_NAMESPACE = enum.auto()
    SUBSCRIBE_NAMESPACE = enum.auto()
    REQUEST_UPDATE = enum.auto()


# --- draft-14 error code tables: draft-14 code -> draft-16 code with the same meaning ----

_COMMON_14 = {0x0: 0x0, 0x1: 0x1, 0x2: 0x2, 0x3: 0x3, 0x10: 0x4, 0x12: 0x5}
_SUBSCRIBE_ERROR_14 = {**_COMMON_14, 0x4: 0x10, 0x5: 0x11}
_PUBLISH_ERROR_14 = {0x0: 0x0, 0x1: 0x1, 0x2: 0x2, 0x3: 0x3, 0x4: 0x20}
_FETCH_ERROR_14 = {**_COMMON_14, 0x4: 0x10, 0x5: 0x11, 0x7: 0x32, 0x9: 0x12}
_PUBLISH_NAMESPACE_ERROR_14 = {**_COMMON_14, 0x4: 0x20}
_SUBSCRIBE_NAMESPACE_ERROR_14 = {**_COMMON_14, 0x4: 0x10, 0x5: 0x30}
_PUBLISH_DONE_14 = {**{c: c for c in range(7)}, 0x7: 0x12}


def _code_from_14(table: dict[int, int], code: int) -> int:
    return enum_or_int(RequestErrorCode, table.get(code, code))


def _code_to_14(table: dict[int, int], code: int) -> int:
    for old, new in table.items():
        if new == code:
            return old
    return 0 if code in table else code  # that value means something else in draft-14


# --- field helpers ----------------------------------------------------------------------

def _r_namespace(r: Reader, v: Version, *, empty_ok: bool = False) -> tuple[bytes, ...]:
    ns = r.namespace_prefix() if empty_ok else r.namespace()
    if v == D16:
        if not all(ns):
            raise violation("empty track namespace field")
        if sum(map(len, ns)) > FULL_NAME_MAX:
            raise violation(f"track namespace longer than {FULL_NAME_MAX} bytes")
    return ns


def _w_namespace(w: Writer, ns: tuple[bytes, ...], v: Version, *, empty_ok: bool = False) -> None:
    if not (0 if empty_ok else 1) <= len(ns) <= NAMESPACE_FIELDS_MAX:
        raise ValueError(f"track namespace has {len(ns)} fields")
    if v == D16 and (not all(ns) or sum(map(len, ns)) > FULL_NAME_MAX):
        raise ValueError("track namespace has an empty field or is too long")
    w.namespace(ns)


def _r_track(r: Reader, v: Version) -> tuple[tuple[bytes, ...], bytes]:
    ns = _r_namespace(r, v)
    name = r.length_prefixed("track name", FULL_NAME_MAX)
    if sum(map(len, ns)) + len(name) > FULL_NAME_MAX:
        raise violation(f"full track name longer than {FULL_NAME_MAX} bytes")
    return ns, name


def _w_track(w: Writer, ns: tuple[bytes, ...], name: bytes, v: Version) -> None:
    _w_namespace(w, ns, v)
    if sum(map(len, ns)) + len(name) > FULL_NAME_MAX:
        raise ValueError(f"full track name longer than {FULL_NAME_MAX} bytes")
    w.length_prefixed(name)


def _r_flag(r: Reader, what: str) -> bool:
    value = r.uint8(what)
    if value > 1:
        raise violation(f"{what} is {value}, not 0 or 1")
    return bool(value)


def _w_flag(w: Writer, value: bool) -> None:
    if value not in (True, False):
        raise ValueError(f"flag must be a bool, not {value!r}")
    w.uint8(int(value))


def _r_group_order(r: Reader, *, zero_ok: bool) -> GroupOrder | None:
    value = r.uint8("group order")
    if value == 0 and zero_ok:
        return None
    if value not in GroupOrder._value2member_map_:
        raise violation(f"group order {value}")
    return GroupOrder(value)


def _r_largest(r: Reader) -> Location | None:
    return r.location() if _r_flag(r, "content exists") else None


def _w_largest(w: Writer, largest: Location | None) -> None:
    w.uint8(largest is not None)
    if largest is not None:
        w.location(largest)


def _check_params(params: MessageParams, allowed: frozenset[str], what: str, v: Version) -> None:
    extra = params.present() - allowed
    if extra:
        raise ValueError(f"{v.name} {what} cannot carry {sorted(extra)}")


def _strip(params: MessageParams, names: frozenset[str]) -> MessageParams:
    return replace(params, **dict.fromkeys(names))


_EXTENSION_VALID = {
    TrackExtension.DELIVERY_TIMEOUT: lambda value: value > 0,
    TrackExtension.DEFAULT_PUBLISHER_PRIORITY: lambda value: value <= 255,
    TrackExtension.DEFAULT_PUBLISHER_GROUP_ORDER: lambda value: value in (1, 2),
    TrackExtension.DYNAMIC_GROUPS: lambda value: value <= 1,
}


def _invalid_extension(ext: tuple[Pair, ...]) -> Pair | None:
    """The first known track extension whose value the draft forbids (all are even types)."""
    return next(((k, x) for k, x in ext if k in _EXTENSION_VALID and not _EXTENSION_VALID[k](x)), None)


def _r_extensions(r: Reader) -> tuple[Pair, ...]:
    """Track Extensions: delta-encoded Key-Value-Pairs up to the end of the payload."""
    out: list[Pair] = []
    kind = 0
    while not r.eof():
        kind += r.varint("extension type")
        if kind > (1 << 64) - 1:
            raise violation("extension type overflows 2^64-1")
        out.append((kind, r.varint("extension value") if kind % 2 == 0
                    else r.length_prefixed("extension value", KVP_VALUE_MAX)))
    bad = _invalid_extension(tuple(out))
    if bad:
        raise violation(f"track extension 0x{bad[0]:x} has invalid value {bad[1]!r}")
    return tuple(out)


def _w_extensions(w: Writer, ext: tuple[Pair, ...]) -> None:
    bad = _invalid_extension(ext)
    if bad:
        raise ValueError(f"track extension 0x{bad[0]:x} has invalid value {bad[1]!r}")
    w.key_value_pairs(list(ext))


def _ext_to_14(ext: tuple[Pair, ...], param_types: frozenset[int], what: str) -> tuple[GroupOrder, list[Pair]]:
    """Split draft-16 track extensions into draft-14's inline Group Order and parameters."""
    seen: dict[int, int | bytes] = {}
    for kind, value in ext:
        if kind in seen or kind not in param_types | {TrackExtension.DEFAULT_PUBLISHER_GROUP_ORDER}:
            raise ValueError(f"draft-14 {what} cannot carry track extension 0x{kind:x} (or repeats it)")
        seen[kind] = value
    order = seen.pop(TrackExtension.DEFAULT_PUBLISHER_GROUP_ORDER, GroupOrder.ASCENDING)
    if order not in (1, 2):
        raise ValueError(f"group order extension {order!r}")
    return GroupOrder(order), sorted(seen.items())


def _ext_from_14(pairs: list[Pair], param_types: frozenset[int],
                 order: GroupOrder) -> tuple[tuple[Pair, ...], list[Pair]]:
    """Draft-14 parameters of `param_types` plus inline Group Order -> track extensions."""
    ext: dict[int, int | bytes] = {TrackExtension.DEFAULT_PUBLISHER_GROUP_ORDER: order}
    rest: list[Pair] = []
    for kind, value in pairs:
        if kind not in param_types:
            rest.append((kind, value))
        elif kind in ext:
            raise violation(f"duplicate message parameter 0x{kind:x}")
        else:
            ext[kind] = value
    return tuple(sorted(ext.items())), rest


def _w_pairs(w: Writer, pairs: list[Pair], v: Version) -> None:
    w.varint(len(pairs))
    write_key_value_pairs(w, pairs, v)


def _freeze(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            object.__setattr__(obj, name, tuple(value))


# --- messages ---------------------------------------------------------------------------

class Message:
    """Base of all control messages."""

    __slots__ = ()
    TYPES: ClassVar[dict[Version, tuple[int, ...]]]  # wire type codes per version

    def _encode(self, w: Writer, v: Version) -> int:
        """Write the payload; return the message type."""
        raise NotImplementedError

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        raise NotImplementedError

    @classmethod
    def max_payload(cls, v: Version, msg_type: int) -> int:
        """Largest payload a well-formed message of this type can have."""
        return PAYLOAD_MAX


def _both(code: int) -> dict[Version, tuple[int, ...]]:
    return {D14: (code,), D16: (code,)}


@dataclass(frozen=True, slots=True)
class ClientSetup(Message):
    """CLIENT_SETUP; `supported_versions` is sent in draft-14 only."""

    supported_versions: tuple[int, ...] = ()
    params: SetupParams = field(default_factory=SetupParams)
    TYPES: ClassVar = _both(0x20)

    def __post_init__(self) -> None:
        _freeze(self, "supported_versions")

    def _encode(self, w: Writer, v: Version) -> int:
        if v == D14:
            w.varint(len(self.supported_versions))
            for version in self.supported_versions:
                w.varint(version)
        else:
            if self.supported_versions:
                raise ValueError("draft-16 CLIENT_SETUP has no version list (ALPN negotiates)")
            if any(t.alias_type in (AliasType.DELETE, AliasType.USE_ALIAS) for t in self.params.authorization_tokens):
                raise ValueError("CLIENT_SETUP token cannot DELETE or USE_ALIAS")
        w.raw(encode_setup_params(self.params, v))
        return 0x20

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        versions: tuple[int, ...] = ()
        if v == D14:
            versions = tuple(enum_or_int(Version, r.varint("version")) for _ in range(r.varint("version count")))
        params = decode_setup_params(r, r.varint("parameter count"), v)
        if v == D16 and any(t.alias_type in (AliasType.DELETE, AliasType.USE_ALIAS)
                            for t in params.authorization_tokens):
            raise violation("CLIENT_SETUP authorization token with alias type DELETE or USE_ALIAS")
        return cls(versions, params)


@dataclass(frozen=True, slots=True)
class ServerSetup(Message):
    """SERVER_SETUP; `selected_version` is sent in draft-14 only."""

    selected_version: int | None = None
    params: SetupParams = field(default_factory=SetupParams)
    TYPES: ClassVar = _both(0x21)

    def _encode(self, w: Writer, v: Version) -> int:
        if (self.selected_version is None) != (v == D16):
            raise ValueError("selected_version is required in draft-14 and absent in draft-16")
        if self.selected_version is not None:
            w.varint(self.selected_version)
        w.raw(encode_setup_params(self.params, v))
        return 0x21

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        selected = enum_or_int(Version, r.varint("selected version")) if v == D14 else None
        return cls(selected, decode_setup_params(r, r.varint("parameter count"), v))


@dataclass(frozen=True, slots=True)
class Goaway(Message):
    new_session_uri: str = ""
    TYPES: ClassVar = _both(0x10)

    def _encode(self, w: Writer, v: Version) -> int:
        raw = self.new_session_uri.encode()
        if len(raw) > GOAWAY_URI_MAX:
            raise ValueError(f"new session URI longer than {GOAWAY_URI_MAX} bytes")
        w.length_prefixed(raw)
        return 0x10

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        raw = r.length_prefixed("new session URI", GOAWAY_URI_MAX)
        try:
            return cls(raw.decode())
        except UnicodeDecodeError:
            raise violation("new session URI is not UTF-8") from None

    @classmethod
    def max_payload(cls, v: Version, msg_type: int) -> int:
        return _VARINT + GOAWAY_URI_MAX


@dataclass(frozen=True, slots=True)
class MaxRequestId(Message):
    max_request_id: int
    TYPES: ClassVar = _both(0x15)

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.max_request_id)
        return 0x15

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        return cls(r.varint("max request ID"))

    @classmethod
    def max_payload(cls, v: Version, msg_type: int) -> int:
        return _VARINT


@dataclass(frozen=True, slots=True)
class RequestsBlocked(Message):
    maximum_request_id: int
    TYPES: ClassVar = _both(0x1A)

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.maximum_request_id)
        return 0x1A

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        return cls(r.varint("maximum request ID"))

    @classmethod
    def max_payload(cls, v: Version, msg_type: int) -> int:
        return _VARINT


_REQUEST_OK_14 = {RequestKind.PUBLISH_NAMESPACE: 0x07, RequestKind.SUBSCRIBE_NAMESPACE: 0x12,
                  RequestKind.TRACK_STATUS: 0x0E}
_REQUEST_OK_PARAMS = frozenset({"expires", "largest_object"})


@dataclass(frozen=True, slots=True)
class RequestOk(Message):
    """REQUEST_OK (draft-14: PUBLISH_NAMESPACE_OK / SUBSCRIBE_NAMESPACE_OK / TRACK_STATUS_OK,
    chosen by `request_kind`)."""

    request_id: int
    params: MessageParams = field(default_factory=MessageParams)
    request_kind: RequestKind | None = None
    TYPES: ClassVar = {D16: (0x07,), D14: tuple(_REQUEST_OK_14.values())}

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.request_id)
        if v == D16:
            w.raw(encode_params(self.params, v, _REQUEST_OK_PARAMS))
            return 0x07
        if self.request_kind not in _REQUEST_OK_14:
            raise ValueError(f"draft-14 has no OK message answering {self.request_kind}")
        msg_type = _REQUEST_OK_14[self.request_kind]
        if msg_type != 0x0E:
            _check_params(self.params, frozenset(), "namespace OK", v)
            return msg_type
        _check_params(self.params, _REQUEST_OK_PARAMS, "TRACK_STATUS_OK", v)
        w.varint(0).varint(self.params.expires or 0).uint8(GroupOrder.ASCENDING)
        _w_largest(w, self.params.largest_object)
        w.varint(0)
        return msg_type

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        request_id = r.varint("request ID")
        if v == D16:
            return cls(request_id, decode_params(r, r.varint("parameter count"), v, _REQUEST_OK_PARAMS))
        kind = {t: k for k, t in _REQUEST_OK_14.items()}[msg_type]
        if msg_type != 0x0E:
            return cls(request_id, request_kind=kind)
        r.varint("track alias")
        expires = r.varint("expires")
        _r_group_order(r, zero_ok=False)
        largest = _r_largest(r)
        decode_params(r, r.varint("parameter count"), v, frozenset())
        return cls(request_id, MessageParams(expires=expires or None, largest_object=largest), kind)

    @classmethod
    def max_payload(cls, v: Version, msg_type: int) -> int:
        return _VARINT if v == D14 and msg_type != 0x0E else PAYLOAD_MAX


_REQUEST_ERROR_14 = {
    RequestKind.SUBSCRIBE: (0x05, _SUBSCRIBE_ERROR_14),
    RequestKind.PUBLISH: (0x1F, _PUBLISH_ERROR_14),
    RequestKind.FETCH: (0x19, _FETCH_ERROR_14),
    RequestKind.TRACK_STATUS: (0x0F, _SUBSCRIBE_ERROR_14),
    RequestKind.PUBLISH_NAMESPACE: (0x08, _PUBLISH_NAMESPACE_ERROR_14),
    RequestKind.SUBSCRIBE_NAMESPACE: (0x13, _SUBSCRIBE_NAMESPACE_ERROR_14),
}


@dataclass(frozen=True, slots=True)
class RequestError(Message):
    """REQUEST_ERROR (draft-14: the per-request *_ERROR chosen by `request_kind`)."""

    request_id: int
    error_code: int
    retry_interval: int = 0
    error_reason: str = ""
    request_kind: RequestKind | None = None
    TYPES: ClassVar = {D16: (0x05,), D14: tuple(t for t, _ in _REQUEST_ERROR_14.values())}

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.request_id)
        if v == D16:
            w.varint(self.error_code).varint(self.retry_interval).reason(self.error_reason)
            return 0x05
        if self.request_kind not in _REQUEST_ERROR_14:
            raise ValueError(f"draft-14 has no error message answering {self.request_kind}")
        if self.retry_interval:
            raise ValueError("draft-14 errors have no retry interval")
        msg_type, table = _REQUEST_ERROR_14[self.request_kind]
        w.varint(_code_to_14(table, self.error_code)).reason(self.error_reason)
        return msg_type

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        request_id = r.varint("request ID")
        if v == D16:
            code = enum_or_int(RequestErrorCode, r.varint("error code"))
            return cls(request_id, code, r.varint("retry interval"), r.reason())
        kind, table = next((k, tbl) for k, (t, tbl) in _REQUEST_ERROR_14.items() if t == msg_type)
        return cls(request_id, _code_from_14(table, r.varint("error code")), 0, r.reason(), kind)

    @classmethod
    def max_payload(cls, v: Version, msg_type: int) -> int:
        return (3 if v == D16 else 2) * _VARINT + _REASON


_SUBSCRIBE_INLINE_14 = frozenset({"subscriber_priority", "group_order", "forward", "subscription_filter"})
_SUBSCRIBE_PARAMS_14 = frozenset({"delivery_timeout", "authorization_tokens"})


def _encode_subscribe_like(w: Writer, msg: Subscribe | TrackStatus, v: Version, allowed16: frozenset[str]) -> None:
    """SUBSCRIBE and TRACK_STATUS share one layout."""
    w.varint(msg.request_id)
    _w_track(w, msg.track_namespace, msg.track_name, v)
    p = msg.params
    if v == D16:
        w.raw(encode_params(p, v, allowed16))
        return
    _check_params(p, _SUBSCRIBE_INLINE_14 | _SUBSCRIBE_PARAMS_14, type(msg).__name__, v)
    w.uint8(128 if p.subscriber_priority is None else p.subscriber_priority)
    w.uint8(0 if p.group_order is None else GroupOrder(p.group_order))
    _w_flag(w, True if p.forward is None else p.forward)
    (p.subscription_filter or UNFILTERED).write(w)
    w.raw(encode_params(_strip(p, _SUBSCRIBE_INLINE_14), v))


def _decode_subscribe_like(r: Reader, v: Version, allowed16: frozenset[str]) -> tuple:
    request_id = r.varint("request ID")
    ns, name = _r_track(r, v)
    if v == D16:
        return request_id, ns, name, decode_params(r, r.varint("parameter count"), v, allowed16)
    inline = {"subscriber_priority": r.uint8("subscriber priority"),
              "group_order": _r_group_order(r, zero_ok=True),
              "forward": _r_flag(r, "forward"),
              "subscription_filter": SubscriptionFilter.read(r)}
    params = decode_params(r, r.varint("parameter count"), v, _SUBSCRIBE_PARAMS_14)
    return request_id, ns, name, replace(params, **inline)


_SUBSCRIBE_PARAMS_16 = frozenset({"delivery_timeout", "authorization_tokens", "forward", "subscriber_priority",
                                  "subscription_filter", "group_order", "new_group_request"})


@dataclass(frozen=True, slots=True)
class Subscribe(Message):
    request_id: int
    track_namespace: tuple[bytes, ...]
    track_name: bytes
    params: MessageParams = field(default_factory=MessageParams)
    TYPES: ClassVar = _both(0x03)

    def __post_init__(self) -> None:
        _freeze(self, "track_namespace")

    def _encode(self, w: Writer, v: Version) -> int:
        _encode_subscribe_like(w, self, v, _SUBSCRIBE_PARAMS_16)
        return 0x03

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        return cls(*_decode_subscribe_like(r, v, _SUBSCRIBE_PARAMS_16))


_SUBSCRIBE_OK_PARAMS = frozenset({"expires", "largest_object"})
_PUBLISHER_PARAMS_14 = frozenset({TrackExtension.DELIVERY_TIMEOUT, TrackExtension.MAX_CACHE_DURATION})


@dataclass(frozen=True, slots=True)
class SubscribeOk(Message):
    request_id: int
    track_alias: int
    params: MessageParams = field(default_factory=MessageParams)
    track_extensions: tuple[Pair, ...] = ()
    TYPES: ClassVar = _both(0x04)

    def __post_init__(self) -> None:
        _freeze(self, "track_extensions")

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.request_id).varint(self.track_alias)
        if v == D16:
            w.raw(encode_params(self.params, v, _SUBSCRIBE_OK_PARAMS))
            _w_extensions(w, self.track_extensions)
            return 0x04
        _check_params(self.params, _SUBSCRIBE_OK_PARAMS, "SUBSCRIBE_OK", v)
        order, pairs = _ext_to_14(self.track_extensions, _PUBLISHER_PARAMS_14, "SUBSCRIBE_OK")
        w.varint(self.params.expires or 0).uint8(order)
        _w_largest(w, self.params.largest_object)
        _w_pairs(w, pairs, v)
        return 0x04

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        request_id, alias = r.varint("request ID"), r.varint("track alias")
        if v == D16:
            params = decode_params(r, r.varint("parameter count"), v, _SUBSCRIBE_OK_PARAMS)
            return cls(request_id, alias, params, _r_extensions(r))
        expires = r.varint("expires")
        order = _r_group_order(r, zero_ok=False)
        assert order is not None
        largest = _r_largest(r)
        ext, rest = _ext_from_14(read_key_value_pairs(r, r.varint("parameter count"), v), _PUBLISHER_PARAMS_14, order)
        parse_params(rest, v, frozenset())
        return cls(request_id, alias, MessageParams(expires=expires or None, largest_object=largest), ext)


_REQUEST_UPDATE_PARAMS_16 = frozenset({"delivery_timeout", "authorization_tokens", "forward",
                                       "subscriber_priority", "subscription_filter", "new_group_request"})
_REQUEST_UPDATE_INLINE_14 = frozenset({"subscription_filter", "subscriber_priority", "forward"})


@dataclass(frozen=True, slots=True)
class RequestUpdate(Message):
    """REQUEST_UPDATE (draft-14: SUBSCRIBE_UPDATE)."""

    request_id: int
    existing_request_id: int
    params: MessageParams = field(default_factory=MessageParams)
    TYPES: ClassVar = _both(0x02)

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.request_id).varint(self.existing_request_id)
        p = self.params
        if v == D16:
            w.raw(encode_params(p, v, _REQUEST_UPDATE_PARAMS_16))
            return 0x02
        _check_params(p, _REQUEST_UPDATE_INLINE_14 | _SUBSCRIBE_PARAMS_14, "SUBSCRIBE_UPDATE", v)
        f = p.subscription_filter
        if f is None or f.start_location is None or p.subscriber_priority is None or p.forward is None:
            raise ValueError("draft-14 SUBSCRIBE_UPDATE needs an Absolute filter, subscriber_priority and forward")
        w.location(f.start_location).varint(0 if f.end_group is None else f.end_group + 1)
        w.uint8(p.subscriber_priority)
        _w_flag(w, p.forward)
        w.raw(encode_params(_strip(p, _REQUEST_UPDATE_INLINE_14), v))
        return 0x02

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        request_id, existing = r.varint("request ID"), r.varint("existing request ID")
        if v == D16:
            params = decode_params(r, r.varint("parameter count"), v, _REQUEST_UPDATE_PARAMS_16)
            return cls(request_id, existing, params)
        start, end = r.location(), r.varint("end group")
        inline = {"subscription_filter": SubscriptionFilter(FilterType.ABSOLUTE_START, start) if end == 0
                  else SubscriptionFilter(FilterType.ABSOLUTE_RANGE, start, end - 1),
                  "subscriber_priority": r.uint8("subscriber priority"),
                  "forward": _r_flag(r, "forward")}
        params = decode_params(r, r.varint("parameter count"), v, _SUBSCRIBE_PARAMS_14)
        return cls(request_id, existing, replace(params, **inline))


@dataclass(frozen=True, slots=True)
class Unsubscribe(Message):
    request_id: int
    TYPES: ClassVar = _both(0x0A)

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.request_id)
        return 0x0A

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        return cls(r.varint("request ID"))

    @classmethod
    def max_payload(cls, v: Version, msg_type: int) -> int:
        return _VARINT


_PUBLISH_PARAMS_16 = frozenset({"authorization_tokens", "expires", "largest_object", "forward"})
_PUBLISH_INLINE_14 = frozenset({"largest_object", "forward"})
_AUTH_ONLY = frozenset({"authorization_tokens"})


@dataclass(frozen=True, slots=True)
class Publish(Message):
    request_id: int
    track_namespace: tuple[bytes, ...]
    track_name: bytes
    track_alias: int
    params: MessageParams = field(default_factory=MessageParams)
    track_extensions: tuple[Pair, ...] = ()
    TYPES: ClassVar = _both(0x1D)

    def __post_init__(self) -> None:
        _freeze(self, "track_namespace", "track_extensions")

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.request_id)
        _w_track(w, self.track_namespace, self.track_name, v)
        w.varint(self.track_alias)
        p = self.params
        if v == D16:
            w.raw(encode_params(p, v, _PUBLISH_PARAMS_16))
            _w_extensions(w, self.track_extensions)
            return 0x1D
        _check_params(p, _PUBLISH_INLINE_14 | _AUTH_ONLY, "PUBLISH", v)
        order, ext_pairs = _ext_to_14(self.track_extensions, _PUBLISHER_PARAMS_14, "PUBLISH")
        w.uint8(order)
        _w_largest(w, p.largest_object)
        _w_flag(w, True if p.forward is None else p.forward)
        pairs = sorted(ext_pairs + params_pairs(_strip(p, _PUBLISH_INLINE_14), v, _AUTH_ONLY), key=lambda kv: kv[0])
        _w_pairs(w, pairs, v)
        return 0x1D

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        request_id = r.varint("request ID")
        ns, name = _r_track(r, v)
        alias = r.varint("track alias")
        if v == D16:
            params = decode_params(r, r.varint("parameter count"), v, _PUBLISH_PARAMS_16)
            return cls(request_id, ns, name, alias, params, _r_extensions(r))
        order = _r_group_order(r, zero_ok=False)
        assert order is not None
        largest = _r_largest(r)
        forward = _r_flag(r, "forward")
        ext, rest = _ext_from_14(read_key_value_pairs(r, r.varint("parameter count"), v), _PUBLISHER_PARAMS_14, order)
        params = replace(parse_params(rest, v, _AUTH_ONLY), largest_object=largest, forward=forward)
        return cls(request_id, ns, name, alias, params, ext)


_PUBLISH_OK_PARAMS_16 = frozenset({"delivery_timeout", "expires", "forward", "subscriber_priority",
                                   "subscription_filter", "group_order", "new_group_request"})
_DELIVERY_ONLY = frozenset({"delivery_timeout"})


@dataclass(frozen=True, slots=True)
class PublishOk(Message):
    request_id: int
    params: MessageParams = field(default_factory=MessageParams)
    TYPES: ClassVar = _both(0x1E)

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.request_id)
        p = self.params
        if v == D16:
            w.raw(encode_params(p, v, _PUBLISH_OK_PARAMS_16))
            return 0x1E
        _check_params(p, _SUBSCRIBE_INLINE_14 | _DELIVERY_ONLY, "PUBLISH_OK", v)
        if p.group_order is None:
            raise ValueError("draft-14 PUBLISH_OK needs a group_order")
        _w_flag(w, True if p.forward is None else p.forward)
        w.uint8(128 if p.subscriber_priority is None else p.subscriber_priority)
        w.uint8(GroupOrder(p.group_order))
        (p.subscription_filter or UNFILTERED).write(w)
        w.raw(encode_params(_strip(p, _SUBSCRIBE_INLINE_14), v))
        return 0x1E

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        request_id = r.varint("request ID")
        if v == D16:
            return cls(request_id, decode_params(r, r.varint("parameter count"), v, _PUBLISH_OK_PARAMS_16))
        inline = {"forward": _r_flag(r, "forward"),
                  "subscriber_priority": r.uint8("subscriber priority"),
                  "group_order": _r_group_order(r, zero_ok=False),
                  "subscription_filter": SubscriptionFilter.read(r)}
        params = decode_params(r, r.varint("parameter count"), v, _DELIVERY_ONLY)
        return cls(request_id, replace(params, **inline))


@dataclass(frozen=True, slots=True)
class PublishDone(Message):
    request_id: int
    status_code: int
    stream_count: int
    error_reason: str = ""
    TYPES: ClassVar = _both(0x0B)

    def _encode(self, w: Writer, v: Version) -> int:
        code = self.status_code if v == D16 else _code_to_14(_PUBLISH_DONE_14, self.status_code)
        w.varint(self.request_id).varint(code).varint(self.stream_count).reason(self.error_reason)
        return 0x0B

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        request_id, code = r.varint("request ID"), r.varint("status code")
        if v == D14:
            code = _PUBLISH_DONE_14.get(code, code)
        return cls(request_id, enum_or_int(PublishDoneCode, code), r.varint("stream count"), r.reason())

    @classmethod
    def max_payload(cls, v: Version, msg_type: int) -> int:
        return 3 * _VARINT + _REASON


_FETCH_PARAMS_16 = frozenset({"authorization_tokens", "subscriber_priority", "group_order"})
_FETCH_INLINE_14 = frozenset({"subscriber_priority", "group_order"})


@dataclass(frozen=True, slots=True)
class Fetch(Message):
    """FETCH: Standalone (track_namespace, track_name, start_location, end_location) or
    Relative/Absolute Joining (joining_request_id, joining_start)."""

    request_id: int
    fetch_type: FetchType
    track_namespace: tuple[bytes, ...] | None = None
    track_name: bytes | None = None
    start_location: Location | None = None
    end_location: Location | None = None
    joining_request_id: int | None = None
    joining_start: int | None = None
    params: MessageParams = field(default_factory=MessageParams)
    TYPES: ClassVar = _both(0x16)

    def __post_init__(self) -> None:
        _freeze(self, "track_namespace")
        standalone = self.fetch_type == FetchType.STANDALONE
        fields = (self.track_namespace, self.track_name, self.start_location, self.end_location)
        if any((f is None) == standalone for f in fields) \
                or any((f is None) != standalone for f in (self.joining_request_id, self.joining_start)):
            raise ValueError(f"fields do not match fetch type {self.fetch_type!r}")

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.request_id)
        p = self.params
        if v == D14:
            _check_params(p, _FETCH_INLINE_14 | _AUTH_ONLY, "FETCH", v)
            w.uint8(128 if p.subscriber_priority is None else p.subscriber_priority)
            w.uint8(0 if p.group_order is None else GroupOrder(p.group_order))
            p = _strip(p, _FETCH_INLINE_14)
        w.varint(FetchType(self.fetch_type))
        if self.track_namespace is not None and self.track_name is not None \
                and self.start_location is not None and self.end_location is not None:
            _w_track(w, self.track_namespace, self.track_name, v)
            w.location(self.start_location).location(self.end_location)
        elif self.joining_request_id is not None and self.joining_start is not None:
            w.varint(self.joining_request_id).varint(self.joining_start)
        w.raw(encode_params(p, v, _FETCH_PARAMS_16 if v == D16 else _AUTH_ONLY))
        return 0x16

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        request_id = r.varint("request ID")
        inline: dict[str, object] = {}
        if v == D14:
            inline = {"subscriber_priority": r.uint8("subscriber priority"),
                      "group_order": _r_group_order(r, zero_ok=True)}
        kind = r.varint("fetch type")
        if kind not in FetchType._value2member_map_:
            raise violation(f"unknown fetch type {kind}")
        if kind == FetchType.STANDALONE:
            ns, name = _r_track(r, v)
            variant: dict[str, object] = {"track_namespace": ns, "track_name": name,
                                          "start_location": r.location(), "end_location": r.location()}
        else:
            variant = {"joining_request_id": r.varint("joining request ID"),
                       "joining_start": r.varint("joining start")}
        params = decode_params(r, r.varint("parameter count"), v, _FETCH_PARAMS_16 if v == D16 else _AUTH_ONLY)
        return cls(request_id, FetchType(kind), params=replace(params, **inline), **variant)  # type: ignore[arg-type]


_FETCH_OK_PARAMS_14 = frozenset({TrackExtension.MAX_CACHE_DURATION})


@dataclass(frozen=True, slots=True)
class FetchOk(Message):
    request_id: int
    end_of_track: bool
    end_location: Location
    params: MessageParams = field(default_factory=MessageParams)
    track_extensions: tuple[Pair, ...] = ()
    TYPES: ClassVar = _both(0x18)

    def __post_init__(self) -> None:
        _freeze(self, "track_extensions")

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.request_id)
        if v == D16:
            _w_flag(w, self.end_of_track)
            w.location(self.end_location).raw(encode_params(self.params, v, frozenset()))
            _w_extensions(w, self.track_extensions)
            return 0x18
        _check_params(self.params, frozenset(), "FETCH_OK", v)
        order, pairs = _ext_to_14(self.track_extensions, _FETCH_OK_PARAMS_14, "FETCH_OK")
        w.uint8(order)
        _w_flag(w, self.end_of_track)
        w.location(self.end_location)
        _w_pairs(w, pairs, v)
        return 0x18

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        request_id = r.varint("request ID")
        if v == D16:
            end_of_track, end = _r_flag(r, "end of track"), r.location()
            params = decode_params(r, r.varint("parameter count"), v, frozenset())
            return cls(request_id, end_of_track, end, params, _r_extensions(r))
        order = _r_group_order(r, zero_ok=False)
        assert order is not None
        end_of_track, end = _r_flag(r, "end of track"), r.location()
        ext, rest = _ext_from_14(read_key_value_pairs(r, r.varint("parameter count"), v), _FETCH_OK_PARAMS_14, order)
        parse_params(rest, v, frozenset())
        return cls(request_id, end_of_track, end, MessageParams(), ext)


@dataclass(frozen=True, slots=True)
class FetchCancel(Message):
    request_id: int
    TYPES: ClassVar = _both(0x17)

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.request_id)
        return 0x17

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        return cls(r.varint("request ID"))

    @classmethod
    def max_payload(cls, v: Version, msg_type: int) -> int:
        return _VARINT


@dataclass(frozen=True, slots=True)
class TrackStatus(Message):
    """TRACK_STATUS: SUBSCRIBE's layout; draft-16 allows only AUTHORIZATION_TOKEN."""

    request_id: int
    track_namespace: tuple[bytes, ...]
    track_name: bytes
    params: MessageParams = field(default_factory=MessageParams)
    TYPES: ClassVar = _both(0x0D)

    def __post_init__(self) -> None:
        _freeze(self, "track_namespace")

    def _encode(self, w: Writer, v: Version) -> int:
        _encode_subscribe_like(w, self, v, _AUTH_ONLY)
        return 0x0D

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        return cls(*_decode_subscribe_like(r, v, _AUTH_ONLY))


@dataclass(frozen=True, slots=True)
class PublishNamespace(Message):
    request_id: int
    track_namespace: tuple[bytes, ...]
    params: MessageParams = field(default_factory=MessageParams)
    TYPES: ClassVar = _both(0x06)

    def __post_init__(self) -> None:
        _freeze(self, "track_namespace")

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.request_id)
        _w_namespace(w, self.track_namespace, v)
        w.raw(encode_params(self.params, v, _AUTH_ONLY))
        return 0x06

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        request_id, ns = r.varint("request ID"), _r_namespace(r, v)
        return cls(request_id, ns, decode_params(r, r.varint("parameter count"), v, _AUTH_ONLY))


_NAMESPACE_MAX = _VARINT + NAMESPACE_FIELDS_MAX * _VARINT + FULL_NAME_MAX


@dataclass(frozen=True, slots=True)
class _NamespaceSuffixMessage(Message):
    """A draft-16 message that carries only a namespace suffix (on a SUBSCRIBE_NAMESPACE stream)."""

    track_namespace_suffix: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _freeze(self, "track_namespace_suffix")

    def _encode(self, w: Writer, v: Version) -> int:
        _w_namespace(w, self.track_namespace_suffix, v, empty_ok=True)
        return self.TYPES[D16][0]

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        return cls(_r_namespace(r, v, empty_ok=True))

    @classmethod
    def max_payload(cls, v: Version, msg_type: int) -> int:
        return _NAMESPACE_MAX


@dataclass(frozen=True, slots=True)
class Namespace(_NamespaceSuffixMessage):
    """NAMESPACE (draft-16 only)."""

    TYPES: ClassVar = {D16: (0x08,)}


@dataclass(frozen=True, slots=True)
class PublishNamespaceDone(Message):
    """PUBLISH_NAMESPACE_DONE: by `request_id` in draft-16, `track_namespace` in draft-14."""

    request_id: int | None
    track_namespace: tuple[bytes, ...] | None = None
    TYPES: ClassVar = _both(0x09)

    def __post_init__(self) -> None:
        _freeze(self, "track_namespace")

    def _encode(self, w: Writer, v: Version) -> int:
        if v == D16:
            if self.request_id is None:
                raise ValueError("draft-16 PUBLISH_NAMESPACE_DONE needs request_id")
            w.varint(self.request_id)
        else:
            if self.track_namespace is None:
                raise ValueError("draft-14 PUBLISH_NAMESPACE_DONE needs track_namespace")
            _w_namespace(w, self.track_namespace, v)
        return 0x09

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        return cls(r.varint("request ID")) if v == D16 else cls(None, _r_namespace(r, v))

    @classmethod
    def max_payload(cls, v: Version, msg_type: int) -> int:
        return _VARINT if v == D16 else PAYLOAD_MAX


@dataclass(frozen=True, slots=True)
class NamespaceDone(_NamespaceSuffixMessage):
    """NAMESPACE_DONE (draft-16 only)."""

    TYPES: ClassVar = {D16: (0x0E,)}


@dataclass(frozen=True, slots=True)
class PublishNamespaceCancel(Message):
    """PUBLISH_NAMESPACE_CANCEL: by `request_id` in draft-16, `track_namespace` in draft-14;
    codes are RequestErrorCode."""

    request_id: int | None
    error_code: int
    error_reason: str = ""
    track_namespace: tuple[bytes, ...] | None = None
    TYPES: ClassVar = _both(0x0C)

    def __post_init__(self) -> None:
        _freeze(self, "track_namespace")

    def _encode(self, w: Writer, v: Version) -> int:
        if v == D16:
            if self.request_id is None:
                raise ValueError("draft-16 PUBLISH_NAMESPACE_CANCEL needs request_id")
            w.varint(self.request_id).varint(self.error_code)
        else:
            if self.track_namespace is None:
                raise ValueError("draft-14 PUBLISH_NAMESPACE_CANCEL needs track_namespace")
            _w_namespace(w, self.track_namespace, v)
            w.varint(_code_to_14(_PUBLISH_NAMESPACE_ERROR_14, self.error_code))
        w.reason(self.error_reason)
        return 0x0C

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        if v == D16:
            request_id = r.varint("request ID")
            code = enum_or_int(RequestErrorCode, r.varint("error code"))
            return cls(request_id, code, r.reason())
        ns = _r_namespace(r, v)
        code = _code_from_14(_PUBLISH_NAMESPACE_ERROR_14, r.varint("error code"))
        return cls(None, code, r.reason(), ns)

    @classmethod
    def max_payload(cls, v: Version, msg_type: int) -> int:
        return 2 * _VARINT + _REASON if v == D16 else PAYLOAD_MAX


_SUBSCRIBE_NAMESPACE_PARAMS_16 = frozenset({"authorization_tokens", "forward"})


@dataclass(frozen=True, slots=True)
class SubscribeNamespace(Message):
    """SUBSCRIBE_NAMESPACE; draft-14 has no Subscribe Options (always BOTH) and needs a
    non-empty prefix."""

    request_id: int
    track_namespace_prefix: tuple[bytes, ...]
    subscribe_options: SubscribeOptions = SubscribeOptions.BOTH
    params: MessageParams = field(default_factory=MessageParams)
    TYPES: ClassVar = _both(0x11)

    def __post_init__(self) -> None:
        _freeze(self, "track_namespace_prefix")

    def _encode(self, w: Writer, v: Version) -> int:
        w.varint(self.request_id)
        _w_namespace(w, self.track_namespace_prefix, v, empty_ok=v == D16)
        if v == D16:
            w.varint(SubscribeOptions(self.subscribe_options))
        elif self.subscribe_options != SubscribeOptions.BOTH:
            raise ValueError("draft-14 SUBSCRIBE_NAMESPACE always subscribes to both")
        w.raw(encode_params(self.params, v, _SUBSCRIBE_NAMESPACE_PARAMS_16 if v == D16 else _AUTH_ONLY))
        return 0x11

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        request_id = r.varint("request ID")
        prefix = _r_namespace(r, v, empty_ok=v == D16)
        options = SubscribeOptions.BOTH
        if v == D16:
            value = r.varint("subscribe options")
            if value not in SubscribeOptions._value2member_map_:
                raise violation(f"subscribe options {value}")
            options = SubscribeOptions(value)
        allowed = _SUBSCRIBE_NAMESPACE_PARAMS_16 if v == D16 else _AUTH_ONLY
        return cls(request_id, prefix, options, decode_params(r, r.varint("parameter count"), v, allowed))


@dataclass(frozen=True, slots=True)
class UnsubscribeNamespace(Message):
    """UNSUBSCRIBE_NAMESPACE (draft-14 only)."""

    track_namespace_prefix: tuple[bytes, ...]
    TYPES: ClassVar = {D14: (0x14,)}

    def __post_init__(self) -> None:
        _freeze(self, "track_namespace_prefix")

    def _encode(self, w: Writer, v: Version) -> int:
        _w_namespace(w, self.track_namespace_prefix, v)
        return 0x14

    @classmethod
    def _decode(cls, r: Reader, v: Version, msg_type: int) -> Self:
        return cls(_r_namespace(r, v))


MESSAGE_CLASSES: tuple[type[Message], ...] = (
    ClientSetup, ServerSetup, Goaway, MaxRequestId, RequestsBlocked, RequestOk, RequestError, Subscribe,
    SubscribeOk, RequestUpdate, Unsubscribe, Publish, PublishOk, PublishDone, Fetch, FetchOk, FetchCancel,
    TrackStatus, PublishNamespace, Namespace, PublishNamespaceDone, NamespaceDone, PublishNamespaceCancel,
    SubscribeNamespace, UnsubscribeNamespace,
)
_BY_TYPE = {v: {t: cls for cls in MESSAGE_CLASSES for t in cls.TYPES.get(v, ())} for v in Version}


def _message_class(msg_type: int, version: Version) -> type[Message]:
    cls = _BY_TYPE[version].get(msg_type)
    if cls is None:
        raise violation(f"unknown message type 0x{msg_type:x}")
    return cls


def encode_message(msg: Message, version: Version) -> bytes:
    """Type (i), Length (16), Payload. ValueError if `version` cannot carry `msg`."""
    version = Version(version)
    if version not in type(msg).TYPES:
        raise ValueError(f"{type(msg).__name__} does not exist in {version.name}")
    w = Writer()
    msg_type = msg._encode(w, version)
    if len(w.buf) > PAYLOAD_MAX:
        raise ValueError(f"{type(msg).__name__} payload of {len(w.buf)} bytes exceeds {PAYLOAD_MAX}")
    return bytes(Writer().varint(msg_type).uint16(len(w.buf)).raw(w.buf))


def decode_message(msg_type: int, payload: bytes, version: Version) -> Message:
    """Decode one complete payload; ProtocolError if it is not exactly a valid message."""
    version = Version(version)
    cls = _message_class(msg_type, version)
    if len(payload) > cls.max_payload(version, msg_type):
        raise violation(f"{cls.__name__} length {len(payload)} exceeds {cls.max_payload(version, msg_type)}")
    r = Reader(payload)
    msg = cls._decode(r, version, msg_type)
    if not r.eof():
        raise violation(f"{r.remaining} trailing bytes after {cls.__name__}")
    return msg


_HEADER_MAX = _VARINT + 2


class ControlStreamParser:
    """Splits a control (or SUBSCRIBE_NAMESPACE) stream into messages. Holds at most one
    incomplete message; an unknown type or an impossible length fails as soon as the
    header is read. After a ProtocolError the stream is unusable."""

    def __init__(self, version: Version) -> None:
        self.version = Version(version)
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add stream bytes; return every message they complete, in order."""
        buf = self._buf
        buf += data
        out: list[Message] = []
        pos = 0
        while True:
            r = Reader(bytes(buf[pos:pos + _HEADER_MAX]), partial=True)
            try:
                msg_type = r.varint("message type")
                cls = _message_class(msg_type, self.version)
                length = r.uint16("message length")
            except NeedMore:
                break
            limit = cls.max_payload(self.version, msg_type)
            if length > limit:
                raise violation(f"{cls.__name__} length {length} exceeds {limit}")
            start = pos + r.pos
            if len(buf) - start < length:
                break
            out.append(decode_message(msg_type, bytes(buf[start:start + length]), self.version))
            pos = start + length
        del buf[:pos]
        return out
