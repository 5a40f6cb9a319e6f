"""A relay-side failure while serving one request fails that request only (REQUEST_ERROR,
PUBLISH_DONE or a reset fetch stream, one log line); the session, its other requests and the
other sessions go on (in-memory sessions, faults injected into the relay)."""

from __future__ import annotations

import logging

import pytest
from moqtools import NS, TRACK, Publisher, connect, messages, objects

from fastrelay.moq import messages as m
from fastrelay.moq.cache import TrackCache
from fastrelay.moq.data import FetchHeader
from fastrelay.moq.params import Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import Closed, ObjectReceived, RequestStreamClosed, StreamEnded
from fastrelay.moq.wire import ErrorCode, Location

D14, D16 = Version.DRAFT_14, Version.DRAFT_16
VERSIONS = pytest.mark.parametrize("version", [D16, D14], ids=["draft16", "draft14"])


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def fetch_ends(events) -> list[int | None]:
    return [e.reset_code for e in events if isinstance(e, StreamEnded) and isinstance(e.header, FetchHeader)]


def live_track(relay: Relay, version: Version, groups: int = 2):
    """A publisher with `groups` groups of two objects cached, and a subscriber `s` on the track."""
    pub = Publisher(relay, version)
    s, ev = connect(relay, version, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    for g in range(groups):
        pub.write(g, 0)
        pub.write(g, 1, fin=True)
    return pub, s, ev


@VERSIONS
def test_a_fault_in_the_cache_lookup_fails_that_fetch_only(version, monkeypatch, caplog):
    relay = Relay()
    pub, s, ev = live_track(relay, version)

    def broken(self, *args, **kwargs):
        raise RuntimeError("cache lookup failed")

    with monkeypatch.context() as patch:
        patch.setattr(TrackCache, "range", broken)
        fid = s.session.next_request_id()
        s.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(0, 0), Location(1, 0)))
    err = messages(ev, m.RequestError)
    assert [(e.request_id, e.error_code) for e in err] == [(fid, m.RequestErrorCode.INTERNAL_ERROR)]
    assert "cache lookup failed" in err[0].error_reason
    assert len(errors(caplog)) == 1 and f"Fetch for request {fid} failed: RuntimeError" in errors(caplog)[0]
    assert s.session.closed is None and pub.pipe.session.closed is None
    # the session's other requests go on: its subscription, and a new FETCH
    pub.write(2, 0)
    assert objects(ev)[-1][:2] == (2, 0)
    fid = s.session.next_request_id()
    s.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(0, 0), Location(1, 0)))
    assert messages(ev, m.FetchOk) and fetch_ends(ev) == [None]
    assert not relay.peers[id(s.peer.session)].fetches


@VERSIONS
def test_a_fault_in_the_middle_of_a_fetch_response_resets_its_stream_only(version, monkeypatch, caplog):
    """The response is written while the relay handles the publisher's next object: the fault
    there must not reach the publisher's session either."""
    relay = Relay()
    pub, s, ev = live_track(relay, version)
    s.peer.window_bytes = 0  # the response waits in the relay's queue
    real = TrackCache.range

    def one_then_broken(self, *args, **kwargs):
        items = real(self, *args, **kwargs)
        yield next(items)
        raise RuntimeError("cache lookup failed")

    monkeypatch.setattr(TrackCache, "range", one_then_broken)
    fid = s.session.next_request_id()
    s.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(0, 0), Location(1, 0)))
    assert messages(ev, m.FetchOk) and fetch_ends(ev) == []
    s.peer.window_bytes = 1 << 30
    pub.write(2, 0)  # the relay pumps the subscriber's queue while handling this object
    fetched = [(e.object.group_id, e.object.object_id) for e in ev
               if isinstance(e, ObjectReceived) and isinstance(e.header, FetchHeader)]
    assert fetched == [(0, 0)] and fetch_ends(ev) == [0]  # reset: INTERNAL_ERROR
    assert objects(ev)[-1][:2] == (2, 0)  # the live object still arrived
    assert pub.pipe.session.closed is None and s.session.closed is None
    assert len(errors(caplog)) == 1 and f"s: writing its FETCH response for request {fid} failed" in errors(caplog)[0]
    assert not relay.peers[id(s.peer.session)].fetches


