"""Relay: replies to requests that never existed close that session (PROTOCOL_VIOLATION, one log
line); messages about requests that are over are legitimate races and change nothing."""

from __future__ import annotations

import logging

from moqtools import NS, TRACK, Publisher, connect, messages, objects

from fastrelay.moq import messages as m
from fastrelay.moq.params import MessageParams, Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import Closed
from fastrelay.moq.wire import ErrorCode

D16 = Version.DRAFT_16


def closings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "closing MoQT session" in r.getMessage()]


def test_subscribe_ok_for_a_subscribe_never_sent_closes_only_that_session(caplog):
    caplog.set_level(logging.INFO)
    relay = Relay()
    pub = Publisher(relay, D16)
    s, ev = connect(relay, D16, "s")
    pub.pipe.session.send(m.SubscribeOk(1, 9))  # the relay sent no request 1
    assert isinstance(pub.events[-1], Closed) and pub.events[-1].code == ErrorCode.PROTOCOL_VIOLATION
    assert len(closings(caplog)) == 1 and "SubscribeOk for request 1" in closings(caplog)[0]
    assert s.session.closed is None and [p.name for p in relay.peers.values()] == ["s"]


def test_a_second_subscribe_ok_is_a_protocol_violation():
    relay = Relay()
    pub = Publisher(relay, D16)
    s, ev = connect(relay, D16, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    rid = messages(pub.events, m.Subscribe)[0].request_id
    pub.answer_subscribes()
    pub.pipe.session.send(m.SubscribeOk(rid, 43))
    assert isinstance(pub.events[-1], Closed) and pub.events[-1].code == ErrorCode.PROTOCOL_VIOLATION


def test_subscribe_ok_crossing_the_relays_unsubscribe_is_ignored():
    relay = Relay()
    pub = Publisher(relay, D16)
    s, ev = connect(relay, D16, "s")
    sub = s.session.next_request_id()
    s.session.send(m.Subscribe(sub, NS, TRACK))
    s.session.send(m.Unsubscribe(sub))  # before the publisher answered: the relay unsubscribes upstream
    assert len(messages(pub.events, m.Unsubscribe)) == 1
    assert pub.answer_subscribes() == 1  # the answer was already on its way
    assert pub.pipe.session.closed is None and s.session.closed is None
    assert not relay.tracks


def test_unsubscribe_and_update_after_publish_done_are_races_not_errors():
    relay = Relay()
    pub = Publisher(relay, D16)
    s, ev = connect(relay, D16, "s")
    sub = s.session.next_request_id()
    s.session.send(m.Subscribe(sub, NS, TRACK))
    rid = messages(pub.events, m.Subscribe)[0].request_id
    pub.answer_subscribes()
    pub.write(0, 0, fin=True)
    pub.pipe.session.send(m.PublishDone(rid, m.PublishDoneCode.TRACK_ENDED, 1))
    assert len(messages(ev, m.PublishDone)) == 1
    update = s.session.next_request_id()
    s.session.send(m.RequestUpdate(update, sub, MessageParams(forward=False)))  # crossed PUBLISH_DONE
    err = messages(ev, m.RequestError)[-1]
    assert err.request_id == update and err.error_code == m.RequestErrorCode.DOES_NOT_EXIST
    s.session.send(m.Unsubscribe(sub))  # crossed PUBLISH_DONE too
    pub.pipe.session.send(m.PublishDone(rid, m.PublishDoneCode.TRACK_ENDED, 1))  # about a track already over
    assert s.session.closed is None and pub.pipe.session.closed is None
    assert objects(ev) == [(0, 0, b"g0o0")]


def test_unsubscribe_or_fetch_cancel_of_requests_never_made_close_the_session():
    relay = Relay()
    for msg in (m.Unsubscribe(4), m.FetchCancel(0), m.Unsubscribe(1)):
        s, ev = connect(relay, D16, "s")
        s.session.send(m.TrackStatus(s.session.next_request_id(), NS, TRACK))  # request 0: a TRACK_STATUS
        s.session.send(msg)
        assert isinstance(ev[-1], Closed) and ev[-1].code == ErrorCode.PROTOCOL_VIOLATION, msg
