"""SUBSCRIBE_NAMESPACE end to end (issue 10): a subscriber that knows only a namespace prefix
learns the tracks under it and receives them. Real QUIC (aioquic) on loopback, drafts 16 and 14:
the relay is serve_relay() in this process, publishers are fastrelay's (endpoints/publisher.py) or a
small one that announces its tracks with PUBLISH, and the namespace subscriber is a MoqtClient
that sends only SUBSCRIBE_NAMESPACE and answers every PUBLISH with PUBLISH_OK.

What the subscriber must get, per track: one PUBLISH (naming the track and the relay's Largest
Location), then every object the relay receives after it processed the PUBLISH_OK, once, each
payload the synthetic source's, on as many subgroup streams as the final PUBLISH_DONE
(TRACK_ENDED) counts. The objects it is owed are known exactly: the publisher numbers them
from (0, 0), and the relay's largest location when it handles the PUBLISH_OK is recorded from
its event stream (`PublishOkPoints`); objects between the PUBLISH's Largest Location and that
point may come too (the relay does not send them today), nothing older.

Three of them guard relay bugs they found: test_a_subgroup_of_an_older_group_arriving_after_a_newer_group_is_forwarded
(the relay dropped a subgroup that started after a newer group began, congestion or not), the
`one-namespace` case of test_tracks_are_offered_as_they_go_live (a SUBSCRIBE went to one
publisher of a namespace only) and test_fastrelay_publishers_alone_are_learnt (fastrelay's
publisher never sent PUBLISH: it does with announce="publish").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from moqtools import relay_server, synthetic

from fastrelay.endpoints.endpoint import MoqtClient
from fastrelay.endpoints.publisher import publish
from fastrelay.endpoints.subscriber import subscribe
from fastrelay.media.h264 import synthetic_payload, verify_synthetic_payload
from fastrelay.moq import messages as m
from fastrelay.moq.data import Object, subgroup_header_for
from fastrelay.moq.params import GroupOrder, MessageParams, Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import Closed, MessageReceived, ObjectReceived
from fastrelay.moq.wire import Location

VERSIONS = pytest.mark.parametrize("version", [Version.DRAFT_16, Version.DRAFT_14], ids=["draft16", "draft14"])
PREFIX = (b"live",)
CAM, MIC = (b"live", b"cam"), (b"live", b"mic")
GOP = 30  # objects per group: synthetic() in test_quic_e2e, and the PUBLISH publisher below
TIMEOUT = 10.0  # any single wait; a healthy run needs well under a second for each
RATE = 150.0  # objects/s of every publisher here (5 groups/s)

Namespace = tuple[bytes, ...]
TrackKey = tuple[Namespace, bytes]


def ids(count: int) -> list[Location]:
    """The locations of a publisher's first `count` objects (GOP objects per group from (0, 0))."""
    return [Location(*divmod(i, GOP)) for i in range(count)]


def after(loc: Location | None) -> Callable[[Location], bool]:
    return lambda x: loc is None or x > loc


# ---- the relay's side: where each PUBLISH_OK took effect ----------------------------------

class PublishOkPoints(dict[TrackKey, Location | None]):
    """track -> the relay's largest location of it when it handled a namespace subscriber's
    PUBLISH_OK (None: nothing yet). Read from the relay's event stream: serve_relay hands every
    session event to relay.on_event, which this wraps."""

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        handle = relay.on_event

        def on_event(peer, ev) -> None:
            if isinstance(ev, MessageReceived) and isinstance(ev.message, m.PublishOk):
                ds = peer.downstream.get(ev.message.request_id)
                if ds is not None:
                    self[(ds.track.namespace, ds.track.name)] = ds.track.cache.largest()
            handle(peer, ev)

        relay.on_event = on_event


async def until(read: Callable[[], object], what: str | Callable[[], str], timeout: float = TIMEOUT,
                changed: asyncio.Event | None = None) -> None:
    """Until `read()` is true: re-read whenever `changed` is set (else every 10 ms); an
    AssertionError saying what was awaited after `timeout`."""
    deadline = time.monotonic() + timeout
    while not read():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}")
        if changed is None:
            await asyncio.sleep(min(0.01, left))
            continue
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), left)


