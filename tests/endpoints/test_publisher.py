"""Publisher over real QUIC (aioquic, loopback): how it ends, and how it announces its track."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from moqtools import NS, TRACK, announced, relay_server

from fastrelay.endpoints.endpoint import MoqtClient
from fastrelay.endpoints.publisher import publish
from fastrelay.media.h264 import SyntheticSource
from fastrelay.moq import messages as m
from fastrelay.moq.params import MessageParams
from fastrelay.moq.relay import Relay


async def _publish_done(client: MoqtClient) -> m.PublishDone:
    while True:
        ev = await client.events.get()
        if isinstance(getattr(ev, "message", None), m.PublishDone):
            return ev.message


def test_goaway_stops_publishing_with_publish_done_and_a_normal_close(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastrelay.publish")
    source = SyntheticSource(object_size=500, fps=100, gop=10, count=3000, realtime=True)  # 30 s worth

    async def main():
        async with relay_server(tmp_path) as (relay, url):
            pub = asyncio.create_task(publish(url, NS, TRACK, source, wait_subscriber=5))
            await asyncio.wait_for(announced(relay), 5)
            async with MoqtClient(url) as watcher:  # a subscriber that stays after GOAWAY
                ok = await watcher.request(lambda rid: m.Subscribe(rid, NS, TRACK))
                assert isinstance(ok, m.SubscribeOk)
                await asyncio.sleep(0.5)
                relay.goaway("moqt://127.0.0.1:1/elsewhere")
                t0 = time.monotonic()
                sent = await asyncio.wait_for(pub, 5)
                stopped_in = time.monotonic() - t0
                done = await asyncio.wait_for(_publish_done(watcher), 5)
                await asyncio.sleep(0.1)
                publishers_left = [p for p in relay.peers.values() if p.namespaces]
            return sent, stopped_in, done, publishers_left, relay

    sent, stopped_in, done, publishers_left, relay = asyncio.run(main())
    assert sent.ended == "goaway" and 0 < sent.objects < 3000 and stopped_in < 1.0
    # the publisher's own PUBLISH_DONE reached the subscriber (not the one the relay makes up
    # when a publisher's connection just goes: that one has a reason)
    assert done.status_code == m.PublishDoneCode.GOING_AWAY and done.error_reason == ""
    assert relay.stats.objects_in == sent.objects
    assert publishers_left == [] and not relay.tracks  # its session closed, the track ended
    lines = [r.getMessage() for r in caplog.records if r.name == "fastrelay.publish" and "GOAWAY" in r.message]
    assert lines == ["relay sent GOAWAY (new session URI moqt://127.0.0.1:1/elsewhere): stopping, PUBLISH_DONE "
                     "and close"]


async def _publish_to_one_subscriber(tmp_path, relay: Relay | None = None, **options):
    """100 synthetic objects (10 groups) published through a relay to one subscriber by name:
    (the publisher's result, the PUBLISH_DONE the subscriber got)."""
    async with relay_server(tmp_path, relay) as (relay, url):
        source = SyntheticSource(object_size=500, fps=200, gop=10, count=100, realtime=True)
        pub = asyncio.create_task(publish(url, NS, TRACK, source, wait_subscriber=5, **options))
        await asyncio.wait_for(announced(relay), 5)
        async with MoqtClient(url) as watcher:
            assert isinstance(await watcher.request(lambda rid: m.Subscribe(rid, NS, TRACK)), m.SubscribeOk)
            done = await asyncio.wait_for(_publish_done(watcher), 10)
            return await pub, done


def test_a_source_that_ends_sends_publish_done_track_ended(tmp_path):
    sent, done = asyncio.run(_publish_to_one_subscriber(tmp_path))
    assert sent.ended == "source ended" and sent.objects == 100
    assert done.status_code == m.PublishDoneCode.TRACK_ENDED and done.stream_count == 20  # 2 subgroups x 10 groups


# ---- announce="publish": PUBLISH after PUBLISH_NAMESPACE ------------------------------------

class RefusingRelay(Relay):
    """Like moq-dev's relay: PUBLISH is refused (NOT_SUPPORTED), SUBSCRIBE goes to the publisher."""

    def _on_Publish(self, peer, msg: m.Publish) -> None:
        peer.session.send(m.RequestError(msg.request_id, m.RequestErrorCode.NOT_SUPPORTED, 0,
                                         "PUBLISH is not supported", m.RequestKind.PUBLISH))


class ParkingRelay(Relay):
    """Changes the Forward State of the publisher's PUBLISH with REQUEST_UPDATE (draft-16), as
    aiomoqt's relay does (it answers PUBLISH_OK with Forward 0 until someone subscribes)."""

    publisher: tuple = ()

    def _on_Publish(self, peer, msg: m.Publish) -> None:
        super()._on_Publish(peer, msg)  # PUBLISH_OK, Forward 1
        self.publisher = (peer, msg.request_id)

    def set_forward(self, forward: bool) -> None:
        peer, rid = self.publisher
        peer.session.send(m.RequestUpdate(peer.session.next_request_id(), rid, MessageParams(forward=forward)))


def test_publish_mode_makes_the_track_live_without_a_subscribe(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastrelay.publish")

    async def main():
        async with relay_server(tmp_path) as (relay, url):
            source = SyntheticSource(object_size=500, fps=200, gop=10, count=100, realtime=True)
            pub = asyncio.create_task(publish(url, NS, TRACK, source, wait_subscriber=5, announce="publish"))
            while not relay.tracks:  # the PUBLISH made it known, nobody subscribed
                await asyncio.sleep(0.01)
            async with MoqtClient(url) as watcher:
                assert isinstance(await watcher.request(lambda rid: m.Subscribe(rid, NS, TRACK)), m.SubscribeOk)
                done = await asyncio.wait_for(_publish_done(watcher), 10)
                return await pub, done

    sent, done = asyncio.run(main())
    assert sent.published == "accepted" and sent.ended == "source ended" and sent.objects == 100
    assert done.status_code == m.PublishDoneCode.TRACK_ENDED
    lines = [r.getMessage() for r in caplog.records if r.name == "fastrelay.publish"]
    assert not any("subscribed by the relay" in line for line in lines), lines


def test_a_refused_publish_falls_back_to_the_relays_subscribe(tmp_path):
    sent, done = asyncio.run(_publish_to_one_subscriber(tmp_path, RefusingRelay(cache_groups=4), announce="publish"))
    assert sent.published == "refused" and sent.subscribed and sent.objects == 100
    assert done.status_code == m.PublishDoneCode.TRACK_ENDED and done.stream_count == 20


def test_objects_follow_the_relays_forward_state(tmp_path):
    async def main():
        relay = ParkingRelay(cache_groups=4)
        async with relay_server(tmp_path, relay) as (relay, url):
            source = SyntheticSource(object_size=500, fps=200, gop=10, count=400, realtime=True)
            pub = asyncio.create_task(publish(url, NS, TRACK, source, announce="publish"))
            while not relay.publisher:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            running = relay.stats.objects_in
            assert running > 0  # PUBLISH_OK said Forward 1
            relay.set_forward(False)
            await asyncio.sleep(0.2)  # what was in flight arrives
            paused = relay.stats.objects_in
            await asyncio.sleep(0.4)
            assert relay.stats.objects_in == paused  # nothing while Forward is 0
            relay.set_forward(True)
            await asyncio.sleep(0.3)
            assert relay.stats.objects_in > paused
            return await asyncio.wait_for(pub, 10), relay

    sent, relay = asyncio.run(main())
    assert sent.published == "accepted" and 0 < sent.objects < 400
    assert relay.stats.objects_in == sent.objects


def test_announce_must_be_publish_or_namespace():
    source = SyntheticSource(object_size=500, fps=200, gop=10, count=1)
    with pytest.raises(ValueError, match="announce"):
        asyncio.run(publish("moqt://127.0.0.1:1", NS, TRACK, source, announce="track"))
