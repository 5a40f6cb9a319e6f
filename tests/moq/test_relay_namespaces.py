"""Relay namespace handling: UNSUBSCRIBE_NAMESPACE, PUBLISH_NAMESPACE_CANCEL, several publishers
of one namespace, and a publisher's GOAWAY (in-memory sessions)."""

from __future__ import annotations

from moqtools import NS, TRACK, Publisher, connect, messages, objects

from fastrelay.moq import messages as m
from fastrelay.moq.params import Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import Closed, MessageReceived
from fastrelay.moq.wire import ErrorCode

D14, D16 = Version.DRAFT_14, Version.DRAFT_16


def watch_d14(relay: Relay, prefix: tuple[bytes, ...] = (b"live",)):
    s, ev = connect(relay, D14, "watcher")
    s.session.send(m.SubscribeNamespace(s.session.next_request_id(), prefix))
    assert messages(ev, m.RequestOk)
    return s, ev


def watch_d16(relay: Relay, prefix: tuple[bytes, ...] = (b"live",)):
    s, ev = connect(relay, D16, "watcher")
    sid = s.session.open_request_stream(m.SubscribeNamespace(s.session.next_request_id(), prefix))

    def said():
        return [e.message for e in ev if isinstance(e, MessageReceived) and e.stream_id == sid][1:]
    return s, ev, said


def test_unsubscribe_namespace_ends_the_namespace_subscription():
    relay = Relay()
    w, ev = watch_d14(relay)
    pub = Publisher(relay, D14)
    assert [x.track_namespace for x in messages(ev, m.PublishNamespace)] == [NS]
    w.session.send(m.UnsubscribeNamespace((b"live",)))
    pub.pipe.close(0, "")  # the namespace goes: the watcher no longer hears of it
    Publisher(relay, D14, namespace=(b"live", b"other"))
    assert not messages(ev, m.PublishNamespaceDone)
    assert [x.track_namespace for x in messages(ev, m.PublishNamespace)] == [NS]
    # the prefix is free again (no PREFIX_OVERLAP) and says what is published now
    w.session.send(m.SubscribeNamespace(w.session.next_request_id(), (b"live",)))
    assert [type(x) for x in messages(ev, m.RequestOk)] == [m.RequestOk, m.RequestOk]
    assert messages(ev, m.PublishNamespace)[-1].track_namespace == (b"live", b"other")
    w.session.send(m.UnsubscribeNamespace((b"nothing",)))  # not subscribed: nothing happens
    assert w.session.closed is None


def test_publish_namespace_cancel_from_a_subscriber_means_no_done_for_it():
    relay = Relay()
    w1, ev1 = watch_d14(relay)
    w2, ev2 = watch_d14(relay)
    pub = Publisher(relay, D14)
    w1.session.send(m.PublishNamespaceCancel(None, m.RequestErrorCode.UNINTERESTED, "not for me", NS))
    pub.pipe.session.send(m.PublishNamespaceDone(None, NS))
    assert not messages(ev1, m.PublishNamespaceDone)  # it cancelled: no DONE
    assert [x.track_namespace for x in messages(ev2, m.PublishNamespaceDone)] == [NS]
    w1.session.send(m.PublishNamespaceCancel(None, m.RequestErrorCode.UNINTERESTED, "", NS))  # a late one: ignored
    assert w1.session.closed is None and w2.session.closed is None


def test_a_refused_forwarded_namespace_gets_no_done():
    relay = Relay()
    w, ev = watch_d14(relay)
    pub = Publisher(relay, D14)
    named = messages(ev, m.PublishNamespace)[0]
    w.session.send(m.RequestError(named.request_id, m.RequestErrorCode.UNINTERESTED, 0, "no",
                                  m.RequestKind.PUBLISH_NAMESPACE))
    pub.pipe.close(0, "")
    assert not messages(ev, m.PublishNamespaceDone) and w.session.closed is None


def test_draft16_publish_namespace_cancel_for_a_namespace_never_sent_is_a_protocol_violation():
    relay = Relay()
    Publisher(relay, D16)
    s, ev = connect(relay, D16, "s")
    s.session._send_control(m.PublishNamespaceCancel(1, m.RequestErrorCode.UNINTERESTED))  # relay sent no request 1
    assert isinstance(ev[-1], Closed) and ev[-1].code == ErrorCode.PROTOCOL_VIOLATION


def test_subscribers_hear_of_a_namespace_once_however_many_publish_it():
    relay = Relay()
    w, ev, said = watch_d16(relay)
    a = Publisher(relay, D16)
    b = Publisher(relay, D16)
    assert said() == [m.Namespace((b"cam",))]
    a.pipe.session.send(m.PublishNamespaceDone(a.ns_request))
    assert said() == [m.Namespace((b"cam",))]  # b still publishes it
    b.pipe.close(0, "")
    assert said() == [m.Namespace((b"cam",)), m.NamespaceDone((b"cam",))]
    a.pipe.close(0, "")  # withdrawn already: nothing more
    assert len(said()) == 2


def test_a_publisher_goaway_withdraws_its_namespaces_but_keeps_its_tracks():
    relay = Relay()
    w, ev, said = watch_d16(relay)
    pub = Publisher(relay, D16)
    s, sev = connect(relay, D16, "s")
    s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    pub.write(0, 0)

    pub.pipe.session.goaway()
    cancel = messages(pub.events, m.PublishNamespaceCancel)
    assert len(cancel) == 1 and cancel[0].request_id == pub.ns_request  # no new SUBSCRIBE will come
    assert said() == [m.Namespace((b"cam",)), m.NamespaceDone((b"cam",))]
    late, lev = connect(relay, D16, "late")
    late.session.send(m.Subscribe(late.session.next_request_id(), NS, b"audio"))  # a new track: nobody to ask
    assert messages(lev, m.RequestError)[0].error_code == m.RequestErrorCode.DOES_NOT_EXIST
    assert not messages(pub.events, m.Subscribe)
    late.session.send(m.Subscribe(late.session.next_request_id(), NS, TRACK))  # the established one: joins
    assert messages(lev, m.SubscribeOk)
    pub.write(0, 1, fin=True)
    assert [o[:2] for o in objects(sev)] == [(0, 0), (0, 1)] and [o[:2] for o in objects(lev)] == [(0, 1)]
    pub.pipe.close(0, "")
    assert len(said()) == 2  # no second NAMESPACE_DONE
    assert len(messages(sev, m.PublishDone)) == 1


def test_draft14_goaway_cancels_by_namespace():
    relay = Relay()
    pub = Publisher(relay, D14)
    w, ev = watch_d14(relay)
    pub.pipe.session.goaway()
    assert messages(pub.events, m.PublishNamespaceCancel)[0].track_namespace == NS
    assert [x.track_namespace for x in messages(ev, m.PublishNamespaceDone)] == [NS]


def test_a_namespace_subscriber_that_sent_goaway_is_not_sent_new_requests():
    relay = Relay()
    w, ev = watch_d14(relay)
    w.session.goaway()
    pub = Publisher(relay, D14)  # the relay would send PUBLISH_NAMESPACE (a new request): it must not
    assert not messages(ev, m.PublishNamespace)
    assert pub.pipe.session.closed is None and w.session.closed is None
