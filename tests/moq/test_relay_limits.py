"""One session cannot exhaust the relay (in-memory sessions): a bounded number of requests in
progress (MAX_REQUEST_ID grows only as requests finish), one subscription per track, a bounded
number of FETCH responses in progress, and a bounded queue for a session that never reads,
which skips to the newest groups (whole subgroups, never holes) while honest subscribers get
every object."""

from __future__ import annotations

from collections import defaultdict

import pytest
from moqtools import NS, TRACK, Publisher, connect, messages, objects

from fastrelay.moq import messages as m
from fastrelay.moq.params import Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import Closed, ObjectReceived, StreamEnded
from fastrelay.moq.wire import ErrorCode, Location

D14, D16 = Version.DRAFT_14, Version.DRAFT_16
VERSIONS = pytest.mark.parametrize("version", [D16, D14], ids=["draft16", "draft14"])


def streams(events) -> dict[int, tuple[list[tuple[int, int]], int | str | None]]:
    """Subgroup stream -> ((group, object) received on it, its end: None FIN, a reset code, "open")."""
    got: dict[int, list[tuple[int, int]]] = defaultdict(list)
    ends: dict[int, int | None] = {}
    for e in events:
        if isinstance(e, ObjectReceived) and e.stream_id is not None:
            got[e.stream_id].append((e.object.group_id, e.object.object_id))
        elif isinstance(e, StreamEnded):
            ends[e.stream_id] = e.reset_code
    return {sid: (objs, ends.get(sid, "open")) for sid, objs in got.items()}