async def announced(relay: Relay, ns: Namespace) -> None:
    """Until a publisher's PUBLISH_NAMESPACE of `ns` has reached the relay."""
    await until(lambda: any(ns in p.namespaces for p in relay.peers.values()), f"namespace {ns} at the relay")


async def relayed(relay: Relay, key: TrackKey, objects: int) -> None:
    """Until the relay has received `objects` objects of track `key`."""
    await until(lambda: key in relay.tracks and relay.tracks[key].objects_in >= objects,
                f"{objects} objects of {key} at the relay")


# ---- the namespace subscriber -------------------------------------------------------------

@dataclass
class Offer:
    """A PUBLISH the watcher received and accepted, and what came of it."""

    publish: m.Publish
    objects: list[tuple[Location, bool]] = field(default_factory=list)  # arrival order; payload verified
    streams: set[int] = field(default_factory=set)
    done: m.PublishDone | None = None

    @property
    def received(self) -> set[Location]:
        return {loc for loc, _ in self.objects}


class Watcher:
    """A client that knows only a namespace prefix: SUBSCRIBE_NAMESPACE, PUBLISH_OK for every
    PUBLISH (Forward 1, ascending), and a record of what it hears."""

    def __init__(self, client: MoqtClient, version: Version) -> None:
        self.client = client
        self.version = version
        self.namespaces: list[Namespace] = []  # in the order heard (NAMESPACE / PUBLISH_NAMESPACE)
        self.offers: dict[TrackKey, Offer] = {}
        self.by_alias: dict[int, Offer] = {}
        self.by_request: dict[int, Offer] = {}
        self.unexpected: list[object] = []  # messages a namespace subscriber should not get
        self.subscribed = False
        self.closed: Closed | None = None
        self.changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def subscribe_namespace(self, prefix: Namespace) -> None:
        session = self.client.session
        self._task = asyncio.create_task(self._run(prefix))
        if self.version == Version.DRAFT_16:  # a request stream of its own; the reply comes on it
            session.open_request_stream(m.SubscribeNamespace(session.next_request_id(), prefix,
                                                             m.SubscribeOptions.BOTH))
            await until(lambda: self.subscribed or self.unexpected, "REQUEST_OK to SUBSCRIBE_NAMESPACE",
                        changed=self.changed)
        else:
            reply = await self.client.request(lambda rid: m.SubscribeNamespace(rid, prefix))
            self.subscribed = isinstance(reply, m.RequestOk)
            if not self.subscribed:
                self.unexpected.append(reply)
        assert self.subscribed, f"SUBSCRIBE_NAMESPACE {prefix} refused: {self.unexpected}"

    async def _run(self, prefix: Namespace) -> None:
        while True:
            ev = await self.client.events.get()
            try:
                self._event(prefix, ev)
            finally:
                self.changed.set()

    def _event(self, prefix: Namespace, ev: object) -> None:
        session = self.client.session
        if isinstance(ev, ObjectReceived):
            offer = self.by_alias.get(ev.track_alias)
            if offer is None:
                self.unexpected.append(("object on an unknown alias", ev.track_alias))
                return
            o = ev.object
            loc = Location(o.group_id, o.object_id)
            offer.objects.append((loc, verify_synthetic_payload(o.group_id, o.object_id, o.payload)))
            offer.streams.add(ev.stream_id)
        elif isinstance(ev, Closed):
            self.closed = ev
        elif isinstance(ev, MessageReceived):
            msg = ev.message
            if isinstance(msg, m.RequestOk) and ev.stream_id is not None:  # draft-16 SUBSCRIBE_NAMESPACE
                self.subscribed = True
            elif isinstance(msg, m.Namespace):  # draft-16: the suffix under our prefix
                self.namespaces.append(prefix + msg.track_namespace_suffix)
            elif isinstance(msg, m.PublishNamespace):  # draft-14: the relay names the namespace
                self.namespaces.append(msg.track_namespace)
                session.send(m.RequestOk(msg.request_id, request_kind=m.RequestKind.PUBLISH_NAMESPACE))
            elif isinstance(msg, m.Publish):
                offer = Offer(msg)
                key = (msg.track_namespace, msg.track_name)
                if key in self.offers or msg.track_alias in self.by_alias:
                    self.unexpected.append(("second PUBLISH", msg))
                self.offers[key] = self.by_alias[msg.track_alias] = self.by_request[msg.request_id] = offer
                # draft-14 PUBLISH_OK requires a group order
                session.send(m.PublishOk(msg.request_id, MessageParams(forward=True, group_order=GroupOrder.ASCENDING)))
            elif isinstance(msg, m.PublishDone):
                offer = self.by_request.get(msg.request_id)
                if offer is None or offer.done is not None:
                    self.unexpected.append(("PUBLISH_DONE", msg))
                else:
                    offer.done = msg
            elif not isinstance(msg, m.NamespaceDone | m.PublishNamespaceDone):
                self.unexpected.append(msg)

    async def offered(self, *keys: TrackKey) -> list[Offer]:
        await until(lambda: all(k in self.offers for k in keys),
                    lambda: f"PUBLISH of {keys}; heard of namespaces {self.namespaces}, offered "
                            f"{list(self.offers)}", changed=self.changed)
        return [self.offers[k] for k in keys]

    async def heard_of(self, ns: Namespace) -> None:
        await until(lambda: ns in self.namespaces, lambda: f"namespace {ns}; heard of {self.namespaces}",
                    changed=self.changed)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def owed(sent: int, accepted_at: Location | None) -> set[Location]:
    """What a subscriber whose PUBLISH_OK took effect at `accepted_at` is owed of `sent` objects."""
    return {x for x in ids(sent) if after(accepted_at)(x)}


