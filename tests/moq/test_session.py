"""MoQT session state machine over an in-memory transport pair (deterministic, no sockets)."""

from __future__ import annotations

import pytest
from moqtools import Pipe, pair

from fastrelay.moq import messages as m
from fastrelay.moq.data import Object, SubgroupHeader, subgroup_header_for
from fastrelay.moq.params import UNFILTERED, Version
from fastrelay.moq.session import (
    Closed,
    GoawayReceived,
    MessageReceived,
    MoqtSession,
    ObjectReceived,
    Ready,
    StreamEnded,
)
from fastrelay.moq.wire import ErrorCode, Location, Writer

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


def grants(side: Pipe) -> list[int]:
    """The MAX_REQUEST_IDs `side`'s session sends from now on (the peer's session takes them in)."""
    sent: list[int] = []
    send = side.session._send_control

    def spy(msg: m.Message) -> None:
        if isinstance(msg, m.MaxRequestId):
            sent.append(msg.max_request_id)
        send(msg)
    side.session._send_control = spy
    return sent


def test_request_ids_are_granted_as_requests_finish_and_enforced():
    c, s, cev, sev = pair(Version.DRAFT_16, window=4)  # request IDs 0 and 2: two requests in progress
    for _ in range(10):  # each answered (refused): the server grants their IDs again
        rid = c.session.next_request_id()
        c.session.send(m.Subscribe(rid, (b"a",), b"b"))
        s.session.send(m.RequestError(rid, m.RequestErrorCode.DOES_NOT_EXIST, 0, "", m.RequestKind.SUBSCRIBE))
    assert s.session.closed is None and s.session.requests_in_progress == 0
    c2, s2, cev2, _ = pair(Version.DRAFT_16, window=4)
    granted = grants(s2)
    for _ in range(2):  # never answered: the limit stays
        c2.session.send(m.Subscribe(c2.session.next_request_id(), (b"a",), b"b"))
    with pytest.raises(ConnectionError):
        c2.session.next_request_id()
    assert granted == [] and s2.session.requests_in_progress == 2
    c2.session._next_request_id = 4  # pretend: beyond the limit without asking
    c2.session._peer_max = 100
    c2.session._send_control(m.Subscribe(4, (b"a",), b"b"))
    assert s2.closed_with[0] in (ErrorCode.INVALID_REQUEST_ID, ErrorCode.TOO_MANY_REQUESTS)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_way_a_request_ends_frees_its_request_id(version):
    """The server sees every message that ends one of the client's requests and grants that many
    Request IDs again once the client has used all of its own (limit: 8 in progress)."""
    c, s, cev, sev = pair(version, window=16)
    cs, ss = c.session, s.session
    d16 = version == Version.DRAFT_16
    granted = grants(s)

    def request(msg_of):
        rid = cs.next_request_id()
        cs.send(msg_of(rid))
        return rid

    sub = request(lambda r: m.Subscribe(r, (b"a",), b"b"))               # ends: server's PUBLISH_DONE
    sub2 = request(lambda r: m.Subscribe(r, (b"a",), b"c"))              # ends: client's UNSUBSCRIBE
    fetch = request(lambda r: m.Fetch(r, m.FetchType.STANDALONE, (b"a",), b"b", Location(0, 0), Location(1, 0)))
    fetch2 = request(lambda r: m.Fetch(r, m.FetchType.STANDALONE, (b"a",), b"b", Location(0, 0), Location(1, 0)))
    status = request(lambda r: m.TrackStatus(r, (b"a",), b"b"))          # ends: its answer
    ns = request(lambda r: m.PublishNamespace(r, (b"n",)))               # ends: PUBLISH_NAMESPACE_DONE
    ns2 = request(lambda r: m.PublishNamespace(r, (b"o",)))              # ends: server's PUBLISH_NAMESPACE_CANCEL
    if d16:
        stream = cs.open_request_stream(m.SubscribeNamespace(cs.next_request_id(), (b"p",)))  # ends: its stream
    else:
        request(lambda r: m.SubscribeNamespace(r, (b"p",)))              # ends: UNSUBSCRIBE_NAMESPACE
    assert ss.requests_in_progress == 8
    with pytest.raises(ConnectionError):
        cs.next_request_id()
    assert ss.unanswered(sub) and not ss.unanswered(16)

    ss.send(m.SubscribeOk(sub, 1))
    assert not ss.unanswered(sub) and ss.requests_in_progress == 8  # answered, still in progress
    ss.send(m.FetchOk(fetch, False, Location(0, 1)))
    writer = ss.open_fetch(fetch)
    ss.send(m.RequestOk(ns, request_kind=m.RequestKind.PUBLISH_NAMESPACE))
    ss.send(m.RequestOk(ns2, request_kind=m.RequestKind.PUBLISH_NAMESPACE))
    assert ss.requests_in_progress == 8
    ends = [
        lambda: ss.send(m.PublishDone(sub, m.PublishDoneCode.TRACK_ENDED, 0)),
        lambda: cs.send(m.Unsubscribe(sub2)),
        writer.finish,
        lambda: cs.send(m.FetchCancel(fetch2)),
        lambda: ss.send(m.RequestOk(status, request_kind=m.RequestKind.TRACK_STATUS)),
        lambda: cs.send(m.PublishNamespaceDone(ns if d16 else None, None if d16 else (b"n",))),
        lambda: ss.send(m.PublishNamespaceCancel(ns2 if d16 else None, m.RequestErrorCode.INTERNAL_ERROR, "",
                                                 None if d16 else (b"o",))),
        (lambda: cs.end_request_stream(stream)) if d16 else (lambda: cs.send(m.UnsubscribeNamespace((b"p",)))),
    ]
    for i, end in enumerate(ends):
        end()
        assert ss.requests_in_progress == 7 - i
    # the client had no Request ID left: the first end granted one at once, the next four
    # (half the limit) one more batch; the last three wait until they are worth a message
    assert granted == [18, 26]
    assert [cs.next_request_id() for _ in range(5)] == [16, 18, 20, 22, 24]
    assert c.closed_with is None and s.closed_with is None


