"""Relay FETCH: absolute joining, group order, FETCH_CANCEL of a response in progress, and ranges
the cache no longer holds completely (in-memory sessions)."""

from __future__ import annotations

import pytest
from moqtools import LARGEST, NS, TRACK, Publisher, connect, messages

from fastrelay.moq import messages as m
from fastrelay.moq.data import FetchHeader
from fastrelay.moq.params import GroupOrder, MessageParams, Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import ObjectReceived, StreamEnded
from fastrelay.moq.wire import Location

D14, D16 = Version.DRAFT_14, Version.DRAFT_16


def fetched(events, request_id: int) -> list[tuple[int, int]]:
    return [(e.object.group_id, e.object.object_id) for e in events if isinstance(e, ObjectReceived)
            and isinstance(e.header, FetchHeader) and e.header.request_id == request_id]


def setup(relay: Relay, version: Version = D16, groups: int = 3, per_group: int = 2):
    """A publisher that wrote `groups` x `per_group` objects, and a subscriber whose SUBSCRIBE
    came before them (so the relay cached them all)."""
    pub = Publisher(relay, version)
    s, ev = connect(relay, version, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    for g in range(groups):
        for o in range(per_group):
            pub.write(g, o, fin=o == per_group - 1)
    return pub, s, ev


def test_absolute_joining_fetch_delivers_from_the_named_group_to_the_subscriptions_start():
    for version in (D16, D14):
        relay = Relay()
        pub, _, _ = setup(relay, version, groups=4)
        late, ev = connect(relay, version, "late")
        sub = late.session.next_request_id()
        late.session.send(m.Subscribe(sub, NS, TRACK, LARGEST))
        assert messages(ev, m.SubscribeOk)[0].params.largest_object == Location(3, 1)
        fid = late.session.next_request_id()
        late.session.send(m.Fetch(fid, m.FetchType.ABSOLUTE_JOINING, joining_request_id=sub, joining_start=2))
        assert messages(ev, m.FetchOk)[0].end_location == Location(3, 2)
        pub.write(4, 0)  # live, through the subscription
        assert fetched(ev, fid) == [(2, 0), (2, 1), (3, 0), (3, 1)]  # contiguous with it, no overlap
        assert [(e.object.group_id, e.object.object_id) for e in ev if isinstance(e, ObjectReceived)
                and not isinstance(e.header, FetchHeader)] == [(4, 0)]
        assert any(isinstance(e, StreamEnded) and isinstance(e.header, FetchHeader) and e.reset_code is None
                   for e in ev)


def test_fetch_in_descending_group_order():
    relay = Relay()
    setup(relay)
    s, ev = connect(relay, D16, "f")
    fid = s.session.next_request_id()
    s.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(0, 1), Location(2, 0),
                           params=MessageParams(group_order=GroupOrder.DESCENDING)))
    assert fetched(ev, fid) == [(2, 0), (2, 1), (1, 0), (1, 1), (0, 1)]
    assert messages(ev, m.FetchOk)[0].end_location == Location(2, 2)


def test_fetch_cancel_resets_a_response_in_progress():
    relay = Relay()
    setup(relay)
    s, ev = connect(relay, D16, "f")
    relay_side = s.peer
    relay_side.window_bytes = 0  # the connection takes nothing now: the response waits in the queue
    fid = s.session.next_request_id()
    s.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(0, 0), Location(3, 0)))
    assert messages(ev, m.FetchOk) and fetched(ev, fid) == []
    peer = relay.peers[id(relay_side.session)]
    assert fid in peer.fetches and peer.queued_bytes > 0
    s.session.send(m.FetchCancel(fid))
    resets = [e for e in ev if isinstance(e, StreamEnded) and isinstance(e.header, FetchHeader)]
    assert len(resets) == 1 and resets[0].reset_code == 1  # CANCELLED
    assert not peer.fetches and peer.queue == [] and peer.queued_bytes == 0
    relay_side.window_bytes = 1 << 30
    relay.pump(peer)
    assert fetched(ev, fid) == [] and relay.stats.cache_hits == 0
    s.session.send(m.FetchCancel(fid))  # again, or after the FIN: nothing to stop, no error
    assert s.session.closed is None


