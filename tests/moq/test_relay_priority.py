"""Relay priorities: publisher priority 0, inherited (DEFAULT_PRIORITY) priorities, and the
publisher's group order when the subscriber names none (in-memory sessions)."""

from __future__ import annotations

import pytest
from moqtools import NS, TRACK, Publisher, connect, messages

from fastrelay.moq import messages as m
from fastrelay.moq.data import FetchHeader, SubgroupHeader
from fastrelay.moq.params import GroupOrder, MessageParams, Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import ObjectReceived
from fastrelay.moq.wire import Location

D14, D16 = Version.DRAFT_14, Version.DRAFT_16
PRIORITY, ORDER = m.TrackExtension.DEFAULT_PUBLISHER_PRIORITY, m.TrackExtension.DEFAULT_PUBLISHER_GROUP_ORDER


def received(events) -> list[tuple[int, int, int | None, int | None]]:
    """(group, object, priority in the subgroup header, priority of the object) of live objects."""
    return [(e.object.group_id, e.object.object_id, e.header.publisher_priority, e.object.publisher_priority)
            for e in events if isinstance(e, ObjectReceived) and isinstance(e.header, SubgroupHeader)]


@pytest.mark.parametrize("version", [D16, D14])
def test_publisher_priority_zero_is_forwarded_as_zero(version):
    relay = Relay()
    pub = Publisher(relay, version)
    s, ev = connect(relay, version, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    pub.write(0, 0, priority=0)
    pub.write(0, 1, priority=0, fin=True)
    assert received(ev) == [(0, 0, 0, 0), (0, 1, 0, 0)]
    assert pub.pipe.session.closed is None
    fid = s.session.next_request_id()
    s.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(0, 0), Location(1, 0)))
    assert [e.object.publisher_priority for e in ev
            if isinstance(e, ObjectReceived) and isinstance(e.header, FetchHeader)] == [0, 0]


@pytest.mark.parametrize("extensions,expected", [(((PRIORITY, 7),), 7), ((), 128)])
def test_an_inherited_priority_is_the_tracks_default_and_is_written_explicitly(extensions, expected):
    relay = Relay()
    pub = Publisher(relay, D16)
    subs = {}
    for version in (D16, D14):
        s, ev = connect(relay, version, f"s{version.name}")
        s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
        subs[version] = (s, ev)
    pub.answer_subscribes(extensions)
    pub.write(0, 0, priority=None)  # DEFAULT_PRIORITY: the subgroup header carries none
    for version, (_, ev) in subs.items():
        assert received(ev) == [(0, 0, expected, expected)], version
    ok16 = messages(subs[D16][1], m.SubscribeOk)[0]
    assert dict(ok16.track_extensions).get(PRIORITY) == (7 if extensions else None)
    ok14 = messages(subs[D14][1], m.SubscribeOk)[0]  # draft-14 has no field for it; all headers carry one
    assert PRIORITY not in dict(ok14.track_extensions)


def test_an_inherited_priority_is_scheduled_at_its_value():
    relay = Relay(max_backlog=1 << 30)
    pub = Publisher(relay, D16)
    s, ev = connect(relay, D16, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes(((PRIORITY, 200),))
    s.peer.window_bytes = 0
    pub.write(0, 0, priority=None)  # 200, inherited
    pub.write(1, 0, priority=100)
    s.peer.window_bytes = 1 << 30
    relay.pump(relay.peers[id(s.peer.session)])
    assert received(ev) == [(1, 0, 100, 100), (0, 0, 200, 200)]


@pytest.mark.parametrize("publisher,subscriber,expected", [
    (GroupOrder.DESCENDING, None, [2, 1, 0]),  # the subscriber has no preference: the publisher's
    (GroupOrder.DESCENDING, GroupOrder.ASCENDING, [0, 1, 2]),  # the subscriber's wins
    (None, None, [0, 1, 2]),  # nobody says: ascending
    (None, GroupOrder.DESCENDING, [2, 1, 0]),
])
@pytest.mark.parametrize("version", [D16, D14])
def test_group_order_is_the_subscribers_else_the_publishers(version, publisher, subscriber, expected):
    relay = Relay(max_backlog=1 << 30)
    pub = Publisher(relay, version)
    s, ev = connect(relay, version, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK, MessageParams(group_order=subscriber)))
    pub.answer_subscribes(() if publisher is None else ((ORDER, publisher),))
    ok = messages(ev, m.SubscribeOk)[0]
    assert dict(ok.track_extensions).get(ORDER, GroupOrder.ASCENDING) == (publisher or GroupOrder.ASCENDING)
    s.peer.window_bytes = 0
    for g in range(3):
        pub.write(g, 0, fin=True)
    s.peer.window_bytes = 1 << 30
    relay.pump(relay.peers[id(s.peer.session)])
    assert [r[0] for r in received(ev)] == expected
