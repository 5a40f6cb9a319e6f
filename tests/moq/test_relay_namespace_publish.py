"""SUBSCRIBE_NAMESPACE: a subscriber that knows only a namespace learns its tracks. The relay
sends it a PUBLISH for every track being relayed under the prefix, now and as tracks go live,
and forwards objects once it answers PUBLISH_OK, in the Forward State it chose. Draft-16: the
Subscribe Options choose NAMESPACE messages (on the request stream), PUBLISH messages (on the
control stream) or both, and a FORWARD 0 in SUBSCRIBE_NAMESPACE makes the PUBLISHes say
FORWARD 0; draft-14: PUBLISH_NAMESPACE and PUBLISH always (in-memory sessions)."""

from __future__ import annotations

import pytest
from moqtools import NS, TRACK, Publisher, connect, messages, objects

from fastrelay.moq import messages as m
from fastrelay.moq.params import FilterType, GroupOrder, MessageParams, SubscriptionFilter, Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import MessageReceived
from fastrelay.moq.wire import Location

D14, D16 = Version.DRAFT_14, Version.DRAFT_16
VERSIONS = pytest.mark.parametrize("version", [D16, D14], ids=["draft16", "draft14"])
PREFIX = (b"live",)


def watch(relay: Relay, version: Version, options: m.SubscribeOptions = m.SubscribeOptions.BOTH,
          params: MessageParams | None = None):
    """A session that subscribes to the namespace prefix `live` (draft-16 on a request stream)."""
    w, ev = connect(relay, version, "watcher")
    msg = m.SubscribeNamespace(w.session.next_request_id(), PREFIX, options, params or MessageParams())
    if version == D16:
        w.session.open_request_stream(msg)
    else:
        w.session.send(msg)
    assert messages(ev, m.RequestOk)
    return w, ev


def accept(w, offer: m.Publish, **params) -> None:
    """PUBLISH_OK (draft-14 needs a group order in it)."""
    w.session.send(m.PublishOk(offer.request_id, MessageParams(group_order=GroupOrder.ASCENDING, **params)))