@VERSIONS
def test_a_fault_forwarding_to_one_subscriber_ends_only_its_subscription(version, monkeypatch, caplog):
    relay = Relay()
    pub, good, gev = live_track(relay, version, groups=1)
    bad, bev = connect(relay, version, "bad")
    bad_sub = bad.session.next_request_id()
    bad.session.send(m.Subscribe(bad_sub, NS, TRACK))
    other = bad.session.next_request_id()  # a second track of the bad subscriber's session
    pub.pipe.session.send(m.PublishNamespace(pub.pipe.session.next_request_id(), (*NS, b"a")))
    bad.session.send(m.Subscribe(other, (*NS, b"a"), b"audio"))
    pub.pipe.session.send(m.SubscribeOk(messages(pub.events, m.Subscribe)[-1].request_id, 77))
    real = Relay._admit

    def broken(self, ds, obj):
        if ds.peer.name == "bad" and ds.track.name == TRACK:
            raise RuntimeError("forwarding failed")
        return real(self, ds, obj)

    monkeypatch.setattr(Relay, "_admit", broken)
    pub.write(1, 0)
    done = messages(bev, m.PublishDone)
    assert [(d.request_id, d.status_code) for d in done] == [(bad_sub, m.PublishDoneCode.INTERNAL_ERROR)]
    assert len(errors(caplog)) == 1 and "bad: forwarding live-cam--video for request 0 failed" in errors(caplog)[0]
    pub.write(1, 1, fin=True)
    assert [o[:2] for o in objects(gev)] == [(0, 0), (0, 1), (1, 0), (1, 1)]  # the others: every object
    assert pub.pipe.session.closed is None and bad.session.closed is None
    assert list(relay.peers[id(bad.peer.session)].downstream) == [other]  # its other subscription stays


def test_a_fault_while_a_pending_subscribe_is_accepted_is_its_request_error(monkeypatch, caplog):
    relay = Relay()
    pub = Publisher(relay, D16)
    a, aev = connect(relay, D16, "a")
    b, bev = connect(relay, D16, "b")
    for s in (a, b):
        s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    real = Relay._accept

    def broken(self, ds):
        if ds.peer.name == "a":
            raise RuntimeError("accept failed")
        return real(self, ds)

    monkeypatch.setattr(Relay, "_accept", broken)
    pub.answer_subscribes()  # the SUBSCRIBE_OK comes on the publisher's session
    assert messages(aev, m.RequestError)[0].error_code == m.RequestErrorCode.INTERNAL_ERROR
    assert messages(bev, m.SubscribeOk) and pub.pipe.session.closed is None and a.session.closed is None
    assert len(errors(caplog)) == 1


def test_a_fault_in_a_track_status_is_its_request_error(monkeypatch):
    relay = Relay()
    live_track(relay, D16)
    s, ev = connect(relay, D16, "s2")
    monkeypatch.setattr(TrackCache, "largest", lambda self: 1 / 0)
    s.session.send(m.TrackStatus(s.session.next_request_id(), NS, TRACK))
    assert messages(ev, m.RequestError)[0].error_code == m.RequestErrorCode.INTERNAL_ERROR
    assert s.session.closed is None and s.peer.session.requests_in_progress == 0  # its Request ID is free again


def test_a_fault_outside_any_request_still_closes_only_that_session(monkeypatch):
    relay = Relay()
    a, aev = connect(relay, D16, "a")
    b, bev = connect(relay, D16, "b")
    monkeypatch.setattr(Relay, "_peer_going_away", lambda self, peer: 1 / 0)
    a.session.goaway()
    assert isinstance(aev[-1], Closed) and aev[-1].code == ErrorCode.INTERNAL_ERROR
    assert b.session.closed is None and len(relay.peers) == 1


