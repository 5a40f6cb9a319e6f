"""Joining FETCH is permitted only for a SUBSCRIBE with Filter Type Largest Object; any other
filter (none included: an absent SUBSCRIPTION_FILTER means unfiltered) closes the session with
PROTOCOL_VIOLATION. Draft-16 section 9.16.2 and draft-14 section 9.16.2 say the same
(in-memory sessions)."""

from __future__ import annotations

import pytest
from moqtools import LARGEST, NS, TRACK, Publisher, connect, messages

from fastrelay.moq import messages as m
from fastrelay.moq.params import FilterType, GroupOrder, MessageParams, SubscriptionFilter, Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import Closed
from fastrelay.moq.wire import ErrorCode, Location

D14, D16 = Version.DRAFT_14, Version.DRAFT_16
VERSIONS = pytest.mark.parametrize("version", [D16, D14], ids=["draft16", "draft14"])
OTHER_FILTERS = {
    "none": None,
    "next-group-start": SubscriptionFilter(FilterType.NEXT_GROUP_START),
    "absolute-start": SubscriptionFilter(FilterType.ABSOLUTE_START, Location(0, 0)),
    "absolute-range": SubscriptionFilter(FilterType.ABSOLUTE_RANGE, Location(1, 0), 9),
}


def joined(version: Version, params: MessageParams, fetch_type: m.FetchType = m.FetchType.RELATIVE_JOINING):
    relay = Relay()
    pub = Publisher(relay, version)
    keeper, _ = connect(relay, version, "keeper")
    keeper.session.send(m.Subscribe(keeper.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    for o in range(3):
        pub.write(0, o)
    s, ev = connect(relay, version, "s")
    sub = s.session.next_request_id()
    s.session.send(m.Subscribe(sub, NS, TRACK, params))
    assert messages(ev, m.SubscribeOk)
    s.session.send(m.Fetch(s.session.next_request_id(), fetch_type, joining_request_id=sub, joining_start=0))
    return s, ev, pub


@VERSIONS
@pytest.mark.parametrize("fetch_type", [m.FetchType.RELATIVE_JOINING, m.FetchType.ABSOLUTE_JOINING])
def test_a_joining_fetch_for_a_largest_object_subscription_is_served(version, fetch_type):
    s, ev, _ = joined(version, LARGEST, fetch_type)
    assert messages(ev, m.FetchOk)[0].end_location == Location(0, 3) and s.session.closed is None


@VERSIONS
@pytest.mark.parametrize("flt", OTHER_FILTERS.values(), ids=OTHER_FILTERS.keys())
def test_a_joining_fetch_for_any_other_filter_closes_the_session(version, flt, caplog):
    s, ev, pub = joined(version, MessageParams(subscription_filter=flt))
    assert isinstance(ev[-1], Closed) and ev[-1].code == ErrorCode.PROTOCOL_VIOLATION
    assert not messages(ev, m.FetchOk) and "whose filter is not Largest Object" in caplog.text
    assert pub.pipe.session.closed is None


def test_an_update_of_the_filter_does_not_make_a_subscription_joinable():
    """The rule is about the SUBSCRIBE's filter: a later REQUEST_UPDATE changes nothing."""
    relay = Relay()
    pub = Publisher(relay, D16)
    s, ev = connect(relay, D16, "s")
    sub = s.session.next_request_id()
    s.session.send(m.Subscribe(sub, NS, TRACK, MessageParams(subscription_filter=OTHER_FILTERS["absolute-start"])))
    pub.answer_subscribes()
    pub.write(0, 0)
    s.session.send(m.RequestUpdate(s.session.next_request_id(), sub, LARGEST))
    s.session.send(m.Fetch(s.session.next_request_id(), m.FetchType.RELATIVE_JOINING, joining_request_id=sub,
                           joining_start=0))
    assert isinstance(ev[-1], Closed) and ev[-1].code == ErrorCode.PROTOCOL_VIOLATION


@VERSIONS
def test_a_joining_fetch_cannot_name_a_subscription_the_relay_began_with_publish(version):
    relay = Relay()
    pub = Publisher(relay, version)
    keeper, _ = connect(relay, version, "keeper")
    keeper.session.send(m.Subscribe(keeper.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    pub.write(0, 0)
    w, ev = connect(relay, version, "watcher")
    w.session.send(m.SubscribeNamespace(w.session.next_request_id(), NS))
    offer = messages(ev, m.Publish)[0]
    w.session.send(m.PublishOk(offer.request_id, MessageParams(group_order=GroupOrder.ASCENDING,
                                                               subscription_filter=LARGEST.subscription_filter)))
    w.session.send(m.Fetch(w.session.next_request_id(), m.FetchType.RELATIVE_JOINING,
                           joining_request_id=offer.request_id, joining_start=0))
    err = messages(ev, m.RequestError)[-1]
    assert err.error_code == m.RequestErrorCode.INVALID_JOINING_REQUEST_ID and w.session.closed is None