async def complete(watcher: Watcher, offer: Offer, sent: int, points: PublishOkPoints) -> None:
    """Until the offer's PUBLISH_DONE and every object it is owed have arrived."""
    key = (offer.publish.track_namespace, offer.publish.track_name)
    await until(lambda: offer.done is not None and key in points and owed(sent, points[key]) <= offer.received,
                lambda: f"PUBLISH_DONE and all objects of {key}: done={offer.done}, "
                        f"{len(offer.received)} received, missing "
                        f"{sorted(owed(sent, points.get(key)) - offer.received)[:10]}",
                changed=watcher.changed)


def check_delivery(offer: Offer, sent: int, accepted_at: Location | None) -> None:
    """Every object owed, once, verified, nothing from before the PUBLISH; PUBLISH_DONE counts
    the streams and says the track ended."""
    got = [loc for loc, _ in offer.objects]
    name = offer.publish.track_name
    assert len(got) == len(set(got)), f"{name}: duplicates {sorted({x for x in got if got.count(x) > 1})}"
    assert all(ok for _, ok in offer.objects), f"{name}: bad payloads {[x for x, ok in offer.objects if not ok]}"
    assert owed(sent, accepted_at) <= set(got)
    assert set(got) <= owed(sent, offer.publish.params.largest_object), \
        f"{name}: objects not published after the PUBLISH's Largest Location"
    assert accepted_at is None or accepted_at < ids(sent)[-1], f"{name}: accepted only after its last object"
    done = offer.done
    assert (done.status_code, done.stream_count) == (m.PublishDoneCode.TRACK_ENDED, len(offer.streams)), done


@contextlib.asynccontextmanager
async def watching(url: str, version: Version, relay: Relay):
    """A connected Watcher and the relay's PUBLISH_OK points."""
    points = PublishOkPoints(relay)
    async with MoqtClient(url, version) as client:
        watcher = Watcher(client, version)
        try:
            yield watcher, points
        finally:
            watcher.stop()


