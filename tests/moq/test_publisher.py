"""Publisher over real QUIC (aioquic, loopback): how it ends."""

from __future__ import annotations

import asyncio
import logging
import time

from fastrelay.media.h264 import SyntheticSource
from fastrelay.moq import messages as m
from fastrelay.moq.endpoint import MoqtClient
from fastrelay.moq.publisher import publish

from .test_quic_e2e import NS, TRACK, announced, relay_server


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


def test_a_source_that_ends_sends_publish_done_track_ended(tmp_path):
    async def main():
        async with relay_server(tmp_path) as (relay, url):
            source = SyntheticSource(object_size=500, fps=200, gop=10, count=100, realtime=True)
            pub = asyncio.create_task(publish(url, NS, TRACK, source, wait_subscriber=5))
            await asyncio.wait_for(announced(relay), 5)
            async with MoqtClient(url) as watcher:
                assert isinstance(await watcher.request(lambda rid: m.Subscribe(rid, NS, TRACK)), m.SubscribeOk)
                done = await asyncio.wait_for(_publish_done(watcher), 10)
                return await pub, done

    sent, done = asyncio.run(main())
    assert sent.ended == "source ended" and sent.objects == 100
    assert done.status_code == m.PublishDoneCode.TRACK_ENDED and done.stream_count == 20  # 2 subgroups x 10 groups
