"""Relay FETCH and joining FETCH over cached groups that end with status objects (End of Group,
End of Track), drafts 16 and 14 (in-memory sessions).

Draft-16 fetch objects carry no Object Status: a status object is left out of the stream (the
gap it leaves means those objects do not exist) and FETCH_OK's End Of Track says the track
ended. Draft-14 fetch streams carry the status objects themselves."""

from __future__ import annotations

import pytest
from moqtools import LARGEST, NS, TRACK, Publisher, connect, messages

from fastrelay.moq import messages as m
from fastrelay.moq.data import FetchHeader, Object, ObjectStatus, subgroup_header_for
from fastrelay.moq.params import Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import ObjectReceived, StreamEnded
from fastrelay.moq.wire import Location

D14, D16 = Version.DRAFT_14, Version.DRAFT_16
VERSIONS = pytest.mark.parametrize("version", [D16, D14], ids=["draft16", "draft14"])
EOG, EOT = ObjectStatus.END_OF_GROUP, ObjectStatus.END_OF_TRACK


def end(pub: Publisher, group: int, obj: int, status: ObjectStatus = EOG) -> None:
    """The publisher ends `group` with a status object at `obj` (and FIN)."""
    writer = pub.writers.get(group)
    if writer is None:
        header = subgroup_header_for(pub.alias, group, 0, obj, publisher_priority=10, version=pub.version,
                                     extensions=True)
        writer = pub.writers[group] = pub.pipe.session.open_subgroup(header)
    writer.write(Object(group, 0, obj, 10, status), fin=True)


def fetch_stream(events, request_id: int) -> tuple[list[tuple[int, int, ObjectStatus]], int | str | None]:
    """The (group, object, status) items of fetch stream `request_id`, and how it ended (None: FIN,
    a reset code, or "open")."""
    def ours(e) -> bool:
        return isinstance(e.header, FetchHeader) and e.header.request_id == request_id

    items = [(e.object.group_id, e.object.object_id, e.object.status) for e in events
             if isinstance(e, ObjectReceived) and ours(e)]
    ends = [e.reset_code for e in events if isinstance(e, StreamEnded) and ours(e)]
    return items, ends[0] if ends else "open"


def published(relay: Relay, version: Version, groups: int, eog: bool):
    """A publisher that wrote `groups` groups of objects 0 and 1, each ended by an End of Group
    object at 2 (`eog`) or by FIN after object 1, while a subscriber kept the track live."""
    pub = Publisher(relay, version)
    keeper, _ = connect(relay, version, "keeper")
    keeper.session.send(m.Subscribe(keeper.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    for g in range(groups):
        pub.write(g, 0)
        pub.write(g, 1, fin=not eog)
        if eog:
            end(pub, g, 2)
    return pub


def expected(version: Version, groups: range, eog: bool) -> list[tuple[int, int, ObjectStatus]]:
    out = []
    for g in groups:
        out += [(g, 0, ObjectStatus.NORMAL), (g, 1, ObjectStatus.NORMAL)]
        if eog and version == D14:
            out.append((g, 2, EOG))
    return out


@VERSIONS
@pytest.mark.parametrize("eog", [True, False], ids=["end-of-group", "fin"])
def test_standalone_fetch_over_groups_with_and_without_end_of_group(version, eog):
    relay = Relay()
    published(relay, version, 3, eog)
    s, ev = connect(relay, version, "s")
    fid = s.session.next_request_id()
    s.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(0, 0), Location(2, 0)))  # groups 0-2
    ok = messages(ev, m.FetchOk)
    assert len(ok) == 1 and not ok[0].end_of_track
    # beyond the largest object (the last group's End of Group, or its object 1): just past it
    assert ok[0].end_location == (Location(2, 3) if eog else Location(2, 2))
    assert fetch_stream(ev, fid) == (expected(version, range(3), eog), None)
    assert s.session.closed is None and relay.stats.cache_hits == len(expected(version, range(3), eog))

    fid = s.session.next_request_id()  # a whole group that is not the last: End Location is the request's
    s.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(1, 0), Location(1, 0)))
    assert messages(ev, m.FetchOk)[-1].end_location == Location(1, 0)
    assert fetch_stream(ev, fid) == (expected(version, range(1, 2), eog), None)


@VERSIONS
@pytest.mark.parametrize("eog", [True, False], ids=["end-of-group", "fin"])
def test_joining_fetch_over_groups_with_and_without_end_of_group(version, eog):
    relay = Relay()
    pub = published(relay, version, 3, eog)
    late, ev = connect(relay, version, "late")
    sub = late.session.next_request_id()
    late.session.send(m.Subscribe(sub, NS, TRACK, LARGEST))
    largest = Location(2, 2) if eog else Location(2, 1)
    assert messages(ev, m.SubscribeOk)[0].params.largest_object == largest
    fid = late.session.next_request_id()
    late.session.send(m.Fetch(fid, m.FetchType.RELATIVE_JOINING, joining_request_id=sub, joining_start=1))
    ok = messages(ev, m.FetchOk)[0]
    assert ok.end_location == Location(largest.group, largest.object + 1) and not ok.end_of_track
    pub.write(3, 0)  # live, through the subscription
    assert fetch_stream(ev, fid) == (expected(version, range(1, 3), eog), None)
    live = [(e.object.group_id, e.object.object_id) for e in ev
            if isinstance(e, ObjectReceived) and not isinstance(e.header, FetchHeader)]
    assert live == [(3, 0)] and late.session.closed is None


@VERSIONS
def test_fetch_to_the_end_of_the_track_says_so(version):
    relay = Relay()
    pub = published(relay, version, 2, eog=False)
    end(pub, 2, 0, EOT)  # the track ends: nothing at or after (2, 0)
    s, ev = connect(relay, version, "s")
    fid = s.session.next_request_id()
    s.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(1, 0), Location(9, 0)))
    ok = messages(ev, m.FetchOk)[0]
    assert ok.end_of_track and ok.end_location == Location(2, 1)
    tail = [(2, 0, EOT)] if version == D14 else []
    assert fetch_stream(ev, fid) == (expected(version, range(1, 2), False) + tail, None)
    fid = s.session.next_request_id()  # a range that stops before the end: no End Of Track
    s.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(0, 0), Location(1, 0)))
    ok = messages(ev, m.FetchOk)[-1]
    assert not ok.end_of_track and ok.end_location == Location(1, 0)
    assert s.session.closed is None


@VERSIONS
def test_a_group_with_only_its_end_of_group_object(version):
    """An empty group: draft-16 answers with an empty fetch stream (FIN), draft-14 sends the
    status object; a range with nothing at all is draft-14's NO_OBJECTS error."""
    relay = Relay()
    pub = published(relay, version, 1, eog=True)
    end(pub, 1, 0)  # group 1 has no objects
    pub.write(2, 0)
    s, ev = connect(relay, version, "s")
    fid = s.session.next_request_id()
    s.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(1, 0), Location(1, 0)))
    assert messages(ev, m.FetchOk)[0].end_location == Location(1, 0)
    assert fetch_stream(ev, fid) == ([(1, 0, EOG)] if version == D14 else [], None)
    fid = s.session.next_request_id()  # between objects: nothing exists there
    s.session.send(m.Fetch(fid, m.FetchType.STANDALONE, NS, TRACK, Location(0, 3), Location(0, 9)))
    if version == D16:
        assert fetch_stream(ev, fid) == ([], None) and len(messages(ev, m.FetchOk)) == 2
    else:
        assert messages(ev, m.RequestError)[-1].error_code == 0x6  # NO_OBJECTS
    assert s.session.closed is None
