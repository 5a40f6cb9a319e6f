"""MoQT versions, Message Parameters and Setup Parameters (draft-ietf-moq-transport-16
sections 1.4.2, 9.2, 9.3.1; draft-14 sections 9.2, 9.3.1 where it differs).

Versions: draft-16 negotiates the version by ALPN ("moqt-16") and its setup messages carry
no version fields; draft-14 runs under ALPN "moq-00" and negotiates the version inside
CLIENT_SETUP (Supported Versions) / SERVER_SETUP (Selected Version), see messages.py.

Key-Value-Pairs: draft-16 delta-encodes the types (wire.Reader/Writer.key_value_pairs);
draft-14 writes each Type in full (read_key_value_pairs/write_key_value_pairs here).

Message Parameters (version-specific namespace) decode into one typed `MessageParams`:

* draft-16 knows DELIVERY_TIMEOUT 0x02, AUTHORIZATION_TOKEN 0x03 (repeatable), EXPIRES
  0x08, LARGEST_OBJECT 0x09, FORWARD 0x10, SUBSCRIBER_PRIORITY 0x20, SUBSCRIPTION_FILTER
  0x21, GROUP_ORDER 0x22, NEW_GROUP_REQUEST 0x32. An unknown type or a repeated known
  type is a PROTOCOL_VIOLATION.
* draft-14 knows DELIVERY_TIMEOUT 0x02 and AUTHORIZATION_TOKEN 0x03 (MAX_CACHE_DURATION
  0x04 is mapped onto a track extension by messages.py); unknown types are ignored, as
  that draft says. The other fields of MessageParams are inline message fields in
  draft-14 and messages.py moves them in and out of MessageParams.

Error codes: a Token structure or LARGEST_OBJECT Location that does not parse exactly is
KEY_VALUE_FORMATTING_ERROR (section 1.4.2 / 9.2.2.1). Where the draft names the code for
a bad value it is used instead: DELIVERY_TIMEOUT 0, FORWARD > 1, SUBSCRIBER_PRIORITY >
255, GROUP_ORDER not 1/2, an unknown filter type or a SUBSCRIPTION_FILTER whose length
does not match are PROTOCOL_VIOLATION. Setup PATH / AUTHORITY that are not ASCII (URI
syntax, RFC 3986) are MALFORMED_PATH / MALFORMED_AUTHORITY.

Setup Parameters (namespace constant across versions): PATH 0x01, MAX_REQUEST_ID 0x02,
AUTHORIZATION_TOKEN 0x03 (repeatable), MAX_AUTH_TOKEN_CACHE_SIZE 0x04, AUTHORITY 0x05,
MOQT_IMPLEMENTATION 0x07. Draft-14 lists MOQT_IMPLEMENTATION as 0x05 too, colliding with
AUTHORITY; draft-16 moved it to 0x07 (#1191). As the namespace is version-independent,
0x05 is AUTHORITY and 0x07 MOQT_IMPLEMENTATION in both versions. Unknown setup
parameters are kept in `SetupParams.unknown` (duplicates allowed) and otherwise ignored.

Encoding never emits something the decoder would reject: invalid values raise ValueError.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

from fastrelay.moq.wire import (
    KVP_VALUE_MAX,
    ErrorCode,
    Location,
    ProtocolError,
    Reader,
    Writer,
    violation,
)

Pair = tuple[int, int | bytes]


class Version(enum.IntEnum):
    """MoQT version numbers (0xff000000 + draft number)."""

    DRAFT_14 = 0xFF00000E
    DRAFT_16 = 0xFF000010


ALPN = {Version.DRAFT_16: "moqt-16"}
LEGACY_ALPN = "moq-00"  # drafts <= 14: version negotiated in CLIENT_SETUP/SERVER_SETUP


class AliasType(enum.IntEnum):
    """Authorization Token Alias Type (draft-16 section 9.2.2.1)."""

    DELETE = 0x0
    REGISTER = 0x1
    USE_ALIAS = 0x2
    USE_VALUE = 0x3


class FilterType(enum.IntEnum):
    """Subscription Filter types (draft-16 section 5.1.2)."""

    NEXT_GROUP_START = 0x1
    LARGEST_OBJECT = 0x2
    ABSOLUTE_START = 0x3
    ABSOLUTE_RANGE = 0x4


class GroupOrder(enum.IntEnum):
    ASCENDING = 0x1
    DESCENDING = 0x2


class ParamType(enum.IntEnum):
    """Draft-16 Message Parameter types (section 13.2); draft-14 uses 0x02 and 0x03."""

    DELIVERY_TIMEOUT = 0x02
    AUTHORIZATION_TOKEN = 0x03
    EXPIRES = 0x08
    LARGEST_OBJECT = 0x09
    FORWARD = 0x10
    SUBSCRIBER_PRIORITY = 0x20
    SUBSCRIPTION_FILTER = 0x21
    GROUP_ORDER = 0x22
    NEW_GROUP_REQUEST = 0x32


class SetupParamType(enum.IntEnum):
    PATH = 0x01
    MAX_REQUEST_ID = 0x02
    AUTHORIZATION_TOKEN = 0x03
    MAX_AUTH_TOKEN_CACHE_SIZE = 0x04
    AUTHORITY = 0x05
    MOQT_IMPLEMENTATION = 0x07


def enum_or_int[T](cls: Callable[[int], T], value: int) -> T | int:
    """`cls(value)`, or the plain int for a value the enum does not know."""
    try:
        return cls(value)
    except ValueError:
        return value


def _exact[T](data: bytes, parse: Callable[[Reader], T], code: ErrorCode, what: str) -> T:
    """Parse `data` completely with `parse`; any failure or leftover byte raises `code`."""
    r = Reader(data)
    try:
        out = parse(r)
    except ProtocolError as exc:
        raise ProtocolError(code, f"{what}: {exc.reason}") from None
    if not r.eof():
        raise ProtocolError(code, f"{what}: {r.remaining} trailing bytes")
    return out


@dataclass(frozen=True, slots=True)
class AuthToken:
    """A Token structure: `alias` unless USE_VALUE, `token_type`/`token_value` only for
    REGISTER and USE_VALUE."""

    alias_type: AliasType
    alias: int | None = None
    token_type: int | None = None
    token_value: bytes | None = None

    def __post_init__(self) -> None:
        has_alias = self.alias_type != AliasType.USE_VALUE
        has_value = self.alias_type in (AliasType.REGISTER, AliasType.USE_VALUE)
        if (self.alias is not None) != has_alias or (self.token_type is not None) != has_value \
                or (self.token_value is not None) != has_value:
            raise ValueError(f"malformed {self.alias_type.name} token: {self}")

    def encode(self) -> bytes:
        w = Writer().varint(self.alias_type)
        if self.alias is not None:
            w.varint(self.alias)
        if self.token_type is not None and self.token_value is not None:
            w.varint(self.token_type).raw(self.token_value)
        return bytes(w)

    @classmethod
    def decode(cls, data: bytes) -> AuthToken:
        """Raises KEY_VALUE_FORMATTING_ERROR if the structure cannot be decoded."""

        def parse(r: Reader) -> AuthToken:
            kind = r.varint("alias type")
            if kind not in AliasType._value2member_map_:
                raise violation(f"unknown alias type {kind}")
            alias_type = AliasType(kind)
            alias = r.varint("token alias") if alias_type != AliasType.USE_VALUE else None
            if alias_type in (AliasType.DELETE, AliasType.USE_ALIAS):
                return cls(alias_type, alias)
            return cls(alias_type, alias, r.varint("token type"), r.rest())

        return _exact(data, parse, ErrorCode.KEY_VALUE_FORMATTING_ERROR, "authorization token")


@dataclass(frozen=True, slots=True)
class SubscriptionFilter:
    """Filter Type with its Start Location (AbsoluteStart/AbsoluteRange) and End Group
    (AbsoluteRange only)."""

    filter_type: FilterType
    start_location: Location | None = None
    end_group: int | None = None

    def __post_init__(self) -> None:
        has_start = self.filter_type in (FilterType.ABSOLUTE_START, FilterType.ABSOLUTE_RANGE)
        has_end = self.filter_type == FilterType.ABSOLUTE_RANGE
        if (self.start_location is not None) != has_start or (self.end_group is not None) != has_end:
            raise ValueError(f"malformed {self.filter_type.name} filter: {self}")

    def write(self, w: Writer) -> None:
        w.varint(self.filter_type)
        if self.start_location is not None:
            w.location(self.start_location)
        if self.end_group is not None:
            w.varint(self.end_group)

    @classmethod
    def read(cls, r: Reader) -> SubscriptionFilter:
        kind = r.varint("filter type")
        if kind not in FilterType._value2member_map_:
            raise violation(f"unknown filter type {kind}")
        ftype = FilterType(kind)
        start = r.location() if ftype in (FilterType.ABSOLUTE_START, FilterType.ABSOLUTE_RANGE) else None
        end = r.varint("end group") if ftype == FilterType.ABSOLUTE_RANGE else None
        return cls(ftype, start, end)


UNFILTERED = SubscriptionFilter(FilterType.ABSOLUTE_START, Location(0, 0))
"""Equivalent to an omitted SUBSCRIPTION_FILTER (draft-16 section 5.1.2)."""


@dataclass(frozen=True, slots=True)
class MessageParams:
    """Typed Message Parameters; None / () means absent."""

    delivery_timeout: int | None = None
    authorization_tokens: tuple[AuthToken, ...] = ()
    expires: int | None = None
    largest_object: Location | None = None
    forward: bool | None = None
    subscriber_priority: int | None = None
    subscription_filter: SubscriptionFilter | None = None
    group_order: GroupOrder | None = None
    new_group_request: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "authorization_tokens", tuple(self.authorization_tokens))

    def present(self) -> frozenset[str]:
        """Names of the fields that are set."""
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) not in (None, ()))


_FIELD = {
    ParamType.DELIVERY_TIMEOUT: "delivery_timeout",
    ParamType.AUTHORIZATION_TOKEN: "authorization_tokens",
    ParamType.EXPIRES: "expires",
    ParamType.LARGEST_OBJECT: "largest_object",
    ParamType.FORWARD: "forward",
    ParamType.SUBSCRIBER_PRIORITY: "subscriber_priority",
    ParamType.SUBSCRIPTION_FILTER: "subscription_filter",
    ParamType.GROUP_ORDER: "group_order",
    ParamType.NEW_GROUP_REQUEST: "new_group_request",
}
_KNOWN_TYPES = {
    Version.DRAFT_16: frozenset(_FIELD),
    Version.DRAFT_14: frozenset({ParamType.DELIVERY_TIMEOUT, ParamType.AUTHORIZATION_TOKEN}),
}
PARAM_FIELDS = {v: frozenset(_FIELD[t] for t in types) for v, types in _KNOWN_TYPES.items()}
"""Fields of MessageParams that are Message Parameters in each version."""


def read_key_value_pairs(r: Reader, count: int, version: Version) -> list[Pair]:
    """`count` Key-Value-Pairs, delta-encoded types in draft-16, absolute in draft-14."""
    if version == Version.DRAFT_16:
        return r.key_value_pairs(count)
    out: list[Pair] = []
    for _ in range(count):
        kind = r.varint("key-value type")
        out.append((kind, r.varint("key-value value") if kind % 2 == 0
                     else r.length_prefixed("key-value value", KVP_VALUE_MAX)))
    return out


def write_key_value_pairs(w: Writer, pairs: list[Pair], version: Version) -> None:
    """Write pairs (sorted by type for draft-16) without a count."""
    if version == Version.DRAFT_16:
        w.key_value_pairs(pairs)
        return
    for kind, value in pairs:
        if isinstance(value, int) != (kind % 2 == 0):
            raise ValueError(f"key-value type {kind} has the wrong value kind")
        if isinstance(value, int):
            w.varint(kind).varint(value)
        else:
            if len(value) > KVP_VALUE_MAX:
                raise ValueError(f"key-value value longer than {KVP_VALUE_MAX}")
            w.varint(kind).length_prefixed(value)


def _parse_value(kind: ParamType, value: int | bytes, version: Version) -> object:
    """Typed value of a known parameter (the pair's parity is already checked)."""
    if isinstance(value, bytes):
        if kind == ParamType.LARGEST_OBJECT:
            return _exact(value, Reader.location, ErrorCode.KEY_VALUE_FORMATTING_ERROR, "LARGEST_OBJECT")
        return _exact(value, SubscriptionFilter.read, ErrorCode.PROTOCOL_VIOLATION, "SUBSCRIPTION_FILTER")
    if kind == ParamType.DELIVERY_TIMEOUT and value == 0 and version == Version.DRAFT_16:
        raise violation("DELIVERY_TIMEOUT is 0")
    if kind == ParamType.FORWARD:
        if value > 1:
            raise violation(f"FORWARD {value} not 0 or 1")
        return bool(value)
    if kind == ParamType.SUBSCRIBER_PRIORITY and value > 255:
        raise violation(f"SUBSCRIBER_PRIORITY {value} > 255")
    if kind == ParamType.GROUP_ORDER:
        if value not in GroupOrder._value2member_map_:
            raise violation(f"GROUP_ORDER {value} not 1 or 2")
        return GroupOrder(value)
    return value


def parse_params(pairs: Iterable[Pair], version: Version, allowed: frozenset[str] | None = None) -> MessageParams:
    """Validate decoded pairs into MessageParams. Known parameters outside `allowed` (the
    fields this message may carry; default: all) are validated, then ignored as the
    draft requires."""
    known = _KNOWN_TYPES[version]
    values: dict[str, object] = {}
    tokens: list[AuthToken] = []
    for kind, value in pairs:
        if kind not in known:
            if version == Version.DRAFT_16:
                raise violation(f"unknown message parameter 0x{kind:x}")
            continue
        ptype = ParamType(kind)
        if ptype == ParamType.AUTHORIZATION_TOKEN:
            assert isinstance(value, bytes)
            tokens.append(AuthToken.decode(value))
            continue
        if _FIELD[ptype] in values:
            raise violation(f"duplicate message parameter 0x{kind:x}")
        values[_FIELD[ptype]] = _parse_value(ptype, value, version)
    if tokens:
        values["authorization_tokens"] = tuple(tokens)
    if allowed is not None:
        values = {k: v for k, v in values.items() if k in allowed}
    return MessageParams(**values)  # type: ignore[arg-type]


def decode_params(r: Reader, count: int, version: Version, allowed: frozenset[str] | None = None) -> MessageParams:
    """Read `count` Message Parameters (see parse_params)."""
    return parse_params(read_key_value_pairs(r, count, version), version, allowed)


def params_pairs(params: MessageParams, version: Version, allowed: frozenset[str] | None = None) -> list[Pair]:
    """Sorted Key-Value-Pairs for `params`; ValueError for a field this version/message
    cannot carry (`allowed`, default: all parameters of the version) or a bad value."""
    extra = params.present() - (PARAM_FIELDS[version] if allowed is None else allowed & PARAM_FIELDS[version])
    if extra:
        raise ValueError(f"{version.name} cannot carry parameters {sorted(extra)} here")
    p = params
    if p.delivery_timeout == 0 and version == Version.DRAFT_16:
        raise ValueError("DELIVERY_TIMEOUT must be > 0")
    if p.subscriber_priority is not None and not 0 <= p.subscriber_priority <= 255:
        raise ValueError("subscriber priority out of 0..255")
    if p.forward not in (None, True, False):
        raise ValueError(f"forward must be a bool, not {p.forward!r}")
    pairs: list[Pair] = []
    if p.delivery_timeout is not None:
        pairs.append((ParamType.DELIVERY_TIMEOUT, p.delivery_timeout))
    pairs += [(ParamType.AUTHORIZATION_TOKEN, t.encode()) for t in p.authorization_tokens]
    if p.expires is not None:
        pairs.append((ParamType.EXPIRES, p.expires))
    if p.largest_object is not None:
        pairs.append((ParamType.LARGEST_OBJECT, bytes(Writer().location(p.largest_object))))
    if p.forward is not None:
        pairs.append((ParamType.FORWARD, int(p.forward)))
    if p.subscriber_priority is not None:
        pairs.append((ParamType.SUBSCRIBER_PRIORITY, p.subscriber_priority))
    if p.subscription_filter is not None:
        w = Writer()
        p.subscription_filter.write(w)
        pairs.append((ParamType.SUBSCRIPTION_FILTER, bytes(w)))
    if p.group_order is not None:
        pairs.append((ParamType.GROUP_ORDER, GroupOrder(p.group_order)))
    if p.new_group_request is not None:
        pairs.append((ParamType.NEW_GROUP_REQUEST, p.new_group_request))
    return pairs


def encode_params(params: MessageParams, version: Version, allowed: frozenset[str] | None = None) -> bytes:
    """Number of Parameters followed by the parameters (see params_pairs)."""
    pairs = params_pairs(params, version, allowed)
    w = Writer().varint(len(pairs))
    write_key_value_pairs(w, pairs, version)
    return bytes(w)


@dataclass(frozen=True, slots=True)
class SetupParams:
    """Setup Parameters; `unknown` keeps unrecognised (type, value) pairs, stably sorted by
    type (the draft-16 wire order; draft-14 does not order them)."""

    path: str | None = None
    max_request_id: int | None = None
    authorization_tokens: tuple[AuthToken, ...] = ()
    max_auth_token_cache_size: int | None = None
    authority: str | None = None
    implementation: str | None = None
    unknown: tuple[Pair, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "authorization_tokens", tuple(self.authorization_tokens))
        object.__setattr__(self, "unknown", tuple((k, v) for k, v in self.unknown))


def _ascii(value: bytes, code: ErrorCode, what: str) -> str:
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(code, f"{what} is not an ASCII URI component") from None


def decode_setup_params(r: Reader, count: int, version: Version) -> SetupParams:
    """Read `count` Setup Parameters; a repeated known parameter (other than
    AUTHORIZATION_TOKEN) is a PROTOCOL_VIOLATION."""
    values: dict[str, object] = {}
    tokens: list[AuthToken] = []
    unknown: list[Pair] = []
    names = {SetupParamType.PATH: "path", SetupParamType.MAX_REQUEST_ID: "max_request_id",
             SetupParamType.MAX_AUTH_TOKEN_CACHE_SIZE: "max_auth_token_cache_size",
             SetupParamType.AUTHORITY: "authority", SetupParamType.MOQT_IMPLEMENTATION: "implementation"}
    for kind, value in read_key_value_pairs(r, count, version):
        if kind not in SetupParamType._value2member_map_:
            unknown.append((kind, value))
            continue
        stype = SetupParamType(kind)
        if stype == SetupParamType.AUTHORIZATION_TOKEN:
            assert isinstance(value, bytes)
            tokens.append(AuthToken.decode(value))
            continue
        if names[stype] in values:
            raise violation(f"duplicate setup parameter 0x{kind:x}")
        if stype == SetupParamType.PATH:
            assert isinstance(value, bytes)
            values["path"] = _ascii(value, ErrorCode.MALFORMED_PATH, "PATH")
        elif stype == SetupParamType.AUTHORITY:
            assert isinstance(value, bytes)
            values["authority"] = _ascii(value, ErrorCode.MALFORMED_AUTHORITY, "AUTHORITY")
        elif stype == SetupParamType.MOQT_IMPLEMENTATION:
            assert isinstance(value, bytes)
            values["implementation"] = value.decode("utf-8", "replace")  # only a SHOULD
        else:
            values[names[stype]] = value
    unknown.sort(key=lambda pair: pair[0])
    return SetupParams(authorization_tokens=tuple(tokens), unknown=tuple(unknown), **values)  # type: ignore[arg-type]


def encode_setup_params(params: SetupParams, version: Version) -> bytes:
    """Number of Parameters followed by the Setup Parameters, sorted by type."""
    p = params
    pairs: list[Pair] = []
    if p.path is not None:
        pairs.append((SetupParamType.PATH, p.path.encode("ascii")))
    if p.max_request_id is not None:
        pairs.append((SetupParamType.MAX_REQUEST_ID, p.max_request_id))
    pairs += [(SetupParamType.AUTHORIZATION_TOKEN, t.encode()) for t in p.authorization_tokens]
    if p.max_auth_token_cache_size is not None:
        pairs.append((SetupParamType.MAX_AUTH_TOKEN_CACHE_SIZE, p.max_auth_token_cache_size))
    if p.authority is not None:
        pairs.append((SetupParamType.AUTHORITY, p.authority.encode("ascii")))
    if p.implementation is not None:
        pairs.append((SetupParamType.MOQT_IMPLEMENTATION, p.implementation.encode()))
    for kind, _ in p.unknown:
        if kind in SetupParamType._value2member_map_:
            raise ValueError(f"setup parameter 0x{kind:x} is known; use its field")
    pairs = sorted(pairs + list(p.unknown), key=lambda pair: pair[0])
    w = Writer().varint(len(pairs))
    write_key_value_pairs(w, pairs, version)
    return bytes(w)
