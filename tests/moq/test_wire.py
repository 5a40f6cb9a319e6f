"""MoQT wire primitives: round trips and malformed input (hypothesis)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastrelay.moq.wire import (
    VARINT_MAX,
    Location,
    NeedMore,
    ProtocolError,
    Reader,
    Writer,
    render_name,
    varint_size,
)


@given(st.integers(0, VARINT_MAX))
def test_varint_round_trip_and_minimal_size(v):
    data = bytes(Writer().varint(v))
    assert len(data) == varint_size(v)
    r = Reader(data)
    assert r.varint() == v and r.eof()


def test_varint_examples_from_rfc9000():
    assert Reader(bytes.fromhex("c2197c5eff14e88c")).varint() == 151288809941952652
    assert Reader(bytes.fromhex("9d7f3e7d")).varint() == 494878333
    assert Reader(bytes.fromhex("7bbd")).varint() == 15293
    assert Reader(bytes.fromhex("25")).varint() == 37
    assert Reader(bytes.fromhex("4025")).varint() == 37  # non-minimal is still valid


def test_truncation_is_a_violation_or_need_more():
    with pytest.raises(ProtocolError):
        Reader(b"\x80\x01").varint()
    with pytest.raises(NeedMore):
        Reader(b"\x80\x01", partial=True).varint()


@given(st.lists(st.tuples(st.integers(0, 2**20), st.one_of(st.integers(0, VARINT_MAX), st.binary(max_size=64))),
                max_size=8))
def test_key_value_pairs_round_trip(raw):
    pairs = sorted((k if isinstance(v, int) == (k % 2 == 0) else k + 1, v) for k, v in raw)
    data = bytes(Writer().key_value_pairs(pairs))
    assert Reader(data).key_value_pairs(len(pairs)) == pairs


def test_key_value_length_limit():
    w = Writer().varint(1).varint(0x10000).raw(b"x" * 0x10000)
    with pytest.raises(ProtocolError, match="exceeds"):
        Reader(bytes(w)).key_value_pairs(1)


@given(st.lists(st.binary(max_size=20), min_size=1, max_size=32))
def test_namespace_round_trip(ns):
    assert Reader(bytes(Writer().namespace(tuple(ns)))).namespace() == tuple(ns)


def test_namespace_limits():
    with pytest.raises(ProtocolError):
        Reader(b"\x00").namespace()
    with pytest.raises(ProtocolError):
        Reader(bytes(Writer().varint(33))).namespace()


def test_reason_phrase():
    assert Reader(bytes(Writer().reason("bye ✓"))).reason() == "bye ✓"
    with pytest.raises(ProtocolError, match="UTF-8"):
        Reader(b"\x01\xff").reason()
    with pytest.raises(ProtocolError):
        Reader(bytes(Writer().varint(1025)) + b"x" * 1025).reason()


def test_location_order():
    assert Location(1, 5) < Location(2, 0) and Location(2, 0) < Location(2, 1)
    assert max(Location(3, 0), Location(2, 9)) == Location(3, 0)


def test_render_name_matches_the_drafts_example():
    assert render_name((b"example.net", b"team2", b"project_x"), b"report") == "example.2enet-team2-project_x--report"


@given(st.binary(max_size=64))
def test_random_bytes_only_raise_protocol_errors(data):
    r = Reader(data)
    try:
        while not r.eof():
            r.key_value_pairs(1)
            r.location()
            r.namespace_prefix()
    except ProtocolError:
        pass
