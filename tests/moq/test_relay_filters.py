"""Relay SUBSCRIBE filters: exactly which objects each one delivers (in-memory sessions)."""

from __future__ import annotations

import pytest
from moqtools import NS, TRACK, Publisher, connect, messages, objects

from fastrelay.moq import messages as m
from fastrelay.moq.params import FilterType, MessageParams, SubscriptionFilter, Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.wire import Location

D14, D16 = Version.DRAFT_14, Version.DRAFT_16
VERSIONS = pytest.mark.parametrize("version", [D16, D14])


def run(version: Version, flt: SubscriptionFilter | None, before: list[tuple[int, int]],
        after: list[tuple[int, int]]):
    """Publish `before`, subscribe a second subscriber with `flt`, publish `after`; returns its
    (group, object) list and its SUBSCRIBE_OK (or REQUEST_ERROR)."""
    relay = Relay()
    pub = Publisher(relay, version)
    first, _ = connect(relay, version, "first")  # keeps the track live from the start
    first.session.send(m.Subscribe(first.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    for g, o in before:
        pub.write(g, o)
    s, ev = connect(relay, version, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK, MessageParams(subscription_filter=flt)))
    reply = (messages(ev, m.SubscribeOk) or messages(ev, m.RequestError))[0]
    for g, o in after:
        pub.write(g, o)
    return [o[:2] for o in objects(ev)], reply


BEFORE = [(0, 0), (0, 1), (1, 0), (1, 1)]
AFTER = [(1, 2), (1, 3), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0)]


@VERSIONS
def test_next_group_start(version):
    got, ok = run(version, SubscriptionFilter(FilterType.NEXT_GROUP_START), BEFORE, AFTER)
    assert ok.params.largest_object == Location(1, 1)
    assert got == [(2, 0), (2, 1), (3, 0), (3, 1), (4, 0)]  # not the rest of group 1


@VERSIONS
def test_next_group_start_on_a_track_with_nothing_yet_starts_at_the_beginning(version):
    got, ok = run(version, SubscriptionFilter(FilterType.NEXT_GROUP_START), [], [(0, 0), (0, 1), (1, 0)])
    assert ok.params.largest_object is None and got == [(0, 0), (0, 1), (1, 0)]


@VERSIONS
def test_largest_object(version):
    got, _ = run(version, SubscriptionFilter(FilterType.LARGEST_OBJECT), BEFORE, AFTER)
    assert got == AFTER


@VERSIONS
def test_absolute_start_in_the_future(version):
    got, _ = run(version, SubscriptionFilter(FilterType.ABSOLUTE_START, Location(2, 1)), BEFORE, AFTER)
    assert got == [(2, 1), (3, 0), (3, 1), (4, 0)]


@VERSIONS
def test_absolute_start_in_the_past_delivers_what_is_published_from_now_on(version):
    got, _ = run(version, SubscriptionFilter(FilterType.ABSOLUTE_START, Location(0, 1)), BEFORE, AFTER)
    assert got == AFTER  # the past is FETCH's job


@VERSIONS
def test_absolute_range(version):
    got, _ = run(version, SubscriptionFilter(FilterType.ABSOLUTE_RANGE, Location(1, 3), 3), BEFORE, AFTER)
    assert got == [(1, 3), (2, 0), (2, 1), (3, 0), (3, 1)]  # up to and including the end group


@VERSIONS
def test_absolute_range_of_one_group(version):
    got, _ = run(version, SubscriptionFilter(FilterType.ABSOLUTE_RANGE, Location(2, 0), 2), BEFORE, AFTER)
    assert got == [(2, 0), (2, 1)]


@VERSIONS
@pytest.mark.parametrize("flt", [
    SubscriptionFilter(FilterType.ABSOLUTE_RANGE, Location(0, 0), 0),  # the end group is already over
    SubscriptionFilter(FilterType.ABSOLUTE_RANGE, Location(5, 0), 4),  # ends before it starts
])
def test_absolute_ranges_that_cannot_be_served_are_refused(version, flt):
    got, err = run(version, flt, BEFORE, AFTER)
    assert isinstance(err, m.RequestError) and err.error_code == m.RequestErrorCode.INVALID_RANGE
    assert got == []