@pytest.mark.parametrize("priority,first", [(5, "fetch"), (250, "live")])
def test_fetch_objects_are_scheduled_by_the_fetchs_subscriber_priority(priority, first):
    relay = Relay(max_backlog=1 << 30)
    pub, s, ev = setup(relay, groups=1, per_group=1)
    relay_side = s.peer
    relay_side.window_bytes = 0
    fid = s.session.next_request_id()  # same session: its live subscription has priority 128
    s.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(0, 0), Location(1, 0),
                           params=MessageParams(subscriber_priority=priority)))
    pub.write(1, 0)
    ev.clear()
    relay_side.window_bytes = 1 << 30
    relay.pump(relay.peers[id(relay_side.session)])
    order = [("fetch" if isinstance(e.header, FetchHeader) else "live", e.object.group_id)
             for e in ev if isinstance(e, ObjectReceived)]
    assert order[0][0] == first and sorted(order) == [("fetch", 0), ("live", 1)]


def test_a_group_whose_head_was_evicted_is_not_served_with_a_hole():
    # room for about three objects: group 1 alone outgrows it and loses its head
    relay = Relay(cache_bytes=3 * 150)
    pub = Publisher(relay, D16)
    s, _ = connect(relay, D16, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    pub.write(0, 0, size=100, fin=True)
    for o in range(5):
        pub.write(1, o, size=100)
    cache = next(iter(relay.tracks.values())).cache
    assert cache.groups == [1] and cache.floor == Location(1, 2) and cache.bytes <= 450

    late, ev = connect(relay, D16, "late")
    sub = late.session.next_request_id()
    late.session.send(m.Subscribe(sub, NS, TRACK, LARGEST))
    late.session.send(m.Fetch(late.session.next_request_id(), m.FetchType.RELATIVE_JOINING,
                              joining_request_id=sub, joining_start=0))  # group 1 from its start: gone
    err = messages(ev, m.RequestError)[-1]
    assert err.error_code == m.RequestErrorCode.INVALID_RANGE and "group 1 object 2" in err.error_reason
    late.session.send(m.Fetch(late.session.next_request_id(), m.FetchType.STANDALONE, NS, TRACK,
                              Location(0, 0), Location(2, 0)))  # reaches into what was evicted
    assert messages(ev, m.RequestError)[-1].error_code == m.RequestErrorCode.INVALID_RANGE
    fid = late.session.next_request_id()
    late.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(1, 2), Location(2, 0)))
    assert fetched(ev, fid) == [(1, 2), (1, 3), (1, 4)]  # from the floor on, everything


def test_objects_before_the_upstream_subscription_are_unknown_not_missing():
    relay = Relay()
    pub = Publisher(relay, D16)
    s, ev = connect(relay, D16, "s")
    sub = s.session.next_request_id()
    s.session.send(m.Subscribe(sub, NS, TRACK, LARGEST))
    pub.answer_subscribes(largest=Location(3, 5))  # the publisher was mid-group 3 already
    assert messages(ev, m.SubscribeOk)[0].params.largest_object == Location(3, 5)
    pub.write(3, 6)
    pub.write(3, 7)
    s.session.send(m.Fetch(s.session.next_request_id(), m.FetchType.RELATIVE_JOINING, joining_request_id=sub,
                           joining_start=0))  # group 3 from object 0: the relay never had 0..5
    assert messages(ev, m.RequestError)[-1].error_code == m.RequestErrorCode.INVALID_RANGE
    late, lev = connect(relay, D16, "late")
    late_sub = late.session.next_request_id()
    late.session.send(m.Subscribe(late_sub, NS, TRACK))
    fid = late.session.next_request_id()
    late.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(3, 6), Location(4, 0)))
    assert fetched(lev, fid) == [(3, 6), (3, 7)]
