"""MoQT Message / Setup Parameters: typed decoding, validation codes, both KVP encodings."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastrelay.moq.params import (
    ALPN,
    LEGACY_ALPN,
    AliasType,
    AuthToken,
    FilterType,
    GroupOrder,
    MessageParams,
    SetupParams,
    SubscriptionFilter,
    Version,
    decode_params,
    decode_setup_params,
    encode_params,
    encode_setup_params,
    enum_or_int,
    read_key_value_pairs,
    write_key_value_pairs,
)
from fastrelay.moq.wire import VARINT_MAX, ErrorCode, Location, ProtocolError, Reader, Writer

D14, D16 = Version.DRAFT_14, Version.DRAFT_16
vint = st.one_of(st.integers(0, 63), st.integers(0, VARINT_MAX))
locations = st.builds(Location, vint, vint)
tokens = st.one_of(
    st.builds(AuthToken, st.sampled_from([AliasType.DELETE, AliasType.USE_ALIAS]), vint),
    st.builds(AuthToken, st.just(AliasType.REGISTER), vint, vint, st.binary(max_size=16)),
    st.builds(AuthToken, st.just(AliasType.USE_VALUE), st.none(), vint, st.binary(max_size=16)),
)
filters = st.one_of(
    st.builds(SubscriptionFilter, st.sampled_from([FilterType.NEXT_GROUP_START, FilterType.LARGEST_OBJECT])),
    st.builds(SubscriptionFilter, st.just(FilterType.ABSOLUTE_START), locations),
    st.builds(SubscriptionFilter, st.just(FilterType.ABSOLUTE_RANGE), locations, vint),
)
all_params_16 = st.builds(
    MessageParams,
    delivery_timeout=st.none() | st.integers(1, VARINT_MAX),
    authorization_tokens=st.lists(tokens, max_size=3).map(tuple),
    expires=st.none() | vint,
    largest_object=st.none() | locations,
    forward=st.none() | st.booleans(),
    subscriber_priority=st.none() | st.integers(0, 255),
    subscription_filter=st.none() | filters,
    group_order=st.none() | st.sampled_from(GroupOrder),
    new_group_request=st.none() | vint,
)


def decode(data: bytes, version: Version) -> MessageParams:
    r = Reader(data)
    params = decode_params(r, r.varint(), version)
    assert r.eof()
    return params


def pairs_bytes(pairs, version=D16) -> bytes:
    w = Writer().varint(len(pairs))
    write_key_value_pairs(w, pairs, version)
    return bytes(w)


def test_versions_and_alpn():
    assert Version.DRAFT_14 == 0xFF00000E and Version.DRAFT_16 == 0xFF000010
    assert ALPN[Version.DRAFT_16] == "moqt-16" and LEGACY_ALPN == "moq-00"
    assert enum_or_int(Version, 0xFF00000E) is Version.DRAFT_14 and enum_or_int(Version, 7) == 7


@given(all_params_16)
def test_message_params_round_trip_16(params):
    assert decode(encode_params(params, D16), D16) == params


@given(st.builds(MessageParams, delivery_timeout=st.none() | vint,
                 authorization_tokens=st.lists(tokens, max_size=3).map(tuple)))
def test_message_params_round_trip_14(params):
    assert decode(encode_params(params, D14), D14) == params


def test_hand_vector_16():
    # Count 3; delta 2 -> DELIVERY_TIMEOUT 5; delta 0x1e -> 0x20 SUBSCRIBER_PRIORITY 7;
    # delta 1 -> 0x21 SUBSCRIPTION_FILTER, 3 bytes: AbsoluteStart {1, 2}.
    data = bytes.fromhex("03" "0205" "1e07" "0103030102")
    expected = MessageParams(delivery_timeout=5, subscriber_priority=7,
                             subscription_filter=SubscriptionFilter(FilterType.ABSOLUTE_START, Location(1, 2)))
    assert decode(data, D16) == expected
    assert encode_params(expected, D16) == data


def test_draft_14_types_are_absolute_and_unknown_ones_ignored():
    # Count 3: 0x02 DELIVERY_TIMEOUT 5, unknown 0x3f (odd, 1 byte), 0x03 token USE_VALUE type 0 "a".
    data = bytes.fromhex("03" "0205" "3f01ff" "0303030061")
    assert decode(data, D14) == MessageParams(delivery_timeout=5,
                                              authorization_tokens=(AuthToken(AliasType.USE_VALUE, None, 0, b"a"),))
    with pytest.raises(ProtocolError) as e:
        decode(data, D16)  # 0x3f is unknown in draft-16 (delta types: 2, 0x41, 0x44)
    assert e.value.code == ErrorCode.PROTOCOL_VIOLATION


@pytest.mark.parametrize("version", [D14, D16])
def test_duplicate_parameter_is_a_violation(version):
    with pytest.raises(ProtocolError, match="duplicate") as e:
        decode(pairs_bytes([(2, 5), (2, 6)], version), version)
    assert e.value.code == ErrorCode.PROTOCOL_VIOLATION


def test_repeated_tokens_are_allowed():
    t1, t2 = AuthToken(AliasType.USE_ALIAS, 1), AuthToken(AliasType.DELETE, 2)
    assert decode(pairs_bytes([(3, t1.encode()), (3, t2.encode())]), D16).authorization_tokens == (t1, t2)


def test_unknown_parameter_is_a_violation_in_16():
    with pytest.raises(ProtocolError, match="unknown message parameter 0x4") as e:
        decode(pairs_bytes([(4, 1)]), D16)
    assert e.value.code == ErrorCode.PROTOCOL_VIOLATION


@pytest.mark.parametrize(("pair", "code"), [
    ((0x09, b"\x01"), ErrorCode.KEY_VALUE_FORMATTING_ERROR),          # LARGEST_OBJECT truncated
    ((0x09, b"\x01\x02\x03"), ErrorCode.KEY_VALUE_FORMATTING_ERROR),  # LARGEST_OBJECT trailing byte
    ((0x03, b"\x07\x01"), ErrorCode.KEY_VALUE_FORMATTING_ERROR),      # alias type 7
    ((0x03, b"\x00\x01\x00"), ErrorCode.KEY_VALUE_FORMATTING_ERROR),  # DELETE with a token type
    ((0x03, b"\x01\x01"), ErrorCode.KEY_VALUE_FORMATTING_ERROR),      # REGISTER without type
    ((0x03, b""), ErrorCode.KEY_VALUE_FORMATTING_ERROR),              # empty token
    ((0x02, 0), ErrorCode.PROTOCOL_VIOLATION),                        # DELIVERY_TIMEOUT 0
    ((0x10, 2), ErrorCode.PROTOCOL_VIOLATION),                        # FORWARD 2
    ((0x20, 256), ErrorCode.PROTOCOL_VIOLATION),                      # SUBSCRIBER_PRIORITY 256
    ((0x22, 0), ErrorCode.PROTOCOL_VIOLATION),                        # GROUP_ORDER 0
    ((0x22, 3), ErrorCode.PROTOCOL_VIOLATION),                        # GROUP_ORDER 3
    ((0x21, b"\x05"), ErrorCode.PROTOCOL_VIOLATION),                  # filter type 5
    ((0x21, b"\x03\x01"), ErrorCode.PROTOCOL_VIOLATION),              # AbsoluteStart truncated
    ((0x21, b"\x02\x00"), ErrorCode.PROTOCOL_VIOLATION),              # filter length mismatch
])
def test_bad_parameter_values(pair, code):
    with pytest.raises(ProtocolError) as e:
        decode(pairs_bytes([pair]), D16)
    assert e.value.code == code


def test_draft_14_accepts_delivery_timeout_zero():
    assert decode(pairs_bytes([(2, 0)], D14), D14).delivery_timeout == 0


def test_allowed_filters_and_refuses_on_encode():
    params = MessageParams(forward=True, expires=9)
    r = Reader(encode_params(params, D16))
    assert decode_params(r, r.varint(), D16, frozenset({"expires"})) == MessageParams(expires=9)
    with pytest.raises(ValueError, match="forward"):
        encode_params(params, D16, frozenset({"expires"}))
    with pytest.raises(ValueError, match="expires"):
        encode_params(MessageParams(expires=1), D14)  # not a parameter in draft-14


@pytest.mark.parametrize("params", [
    MessageParams(delivery_timeout=0), MessageParams(subscriber_priority=256), MessageParams(forward=2),
    MessageParams(group_order=3), MessageParams(expires=-1),
])
def test_encode_rejects_bad_values(params):
    with pytest.raises(ValueError):
        encode_params(params, D16)


def test_token_and_filter_shapes_are_checked():
    with pytest.raises(ValueError):
        AuthToken(AliasType.USE_VALUE, 1, 0, b"")
    with pytest.raises(ValueError):
        AuthToken(AliasType.REGISTER, 1)
    with pytest.raises(ValueError):
        SubscriptionFilter(FilterType.ABSOLUTE_RANGE, Location(0, 0))
    with pytest.raises(ValueError):
        SubscriptionFilter(FilterType.LARGEST_OBJECT, Location(0, 0))


@given(tokens)
def test_token_round_trip(token):
    assert AuthToken.decode(token.encode()) == token


def test_token_layout():
    # REGISTER (1), alias 5, type 2, value "xy"
    assert AuthToken(AliasType.REGISTER, 5, 2, b"xy").encode() == bytes.fromhex("0105027879")
    assert AuthToken(AliasType.USE_VALUE, None, 2, b"").encode() == bytes.fromhex("0302")


setup_params = st.builds(
    SetupParams,
    path=st.none() | st.text(st.characters(max_codepoint=127), max_size=12),
    max_request_id=st.none() | vint,
    authorization_tokens=st.lists(tokens, max_size=2).map(tuple),
    max_auth_token_cache_size=st.none() | vint,
    authority=st.none() | st.text(st.characters(max_codepoint=127), max_size=12),
    implementation=st.none() | st.text(max_size=12),
    unknown=st.lists(st.integers(8, 2**20).flatmap(
        lambda k: st.tuples(st.just(k), vint if k % 2 == 0 else st.binary(max_size=8))), max_size=4)
    .map(lambda pairs: tuple(sorted(pairs, key=lambda kv: kv[0]))),
)


@pytest.mark.parametrize("version", [D14, D16])
@given(params=setup_params)
def test_setup_params_round_trip(version, params):
    r = Reader(encode_setup_params(params, version))
    assert decode_setup_params(r, r.varint(), version) == params and r.eof()


def decode_setup(pairs, version=D16) -> SetupParams:
    r = Reader(pairs_bytes(pairs, version))
    return decode_setup_params(r, r.varint(), version)


def test_setup_params_unknown_duplicates_allowed_known_not():
    assert decode_setup([(0x20, 1), (0x20, 2), (0x21, b"z")]).unknown == ((0x20, 1), (0x20, 2), (0x21, b"z"))
    with pytest.raises(ProtocolError, match="duplicate setup parameter 0x2"):
        decode_setup([(2, 1), (2, 1)])
    t = AuthToken(AliasType.USE_VALUE, None, 0, b"")
    assert decode_setup([(3, t.encode()), (3, t.encode())]).authorization_tokens == (t, t)


def test_setup_param_numbering_is_version_independent():
    # 0x05 AUTHORITY and 0x07 MOQT_IMPLEMENTATION in both versions (draft-14 lists both at 0x05).
    for version in (D14, D16):
        got = decode_setup([(5, b"host:4443"), (7, b"impl/1")], version)
        assert (got.authority, got.implementation) == ("host:4443", "impl/1")


@pytest.mark.parametrize(("pair", "code"), [
    ((1, b"/\xff"), ErrorCode.MALFORMED_PATH),
    ((5, b"h\xc3\xa9"), ErrorCode.MALFORMED_AUTHORITY),
    ((3, b"\x09"), ErrorCode.KEY_VALUE_FORMATTING_ERROR),
])
def test_setup_param_errors(pair, code):
    with pytest.raises(ProtocolError) as e:
        decode_setup([pair])
    assert e.value.code == code


def test_implementation_is_lenient_utf8():
    assert decode_setup([(7, b"x\xff")]).implementation == "x\ufffd"


def test_kvp_encodings_differ_by_version():
    pairs = [(2, 1), (3, b"a"), (0x40, 9)]
    w14, w16 = Writer(), Writer()
    write_key_value_pairs(w14, pairs, D14)
    write_key_value_pairs(w16, pairs, D16)
    assert bytes(w14) == bytes.fromhex("0201" "030161" "404009")  # absolute types
    assert bytes(w16) == bytes.fromhex("0201" "010161" "3d09")    # deltas 2, 1, 0x3d
    for version, data in ((D14, bytes(w14)), (D16, bytes(w16))):
        assert read_key_value_pairs(Reader(data), 3, version) == pairs
    with pytest.raises(ValueError):
        write_key_value_pairs(Writer(), [(2, b"x")], D14)


def test_draft_14_unknown_setup_params_are_kept_sorted():
    # draft-14 does not order pairs; the model keeps them sorted (stably) so re-encoding is stable
    got = decode_setup([(0x31, b"b"), (0x08, 0), (0x31, b"a")], D14)
    assert got.unknown == ((0x08, 0), (0x31, b"b"), (0x31, b"a"))
    r = Reader(encode_setup_params(got, D14))
    assert decode_setup_params(r, r.varint(), D14) == got
