"""Publisher -> relay -> subscribers over real QUIC (aioquic) on loopback."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from moqtools import NS, TRACK, announced, relay_server, synthetic

from fastrelay.endpoints.endpoint import MoqtClient
from fastrelay.endpoints.publisher import publish
from fastrelay.endpoints.subscriber import subscribe
from fastrelay.media.h264 import H264Source, verify_synthetic_payload
from fastrelay.moq import messages as m
from fastrelay.moq.params import Version
from fastrelay.moq.session import Closed
from fastrelay.moq.wire import ErrorCode


@pytest.mark.parametrize("version", [Version.DRAFT_16, Version.DRAFT_14], ids=["draft16", "draft14"])
def test_every_object_reaches_every_subscriber_byte_exact(tmp_path, version):
    async def main():
        async with relay_server(tmp_path) as (relay, url):
            pub = asyncio.create_task(publish(url, NS, TRACK, synthetic(600), version=version, wait_subscriber=5))
            await asyncio.wait_for(announced(relay), 5)
            subs = [asyncio.create_task(subscribe(url, NS, TRACK, version=version, codec="raw", duration=15,
                                                  verify=verify_synthetic_payload)) for _ in range(3)]
            sent = await pub
            results = [await s for s in subs]
            return sent, results, relay

    sent, results, relay = asyncio.run(main())
    for r in results:
        assert (r.bad, r.duplicates, r.gaps) == (0, 0, 0)
        assert r.ended.startswith("publish_done")
    # subscribers that joined after the first objects got the latest group from the cache, then live
    assert max(r.objects for r in results) == sent.objects == 600
    assert all(r.objects >= 600 - 30 for r in results)
    assert relay.stats.objects_in == 600


def test_h264_through_the_relay_decodes(tmp_path):
    out = tmp_path / "out.h264"

    async def main():
        async with relay_server(tmp_path) as (relay, url):
            source = H264Source(pattern="testsrc", width=320, height=240, fps=30, gop=15, duration=2, realtime=True)
            pub = asyncio.create_task(publish(url, NS, TRACK, source, wait_subscriber=5))
            await asyncio.wait_for(announced(relay), 5)
            sub = asyncio.create_task(subscribe(url, NS, TRACK, out=str(out), duration=15))
            return await pub, await sub

    sent, got = asyncio.run(main())
    assert got.objects == sent.objects and got.written == sent.objects and got.gaps == 0
    assert len(got.latencies_ms) == got.objects and 0 < got.summary()["latency_p50_ms"] < 1000
    probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                            "stream=nb_read_frames,width,height", "-of", "csv=p=0", str(out)],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == f"320,240,{sent.objects}" and not probe.stderr.strip()


def test_late_joiner_starts_at_the_latest_group_from_the_cache(tmp_path):
    async def main():
        async with relay_server(tmp_path) as (relay, url):
            pub = asyncio.create_task(publish(url, NS, TRACK, synthetic(300, fps=150), wait_subscriber=5))
            await asyncio.wait_for(announced(relay), 5)
            early = asyncio.create_task(subscribe(url, NS, TRACK, codec="raw", duration=15))
            await asyncio.sleep(1.0)  # about 5 groups in
            late = asyncio.create_task(subscribe(url, NS, TRACK, codec="raw", duration=15,
                                                 verify=verify_synthetic_payload))
            await pub
            return await early, await late, relay

    early, late, relay = asyncio.run(main())
    assert relay.stats.cache_hits > 0
    assert late.duplicates == 0 and late.bad == 0 and late.gaps == 0
    assert 0 < late.objects < early.objects
    assert late.objects % 30 == 0  # it started at a group boundary: whole groups, no gap


def test_a_subscriber_vanishing_mid_group_and_a_malformed_one_leave_the_others_streaming(tmp_path):
    async def main():
        async with relay_server(tmp_path) as (relay, url):
            pub = asyncio.create_task(publish(url, NS, TRACK, synthetic(450, fps=150), wait_subscriber=5))
            await asyncio.wait_for(announced(relay), 5)
            steady = asyncio.create_task(subscribe(url, NS, TRACK, codec="raw", duration=15,
                                                   verify=verify_synthetic_payload))
            await asyncio.sleep(0.2)
            async with MoqtClient(url) as quitter:  # subscribes, then its connection goes mid-group
                await quitter.request(lambda rid: m.Subscribe(rid, NS, TRACK))
                await asyncio.sleep(0.5)
            async with MoqtClient(url) as bad:  # a malformed control message: only its session closes
                bad.link.send(bad.session.control_stream, b"\x3f\x00\x05hello")
                ev = await asyncio.wait_for(_closed(bad), 5)
            await pub
            return await steady, ev, relay

    steady, closed, relay = asyncio.run(main())
    assert closed.code == ErrorCode.PROTOCOL_VIOLATION
    assert steady.objects == 450 and steady.bad == 0 and steady.duplicates == 0
    assert not relay.tracks  # the track ended with its publisher


async def _closed(client: MoqtClient) -> Closed:
    while True:
        ev = await client.events.get()
        if isinstance(ev, Closed):
            return ev


def test_publisher_loss_sends_publish_done_to_every_subscriber(tmp_path):
    async def main():
        async with relay_server(tmp_path) as (relay, url):
            async with MoqtClient(url) as publisher:
                ok = await publisher.request(lambda rid: m.PublishNamespace(rid, NS))
                assert isinstance(ok, m.RequestOk)
                subs = [asyncio.create_task(subscribe(url, NS, TRACK, codec="raw", duration=10)) for _ in range(2)]
                for _ in range(2):  # answer the relay's (single) upstream SUBSCRIBE
                    ev = await asyncio.wait_for(publisher.events.get(), 5)
                    if isinstance(getattr(ev, "message", None), m.Subscribe):
                        publisher.session.send(m.SubscribeOk(ev.message.request_id, 9))
                        break
                await asyncio.sleep(0.3)
                publisher.link.close(0, "")  # the publisher's connection just goes
            return [await s for s in subs]

    results = asyncio.run(main())
    assert [r.ended for r in results] == [f"publish_done({m.PublishDoneCode.GOING_AWAY})"] * 2