def test_grants_come_in_batches_while_the_peer_has_request_ids_left():
    c, s, cev, sev = pair(Version.DRAFT_16, window=16)  # 8 in progress
    granted = grants(s)
    for _ in range(3):
        rid = c.session.next_request_id()
        c.session.send(m.TrackStatus(rid, (b"a",), b"b"))
        s.session.send(m.RequestError(rid, m.RequestErrorCode.DOES_NOT_EXIST, 0, "", m.RequestKind.TRACK_STATUS))
    assert granted == []  # 5 left, 3 free: not worth a message yet
    rid = c.session.next_request_id()
    c.session.send(m.TrackStatus(rid, (b"a",), b"b"))
    s.session.send(m.RequestError(rid, m.RequestErrorCode.DOES_NOT_EXIST, 0, "", m.RequestKind.TRACK_STATUS))
    assert granted == [24]  # half the limit free: one MAX_REQUEST_ID for four


def test_a_lower_limit_before_setup_is_what_setup_grants():
    from fastrelay.moq.relay import Relay

    relay = Relay(max_requests=3)
    c, s = Pipe(True), Pipe(False)
    c.peer, s.peer = s, c
    cev: list = []
    c.session = MoqtSession(c, client=True, version=Version.DRAFT_16, on_event=cev.append)
    s.session = MoqtSession(s, client=False, version=Version.DRAFT_16, on_event=lambda e: None)
    relay.attach(s.session, "s")
    c.session.start()
    assert [c.session.next_request_id() for _ in range(3)] == [0, 2, 4]
    with pytest.raises(ConnectionError):
        c.session.next_request_id()


def test_draft14_subscribe_update_has_no_reply_and_never_counts():
    c, s, cev, sev = _subscribed(Version.DRAFT_14)
    update = m.MessageParams(forward=False, subscriber_priority=1, subscription_filter=UNFILTERED)
    c.session.send(m.RequestUpdate(c.session.next_request_id(), 0, update))
    assert s.session.requests_in_progress == 1  # the SUBSCRIBE only


def test_blocked_requests_raise_and_send_requests_blocked_once_per_limit():
    c, s, cev, sev = pair(Version.DRAFT_16, window=2)
    c.session.next_request_id()
    for _ in range(3):
        with pytest.raises(ConnectionError):
            c.session.next_request_id()
    blocked = [e.message for e in sev if isinstance(e, MessageReceived) and isinstance(e.message, m.RequestsBlocked)]
    assert blocked == [m.RequestsBlocked(2)]


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


