"""Relay core driven through in-memory sessions: dedup, forwarding, late join, teardown."""

from __future__ import annotations

import pytest
from moqtools import LARGEST, NS, TRACK, Publisher, connect, messages, objects

from fastrelay.datapath.interface import Owner
from fastrelay.moq import messages as m
from fastrelay.moq.data import Object, subgroup_header_for
from fastrelay.moq.params import FilterType, MessageParams, SubscriptionFilter, Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import Closed, MessageReceived, StreamEnded
from fastrelay.moq.wire import ErrorCode


@pytest.mark.parametrize("version", [Version.DRAFT_16, Version.DRAFT_14])
def test_two_subscribers_one_upstream_subscription_late_join_and_teardown(version):
    relay = Relay()
    pub = Publisher(relay, version)
    s1, ev1 = connect(relay, version, "s1")
    s1.session.send(m.Subscribe(s1.session.next_request_id(), NS, TRACK))
    assert pub.answer_subscribes() == 1
    ok1 = messages(ev1, m.SubscribeOk)[0]
    for o in range(3):
        pub.write(0, o)
    pub.write(1, 0)
    pub.write(1, 1)

    # a late joiner: no second upstream SUBSCRIBE; the subscription starts after the largest
    # object, and a relative joining FETCH brings the current group's start from the cache
    s2, ev2 = connect(relay, version, "s2")
    s2.session.send(m.Subscribe(s2.session.next_request_id(), NS, TRACK, LARGEST))
    assert pub.answer_subscribes() == 0
    ok2 = messages(ev2, m.SubscribeOk)[0]
    assert ok2.params.largest_object.group == 1 and ok2.params.largest_object.object == 1
    s2.session.send(m.Fetch(s2.session.next_request_id(), m.FetchType.RELATIVE_JOINING,
                            joining_request_id=ok2.request_id, joining_start=0))
    fetch_ok = messages(ev2, m.FetchOk)[0]
    assert fetch_ok.end_location.group == 1 and fetch_ok.end_location.object == 2
    pub.write(1, 2, fin=True)
    pub.write(2, 0, fin=True)

    assert objects(ev1, ok1.track_alias) == [(0, 0, b"g0o0"), (0, 1, b"g0o1"), (0, 2, b"g0o2"), (1, 0, b"g1o0"),
                                             (1, 1, b"g1o1"), (1, 2, b"g1o2"), (2, 0, b"g2o0")]
    assert objects(ev2) == [(1, 0, b"g1o0"), (1, 1, b"g1o1"), (1, 2, b"g1o2"), (2, 0, b"g2o0")]
    assert objects(ev2, ok2.track_alias) == [(1, 2, b"g1o2"), (2, 0, b"g2o0")]  # the rest came by FETCH
    assert any(isinstance(e, StreamEnded) and e.reset_code is None for e in ev2)
    assert relay.stats.cache_hits == 2

    # one leaves: the upstream subscription stays; the last leaves: it ends
    s1.session.send(m.Unsubscribe(ok1.request_id))
    assert not messages(pub.events, m.Unsubscribe)
    s2.session.send(m.Unsubscribe(ok2.request_id))
    assert len(messages(pub.events, m.Unsubscribe)) == 1
    assert not relay.tracks


def test_publisher_gone_means_publish_done_for_every_subscriber():
    relay = Relay()
    pub = Publisher(relay, Version.DRAFT_16)
    subs = []
    for i in range(3):
        s, ev = connect(relay, Version.DRAFT_16, f"s{i}")
        s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
        subs.append(ev)
    assert pub.answer_subscribes() == 1
    pub.write(0, 0)
    pub.pipe.close(0, "publisher crashed")
    for ev in subs:
        done = messages(ev, m.PublishDone)
        assert len(done) == 1 and done[0].status_code == m.PublishDoneCode.GOING_AWAY
    assert not relay.tracks


def test_unknown_namespace_is_an_error():
    relay = Relay()
    s, ev = connect(relay, Version.DRAFT_16, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), (b"nobody",), TRACK))
    err = messages(ev, m.RequestError)[0]
    assert err.error_code == m.RequestErrorCode.DOES_NOT_EXIST


