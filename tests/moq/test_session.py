"""MoQT session state machine over an in-memory transport pair (deterministic, no sockets)."""

from __future__ import annotations

import pytest

from fastrelay.moq import messages as m
from fastrelay.moq.data import Object, SubgroupHeader, subgroup_header_for
from fastrelay.moq.params import Version
from fastrelay.moq.session import Closed, MessageReceived, MoqtSession, ObjectReceived, Ready, StreamEnded
from fastrelay.moq.wire import ErrorCode, Writer

from .conftest import Pipe, pair

VERSIONS = [Version.DRAFT_16, Version.DRAFT_14]


@pytest.mark.parametrize("version", VERSIONS)
def test_setup_and_a_subscribe_round_trip(version):
    c, s, cev, sev = pair(version)
    assert isinstance(cev[0], Ready) and isinstance(sev[0], Ready)
    rid = c.session.next_request_id()
    assert rid == 0
    c.session.send(m.Subscribe(rid, (b"live",), b"video"))
    got = sev[-1].message
    assert isinstance(got, m.Subscribe) and got.track_name == b"video"
    s.session.send(m.SubscribeOk(rid, track_alias=7))
    assert isinstance(cev[-1].message, m.SubscribeOk)


@pytest.mark.parametrize("version", VERSIONS)
def test_objects_on_a_subgroup_stream_and_datagrams(version):
    c, s, cev, sev = pair(version)
    header = subgroup_header_for(7, 3, 0, 0, publisher_priority=100, version=version)
    w = s.session.open_subgroup(header)
    for i in range(3):
        w.write(Object(3, 0, i, 100, payload=b"frame%d" % i), fin=(i == 2))
    objs = [e for e in cev if isinstance(e, ObjectReceived)]
    assert [o.object.payload for o in objs] == [b"frame0", b"frame1", b"frame2"]
    assert all(o.track_alias == 7 and o.stream_id == w.stream_id for o in objs)
    assert isinstance(cev[-1], StreamEnded) and cev[-1].reset_code is None
    from fastrelay.moq.data import ObjectDatagram

    s.session.send_datagram(ObjectDatagram(7, Object(4, None, 0, 100, payload=b"dg")))
    assert cev[-1].object.payload == b"dg" and cev[-1].stream_id is None


@pytest.mark.parametrize("version", VERSIONS)
def test_reset_stream_is_reported(version):
    c, s, cev, sev = pair(version)
    w = s.session.open_subgroup(SubgroupHeader(1, 0, 0, subgroup_header_for(1, 0, 0, 0, publisher_priority=1,
                                                                             version=version).subgroup_id_mode, 1))
    w.write(Object(0, 0, 0, 1, payload=b"x"))
    w.reset(5)
    assert isinstance(cev[-1], StreamEnded) and cev[-1].reset_code == 5


def test_request_ids_must_be_in_sequence():
    c, s, cev, sev = pair(Version.DRAFT_16)
    c.session._send_control(m.Subscribe(2, (b"a",), b"b"))  # skips request ID 0
    assert s.closed_with[0] == ErrorCode.INVALID_REQUEST_ID
    assert isinstance(sev[-1], Closed) and isinstance(cev[-1], Closed) and cev[-1].by_peer


def test_request_window_grows_and_is_enforced():
    c, s, cev, sev = pair(Version.DRAFT_16, window=4)
    for _ in range(10):  # the server keeps the window open with MAX_REQUEST_ID
        c.session.send(m.Subscribe(c.session.next_request_id(), (b"a",), b"b"))
    assert s.session.closed is None and len([e for e in sev if isinstance(e, MessageReceived)]) == 10
    c2, s2, _, _ = pair(Version.DRAFT_16, window=4)
    c2.session._next_request_id = 4  # pretend: beyond the limit without asking
    c2.session._peer_max = 100
    c2.session._send_control(m.Subscribe(4, (b"a",), b"b"))
    assert s2.closed_with[0] in (ErrorCode.INVALID_REQUEST_ID, ErrorCode.TOO_MANY_REQUESTS)


def test_blocked_requests_raise_and_send_requests_blocked():
    c, s, cev, sev = pair(Version.DRAFT_16, window=2)
    c.session.next_request_id()
    with pytest.raises(ConnectionError):
        c.session.next_request_id()
    assert isinstance(sev[-1].message, m.RequestsBlocked)


@pytest.mark.parametrize("bad", [
    b"\x3f\x00\x00",  # unknown message type
    bytes(Writer().varint(0x03).uint16(2)) + b"\x00\x00",  # SUBSCRIBE that does not parse
])
def test_malformed_control_message_closes_with_protocol_violation(bad):
    c, s, cev, sev = pair(Version.DRAFT_16)
    c.send(c.session.control_stream, bad)
    assert s.closed_with[0] == ErrorCode.PROTOCOL_VIOLATION
    assert isinstance(cev[-1], Closed)


def test_messages_before_setup_and_second_setup_are_violations():
    c, s = Pipe(True), Pipe(False)
    c.peer, s.peer = s, c
    s.session = MoqtSession(s, client=False, version=Version.DRAFT_16, on_event=lambda e: None)
    c.session = MoqtSession(c, client=True, version=Version.DRAFT_16, on_event=lambda e: None)
    c.send(0, m.encode_message(m.Unsubscribe(0), Version.DRAFT_16))
    assert s.closed_with[0] == ErrorCode.PROTOCOL_VIOLATION
    c2, s2, _, _ = pair(Version.DRAFT_16)
    c2.session._send_control(m.ClientSetup())
    assert s2.closed_with[0] == ErrorCode.PROTOCOL_VIOLATION


def test_draft14_version_negotiation_failure():
    c, s = Pipe(True), Pipe(False)
    c.peer, s.peer = s, c
    s.session = MoqtSession(s, client=False, version=Version.DRAFT_14, on_event=lambda e: None)
    c.session = MoqtSession(c, client=True, version=Version.DRAFT_14, on_event=lambda e: None)
    c.session.control_stream = 0
    c.send(0, m.encode_message(m.ClientSetup((0xFF000099,)), Version.DRAFT_14))
    assert s.closed_with[0] == ErrorCode.VERSION_NEGOTIATION_FAILED


def test_garbage_data_stream_closes_the_session():
    c, s, cev, sev = pair(Version.DRAFT_16)
    s.send(3, b"\x3f\x3f\x3f")  # not a data stream type
    assert c.closed_with[0] == ErrorCode.PROTOCOL_VIOLATION