@pytest.mark.parametrize("version", VERSIONS)
def test_goaway_is_an_event_and_no_new_request_follows_it(version):
    c, s, cev, sev = pair(version)
    sub = c.session.next_request_id()
    c.session.send(m.Subscribe(sub, (b"a",), b"b"))
    s.session.goaway("moqt://elsewhere:4443/x")
    assert cev[-1] == GoawayReceived("moqt://elsewhere:4443/x")
    assert not any(isinstance(e, MessageReceived) and isinstance(e.message, m.Goaway) for e in cev)
    assert not c.session.accepts_requests and s.session.accepts_requests
    with pytest.raises(ConnectionError, match="GOAWAY"):
        c.session.next_request_id()
    with pytest.raises(ConnectionError, match="GOAWAY"):
        c.session.send(m.TrackStatus(sub + 2, (b"a",), b"b"))
    c.session.send(m.Unsubscribe(sub))  # ending what exists is fine
    assert isinstance(sev[-1].message, m.Unsubscribe) and c.session.closed is None
    # updating an existing request is no new request: it still gets a request ID
    c.session.send(m.RequestUpdate(c.session.next_request_id(update=True), sub,
                                   m.MessageParams(forward=False, subscriber_priority=1,
                                                   subscription_filter=UNFILTERED)))
    assert isinstance(sev[-1].message, m.RequestUpdate) and s.session.closed is None
    with pytest.raises(ValueError, match="already sent"):
        s.session.goaway()


def test_a_second_goaway_is_a_protocol_violation():
    c, s, cev, sev = pair(Version.DRAFT_16)
    s.session.goaway()
    s.session._send_control(m.Goaway(""))
    assert c.closed_with[0] == ErrorCode.PROTOCOL_VIOLATION
    assert [e for e in cev if isinstance(e, GoawayReceived)] == [GoawayReceived("")]


def test_a_client_goaway_must_not_name_a_uri():
    c, s, cev, sev = pair(Version.DRAFT_16)
    with pytest.raises(ValueError, match="client"):
        c.session.goaway("moqt://x:1")
    c.session.goaway()  # without one it is fine: the server learns the client leaves soon
    assert sev[-1] == GoawayReceived("") and not s.session.accepts_requests
    c2, s2, _, _ = pair(Version.DRAFT_14)
    c2.session._send_control(m.Goaway("moqt://x:1"))
    assert s2.closed_with[0] == ErrorCode.PROTOCOL_VIOLATION


def _subscribed(version):
    """A pair where the client sent SUBSCRIBE 0 and the server sent nothing."""
    c, s, cev, sev = pair(version)
    c.session.send(m.Subscribe(c.session.next_request_id(), (b"a",), b"b"))
    return c, s, cev, sev


