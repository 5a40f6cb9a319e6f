"""MoQT control messages, draft-16 and draft-14: round trips, stream splitting, hand-written
vectors derived from the drafts' layouts, malformed input and the draft-14 mappings."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrelay.moq.messages import (
    MESSAGE_CLASSES,
    ClientSetup,
    ControlStreamParser,
    Fetch,
    FetchCancel,
    FetchOk,
    FetchType,
    Goaway,
    MaxRequestId,
    Namespace,
    NamespaceDone,
    Publish,
    PublishDone,
    PublishDoneCode,
    PublishNamespace,
    PublishNamespaceCancel,
    PublishNamespaceDone,
    PublishOk,
    RequestError,
    RequestErrorCode,
    RequestKind,
    RequestOk,
    RequestsBlocked,
    RequestUpdate,
    ServerSetup,
    Subscribe,
    SubscribeNamespace,
    SubscribeOk,
    SubscribeOptions,
    TrackStatus,
    Unsubscribe,
    UnsubscribeNamespace,
    decode_message,
    encode_message,
)
from fastrelay.moq.params import (
    UNFILTERED,
    AliasType,
    AuthToken,
    FilterType,
    GroupOrder,
    MessageParams,
    SetupParams,
    SubscriptionFilter,
    Version,
)
from fastrelay.moq.wire import VARINT_MAX, ErrorCode, Location, ProtocolError, Reader, Writer

D14, D16 = Version.DRAFT_14, Version.DRAFT_16
VERSIONS = [D14, D16]
PV = ErrorCode.PROTOCOL_VIOLATION


def split(frame: bytes) -> tuple[int, bytes]:
    r = Reader(frame)
    msg_type, length = r.varint(), r.uint16()
    payload = r.rest()
    assert length == len(payload)
    return msg_type, payload


def round_trip(msg, version):
    return decode_message(*split(encode_message(msg, version)), version)


def frame(msg_type: int, payload: bytes) -> bytes:
    return bytes(Writer().varint(msg_type).uint16(len(payload)).raw(payload))


def violation_code(msg_type: int, payload: bytes, version: Version) -> ErrorCode:
    with pytest.raises(ProtocolError) as e:
        decode_message(msg_type, payload, version)
    return e.value.code


# --- strategies ------------------------------------------------------------------------

vint = st.one_of(st.integers(0, 63), st.integers(0, 2**30), st.integers(0, VARINT_MAX))
positive = st.integers(1, VARINT_MAX)
locations = st.builds(Location, vint, vint)
namespaces = st.lists(st.binary(min_size=1, max_size=6), min_size=1, max_size=32).map(tuple)
prefixes = st.lists(st.binary(min_size=1, max_size=6), max_size=32).map(tuple)
names = st.binary(max_size=12)
reasons = st.text(max_size=16)
tokens = st.one_of(
    st.builds(AuthToken, st.sampled_from([AliasType.DELETE, AliasType.USE_ALIAS]), vint),
    st.builds(AuthToken, st.just(AliasType.REGISTER), vint, vint, st.binary(max_size=8)),
    st.builds(AuthToken, st.just(AliasType.USE_VALUE), st.none(), vint, st.binary(max_size=8)),
)
setup_tokens = st.one_of(  # draft-16 CLIENT_SETUP cannot DELETE or USE_ALIAS
    st.builds(AuthToken, st.just(AliasType.REGISTER), vint, vint, st.binary(max_size=8)),
    st.builds(AuthToken, st.just(AliasType.USE_VALUE), st.none(), vint, st.binary(max_size=8)),
)
absolute_filters = st.one_of(
    st.builds(SubscriptionFilter, st.just(FilterType.ABSOLUTE_START), locations),
    st.builds(SubscriptionFilter, st.just(FilterType.ABSOLUTE_RANGE), locations, st.integers(0, VARINT_MAX - 1)),
)
filters = st.one_of(
    st.builds(SubscriptionFilter, st.sampled_from([FilterType.NEXT_GROUP_START, FilterType.LARGEST_OBJECT])),
    absolute_filters,
)
FIELDS = {
    "delivery_timeout": positive,
    "authorization_tokens": st.lists(tokens, max_size=2).map(tuple),
    "expires": vint,
    "largest_object": locations,
    "forward": st.booleans(),
    "subscriber_priority": st.integers(0, 255),
    "subscription_filter": filters,
    "group_order": st.sampled_from(GroupOrder),
    "new_group_request": vint,
}


def params(optional=(), required=(), **overrides):
    """MessageParams with `optional` fields maybe set and `required` ones always set."""
    strategies = {name: overrides.get(name, FIELDS[name]) for name in (*optional, *required)}
    kwargs = {name: s if name in required or name == "authorization_tokens" else st.none() | s
              for name, s in strategies.items()}
    return st.fixed_dictionaries(kwargs).map(lambda d: MessageParams(**d))


def _ext_entry(kind: int):
    valid = {0x02: positive, 0x0E: st.integers(0, 255), 0x22: st.sampled_from([1, 2]), 0x30: st.integers(0, 1)}
    return st.tuples(st.just(kind), valid.get(kind, vint) if kind % 2 == 0 else st.binary(max_size=8))


extensions_16 = st.lists(st.one_of(st.sampled_from([0x02, 0x04, 0x0B, 0x0E, 0x22, 0x30]), st.integers(0, 2**40))
                         .flatmap(_ext_entry), max_size=5).map(lambda ext: tuple(sorted(ext, key=lambda kv: kv[0])))


def extensions_14(types):
    """Draft-14 publishers send DEFAULT_PUBLISHER_GROUP_ORDER (inline) and the given
    parameter-backed extensions."""
    entries = {0x02: positive, 0x04: vint}
    return st.tuples(*[st.none() | st.tuples(st.just(k), entries[k]) for k in types],
                     st.tuples(st.just(0x22), st.sampled_from([1, 2]))) \
        .map(lambda ext: tuple(e for e in ext if e is not None))


# draft-14 tables, written out from draft-14 section 13 (code -> draft-16 code with that meaning)
E = RequestErrorCode
COMMON_14 = {0x0: E.INTERNAL_ERROR, 0x1: E.UNAUTHORIZED, 0x2: E.TIMEOUT, 0x3: E.NOT_SUPPORTED}
AUTH_14 = {0x10: E.MALFORMED_AUTH_TOKEN, 0x12: E.EXPIRED_AUTH_TOKEN}
LEGACY_CODES = {
    RequestKind.SUBSCRIBE: (0x05, {**COMMON_14, 0x4: E.DOES_NOT_EXIST, 0x5: E.INVALID_RANGE, **AUTH_14}),
    RequestKind.TRACK_STATUS: (0x0F, {**COMMON_14, 0x4: E.DOES_NOT_EXIST, 0x5: E.INVALID_RANGE, **AUTH_14}),
    RequestKind.PUBLISH: (0x1F, {**COMMON_14, 0x4: E.UNINTERESTED}),
    RequestKind.FETCH: (0x19, {**COMMON_14, 0x4: E.DOES_NOT_EXIST, 0x5: E.INVALID_RANGE,
                               0x7: E.INVALID_JOINING_REQUEST_ID, 0x9: E.MALFORMED_TRACK, **AUTH_14}),
    RequestKind.PUBLISH_NAMESPACE: (0x08, {**COMMON_14, 0x4: E.UNINTERESTED, **AUTH_14}),
    RequestKind.SUBSCRIBE_NAMESPACE: (0x13, {**COMMON_14, 0x4: E.DOES_NOT_EXIST, 0x5: E.PREFIX_OVERLAP, **AUTH_14}),
}


def legacy_codes(kind: RequestKind):
    table = LEGACY_CODES[kind][1]
    unregistered = st.integers(0x40, VARINT_MAX)
    legacy_only = st.sampled_from([0x6, 0x8]) if kind == RequestKind.FETCH else st.nothing()
    return st.one_of(st.sampled_from(sorted(table.values())), unregistered, legacy_only)


request_codes_16 = st.one_of(st.sampled_from(RequestErrorCode), vint)

SUBSCRIBE_16 = ("delivery_timeout", "authorization_tokens", "forward", "subscriber_priority",
                "subscription_filter", "group_order", "new_group_request")
SUBSCRIBE_14 = params(("group_order", "delivery_timeout", "authorization_tokens"),
                      ("subscriber_priority", "forward", "subscription_filter"))


def setup_params(version):
    return st.builds(
        SetupParams,
        path=st.none() | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=10),
        max_request_id=st.none() | vint,
        authorization_tokens=st.lists(setup_tokens if version == D16 else tokens, max_size=2).map(tuple),
        max_auth_token_cache_size=st.none() | vint,
        authority=st.none() | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=10),
        implementation=st.none() | st.text(max_size=10),
        unknown=st.lists(st.integers(8, 1000).flatmap(
            lambda k: st.tuples(st.just(k), vint if k % 2 == 0 else st.binary(max_size=4))), max_size=3)
        .map(lambda pairs: tuple(sorted(pairs, key=lambda kv: kv[0]))),
    )


def fetches(version):
    p = params(("authorization_tokens", "subscriber_priority", "group_order")) if version == D16 \
        else params(("authorization_tokens", "group_order"), ("subscriber_priority",))
    standalone = st.builds(Fetch, vint, st.just(FetchType.STANDALONE), namespaces, names, locations, locations,
                           params=p)
    joining = st.builds(Fetch, vint, st.sampled_from([FetchType.RELATIVE_JOINING, FetchType.ABSOLUTE_JOINING]),
                        joining_request_id=vint, joining_start=vint, params=p)
    return standalone | joining


def messages_16() -> dict[str, st.SearchStrategy]:
    return {
        "ClientSetup": st.builds(ClientSetup, st.just(()), setup_params(D16)),
        "ServerSetup": st.builds(ServerSetup, st.none(), setup_params(D16)),
        "Goaway": st.builds(Goaway, st.text(max_size=40)),
        "MaxRequestId": st.builds(MaxRequestId, vint),
        "RequestsBlocked": st.builds(RequestsBlocked, vint),
        "RequestOk": st.builds(RequestOk, vint, params(("largest_object", "expires"))),
        "RequestError": st.builds(RequestError, vint, request_codes_16, vint, reasons),
        "Subscribe": st.builds(Subscribe, vint, namespaces, names, params(SUBSCRIBE_16)),
        "SubscribeOk": st.builds(SubscribeOk, vint, vint, params(("expires", "largest_object")), extensions_16),
        "RequestUpdate": st.builds(RequestUpdate, vint, vint, params((
            "delivery_timeout", "authorization_tokens", "forward", "subscriber_priority", "subscription_filter",
            "new_group_request"))),
        "Unsubscribe": st.builds(Unsubscribe, vint),
        "Publish": st.builds(Publish, vint, namespaces, names, vint,
                             params(("authorization_tokens", "expires", "largest_object", "forward")), extensions_16),
        "PublishOk": st.builds(PublishOk, vint, params((
            "delivery_timeout", "expires", "forward", "subscriber_priority", "subscription_filter", "group_order",
            "new_group_request"))),
        "PublishDone": st.builds(PublishDone, vint, st.one_of(st.sampled_from(PublishDoneCode), vint), vint, reasons),
        "Fetch": fetches(D16),
        "FetchOk": st.builds(FetchOk, vint, st.booleans(), locations, st.just(MessageParams()), extensions_16),
        "FetchCancel": st.builds(FetchCancel, vint),
        "TrackStatus": st.builds(TrackStatus, vint, namespaces, names, params(("authorization_tokens",))),
        "PublishNamespace": st.builds(PublishNamespace, vint, namespaces, params(("authorization_tokens",))),
        "Namespace": st.builds(Namespace, prefixes),
        "PublishNamespaceDone": st.builds(PublishNamespaceDone, vint),
        "NamespaceDone": st.builds(NamespaceDone, prefixes),
        "PublishNamespaceCancel": st.builds(PublishNamespaceCancel, vint, request_codes_16, reasons),
        "SubscribeNamespace": st.builds(SubscribeNamespace, vint, prefixes, st.sampled_from(SubscribeOptions),
                                        params(("authorization_tokens", "forward"))),
    }


def messages_14() -> dict[str, st.SearchStrategy]:
    publisher = {"expires": st.integers(1, VARINT_MAX)}  # draft-14 Expires 0 means absent
    by_kind = {f"RequestError[{kind.name}]": st.builds(RequestError, vint, legacy_codes(kind), st.just(0), reasons,
                                                       st.just(kind)) for kind in LEGACY_CODES}
    return {
        "ClientSetup": st.builds(ClientSetup, st.lists(st.sampled_from(Version) | vint, max_size=3).map(tuple),
                                 setup_params(D14)),
        "ServerSetup": st.builds(ServerSetup, st.sampled_from(Version) | vint, setup_params(D14)),
        "Goaway": st.builds(Goaway, st.text(max_size=40)),
        "MaxRequestId": st.builds(MaxRequestId, vint),
        "RequestsBlocked": st.builds(RequestsBlocked, vint),
        "RequestOk[PUBLISH_NAMESPACE]": st.builds(RequestOk, vint, st.just(MessageParams()),
                                                  st.just(RequestKind.PUBLISH_NAMESPACE)),
        "RequestOk[SUBSCRIBE_NAMESPACE]": st.builds(RequestOk, vint, st.just(MessageParams()),
                                                    st.just(RequestKind.SUBSCRIBE_NAMESPACE)),
        "RequestOk[TRACK_STATUS]": st.builds(RequestOk, vint, params(("largest_object", "expires"), **publisher),
                                             st.just(RequestKind.TRACK_STATUS)),
        **by_kind,
        "Subscribe": st.builds(Subscribe, vint, namespaces, names, SUBSCRIBE_14),
        "SubscribeOk": st.builds(SubscribeOk, vint, vint, params(("expires", "largest_object"), **publisher),
                                 extensions_14((0x02, 0x04))),
        "RequestUpdate": st.builds(RequestUpdate, vint, vint, params(
            ("delivery_timeout", "authorization_tokens"), ("subscription_filter", "subscriber_priority", "forward"),
            subscription_filter=absolute_filters)),
        "Unsubscribe": st.builds(Unsubscribe, vint),
        "Publish": st.builds(Publish, vint, namespaces, names, vint,
                             params(("authorization_tokens", "largest_object"), ("forward",)),
                             extensions_14((0x02, 0x04))),
        "PublishOk": st.builds(PublishOk, vint, params(("delivery_timeout",), (
            "forward", "subscriber_priority", "group_order", "subscription_filter"))),
        "PublishDone": st.builds(PublishDone, vint, st.sampled_from(PublishDoneCode) | vint.filter(lambda c: c != 7),
                                 vint, reasons),
        "Fetch": fetches(D14),
        "FetchOk": st.builds(FetchOk, vint, st.booleans(), locations, st.just(MessageParams()),
                             extensions_14((0x04,))),
        "FetchCancel": st.builds(FetchCancel, vint),
        "TrackStatus": st.builds(TrackStatus, vint, namespaces, names, SUBSCRIBE_14),
        "PublishNamespace": st.builds(PublishNamespace, vint, namespaces, params(("authorization_tokens",))),
        "PublishNamespaceDone": st.builds(PublishNamespaceDone, st.none(), namespaces),
        "PublishNamespaceCancel": st.builds(PublishNamespaceCancel, st.none(),
                                            legacy_codes(RequestKind.PUBLISH_NAMESPACE), reasons, namespaces),
        "SubscribeNamespace": st.builds(SubscribeNamespace, vint, namespaces, st.just(SubscribeOptions.BOTH),
                                        params(("authorization_tokens",))),
        "UnsubscribeNamespace": st.builds(UnsubscribeNamespace, namespaces),
    }


MESSAGES = {D14: messages_14(), D16: messages_16()}
CASES = [(v, name) for v in VERSIONS for name in MESSAGES[v]]
any_message = {v: st.one_of(*MESSAGES[v].values()) for v in VERSIONS}
versioned = st.sampled_from(VERSIONS).flatmap(lambda v: st.tuples(st.just(v), any_message[v]))
versioned_lists = st.sampled_from(VERSIONS).flatmap(
    lambda v: st.tuples(st.just(v), st.lists(any_message[v], min_size=1, max_size=12)))
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- properties ------------------------------------------------------------------------

@pytest.mark.parametrize(("version", "name"), CASES, ids=[f"{v.name}-{n}" for v, n in CASES])
@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_round_trip(version, name, data):
    msg = data.draw(MESSAGES[version][name])
    wire = encode_message(msg, version)
    decoded = decode_message(*split(wire), version)
    assert decoded == msg
    assert encode_message(decoded, version) == wire


@pytest.mark.parametrize("version", VERSIONS)
def test_every_message_type_has_a_strategy(version):
    classes = {cls.__name__ for cls in MESSAGE_CLASSES if version in cls.TYPES}
    assert {name.split("[")[0] for name in MESSAGES[version]} == classes
    kinds = {name for name in MESSAGES[version] if "[" in name}
    if version == D14:  # every draft-14 *_OK / *_ERROR type code
        assert len(kinds) == len(RequestOk.TYPES[D14]) + len(RequestError.TYPES[D14])


@FAST
@given(versioned_lists, st.lists(st.integers(0, 10**6), max_size=20))
def test_parser_splits_a_stream_anywhere(vms, cuts):
    version, msgs = vms
    stream = b"".join(encode_message(m, version) for m in msgs)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    parser = ControlStreamParser(version)
    out = []
    for a, b in zip([0, *points], [*points, len(stream)], strict=True):
        out += parser.feed(stream[a:b])
    assert out == msgs
    assert parser.buffered == 0


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VERSIONS), st.integers(0, 0x40), st.binary(max_size=80))
def test_random_payloads_only_raise_protocol_errors(version, msg_type, payload):
    try:
        decode_message(msg_type, payload, version)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VERSIONS), st.binary(max_size=200))
def test_random_streams_only_raise_protocol_errors(version, data):
    try:
        ControlStreamParser(version).feed(data)
    except ProtocolError:
        pass


@FAST
@given(versioned, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from("rid")),
                           min_size=1, max_size=4))
def test_mutated_encodings_only_raise_protocol_errors(vm, edits):
    version, msg = vm
    data = bytearray(encode_message(msg, version))
    for pos, byte, op in edits:
        pos %= len(data) + 1
        if op == "r" and pos < len(data):
            data[pos] = byte
        elif op == "i":
            data.insert(pos, byte)
        elif pos < len(data):
            del data[pos]
    try:
        decoded = ControlStreamParser(version).feed(bytes(data))
    except ProtocolError:
        decoded = []
    for got in decoded:  # whatever the decoder accepts re-encodes to itself
        assert decode_message(*split(encode_message(got, version)), version) == got
    if len(data) >= 3:  # also the payload directly, under the original type
        try:
            decode_message(split(encode_message(msg, version))[0], bytes(data[3:]), version)
        except ProtocolError:
            pass


# --- hand-written vectors (bytes derived from the drafts' layouts) -----------------------

SUB_PARAMS = MessageParams(
    delivery_timeout=1000,
    authorization_tokens=(AuthToken(AliasType.USE_VALUE, None, 1, b"tok"),),
    forward=False,
    subscriber_priority=10,
    subscription_filter=SubscriptionFilter(FilterType.ABSOLUTE_RANGE, Location(5, 1), 9),
    group_order=GroupOrder.DESCENDING,
)
SUBSCRIBE = Subscribe(2, (b"live", b"cam"), b"hd", SUB_PARAMS)
SUBSCRIBE_16 = bytes.fromhex(
    "03" "0025"          # SUBSCRIBE, length 37
    "02"                 # Request ID 2
    "02" "046c697665" "0363616d"  # Track Namespace: 2 fields "live", "cam"
    "026864"             # Track Name "hd"
    "06"                 # 6 parameters, delta-encoded types:
    "0243e8"             #   +0x02 = 0x02 DELIVERY_TIMEOUT 1000 (2-byte varint 0x43e8)
    "0105" "0301746f6b"  #   +0x01 = 0x03 AUTHORIZATION_TOKEN, 5 bytes: USE_VALUE, type 1, "tok"
    "0d00"               #   +0x0d = 0x10 FORWARD 0
    "100a"               #   +0x10 = 0x20 SUBSCRIBER_PRIORITY 10
    "0104" "04050109"    #   +0x01 = 0x21 SUBSCRIPTION_FILTER, 4 bytes: AbsoluteRange {5,1} end 9
    "0102"               #   +0x01 = 0x22 GROUP_ORDER descending
)
SUBSCRIBE_14 = bytes.fromhex(
    "03" "0020"          # SUBSCRIBE, length 32
    "02"                 # Request ID 2
    "02" "046c697665" "0363616d"  # Track Namespace
    "026864"             # Track Name "hd"
    "0a"                 # Subscriber Priority (8) 10
    "02"                 # Group Order (8) descending
    "00"                 # Forward (8) 0
    "04" "0501" "09"     # Filter Type AbsoluteRange, Start Location {5,1}, End Group 9
    "02"                 # 2 parameters, absolute types:
    "0243e8"             #   0x02 DELIVERY_TIMEOUT 1000
    "0305" "0301746f6b"  #   0x03 AUTHORIZATION_TOKEN, 5 bytes
)
SUBSCRIBE_OK = SubscribeOk(2, 7, MessageParams(expires=30000, largest_object=Location(12, 3)),
                           ((0x02, 500), (0x04, 60000), (0x22, 1)))
SUBSCRIBE_OK_16 = bytes.fromhex(
    "04" "0016"          # SUBSCRIBE_OK, length 22
    "02" "07"            # Request ID 2, Track Alias 7
    "02"                 # 2 parameters:
    "0880007530"         #   +0x08 = EXPIRES 30000 (4-byte varint)
    "0102" "0c03"        #   +0x01 = 0x09 LARGEST_OBJECT, 2 bytes: {12, 3}
    "0241f4"             # Track Extensions: +0x02 = DELIVERY_TIMEOUT 500
    "028000ea60"         #   +0x02 = 0x04 MAX_CACHE_DURATION 60000
    "1e01"               #   +0x1e = 0x22 DEFAULT_PUBLISHER_GROUP_ORDER ascending
)
SUBSCRIBE_OK_14 = bytes.fromhex(
    "04" "0013"          # SUBSCRIBE_OK, length 19
    "02" "07"            # Request ID 2, Track Alias 7
    "80007530"           # Expires (i) 30000
    "01"                 # Group Order (8) ascending
    "01" "0c03"          # Content Exists 1, Largest Location {12, 3}
    "02"                 # 2 parameters:
    "0241f4"             #   0x02 DELIVERY_TIMEOUT 500
    "048000ea60"         #   0x04 MAX_CACHE_DURATION 60000
)
SETUP_PARAMS = SetupParams(path="/moq", max_request_id=100,
                           authorization_tokens=(AuthToken(AliasType.REGISTER, 1, 0, b"ab"),),
                           authority="r.ex", implementation="fr", unknown=((0x40, 5),))
CLIENT_SETUP_16 = bytes.fromhex(
    "20" "001d"          # CLIENT_SETUP, length 29
    "06"                 # 6 setup parameters, delta-encoded types:
    "0104" "2f6d6f71"    #   +1 = 0x01 PATH "/moq"
    "014064"             #   +1 = 0x02 MAX_REQUEST_ID 100
    "0105" "0101006162"  #   +1 = 0x03 AUTHORIZATION_TOKEN: REGISTER, alias 1, type 0, "ab"
    "0204" "722e6578"    #   +2 = 0x05 AUTHORITY "r.ex"
    "0202" "6672"        #   +2 = 0x07 MOQT_IMPLEMENTATION "fr"
    "3905"               #   +0x39 = 0x40 unknown, 5
)
CLIENT_SETUP_14 = bytes.fromhex(
    "20" "002f"          # CLIENT_SETUP, length 47
    "02" "c0000000ff00000e" "c0000000ff00000d"  # 2 Supported Versions (8-byte varints)
    "06"                 # 6 setup parameters, absolute types:
    "0104" "2f6d6f71"    #   0x01 PATH
    "024064"             #   0x02 MAX_REQUEST_ID 100
    "0305" "0101006162"  #   0x03 AUTHORIZATION_TOKEN
    "0504" "722e6578"    #   0x05 AUTHORITY
    "0702" "6672"        #   0x07 MOQT_IMPLEMENTATION
    "404005"             #   0x40 (2-byte varint) unknown, 5
)


@pytest.mark.parametrize(("msg", "version", "wire"), [
    (SUBSCRIBE, D16, SUBSCRIBE_16),
    (SUBSCRIBE, D14, SUBSCRIBE_14),
    (SUBSCRIBE_OK, D16, SUBSCRIBE_OK_16),
    (SUBSCRIBE_OK, D14, SUBSCRIBE_OK_14),
    (ClientSetup((), SETUP_PARAMS), D16, CLIENT_SETUP_16),
    (ClientSetup((D14, 0xFF00000D), SETUP_PARAMS), D14, CLIENT_SETUP_14),
    (ServerSetup(D14, SetupParams(max_request_id=0)), D14, bytes.fromhex("21000b" "c0000000ff00000e" "01" "0200")),
    (ServerSetup(None, SetupParams(max_request_id=0)), D16, bytes.fromhex("210003" "01" "0200")),
    (RequestError(4, E.DOES_NOT_EXIST, 1, "x"), D16, bytes.fromhex("050005" "04" "10" "01" "0178")),
    (RequestError(4, E.DOES_NOT_EXIST, 0, "x", RequestKind.SUBSCRIBE), D14, bytes.fromhex("050004" "04" "04" "0178")),
    (RequestUpdate(6, 2, MessageParams(subscription_filter=SubscriptionFilter(
        FilterType.ABSOLUTE_RANGE, Location(3, 0), 7), subscriber_priority=1, forward=True)), D14,
     bytes.fromhex("020008" "06" "02" "0300" "08" "01" "01" "00")),  # End Group 7 is sent as 8 (+1)
    (Fetch(8, FetchType.RELATIVE_JOINING, joining_request_id=2, joining_start=3), D16,
     bytes.fromhex("160005" "08" "02" "02" "03" "00")),
    (Fetch(8, FetchType.RELATIVE_JOINING, joining_request_id=2, joining_start=3,
           params=MessageParams(subscriber_priority=9)), D14,
     bytes.fromhex("160007" "08" "09" "00" "02" "02" "03" "00")),
    (PublishNamespaceDone(5), D16, bytes.fromhex("090001" "05")),
    (PublishNamespaceDone(None, (b"a",)), D14, bytes.fromhex("090003" "01" "0161")),
    (PublishDone(3, PublishDoneCode.MALFORMED_TRACK, 2, ""), D16, bytes.fromhex("0b0004" "03" "12" "02" "00")),
    (PublishDone(3, PublishDoneCode.MALFORMED_TRACK, 2, ""), D14, bytes.fromhex("0b0004" "03" "07" "02" "00")),
    (SubscribeNamespace(0, (), SubscribeOptions.NAMESPACE), D16, bytes.fromhex("110004" "00" "00" "01" "00")),
])
def test_hand_written_vectors(msg, version, wire):
    assert encode_message(msg, version) == wire
    assert decode_message(*split(wire), version) == msg


# --- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize(("version", "msg_type"), [(D16, 0x14), (D16, 0x1F), (D16, 0x40), (D14, 0x40), (D14, 0x01)])
def test_unknown_message_type(version, msg_type):
    with pytest.raises(ProtocolError, match=f"unknown message type 0x{msg_type:x}") as e:
        decode_message(msg_type, b"", version)
    assert e.value.code == PV
    with pytest.raises(ProtocolError, match="unknown message type"):
        ControlStreamParser(version).feed(bytes(Writer().varint(msg_type)))  # before the length arrives


@pytest.mark.parametrize("version", VERSIONS)
def test_length_mismatch(version):
    msg_type, payload = split(encode_message(SUBSCRIBE, version))
    assert violation_code(msg_type, payload + b"\x00", version) == PV  # trailing byte
    assert violation_code(msg_type, payload[:-1], version) == PV       # truncated
    with pytest.raises(ProtocolError, match="trailing"):
        ControlStreamParser(version).feed(frame(0x15, b"\x05\x00"))
    with pytest.raises(ProtocolError, match="exceeds"):  # MAX_REQUEST_ID cannot exceed one varint
        ControlStreamParser(version).feed(bytes.fromhex("150009"))


def test_lengths_beyond_a_type_are_refused_from_the_header():
    with pytest.raises(ProtocolError, match="exceeds"):
        ControlStreamParser(D16).feed(bytes.fromhex("0a0009"))   # UNSUBSCRIBE
    with pytest.raises(ProtocolError, match="exceeds"):
        ControlStreamParser(D16).feed(bytes.fromhex("052000"))   # REQUEST_ERROR > 3 varints + reason
    with pytest.raises(ProtocolError, match="exceeds"):
        ControlStreamParser(D14).feed(bytes.fromhex("070009"))   # PUBLISH_NAMESPACE_OK
    assert ControlStreamParser(D14).feed(bytes.fromhex("0e0009")) == []  # TRACK_STATUS_OK may be long


def test_parser_buffers_at_most_one_message():
    parser = ControlStreamParser(D16)
    big = encode_message(Publish(0, (b"n",), b"t", 1, track_extensions=((1, b"x" * 65000),)), D16)
    for i in range(0, len(big) - 1, 4096):
        assert parser.feed(big[i:min(i + 4096, len(big) - 1)]) == []
        assert parser.buffered <= 65535 + 10
    assert len(parser.feed(big[-1:] + encode_message(Unsubscribe(1), D16)[:2])) == 1
    assert parser.buffered == 2
    assert parser.feed(encode_message(Unsubscribe(1), D16)[2:]) == [Unsubscribe(1)]


@pytest.mark.parametrize(("version", "pairs"), [
    (D16, [(0x10, 1), (0x10, 0)]),     # FORWARD twice
    (D16, [(0x20, 1), (0x20, 1)]),     # SUBSCRIBER_PRIORITY twice
    (D14, [(0x02, 1), (0x02, 2)]),     # DELIVERY_TIMEOUT twice
])
def test_duplicate_parameter(version, pairs):
    w = Writer().varint(0)
    w.namespace((b"a",)).length_prefixed(b"t")
    if version == D14:
        w.uint8(0).uint8(0).uint8(1).varint(FilterType.LARGEST_OBJECT)
    w.varint(len(pairs))
    if version == D16:
        w.key_value_pairs(pairs)
    else:
        for kind, value in pairs:
            w.varint(kind).varint(value)
    with pytest.raises(ProtocolError, match="duplicate"):
        decode_message(0x03, bytes(w), version)


def subscribe_payload_16(pairs) -> bytes:
    w = Writer().varint(0)
    w.namespace((b"a",)).length_prefixed(b"t").varint(len(pairs)).key_value_pairs(pairs)
    return bytes(w)


def test_unknown_message_parameter():
    with pytest.raises(ProtocolError, match="unknown message parameter 0x4") as e:
        decode_message(0x03, subscribe_payload_16([(0x04, 1)]), D16)
    assert e.value.code == PV
    # draft-14 ignores unknown parameters
    payload = bytes(Writer().varint(0).namespace((b"a",)).length_prefixed(b"t").uint8(0).uint8(0).uint8(1)
                    .varint(2).varint(1).varint(0x3E).varint(1))
    assert decode_message(0x03, payload, D14).params.forward is True


def test_known_parameter_in_another_message_is_ignored():
    # EXPIRES is not defined for SUBSCRIBE: validated, then ignored (draft-16 section 9.2.2)
    assert decode_message(0x03, subscribe_payload_16([(0x08, 5)]), D16).params == MessageParams()
    with pytest.raises(ValueError, match="expires"):
        encode_message(Subscribe(0, (b"a",), b"t", MessageParams(expires=5)), D16)


def test_bad_parameter_value():
    assert violation_code(0x04, bytes.fromhex("0000" "01" "0901" "05"), D16) == ErrorCode.KEY_VALUE_FORMATTING_ERROR
    assert violation_code(0x03, subscribe_payload_16([(0x03, b"\x09")]), D16) == ErrorCode.KEY_VALUE_FORMATTING_ERROR
    assert violation_code(0x03, subscribe_payload_16([(0x20, 300)]), D16) == PV
    assert violation_code(0x03, subscribe_payload_16([(0x21, b"\x04\x00\x00")]), D16) == PV  # no End Group


def test_oversize_reason_phrase():
    payload = bytes(Writer().varint(1).varint(0).varint(0).varint(1025).raw(b"x" * 1025))
    with pytest.raises(ProtocolError, match="exceeds 1024") as e:
        decode_message(0x05, payload, D16)
    assert e.value.code == PV
    with pytest.raises(ValueError):
        encode_message(RequestError(1, 0, 0, "x" * 1025), D16)
    assert round_trip(RequestError(1, 0, 0, "é" * 512), D16).error_reason == "é" * 512


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("count", [0, 33])
def test_namespace_field_count(version, count):
    ns = bytes(Writer().varint(count).raw(b"\x01a" * count))
    assert violation_code(0x06, b"\x00" + ns + b"\x00", version) == PV          # PUBLISH_NAMESPACE
    assert violation_code(0x03, b"\x00" + ns + b"\x01t" + b"\x00", version) == PV  # SUBSCRIBE
    with pytest.raises(ValueError):
        encode_message(PublishNamespace(0, (b"a",) * count), version)


def test_namespace_prefix_rules():
    assert round_trip(SubscribeNamespace(0, ()), D16).track_namespace_prefix == ()
    assert violation_code(0x11, bytes.fromhex("00" "00" "00"), D14) == PV  # draft-14 prefix needs 1..32
    assert violation_code(0x11, bytes.fromhex("00" "00" "03" "00"), D16) == PV  # Subscribe Options 3
    assert violation_code(0x14, bytes.fromhex("00"), D14) == PV
    assert round_trip(Namespace(()), D16) == Namespace(())


def test_namespace_field_and_name_lengths():
    empty_field = bytes.fromhex("00" "02" "0161" "00" "00")  # PUBLISH_NAMESPACE ("a", "")
    assert violation_code(0x06, empty_field, D16) == PV
    assert decode_message(0x06, empty_field, D14) == PublishNamespace(0, (b"a", b""))
    long_name = bytes(Writer().varint(0).namespace((b"a" * 4000,)).length_prefixed(b"b" * 97).varint(0))
    assert violation_code(0x03, long_name[:-1] + bytes(Writer().uint8(0).uint8(0).uint8(1).varint(2).varint(0)),
                          D14) == PV
    assert violation_code(0x03, long_name, D16) == PV
    with pytest.raises(ValueError):
        encode_message(Subscribe(0, (b"a" * 4000,), b"b" * 97), D16)


@pytest.mark.parametrize(("version", "msg_type", "payload"), [
    (D16, 0x16, "00" "04" "00" "00" "00"),            # Fetch Type 4
    (D16, 0x18, "00" "02" "0000" "00"),               # End Of Track 2
    (D16, 0x04, "00" "00" "00" "0200"),               # track extension DELIVERY_TIMEOUT 0
    (D16, 0x04, "00" "00" "00" "2203"),               # track extension DEFAULT_PUBLISHER_GROUP_ORDER 3
    (D16, 0x04, "00" "00" "00" "0e4100"),             # track extension DEFAULT_PUBLISHER_PRIORITY 256
    (D16, 0x04, "00" "00" "00" "3002"),               # track extension DYNAMIC_GROUPS 2
    (D16, 0x10, "02" "ff"),                           # GOAWAY URI not UTF-8
    (D14, 0x04, "00" "00" "00" "00" "00" "00"),       # SUBSCRIBE_OK Group Order 0
    (D14, 0x04, "00" "00" "00" "01" "02" "00"),       # Content Exists 2
    (D14, 0x03, "00" "0161" "00" "00" "03" "01" "02" "00"),  # Group Order 3
    (D14, 0x03, "00" "0161" "00" "00" "00" "02" "02" "00"),  # Forward 2
    (D14, 0x03, "00" "0161" "00" "00" "00" "01" "05" "00"),  # Filter Type 5
    (D14, 0x1E, "00" "01" "80" "00" "02" "00"),       # PUBLISH_OK Group Order 0
])
def test_malformed_fields(version, msg_type, payload):
    assert violation_code(msg_type, bytes.fromhex(payload), version) == PV


def test_goaway_uri_limit():
    assert round_trip(Goaway("u" * 8192), D16) == Goaway("u" * 8192)
    assert violation_code(0x10, bytes(Writer().varint(8193).raw(b"u" * 8193)), D16) == PV


def test_setup_rules():
    delete = SetupParams(authorization_tokens=(AuthToken(AliasType.DELETE, 1),))
    # 1 parameter: +3 = AUTHORIZATION_TOKEN, 2 bytes: DELETE alias 1 (forbidden in draft-16 CLIENT_SETUP)
    with pytest.raises(ProtocolError, match="DELETE or USE_ALIAS") as e:
        decode_message(0x20, bytes.fromhex("01" "0302" "0001"), D16)
    assert e.value.code == PV
    assert decode_message(0x21, bytes.fromhex("01" "0302" "0001"), D16) == ServerSetup(None, delete)
    assert round_trip(ClientSetup((D14,), delete), D14) == ClientSetup((D14,), delete)  # a draft-16 rule
    with pytest.raises(ValueError):
        encode_message(ClientSetup((), delete), D16)
    with pytest.raises(ValueError):
        encode_message(ClientSetup((D14,)), D16)
    with pytest.raises(ValueError):
        encode_message(ServerSetup(None), D14)
    assert round_trip(ClientSetup((0x1234,)), D14).supported_versions == (0x1234,)


def test_unknown_codes_decode_as_ints():
    err = round_trip(RequestError(1, 0x99, 0, ""), D16)
    assert err.error_code == 0x99 and type(err.error_code) is int
    assert type(round_trip(RequestError(1, 0x10, 0, ""), D16).error_code) is RequestErrorCode
    done = round_trip(PublishDone(1, 0x77, 0, ""), D16)
    assert done.status_code == 0x77 and type(done.status_code) is int


# --- draft-14 mappings -----------------------------------------------------------------

@pytest.mark.parametrize("kind", list(LEGACY_CODES))
def test_draft_14_error_code_tables(kind):
    msg_type, table = LEGACY_CODES[kind]
    for old, new in table.items():
        wire = encode_message(RequestError(3, new, 0, "", kind), D14)
        assert split(wire) == (msg_type, bytes(Writer().varint(3).varint(old).varint(0)))
        decoded = decode_message(msg_type, split(wire)[1], D14)
        assert decoded.error_code is new and decoded.request_kind is kind


def test_draft_14_code_without_counterpart():
    # MALFORMED_TRACK (0x12) means EXPIRED_AUTH_TOKEN in draft-14 SUBSCRIBE_ERROR: sent as INTERNAL_ERROR
    wire = encode_message(RequestError(1, E.MALFORMED_TRACK, 0, "", RequestKind.SUBSCRIBE), D14)
    assert split(wire)[1] == bytes.fromhex("01" "00" "00")
    # DUPLICATE_SUBSCRIPTION (0x19) is unassigned there: passed through
    assert split(encode_message(RequestError(1, E.DUPLICATE_SUBSCRIPTION, 0, "", RequestKind.SUBSCRIBE), D14))[1] \
        == bytes.fromhex("01" "19" "00")
    # FETCH_ERROR NO_OBJECTS (0x6) has no draft-16 meaning and stays 6
    assert decode_message(0x19, bytes.fromhex("01" "06" "00"), D14).error_code == 6
    # PUBLISH_NAMESPACE_CANCEL uses the PUBLISH_NAMESPACE_ERROR table
    cancel = PublishNamespaceCancel(None, E.UNINTERESTED, "", (b"a",))
    assert split(encode_message(cancel, D14))[1] == bytes.fromhex("01" "0161" "04" "00")


def test_draft_14_requests_need_a_kind_and_no_retry_interval():
    with pytest.raises(ValueError):
        encode_message(RequestError(1, 0), D14)
    with pytest.raises(ValueError):
        encode_message(RequestError(1, 0, 5, "", RequestKind.SUBSCRIBE), D14)
    with pytest.raises(ValueError):
        encode_message(RequestOk(1, request_kind=RequestKind.REQUEST_UPDATE), D14)
    with pytest.raises(ValueError):
        encode_message(RequestOk(1, MessageParams(expires=3), RequestKind.PUBLISH_NAMESPACE), D14)
    # draft-16 ignores the hint
    assert encode_message(RequestOk(1, request_kind=RequestKind.TRACK_STATUS), D16) == bytes.fromhex("0700020100")


def test_draft_14_subscribe_defaults():
    # Omitted fields are written as the draft-16 defaults and read back explicitly
    got = round_trip(Subscribe(0, (b"a",), b"t"), D14).params
    assert got == MessageParams(subscriber_priority=128, forward=True, subscription_filter=UNFILTERED)
    assert round_trip(Fetch(0, FetchType.ABSOLUTE_JOINING, joining_request_id=1, joining_start=0), D14).params \
        == MessageParams(subscriber_priority=128)


def test_draft_14_track_status_ok():
    ok = RequestOk(4, MessageParams(expires=9, largest_object=Location(1, 2)), RequestKind.TRACK_STATUS)
    # Request ID, Track Alias 0, Expires 9, Group Order 1, Content Exists 1 {1,2}, no parameters
    assert encode_message(ok, D14) == bytes.fromhex("0e0008" "04" "00" "09" "01" "01" "0102" "00")
    # a peer's group order and parameters are validated and dropped
    assert decode_message(0x0E, bytes.fromhex("04" "05" "00" "02" "00" "01" "0401"), D14) \
        == RequestOk(4, MessageParams(), RequestKind.TRACK_STATUS)


def test_draft_14_subscribe_update_filters():
    def update(f):
        return RequestUpdate(1, 0, MessageParams(subscription_filter=f, subscriber_priority=0, forward=False))

    start = SubscriptionFilter(FilterType.ABSOLUTE_START, Location(4, 4))
    assert split(encode_message(update(start), D14))[1] == bytes.fromhex("01" "00" "0404" "00" "00" "00" "00")
    with pytest.raises(ValueError):
        encode_message(update(SubscriptionFilter(FilterType.LARGEST_OBJECT)), D14)
    with pytest.raises(ValueError):
        encode_message(RequestUpdate(1, 0, MessageParams(forward=True)), D14)


def test_draft_14_publisher_extensions():
    pub = Publish(0, (b"a",), b"t", 3, MessageParams(forward=False), ((0x04, 10),))
    # Track Alias 3, Group Order 1 (default), Content Exists 0, Forward 0, 1 parameter: MAX_CACHE_DURATION 10
    assert split(encode_message(pub, D14))[1] == bytes.fromhex("00" "01" "0161" "0174" "03" "01" "00" "00" "01" "040a")
    assert round_trip(pub, D14).track_extensions == ((0x04, 10), (0x22, 1))
    with pytest.raises(ValueError, match="0x30"):
        encode_message(Publish(0, (b"a",), b"t", 3, track_extensions=((0x30, 1),)), D14)
    with pytest.raises(ValueError, match="expires"):
        encode_message(Publish(0, (b"a",), b"t", 3, MessageParams(expires=1)), D14)
    with pytest.raises(ValueError, match="group_order"):
        encode_message(PublishOk(0), D14)


def test_version_specific_messages():
    for msg in (Namespace((b"a",)), NamespaceDone((b"a",))):
        with pytest.raises(ValueError):
            encode_message(msg, D14)
    with pytest.raises(ValueError):
        encode_message(UnsubscribeNamespace((b"a",)), D16)
    with pytest.raises(ValueError):
        encode_message(SubscribeNamespace(0, (b"a",), SubscribeOptions.PUBLISH), D14)
    with pytest.raises(ValueError):
        encode_message(PublishNamespaceDone(None, (b"a",)), D16)
    with pytest.raises(ValueError):
        encode_message(PublishNamespaceDone(1), D14)
    # the identifier the other version uses is ignored
    assert encode_message(PublishNamespaceDone(1, (b"a",)), D16) == encode_message(PublishNamespaceDone(1), D16)


def test_fetch_variant_fields_are_checked():
    with pytest.raises(ValueError):
        Fetch(0, FetchType.STANDALONE, joining_request_id=1, joining_start=1)
    with pytest.raises(ValueError):
        Fetch(0, FetchType.ABSOLUTE_JOINING, (b"a",), b"t", Location(0, 0), Location(1, 0))


def test_sequences_are_normalised_to_tuples():
    assert Subscribe(0, [b"a"], b"t") == Subscribe(0, (b"a",), b"t")
    assert SubscribeOk(0, 1, track_extensions=[(2, 1)]).track_extensions == ((2, 1),)