def test_a_malformed_client_does_not_disturb_the_others():
    relay = Relay()
    pub = Publisher(relay, Version.DRAFT_16)
    good, gev = connect(relay, Version.DRAFT_16, "good")
    good.session.send(m.Subscribe(good.session.next_request_id(), NS, TRACK))
    bad, bev = connect(relay, Version.DRAFT_16, "bad")
    bad.session.send(m.Subscribe(bad.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    pub.write(0, 0)
    bad.send(bad.session.control_stream, b"\x3f\x00\x00")  # unknown message type
    assert isinstance(bev[-1], Closed) and bev[-1].code == ErrorCode.PROTOCOL_VIOLATION
    pub.write(0, 1, fin=True)
    assert objects(gev) == [(0, 0, b"g0o0"), (0, 1, b"g0o1")]
    assert len(relay.tracks) == 1 and len(next(iter(relay.tracks.values())).subscribers) == 1


def test_datagrams_are_forwarded_with_the_subscribers_alias():
    from fastrelay.moq.data import ObjectDatagram

    relay = Relay()
    pub = Publisher(relay, Version.DRAFT_16)
    s, ev = connect(relay, Version.DRAFT_16, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    alias = messages(ev, m.SubscribeOk)[0].track_alias
    pub.pipe.session.send_datagram(ObjectDatagram(pub.alias, Object(5, None, 0, 10, payload=b"dg")))
    assert objects(ev, alias) == [(5, 0, b"dg")]


def test_a_slow_subscriber_skips_to_newer_groups_and_never_slows_the_others():
    relay = Relay(max_backlog=10_000)
    pub = Publisher(relay, Version.DRAFT_16)
    fast, fev = connect(relay, Version.DRAFT_16, "fast")
    slow, sev = connect(relay, Version.DRAFT_16, "slow")
    for s in (fast, slow):
        s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    relay_side_of_slow = slow.peer  # the relay's transport towards the slow subscriber
    pub.write(0, 0)
    pub.write(0, 1)
    relay_side_of_slow.backlog_bytes = 20_000  # it stops acknowledging (behind, below the hard bound)
    pub.write(0, 2)  # same group: still sent (within the hard bound)
    pub.write(1, 0)  # a new group while behind: group 0 is abandoned, group 1 starts
    pub.write(1, 1)
    relay_side_of_slow.backlog_bytes = 100_000  # beyond the hard bound: even the current subgroup goes
    pub.write(1, 2)
    relay_side_of_slow.backlog_bytes = 0  # caught up: the next group flows again
    pub.write(2, 0)

    everything = [(g, o, f"g{g}o{o}".encode()) for g, o in
                  [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]]
    assert objects(fev) == everything
    assert objects(sev) == [(0, 0, b"g0o0"), (0, 1, b"g0o1"), (0, 2, b"g0o2"), (1, 0, b"g1o0"), (1, 1, b"g1o1"),
                            (2, 0, b"g2o0")]
    resets = [e for e in sev if isinstance(e, StreamEnded) and e.reset_code is not None]
    assert len(resets) == 2  # group 0's stream when it skipped ahead, group 1's at the hard bound
    assert relay.stats.dropped_objects == 1


def test_standalone_fetch_and_fetch_errors():
    relay = Relay()
    pub = Publisher(relay, Version.DRAFT_16)
    s, ev = connect(relay, Version.DRAFT_16, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    for g in range(3):
        for o in range(2):
            pub.write(g, o)
    from fastrelay.moq.wire import Location

    ev.clear()
    s.session.send(m.Fetch(s.session.next_request_id(), m.FetchType.STANDALONE, NS, TRACK,
                           Location(0, 1), Location(2, 1)))  # end is exclusive: up to (2, 0)
    assert objects(ev) == [(0, 1, b"g0o1"), (1, 0, b"g1o0"), (1, 1, b"g1o1"), (2, 0, b"g2o0")]
    s.session.send(m.Fetch(s.session.next_request_id(), m.FetchType.STANDALONE, NS, TRACK,
                           Location(1, 0), Location(1, 0)))  # object 0: the whole group
    assert objects(ev)[-2:] == [(1, 0, b"g1o0"), (1, 1, b"g1o1")]
    s.session.send(m.Fetch(s.session.next_request_id(), m.FetchType.STANDALONE, NS, b"nope",
                           Location(0, 0), Location(1, 0)))
    assert messages(ev, m.RequestError)[-1].error_code == m.RequestErrorCode.DOES_NOT_EXIST
    s.session.send(m.Fetch(s.session.next_request_id(), m.FetchType.RELATIVE_JOINING,
                           joining_request_id=99, joining_start=0))
    assert messages(ev, m.RequestError)[-1].error_code == m.RequestErrorCode.INVALID_JOINING_REQUEST_ID


@pytest.mark.parametrize("version", [Version.DRAFT_16, Version.DRAFT_14])
def test_a_bare_publish_is_accepted_with_the_publishers_group_order(version):
    relay = Relay()
    pub, pev = connect(relay, version, "pub")
    track_ext = ((m.TrackExtension.DEFAULT_PUBLISHER_GROUP_ORDER, 2),)  # descending
    pub.session.send(m.Publish(pub.session.next_request_id(), NS, TRACK, 3, track_extensions=track_ext))
    ok = messages(pev, m.PublishOk)
    assert len(ok) == 1 and ok[0].params.forward and int(ok[0].params.group_order) == 2
    s, ev = connect(relay, version, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    assert messages(ev, m.SubscribeOk)


def test_an_internal_error_fails_only_that_request(monkeypatch, caplog):
    relay = Relay()
    a, aev = connect(relay, Version.DRAFT_16, "a")
    b, bev = connect(relay, Version.DRAFT_16, "b")
    with monkeypatch.context() as patch:
        patch.setattr(Relay, "_on_PublishNamespace", lambda self, peer, msg: 1 / 0)
        a.session.send(m.PublishNamespace(a.session.next_request_id(), NS))
    err = messages(aev, m.RequestError)
    assert len(err) == 1 and err[0].error_code == m.RequestErrorCode.INTERNAL_ERROR
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and lines[0].startswith(
        "a: PublishNamespace for request 0 failed: ZeroDivisionError('division by zero') at test_relay.py:")
    assert a.session.closed is None and b.session.closed is None and len(relay.peers) == 2
    a.session.send(m.PublishNamespace(a.session.next_request_id(), NS))  # the session goes on
    assert len(messages(aev, m.RequestOk)) == 1


@pytest.mark.parametrize("version", [Version.DRAFT_16, Version.DRAFT_14])
def test_request_update_pauses_and_resumes_forwarding_and_track_status(version):
    from fastrelay.moq.params import MessageParams
    from fastrelay.moq.wire import Location

    relay = Relay()
    pub = Publisher(relay, version)
    s, ev = connect(relay, version, "s")
    sub_id = s.session.next_request_id()
    s.session.send(m.Subscribe(sub_id, NS, TRACK))
    pub.answer_subscribes()
    pub.write(0, 0)

    def update(forward: bool) -> MessageParams:
        if version == Version.DRAFT_16:
            return MessageParams(forward=forward)
        # draft-14 SUBSCRIBE_UPDATE always carries start, priority and forward
        return MessageParams(forward=forward, subscriber_priority=128,
                             subscription_filter=SubscriptionFilter(FilterType.ABSOLUTE_START, Location(0, 0)))

    s.session.send(m.RequestUpdate(s.session.next_request_id(), sub_id, update(False)))
    assert len(messages(ev, m.RequestOk)) == (1 if version == Version.DRAFT_16 else 0)  # draft-14: no reply
    pub.write(0, 1)  # paused: not delivered
    s.session.send(m.RequestUpdate(s.session.next_request_id(), sub_id, update(True)))
    pub.write(0, 2)
    assert [o[:2] for o in objects(ev)] == [(0, 0), (0, 2)]

    s.session.send(m.TrackStatus(s.session.next_request_id(), NS, TRACK))
    status = messages(ev, m.RequestOk)[-1]
    assert status.params.largest_object.group == 0 and status.params.largest_object.object == 2
    s.session.send(m.TrackStatus(s.session.next_request_id(), NS, b"other"))
    assert messages(ev, m.RequestError)[-1].error_code == m.RequestErrorCode.DOES_NOT_EXIST


def test_request_update_of_an_unknown_request_is_a_protocol_violation():
    relay = Relay()
    s, ev = connect(relay, Version.DRAFT_16, "s")
    s.session.send(m.RequestUpdate(s.session.next_request_id(), 40))
    assert isinstance(ev[-1], Closed) and ev[-1].code == ErrorCode.PROTOCOL_VIOLATION


def test_goaway_reaches_every_session_once():
    from fastrelay.moq.session import GoawayReceived

    relay = Relay()
    evs = [connect(relay, v, f"s{i}")[1] for i, v in enumerate([Version.DRAFT_16, Version.DRAFT_14])]
    assert relay.goaway("moqt://next:4443") == 2
    assert all(GoawayReceived("moqt://next:4443") in ev for ev in evs)
    assert relay.goaway() == 0  # a second GOAWAY would be a protocol violation: none is sent
    assert all(sum(isinstance(e, GoawayReceived) for e in ev) == 1 for ev in evs)


def test_subscribe_namespace_draft16_on_a_request_stream():
    relay = Relay()
    s, ev = connect(relay, Version.DRAFT_16, "watcher")
    sid = s.session.open_request_stream(m.SubscribeNamespace(s.session.next_request_id(), (b"live",)))
    replies = [e for e in ev if isinstance(e, MessageReceived) and e.stream_id == sid]
    assert isinstance(replies[0].message, m.RequestOk)
    pub = Publisher(relay, Version.DRAFT_16)  # publishes (live, cam)
    names = [e.message for e in ev if isinstance(e, MessageReceived) and e.stream_id == sid]
    assert isinstance(names[-1], m.Namespace) and names[-1].track_namespace_suffix == (b"cam",)
    pub.pipe.close(0, "")
    names = [e.message for e in ev if isinstance(e, MessageReceived) and e.stream_id == sid]
    assert isinstance(names[-1], m.NamespaceDone) and names[-1].track_namespace_suffix == (b"cam",)
    # an overlapping prefix on the same session is refused
    sid2 = s.session.open_request_stream(m.SubscribeNamespace(s.session.next_request_id(), (b"live", b"cam")))
    err = [e.message for e in ev if isinstance(e, MessageReceived) and e.stream_id == sid2]
    assert err[0].error_code == m.RequestErrorCode.PREFIX_OVERLAP


def test_subscribe_namespace_draft14_on_the_control_stream():
    relay = Relay()
    pub = Publisher(relay, Version.DRAFT_14)
    s, ev = connect(relay, Version.DRAFT_14, "watcher")
    s.session.send(m.SubscribeNamespace(s.session.next_request_id(), (b"live",)))
    assert messages(ev, m.RequestOk)
    announced = messages(ev, m.PublishNamespace)
    assert announced and announced[0].track_namespace == NS
    pub.pipe.close(0, "")
    assert messages(ev, m.PublishNamespaceDone)[0].track_namespace == NS


def test_a_request_stream_must_start_with_subscribe_namespace():
    relay = Relay()
    s, ev = connect(relay, Version.DRAFT_16, "s")
    s.session.open_request_stream(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    assert isinstance(ev[-1], Closed) and ev[-1].code == ErrorCode.PROTOCOL_VIOLATION


def test_objects_leave_in_the_drafts_priority_order():
    from fastrelay.moq.params import GroupOrder, MessageParams

    relay = Relay(max_backlog=1 << 30)
    pub = Publisher(relay, Version.DRAFT_16)
    s, ev = connect(relay, Version.DRAFT_16, "s")
    low = s.session.next_request_id()
    s.session.send(m.Subscribe(low, NS, TRACK, MessageParams(subscriber_priority=200)))
    pub.answer_subscribes()
    relay_side = s.peer
    relay_side.window_bytes = 0  # the connection can take nothing: everything queues in the relay

    def write(group: int, subgroup: int, obj: int, prio: int) -> None:
        header = subgroup_header_for(pub.alias, group, subgroup, obj, publisher_priority=prio,
                                     version=Version.DRAFT_16, extensions=True)
        w = pub.pipe.session.open_subgroup(header)
        w.write(Object(group, subgroup, obj, prio, extensions=[(2, 1)], payload=f"g{group}o{obj}".encode()),
                fin=True)

    for g in range(2):
        write(g, 0, 0, 0x10)  # keyframe subgroup: more important
        write(g, 1, 1, 0x80)  # dependent frames
    assert objects(ev) == []
    relay_side.window_bytes = 1 << 30
    relay.pump(relay.peers[id(relay_side.session)])
    assert [o[:2] for o in objects(ev)] == [(0, 0), (1, 0), (0, 1), (1, 1)]  # publisher priority first

    # a second subscription on the same session, more important to this subscriber, descending groups
    ev.clear()
    relay_side.window_bytes = 0
    s2 = relay.peers[id(relay_side.session)]
    assert s2.queue == []
    track2 = b"audio"
    pub.pipe.session.send(m.PublishNamespace(pub.pipe.session.next_request_id(), (*NS, b"a")))
    s.session.send(m.Subscribe(s.session.next_request_id(), (*NS, b"a"), track2,
                               MessageParams(subscriber_priority=10, group_order=GroupOrder.DESCENDING)))
    sub2 = messages(pub.events, m.Subscribe)[-1]
    pub.pipe.session.send(m.SubscribeOk(sub2.request_id, 77))
    for g in (2, 3):
        write(g, 0, 0, 0x10)  # on the video track (alias 42), subscriber priority 200
    for g in (2, 3):
        header = subgroup_header_for(77, g, 0, 0, publisher_priority=0x80, version=Version.DRAFT_16,
                                     extensions=True)
        w = pub.pipe.session.open_subgroup(header)
        w.write(Object(g, 0, 0, 0x80, extensions=[(2, 1)], payload=f"a{g}".encode()), fin=True)
    relay_side.window_bytes = 1 << 30
    relay.pump(s2)
    assert [o[2] for o in objects(ev)] == [b"a3", b"a2", b"g2o0", b"g3o0"]


class EndsSeen:
    """A data path that takes nothing and records which upstream streams it was told have ended."""

    def __init__(self) -> None:
        self.ended: list[int] = []

    def upstream_track(self, *a) -> None: ...
    def downstream_ready(self, ds) -> None: ...
    def downstream_gone(self, ds) -> None: ...
    def peer_gone(self, peer) -> None: ...
    def owns(self, *a) -> Owner:
        return Owner.RELAY

    def owns_datagrams(self, ds) -> bool:
        return False

    def stream_ended(self, peer, stream_id: int, reset: bool) -> None:
        self.ended.append(stream_id)


def test_objects_that_overtake_subscribe_ok_are_held_until_it_names_their_alias(caplog):
    """Another QUIC stream may deliver a subgroup before the SUBSCRIBE_OK naming its track alias:
    the relay holds it (bounded) and forwards and caches it once the alias is known; what no
    SUBSCRIBE_OK claims is dropped once none is awaited, its stream ends still reaching the data
    path (which forgets those streams)."""
    datapath = EndsSeen()
    relay = Relay(datapath=datapath)
    pub = Publisher(relay, Version.DRAFT_16)
    s1, ev1 = connect(relay, Version.DRAFT_16, "s1")
    s1.session.send(m.Subscribe(s1.session.next_request_id(), NS, TRACK))
    pub.write(0, 0)                                # before the SUBSCRIBE_OK
    pub.write(0, 1, fin=True)
    pub.alias = 77                                 # and a stream on an alias no SUBSCRIBE_OK will name
    pub.write(5, 0, fin=True)
    pub.alias = 42
    assert not objects(ev1) and relay.stats.objects_in == 0 and datapath.ended == []
    publisher = next(p for p in relay.peers.values() if p.name == "pub")
    assert publisher.early_bytes > 0
    assert pub.answer_subscribes() == 1
    ok = messages(ev1, m.SubscribeOk)[0]
    assert objects(ev1, ok.track_alias) == [(0, 0, b"g0o0"), (0, 1, b"g0o1")]
    assert [e for e in ev1 if isinstance(e, StreamEnded)]          # its FIN too
    assert relay.stats.objects_in == 2
    assert sorted(datapath.ended) == sorted(w.stream_id for w in pub.writers.values())  # both streams' ends
    assert not publisher.early and publisher.early_bytes == 0
    pub.write(1, 0)
    assert objects(ev1, ok.track_alias)[-1] == (1, 0, b"g1o0")

    # the bound: a publisher flooding an alias that is not established yet loses that data
    relay2 = Relay()
    pub2 = Publisher(relay2, Version.DRAFT_16)
    s2, ev2 = connect(relay2, Version.DRAFT_16, "s2")
    s2.session.send(m.Subscribe(s2.session.next_request_id(), NS, TRACK))
    for o in range(3):
        pub2.write(0, o, size=600 << 10)
    assert "bytes on track aliases not established yet" in caplog.text
    pub2.answer_subscribes()
    assert objects(ev2) == [(0, 2, b"g0o2".ljust(600 << 10, b"."))]


def test_held_data_goes_when_the_subscription_it_waits_for_is_given_up():
    """The last subscriber leaves before the publisher answered: the upstream SUBSCRIBE is
    withdrawn and what was held for it is dropped (and no later SUBSCRIBE_OK revives it)."""
    relay = Relay()
    pub = Publisher(relay, Version.DRAFT_16)
    s1, ev1 = connect(relay, Version.DRAFT_16, "s1")
    rid = s1.session.next_request_id()
    s1.session.send(m.Subscribe(rid, NS, TRACK))
    pub.write(0, 0)
    publisher = next(p for p in relay.peers.values() if p.name == "pub")
    assert publisher.early
    s1.session.send(m.Unsubscribe(rid))
    assert not publisher.early and publisher.early_bytes == 0
    assert pub.answer_subscribes() == 1        # the answer crosses the UNSUBSCRIBE
    assert relay.stats.objects_in == 0


def test_data_on_an_unknown_alias_without_a_pending_subscribe_is_dropped():
    relay = Relay()
    pub = Publisher(relay, Version.DRAFT_16)
    pub.write(0, 0, fin=True)
    publisher = next(p for p in relay.peers.values() if p.name == "pub")
    assert not publisher.early and relay.stats.objects_in == 0