NEVER_EXISTED = [  # (sender, message): names a request that does not exist, or not one of its kind
    ("server", m.SubscribeOk(2, 7)),  # request 2 was never sent
    ("server", m.FetchOk(0, False, Location(0, 1))),  # request 0 is a SUBSCRIBE, not a FETCH
    ("server", m.RequestError(4, m.RequestErrorCode.DOES_NOT_EXIST, 0, "", m.RequestKind.SUBSCRIBE)),
    ("server", m.PublishDone(6, m.PublishDoneCode.TRACK_ENDED, 0)),
    ("server", m.RequestOk(0, request_kind=m.RequestKind.TRACK_STATUS)),  # a SUBSCRIBE gets no REQUEST_OK
    ("client", m.Unsubscribe(1)),  # the server never published a track
    ("client", m.Unsubscribe(2)),  # no request 2 from the client yet
    ("client", m.FetchCancel(0)),  # request 0 is no FETCH
    ("client", m.PublishDone(0, m.PublishDoneCode.TRACK_ENDED, 0)),  # 0 is the client's SUBSCRIBE, no PUBLISH
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("sender,msg", NEVER_EXISTED, ids=[f"{s}-{type(x).__name__}" for s, x in NEVER_EXISTED])
def test_a_message_about_a_request_that_never_existed_is_a_protocol_violation(version, sender, msg, caplog):
    c, s, cev, sev = _subscribed(version)
    src, dst = (s, c) if sender == "server" else (c, s)
    src.session._send_control(msg)
    assert dst.session.closed is not None and dst.session.closed.code == ErrorCode.PROTOCOL_VIOLATION
    assert src.closed_with is None and dst.closed_with[0] == ErrorCode.PROTOCOL_VIOLATION
    assert len([r for r in caplog.records if "closing MoQT session" in r.getMessage()]) == 1


@pytest.mark.parametrize("msg", [
    m.PublishNamespaceDone(2),  # the client has no PUBLISH_NAMESPACE 2
    m.PublishNamespaceCancel(1, m.RequestErrorCode.UNINTERESTED),  # the server sent no PUBLISH_NAMESPACE
])
def test_draft16_namespace_messages_name_existing_requests(msg):
    c, s, cev, sev = _subscribed(Version.DRAFT_16)
    (c if isinstance(msg, m.PublishNamespaceDone) else s).session._send_control(msg)
    closed = s if isinstance(msg, m.PublishNamespaceDone) else c
    assert closed.closed_with[0] == ErrorCode.PROTOCOL_VIOLATION


def test_a_draft14_reply_of_the_wrong_kind_is_a_protocol_violation():
    c, s, cev, sev = _subscribed(Version.DRAFT_14)
    s.session.send(m.RequestError(0, m.RequestErrorCode.DOES_NOT_EXIST, 0, "", m.RequestKind.FETCH))  # FETCH_ERROR
    assert c.closed_with[0] == ErrorCode.PROTOCOL_VIOLATION


@pytest.mark.parametrize("version", VERSIONS)
def test_messages_about_requests_that_are_over_are_races_not_errors(version):
    c, s, cev, sev = _subscribed(version)
    s.session.send(m.SubscribeOk(0, 7))
    s.session.send(m.PublishDone(0, m.PublishDoneCode.TRACK_ENDED, 0))
    c.session.send(m.Unsubscribe(0))  # crossed the PUBLISH_DONE
    late = c.session.next_request_id()
    c.session.send(m.Subscribe(late, (b"a",), b"c"))
    c.session.send(m.Unsubscribe(late))
    s.session.send(m.SubscribeOk(late, 8))  # crossed the UNSUBSCRIBE
    s.session.send(m.RequestError(late, m.RequestErrorCode.INTERNAL_ERROR, 0, "", m.RequestKind.SUBSCRIBE))
    assert c.session.closed is None and s.session.closed is None
    assert [type(e.message) for e in cev if isinstance(e, MessageReceived)] == [
        m.SubscribeOk, m.PublishDone, m.SubscribeOk, m.RequestError]


def test_request_update_must_name_an_existing_request_other_than_itself():
    c, s, cev, sev = _subscribed(Version.DRAFT_16)
    c.session.send(m.RequestUpdate(c.session.next_request_id(), 0, m.MessageParams(forward=False)))
    assert s.session.closed is None
    rid = c.session.next_request_id()
    c.session.send(m.RequestUpdate(rid, rid))  # an update of itself: no such request
    assert s.closed_with[0] == ErrorCode.PROTOCOL_VIOLATION
    c2, s2, _, _ = _subscribed(Version.DRAFT_16)
    c2.session.send(m.RequestUpdate(c2.session.next_request_id(), 40))
    assert s2.closed_with[0] == ErrorCode.PROTOCOL_VIOLATION


def test_fetch_writer_reset_abandons_the_stream():
    c, s, cev, sev = pair(Version.DRAFT_16)
    w = s.session.open_fetch(0)
    w.write(Object(0, 0, 0, 5, payload=b"x"))
    w.reset()
    w.finish()  # no effect once reset
    ended = [e for e in cev if isinstance(e, StreamEnded)]
    assert len(ended) == 1 and ended[0].reset_code == 1 and ended[0].stream_id == w.stream_id


def test_a_long_session_remembers_the_kinds_of_its_latest_requests_only(monkeypatch):
    """Request kinds are kept for the latest KINDS_KEPT requests per side, so a session that makes
    requests forever holds bounded state; a message about a forgotten request passes as a race."""
    import fastrelay.moq.session as session_module

    monkeypatch.setattr(session_module, "KINDS_KEPT", 8)
    c, s, cev, sev = pair(Version.DRAFT_16, window=8)
    for _ in range(100):
        rid = c.session.next_request_id()
        c.session.send(m.TrackStatus(rid, (b"a",), b"b"))
        s.session.send(m.RequestError(rid, m.RequestErrorCode.DOES_NOT_EXIST, 0, "", m.RequestKind.TRACK_STATUS))
    assert len(s.session._peer_kinds._codes) < 16 and len(c.session._our_kinds._codes) < 16
    c.session.send(m.Unsubscribe(0))  # request 0 (a TRACK_STATUS) is forgotten: not checked
    assert s.session.closed is None
    c.session.send(m.Unsubscribe(rid))  # a recent one is: it was no SUBSCRIBE
    assert s.closed_with[0] == ErrorCode.PROTOCOL_VIOLATION