@VERSIONS
def test_ten_thousand_subscribes_to_one_track_make_one_subscription(version):
    relay = Relay(max_backlog=10_000)
    pub = Publisher(relay, version)
    honest, hev = connect(relay, version, "honest")
    honest.session.send(m.Subscribe(honest.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    flood, fev = connect(relay, version, "flood")
    flood.peer.window_bytes = 0  # and it never reads what it subscribed to
    sent = []
    for i in range(10_000):
        flood.session.send(m.Subscribe(flood.session.next_request_id(), NS, TRACK))
        if i % 100 == 0:
            g, o = divmod(len(sent), 10)
            pub.write(g, o, size=1000, fin=o == 9)
            sent.append((g, o))
    ok, refused = messages(fev, m.SubscribeOk), messages(fev, m.RequestError)
    code = m.RequestErrorCode.DUPLICATE_SUBSCRIPTION if version == D16 else m.RequestErrorCode.INTERNAL_ERROR
    assert len(ok) == 1 and len(refused) == 9_999 and {e.error_code for e in refused} == {code}
    assert [o[:2] for o in objects(hev)] == sent  # every object, in order
    assert flood.session.closed is None and honest.session.closed is None and pub.pipe.session.closed is None
    # what the relay keeps for the flooding session stays small
    peer = relay.peers[id(flood.peer.session)]
    (ds,) = peer.downstream.values()
    assert peer.session.requests_in_progress == 1 and len(relay.tracks[(NS, TRACK)].subscribers) == 2
    assert peer.queued_bytes <= 4 * relay.max_backlog + 1000 and len(peer.queue) <= 4 * 10 + 4
    assert len(ds.sent) + len(ds.abandoned) + len(ds.queued) + len(ds.writers) <= 4
    assert not peer.fetches and not peer.early


def test_requests_in_progress_are_bounded_and_granted_again_as_they_finish():
    relay = Relay(max_requests=16)
    pub = Publisher(relay, D16)
    honest, hev = connect(relay, D16, "honest")
    honest.session.send(m.Subscribe(honest.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    flood, fev = connect(relay, D16, "flood")
    subs = []
    with pytest.raises(ConnectionError):
        for i in range(10_000):  # tracks the publisher never answers for: each stays in progress
            subs.append(flood.session.next_request_id())
            flood.session.send(m.Subscribe(subs[-1], NS, b"t%d" % i))
    assert len(subs) == 16 and len(messages(pub.events, m.Subscribe)) == 16
    assert flood.peer.session.requests_in_progress == 16
    for rid in subs[:8]:  # eight finish: eight more may come
        flood.session.send(m.Unsubscribe(rid))
    for i in range(8):
        flood.session.send(m.Subscribe(flood.session.next_request_id(), NS, b"u%d" % i))
    with pytest.raises(ConnectionError):
        flood.session.next_request_id()
    flood.session._peer_max += 100  # a client that ignores the limit
    flood.session.send(m.Subscribe(flood.session.next_request_id(), NS, b"x"))
    assert isinstance(fev[-1], Closed) and fev[-1].code == ErrorCode.TOO_MANY_REQUESTS
    pub.write(0, 0)
    assert objects(hev)[-1][:2] == (0, 0) and honest.session.closed is None and pub.pipe.session.closed is None


@VERSIONS
def test_fetch_responses_in_progress_are_bounded(version):
    relay = Relay(max_fetches=2)
    pub = Publisher(relay, version)
    s, ev = connect(relay, version, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    for o in range(3):
        pub.write(0, o)
    s.peer.window_bytes = 0  # responses stay in progress

    def fetch() -> int:
        rid = s.session.next_request_id()
        s.session.send(m.Fetch(rid, m.FetchType.STANDALONE, NS, TRACK, Location(0, 0), Location(1, 0)))
        return rid

    fetch(), fetch()
    busy = fetch()
    err = messages(ev, m.RequestError)
    assert [(e.request_id, e.error_code) for e in err] == [(busy, m.RequestErrorCode.INTERNAL_ERROR)]
    assert err[0].retry_interval == (501 if version == D16 else 0)  # draft-16: retry in 500 ms
    s.peer.window_bytes = 1 << 30
    relay.pump(relay.peers[id(s.peer.session)])
    fetch()  # both done: there is room again
    assert len(messages(ev, m.FetchOk)) == 3 and s.session.closed is None


@VERSIONS
def test_a_session_that_never_reads_has_a_bounded_queue_and_skips_to_the_newest_groups(version):
    relay = Relay(max_backlog=10_000)
    pub = Publisher(relay, version)
    honest, hev = connect(relay, version, "honest")
    slow, sev = connect(relay, version, "slow")
    for s in (honest, slow):
        s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    slow.peer.window_bytes = 0
    peer = relay.peers[id(slow.peer.session)]
    most = 0
    for g in range(50):
        for o in range(10):
            pub.write(g, o, size=1000, fin=o == 9)
            most = max(most, peer.queued_bytes)
    assert most <= 4 * relay.max_backlog + 1000 and len(peer.queue) <= 4 * 10 + 4
    assert len(objects(hev)) == 500  # the honest subscriber was not slowed
    slow.peer.window_bytes = 1 << 30  # it reads at last: the newest groups, whole
    relay.pump(peer)
    got = streams(sev)
    assert {g for objs, _ in got.values() for g, _ in objs} == {48, 49}
    for objs, end in got.values():
        assert end is None and objs == [(objs[0][0], o) for o in range(10)]  # whole, never a hole


def test_per_subscription_state_stays_as_small_as_the_subgroups_in_flight():
    relay = Relay(max_backlog=10_000)
    pub = Publisher(relay, D16)
    fast, _ = connect(relay, D16, "fast")
    slow, _ = connect(relay, D16, "slow")
    for s in (fast, slow):
        s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    slow.peer.backlog_bytes = 50_000  # far behind: it keeps skipping groups
    for g in range(1000):
        pub.write(g, 0, size=100)
        pub.write(g, 1, size=100, fin=True)
    for s in (fast, slow):
        (ds,) = relay.peers[id(s.peer.session)].downstream.values()
        assert len(ds.sent) <= 2 and len(ds.abandoned) <= 2 and len(ds.writers) <= 1 and len(ds.queued) <= 1


def test_a_subgroup_still_queued_gets_its_later_objects_when_a_newer_group_has_begun():
    """Groups can overlap (a publisher still finishing group 0 has begun group 1): objects of a
    subgroup whose first objects wait in the queue are its continuation, not strays to drop."""
    relay = Relay()
    pub = Publisher(relay, D16)
    s, ev = connect(relay, D16, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    s.peer.window_bytes = 0  # everything waits in the queue
    pub.write(0, 0)
    pub.write(1, 0)
    pub.write(0, 1, fin=True)
    pub.write(1, 1, fin=True)
    s.peer.window_bytes = 1 << 30
    relay.pump(relay.peers[id(s.peer.session)])
    assert sorted(objs for objs, end in streams(ev).values()) == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]
    assert all(end is None for _, end in streams(ev).values()) and relay.stats.dropped_objects == 0


@pytest.mark.parametrize("version", [D16, D14], ids=["draft16", "draft14"])
def test_every_subscribe_gets_an_answer_and_every_publish_one_subscription(version):
    """A SUBSCRIBE waiting for a publisher that leaves is refused (it would hold its Request ID
    forever otherwise); a second PUBLISH of a track is a duplicate; a publisher whose track
    another one takes over is unsubscribed."""
    relay = Relay()
    pub = Publisher(relay, version)
    s, ev = connect(relay, version, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.pipe.close(0, "")  # before its SUBSCRIBE_OK
    assert messages(ev, m.RequestError)[0].error_code == m.RequestErrorCode.DOES_NOT_EXIST
    assert s.peer.session.requests_in_progress == 0
    a, aev = connect(relay, version, "a")
    a.session.send(m.Publish(a.session.next_request_id(), NS, TRACK, 1))
    a.session.send(m.Publish(a.session.next_request_id(), NS, TRACK, 2))
    code = m.RequestErrorCode.DUPLICATE_SUBSCRIPTION if version == D16 else m.RequestErrorCode.INTERNAL_ERROR
    assert len(messages(aev, m.PublishOk)) == 1 and messages(aev, m.RequestError)[0].error_code == code
    b, bev = connect(relay, version, "b")
    b.session.send(m.Publish(b.session.next_request_id(), NS, TRACK, 3))
    assert [u.request_id for u in messages(aev, m.Unsubscribe)] == [messages(aev, m.PublishOk)[0].request_id]
    assert a.peer.session.requests_in_progress == 0 and a.session.closed is None and b.session.closed is None