def test_a_fault_telling_a_namespace_subscriber_ends_its_namespace_subscription_only(monkeypatch, caplog):
    relay = Relay()
    w, wev = connect(relay, D16, "watcher")
    sid = w.session.open_request_stream(m.SubscribeNamespace(w.session.next_request_id(), (b"live",)))
    real = Relay._tell

    def broken(self, peer, *args):
        if peer.name == "watcher":
            raise RuntimeError("telling failed")
        return real(self, peer, *args)

    monkeypatch.setattr(Relay, "_tell", broken)
    pub = Publisher(relay, D16)  # its PUBLISH_NAMESPACE is accepted; the watcher's request stream ends
    assert messages(pub.events, m.RequestOk) and pub.pipe.session.closed is None
    ends = [e for e in wev if isinstance(e, RequestStreamClosed) and e.stream_id == sid]
    assert len(ends) == 1 and w.session.closed is None and not relay.peers[id(w.peer.session)].ns_subs
    assert w.peer.session.requests_in_progress == 0 and len(errors(caplog)) == 1


@VERSIONS
def test_a_subgroup_stream_the_subscriber_stopped_ends_that_subgroup_for_it_alone(version):
    """STOP_SENDING on one subgroup stream: nothing more of that subgroup is queued or written
    for that subscriber (counted as dropped); its next subgroups, and the other subscriber, go on."""
    relay = Relay()
    pub, s, ev = live_track(relay, version, groups=0)
    other, other_ev = connect(relay, version, "other")
    other.session.send(m.Subscribe(other.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    pub.write(0, 0)
    (stream,) = {e.stream_id for e in ev if isinstance(e, ObjectReceived)}
    dropped = relay.stats.dropped_objects
    s.peer.session.stop_sending(stream, 0x1)            # what the transport reports for the stopping peer
    pub.write(0, 1)
    pub.write(0, 2, fin=True)
    pub.write(1, 0, fin=True)
    assert [(g, o) for g, o, _ in objects(ev)] == [(0, 0), (1, 0)]
    assert [(g, o) for g, o, _ in objects(other_ev)] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert relay.stats.dropped_objects == dropped + 2
    assert not s.closed_with and not any(isinstance(e, Closed) for e in ev)


@VERSIONS
def test_a_track_refused_by_one_publisher_of_its_namespace_is_asked_of_the_next(version):
    """Two publishers announce one namespace with different tracks: a SUBSCRIBE the first
    refuses goes to the second, and the subscriber gets its objects (draft-16: relays send
    SUBSCRIBE to all matching publishers)."""
    relay = Relay()
    video, audio = Publisher(relay, version), Publisher(relay, version)
    s, ev = connect(relay, version, "s")
    rid = s.session.next_request_id()
    s.session.send(m.Subscribe(rid, NS, TRACK))
    (asked,) = messages(video.events, m.Subscribe) + messages(audio.events, m.Subscribe)
    first, second = (video, audio) if messages(video.events, m.Subscribe) else (audio, video)
    first.events.clear()
    first.pipe.session.send(m.RequestError(asked.request_id, m.RequestErrorCode.DOES_NOT_EXIST, 0, "unknown track",
                                           m.RequestKind.SUBSCRIBE))
    assert not messages(ev, m.RequestError)
    assert second.answer_subscribes() == 1
    second.write(0, 0, fin=True)
    assert [(g, o) for g, o, _ in objects(ev)] == [(0, 0)]
    assert messages(ev, m.SubscribeOk)


@VERSIONS
def test_a_track_every_publisher_refuses_is_refused_with_the_last_answer(version):
    relay = Relay()
    pubs = [Publisher(relay, version), Publisher(relay, version)]
    s, ev = connect(relay, version, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    for _ in pubs:
        (pub, asked), = [(p, msg) for p in pubs for msg in messages(p.events, m.Subscribe)]
        pub.events.clear()
        pub.pipe.session.send(m.RequestError(asked.request_id, m.RequestErrorCode.DOES_NOT_EXIST, 0, "unknown track",
                                             m.RequestKind.SUBSCRIBE))
    (err,) = messages(ev, m.RequestError)
    assert err.error_code == m.RequestErrorCode.DOES_NOT_EXIST and err.error_reason == "unknown track"