async def settle(*tasks: asyncio.Task) -> None:
    """Cancel what is still running (a failed test's publishers) and collect every outcome."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---- tracks made live by a subscriber of fastrelay's publishers ----------------------------

@VERSIONS
@pytest.mark.parametrize("layout", ["two-namespaces", "one-namespace"])
def test_tracks_are_offered_as_they_go_live(tmp_path, version, layout):
    """Two `fastrelay publish` publishers under `live`: video (live/cam), already flowing when the
    watcher subscribes to the prefix, and audio (live/mic, or live/cam too), which starts after
    it. Each track goes live when an ordinary subscriber SUBSCRIBEs to it. The watcher must hear
    of the namespaces, get one PUBLISH per track (video's naming the relay's largest location,
    audio's none), and every object from its PUBLISH_OK on, then PUBLISH_DONE.

    one-namespace: both publishers send PUBLISH_NAMESPACE live/cam, so the SUBSCRIBE for
    live/cam audio may reach the video publisher first, which refuses it (`unknown track`); the
    relay must then ask the other publisher of the namespace (Relay._subscribe_upstream)."""
    audio_ns = MIC if layout == "two-namespaces" else CAM
    video, audio = (CAM, b"video"), (audio_ns, b"audio")
    n_video, n_audio = 450, 150  # 3 s and 1 s at RATE

    async def main():
        async with relay_server(tmp_path) as (relay, url), watching(url, version, relay) as (watcher, points):
            tasks: list[asyncio.Task] = []
            try:
                pub_video = asyncio.create_task(publish(url, *video, synthetic(n_video, RATE), version=version,
                                                        wait_subscriber=TIMEOUT))
                tasks.append(pub_video)
                await announced(relay, CAM)
                sub_video = asyncio.create_task(subscribe(url, *video, version=version, codec="raw", duration=20,
                                                          verify=verify_synthetic_payload))
                tasks.append(sub_video)
                await relayed(relay, video, GOP)  # a group in: the offer names a largest location
                await watcher.subscribe_namespace(PREFIX)
                await watcher.heard_of(CAM)
                (v,) = await watcher.offered(video)

                pub_audio = asyncio.create_task(publish(url, *audio, synthetic(n_audio, RATE), version=version,
                                                        wait_subscriber=TIMEOUT))
                tasks.append(pub_audio)
                publishers = 1 if layout == "two-namespaces" else 2
                await until(lambda: sum(audio_ns in p.namespaces for p in relay.peers.values()) == publishers,
                            "the audio publisher's namespace at the relay")
                if layout == "two-namespaces":
                    await watcher.heard_of(MIC)
                sub_audio = asyncio.create_task(subscribe(url, *audio, version=version, codec="raw", duration=20,
                                                          verify=verify_synthetic_payload))
                offer_audio = asyncio.create_task(watcher.offered(audio))
                tasks += [sub_audio, offer_audio]
                await asyncio.wait([sub_audio, offer_audio], return_when=asyncio.FIRST_COMPLETED)
                if sub_audio.done() and sub_audio.exception() is not None:  # refused: say so, not a timeout
                    raise AssertionError(f"SUBSCRIBE to {audio} failed: {sub_audio.exception()!r}")
                (a,) = await offer_audio

                sent_video, sent_audio = await pub_video, await pub_audio
                await complete(watcher, v, sent_video.objects, points)
                await complete(watcher, a, sent_audio.objects, points)
                subs = [await sub_video, await sub_audio]
                return watcher, points, v, a, sent_video, sent_audio, subs
            finally:
                await settle(*tasks)

    watcher, points, v, a, sent_video, sent_audio, subs = asyncio.run(main())
    assert (sent_video.objects, sent_audio.objects) == (n_video, n_audio)
    assert watcher.namespaces[:1] == [CAM] and (layout == "one-namespace" or MIC in watcher.namespaces)
    assert v.publish.params.largest_object is not None and a.publish.params.largest_object is None
    check_delivery(v, n_video, points[video])
    check_delivery(a, n_audio, points[audio])
    assert not watcher.unexpected and watcher.closed is None
    # the ordinary subscribers, which made the tracks live, got their tracks whole too
    assert [(s.objects, s.bad, s.duplicates) for s in subs] == [(n_video, 0, 0), (n_audio, 0, 0)]


# ---- fastrelay's publishers and nobody but the namespace subscriber -------------------------

@VERSIONS
def test_fastrelay_publishers_alone_are_learnt(tmp_path, version):
    """Issue 10 as asked: the watcher subscribes to `live` first; then two `fastrelay publish`
    publishers (live/cam video, live/mic audio) start, and nobody else subscribes. The watcher
    must get a PUBLISH for each track, and after its PUBLISH_OK every object, then PUBLISH_DONE.

    The publishers announce their tracks with PUBLISH (announce="publish"): with PUBLISH_NAMESPACE
    alone the relay never learns the track names, and offers a track to namespace subscribers
    (Relay._offer_track) only once it is live upstream."""
    video, audio = (CAM, b"video"), (MIC, b"audio")
    n_video, n_audio = 450, 150

    async def main():
        async with relay_server(tmp_path) as (relay, url), watching(url, version, relay) as (watcher, points):
            await watcher.subscribe_namespace(PREFIX)
            tasks = [asyncio.create_task(publish(url, *video, synthetic(n_video, RATE), version=version,
                                                 wait_subscriber=TIMEOUT, announce="publish")),
                     asyncio.create_task(publish(url, *audio, synthetic(n_audio, RATE), version=version,
                                                 wait_subscriber=TIMEOUT, announce="publish"))]
            try:
                await watcher.heard_of(CAM)
                await watcher.heard_of(MIC)
                v, a = await watcher.offered(video, audio)
                sent_video, sent_audio = await asyncio.gather(*tasks)
                await complete(watcher, v, sent_video.objects, points)
                await complete(watcher, a, sent_audio.objects, points)
                return watcher, points, v, a, sent_video, sent_audio
            finally:
                await settle(*tasks)

    watcher, points, v, a, sent_video, sent_audio = asyncio.run(main())
    check_delivery(v, sent_video.objects, points[video])
    check_delivery(a, sent_audio.objects, points[audio])
    assert not watcher.unexpected and watcher.closed is None


# ---- a publisher that announces its tracks with PUBLISH --------------------------------------

async def push(url: str, version: Version, ns: Namespace, name: bytes, alias: int, count: int,
               fps: float = RATE, size: int = 900) -> int:
    """Publish one track by PUBLISH (no PUBLISH_NAMESPACE), `count` synthetic objects at `fps`
    (GOP per group, one subgroup stream per group), then PUBLISH_DONE (TRACK_ENDED); returns
    the objects sent. The relay accepts a PUBLISH at once (PUBLISH_OK, Forward 1)."""
    async with MoqtClient(url, version) as client:
        session = client.session
        ok = await client.request(lambda rid: m.Publish(rid, ns, name, alias))
        assert isinstance(ok, m.PublishOk) and ok.params.forward is not False, ok
        start, writer, streams = time.monotonic(), None, 0
        for i, loc in enumerate(ids(count)):
            await asyncio.sleep(max(0.0, start + i / fps - time.monotonic()))
            if loc.object == 0:
                if writer is not None:
                    writer.finish()
                writer = session.open_subgroup(subgroup_header_for(alias, loc.group, 0, 0, publisher_priority=0x80,
                                                                   version=version))
                streams += 1
            writer.write(Object(loc.group, 0, loc.object, 0x80, payload=synthetic_payload(loc.group, loc.object, size)))
        writer.finish()
        session.send(m.PublishDone(ok.request_id, m.PublishDoneCode.TRACK_ENDED, streams))
        await until(lambda: not session.transport.backlog() or client.closed, "our last objects acknowledged")
    return count


@VERSIONS
def test_tracks_a_publisher_announces_with_publish_are_learnt(tmp_path, version):
    """The relay's part of issue 10 with no one subscribing by name: a publisher announces
    live/cam video with PUBLISH before the watcher subscribes to `live`, another announces
    live/mic audio after; the watcher gets a PUBLISH for each (video's naming the relay's
    largest location) and every object from its PUBLISH_OK on, then PUBLISH_DONE."""
    video, audio = (CAM, b"video"), (MIC, b"audio")
    n_video, n_audio = 450, 150

    async def main():
        async with relay_server(tmp_path) as (relay, url), watching(url, version, relay) as (watcher, points):
            tasks = [asyncio.create_task(push(url, version, *video, alias=7, count=n_video))]
            try:
                await relayed(relay, video, GOP)
                await watcher.subscribe_namespace(PREFIX)
                (v,) = await watcher.offered(video)
                tasks.append(asyncio.create_task(push(url, version, *audio, alias=7, count=n_audio)))
                (a,) = await watcher.offered(audio)
                sent_video, sent_audio = await asyncio.gather(*tasks)
                await complete(watcher, v, sent_video, points)
                await complete(watcher, a, sent_audio, points)
                return watcher, points, v, a
            finally:
                await settle(*tasks)

    watcher, points, v, a = asyncio.run(main())
    assert v.publish.params.largest_object is not None
    check_delivery(v, n_video, points[video])
    check_delivery(a, n_audio, points[audio])
    assert not watcher.unexpected and watcher.closed is None


# ---- a subgroup of an older group that reaches the relay after a newer group began ----------

@VERSIONS
def test_a_subgroup_of_an_older_group_arriving_after_a_newer_group_is_forwarded(tmp_path, version):
    """QUIC does not order streams: under load a publisher's streams reach the relay out of
    order (aioquic shares a congested connection between its open streams). Here, on purpose:
    group 0's keyframe (subgroup 0), then group 1's (subgroup 0), then group 0's next object on
    its own stream (subgroup 1, the way fastrelay's publisher sends dependent frames), each
    once the relay has the previous one. Nobody is congested (a few bytes in flight), so both
    the namespace subscriber and an ordinary subscriber must get all three objects.

    Relay._admit used to drop any (group, subgroup) not started for a subscriber once a newer
    group had, whatever the backlog, leaving group 0 with a hole: on a loaded machine, where
    publishers' streams arrive out of order, keyframes were lost that way."""
    track = (CAM, b"video")
    order = [(0, 0, 0), (1, 0, 0), (0, 1, 1)]  # (group, subgroup, object), in the order sent

    async def main():
        async with relay_server(tmp_path) as (relay, url), watching(url, version, relay) as (watcher, points), \
                MoqtClient(url, version) as publisher, MoqtClient(url, version) as ordinary:
            await watcher.subscribe_namespace(PREFIX)
            ok = await publisher.request(lambda rid: m.Publish(rid, *track, 7))
            assert isinstance(ok, m.PublishOk), ok
            (offer,) = await watcher.offered(track)
            await until(lambda: track in points, "the relay handling the watcher's PUBLISH_OK")
            reply = await ordinary.request(lambda rid: m.Subscribe(rid, *track, MessageParams(forward=True)))
            assert isinstance(reply, m.SubscribeOk), reply
            got: list[Location] = []
            ended: list[m.PublishDone] = []

            async def collect() -> None:  # the ordinary subscriber's objects and PUBLISH_DONE
                while True:
                    ev = await ordinary.events.get()
                    if isinstance(ev, ObjectReceived) and ev.track_alias == reply.track_alias:
                        got.append(Location(ev.object.group_id, ev.object.object_id))
                    elif isinstance(ev, MessageReceived) and isinstance(ev.message, m.PublishDone):
                        ended.append(ev.message)

            collector = asyncio.create_task(collect())
            try:
                writers = {}
                for n, (group, subgroup, obj) in enumerate(order, 1):
                    writer = writers.get((group, subgroup))
                    if writer is None:
                        writer = writers[(group, subgroup)] = publisher.session.open_subgroup(
                            subgroup_header_for(7, group, subgroup, obj, publisher_priority=0x80, version=version))
                    writer.write(Object(group, subgroup, obj, 0x80, payload=synthetic_payload(group, obj, 500)))
                    await relayed(relay, track, n)
                for writer in writers.values():
                    writer.finish()
                publisher.session.send(m.PublishDone(ok.request_id, m.PublishDoneCode.TRACK_ENDED, len(writers)))
                # both subscriptions ended, and everything the relay sent them has arrived
                await until(lambda: offer.done is not None and ended
                            and len(offer.objects) + len(got) == relay.stats.objects_out,
                            lambda: f"PUBLISH_DONE and the objects the relay sent ({relay.stats.objects_out}): "
                                    f"watcher {offer.received}, ordinary {got}, done {offer.done} {ended}")
                return offer, got, relay.stats.dropped_objects
            finally:
                await settle(collector)

    offer, got, dropped = asyncio.run(main())
    expected = {Location(g, o) for g, _, o in order}
    assert offer.received == expected and all(ok for _, ok in offer.objects), \
        f"namespace subscriber got {sorted(offer.received)}; the relay dropped {dropped} objects"
    assert sorted(got) == sorted(expected), f"ordinary subscriber got {got}; the relay dropped {dropped} objects"