def subscribed_track(relay: Relay, version: Version) -> Publisher:
    """A publisher of namespace live/cam whose track `video` is live (someone subscribed)."""
    pub = Publisher(relay, version)
    s, _ = connect(relay, version, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    return pub


@VERSIONS
def test_a_namespace_subscriber_is_offered_a_track_as_it_goes_live_and_gets_its_objects(version):
    relay = Relay()
    w, ev = watch(relay, version)
    pub = subscribed_track(relay, version)
    offers = messages(ev, m.Publish)
    assert [(o.track_namespace, o.track_name) for o in offers] == [(NS, TRACK)]
    offer = offers[0]
    assert offer.params.largest_object is None and offer.params.forward in (None, True)
    pub.write(0, 0)  # before PUBLISH_OK: not forwarded
    assert objects(ev) == []
    accept(w, offer)
    for o in range(1, 4):
        pub.write(0, o)
    pub.write(1, 0, fin=True)
    assert [x[:2] for x in objects(ev, offer.track_alias)] == [(0, 1), (0, 2), (0, 3), (1, 0)]
    pub.pipe.close(0, "")  # the track ends: PUBLISH_DONE for the PUBLISH's request
    done = messages(ev, m.PublishDone)
    assert [(d.request_id, d.status_code) for d in done] == [(offer.request_id, m.PublishDoneCode.GOING_AWAY)]
    assert w.session.closed is None


@VERSIONS
def test_tracks_already_live_are_offered_at_once_with_their_largest_location(version):
    relay = Relay()
    pub = subscribed_track(relay, version)
    pub.write(0, 0)
    pub.write(0, 1)
    w, ev = watch(relay, version)
    offer = messages(ev, m.Publish)[0]
    assert offer.params.largest_object == Location(0, 1)
    accept(w, offer)
    pub.write(0, 2, fin=True)
    assert [x[:2] for x in objects(ev, offer.track_alias)] == [(0, 2)]


@VERSIONS
def test_a_track_a_publisher_publishes_itself_is_offered_too(version):
    relay = Relay()
    w, ev = watch(relay, version)
    p, _ = connect(relay, version, "pub")
    p.session.send(m.Publish(p.session.next_request_id(), NS, b"audio", 9))
    assert [o.track_name for o in messages(ev, m.Publish)] == [b"audio"]


@VERSIONS
def test_the_forward_state_of_publish_ok_is_respected(version):
    relay = Relay()
    w, ev = watch(relay, version)
    pub = subscribed_track(relay, version)
    offer = messages(ev, m.Publish)[0]
    update_params = {"forward": True}
    if version == D14:  # draft-14 SUBSCRIBE_UPDATE always carries start and priority
        update_params.update(subscriber_priority=128,
                             subscription_filter=SubscriptionFilter(FilterType.ABSOLUTE_START, Location(0, 0)))
    accept(w, offer, forward=False)
    pub.write(0, 0)
    assert objects(ev) == []
    w.session.send(m.RequestUpdate(w.session.next_request_id(), offer.request_id, MessageParams(**update_params)))
    pub.write(0, 1, fin=True)
    assert [x[:2] for x in objects(ev, offer.track_alias)] == [(0, 1)]


def test_draft16_forward_0_in_subscribe_namespace_makes_the_publishes_say_forward_0():
    relay = Relay()
    w, ev = watch(relay, D16, params=MessageParams(forward=False))
    pub = subscribed_track(relay, D16)
    offer = messages(ev, m.Publish)[0]
    assert offer.params.forward is False
    accept(w, offer)  # no FORWARD: the Forward State stays 0
    pub.write(0, 0)
    assert objects(ev) == []
    w.session.send(m.RequestUpdate(w.session.next_request_id(), offer.request_id, MessageParams(forward=True)))
    pub.write(0, 1)
    assert [x[:2] for x in objects(ev, offer.track_alias)] == [(0, 1)]


@pytest.mark.parametrize("options,namespaces,publishes", [
    (m.SubscribeOptions.PUBLISH, 0, 1), (m.SubscribeOptions.NAMESPACE, 1, 0), (m.SubscribeOptions.BOTH, 1, 1)],
    ids=["publish", "namespace", "both"])
def test_draft16_subscribe_options_choose_namespace_and_publish_messages(options, namespaces, publishes):
    relay = Relay()
    w, ev = watch(relay, D16, options)
    subscribed_track(relay, D16)
    on_stream = [e.message for e in ev if isinstance(e, MessageReceived) and e.stream_id is not None]
    assert len([x for x in on_stream if isinstance(x, m.Namespace)]) == namespaces
    assert len(messages(ev, m.Publish)) == publishes


@VERSIONS
def test_a_track_the_subscriber_subscribes_to_is_not_offered_and_an_offered_one_cannot_be_subscribed(version):
    relay = Relay()
    pub = subscribed_track(relay, version)
    w, ev = connect(relay, version, "watcher")
    w.session.send(m.Subscribe(w.session.next_request_id(), NS, TRACK))  # already subscribed
    w.session.send(m.SubscribeNamespace(w.session.next_request_id(), PREFIX))
    assert not messages(ev, m.Publish)
    pub.pipe.session.send(m.PublishNamespace(pub.pipe.session.next_request_id(), (*NS, b"a")))
    p2, _ = connect(relay, version, "pub2")
    p2.session.send(m.Publish(p2.session.next_request_id(), (*NS, b"b"), b"audio", 5))
    offer = messages(ev, m.Publish)[0]
    w.session.send(m.Subscribe(w.session.next_request_id(), (*NS, b"b"), b"audio"))  # a second subscription
    err = messages(ev, m.RequestError)[-1]
    code = m.RequestErrorCode.DUPLICATE_SUBSCRIPTION if version == D16 else m.RequestErrorCode.INTERNAL_ERROR
    assert err.error_code == code and "already subscribed" in err.error_reason
    assert offer.track_name == b"audio" and w.session.closed is None


@VERSIONS
def test_a_declined_offer_delivers_nothing_and_leaves_the_track_to_the_others(version):
    relay = Relay()
    w, ev = watch(relay, version)
    p, pev = connect(relay, version, "pub")
    p.session.send(m.Publish(p.session.next_request_id(), NS, b"audio", 9))
    offer = messages(ev, m.Publish)[0]
    w.session.send(m.RequestError(offer.request_id, m.RequestErrorCode.UNINTERESTED, 0, "no",
                                  m.RequestKind.PUBLISH))
    assert not relay.tracks[(NS, b"audio")].subscribers and w.session.closed is None
    w.session.send(m.Subscribe(w.session.next_request_id(), NS, b"audio"))  # it may still subscribe later
    assert messages(ev, m.SubscribeOk)


@VERSIONS
def test_unsubscribe_ends_an_accepted_offer(version):
    relay = Relay()
    w, ev = watch(relay, version)
    pub = subscribed_track(relay, version)
    offer = messages(ev, m.Publish)[0]
    accept(w, offer)
    pub.write(0, 0)
    w.session.send(m.Unsubscribe(offer.request_id))
    pub.write(0, 1)
    assert [x[:2] for x in objects(ev)] == [(0, 0)] and not messages(ev, m.PublishDone)


@VERSIONS
def test_a_namespace_subscription_that_ended_is_offered_nothing_more(version):
    relay = Relay()
    w, ev = connect(relay, version, "watcher")
    if version == D16:
        sid = w.session.open_request_stream(m.SubscribeNamespace(w.session.next_request_id(), PREFIX))
        w.session.end_request_stream(sid)
    else:
        w.session.send(m.SubscribeNamespace(w.session.next_request_id(), PREFIX))
        w.session.send(m.UnsubscribeNamespace(PREFIX))
    subscribed_track(relay, version)
    assert not messages(ev, m.Publish)
