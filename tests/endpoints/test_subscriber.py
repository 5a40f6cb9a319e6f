"""Subscriber: loss accounting and reordering (pure logic), and its counters over real QUIC."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
from dataclasses import replace

import pytest
from moqtools import NS, TRACK, announced, free_port, relay_process, relay_server

from fastrelay.endpoints.endpoint import serve_relay
from fastrelay.endpoints.publisher import publish
from fastrelay.endpoints.subscriber import LossLedger, _Reorder, subscribe
from fastrelay.media.h264 import Frame, H264Source, SyntheticSource, verify_synthetic_payload
from fastrelay.moq import messages as m
from fastrelay.moq.params import FilterType, SubscriptionFilter, Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import MessageReceived
from fastrelay.quic.tls import self_signed

from .test_endpoint_errors import FR

GOP, STEP = 30, 33_333  # objects per group, frame interval (us)


def stamp(group: int, obj: int) -> int:
    return 1_700_000_000_000_000 + (group * GOP + obj) * STEP


def feed(ledger: LossLedger, group: int, ids, stamps: bool = True) -> None:
    for o in ids:
        ledger.add(group, o, stamp(group, o) if stamps else None)


def test_nothing_lost_when_every_object_arrives_even_out_of_order_across_streams():
    ledger = LossLedger()
    for g in range(6):  # the next keyframe (subgroup 0) overtakes the end of the group (subgroup 1)
        feed(ledger, g, [0])
        if g:
            feed(ledger, g - 1, range(1, GOP))
    feed(ledger, 5, range(1, GOP))
    ledger.finish()
    assert ledger.lost == 0


def test_ids_skipped_inside_a_group_are_lost():
    ledger = LossLedger()
    feed(ledger, 0, [0, 1, 4, 5, GOP - 1])
    for g in (1, 2):
        feed(ledger, g, range(GOP))
    ledger.finish()
    assert ledger.lost == GOP - 5  # 2, 3, 6 ... GOP - 2


def test_the_end_of_a_group_the_relay_cut_short_is_lost_as_the_timestamps_say():
    ledger = LossLedger()
    feed(ledger, 0, range(GOP))
    feed(ledger, 1, range(4))  # the relay reset the rest of group 1 (a slow subscriber)
    for g in (2, 3):
        feed(ledger, g, range(GOP))
    assert ledger.lost == GOP - 4  # settled already: group 3 began
    ledger.finish()
    assert ledger.lost == GOP - 4


def test_groups_skipped_whole_are_lost():
    ledger = LossLedger()
    feed(ledger, 0, range(7))  # and the next group received is 3
    for g in (3, 4):
        feed(ledger, g, range(GOP))
    ledger.finish()
    assert ledger.lost == (GOP - 7) + 2 * GOP


def test_a_publisher_stall_and_its_catch_up_burst_are_not_loss():
    ledger = LossLedger()
    feed(ledger, 0, range(GOP))
    for o in range(GOP):  # frames 0-3 of group 1 come out together, 3 intervals late for frame 0
        ledger.add(1, o, max(stamp(1, o), stamp(1, 3)))
    feed(ledger, 2, range(GOP))
    ledger.finish()
    assert ledger.lost == 0


def test_jittery_wall_clock_timestamps_still_count_the_skipped_objects():
    import random

    rnd = random.Random(7)
    ledger = LossLedger()
    received = 0
    for g in range(12):
        ids = range(GOP) if g % 3 else range(3)  # every third group loses all but 3 objects
        for o in ids:
            ledger.add(g, o, stamp(g, o) + rnd.randint(-STEP // 6, STEP // 6))  # +-5.5 ms at 30/s
            received += 1
    ledger.finish()
    assert ledger.lost == 12 * GOP - received == 4 * (GOP - 3)


def test_what_precedes_the_first_group_start_is_not_lost_nor_what_follows_the_last_object():
    ledger = LossLedger()
    feed(ledger, 4, range(6, GOP))  # joined mid-group 4
    feed(ledger, 5, range(GOP))
    feed(ledger, 6, range(3))  # the run ended here
    ledger.finish()
    assert ledger.lost == 0


def test_without_timestamps_only_ids_count():
    ledger = LossLedger()
    feed(ledger, 0, [0, 2], stamps=False)  # its end and groups 1, 2 and 4 are not known
    feed(ledger, 3, range(GOP), stamps=False)
    feed(ledger, 5, range(GOP), stamps=False)
    ledger.finish()
    assert ledger.lost == 1


def test_objects_of_a_settled_group_arriving_late_are_taken_off_the_count():
    ledger = LossLedger()
    feed(ledger, 0, range(5))
    feed(ledger, 1, range(GOP))
    feed(ledger, 2, [0])
    assert ledger.lost == GOP - 5  # group 0 settled: its end looks lost
    feed(ledger, 0, range(5, 8))  # then comes, on a lower-priority stream
    ledger.finish()
    assert ledger.lost == GOP - 8


def test_a_group_taken_for_skipped_that_arrives_late_is_taken_off_the_count():
    ledger = LossLedger()
    feed(ledger, 0, range(GOP))
    feed(ledger, 2, range(GOP))
    feed(ledger, 3, [0])
    assert ledger.lost == GOP  # group 1 looks skipped whole
    feed(ledger, 1, range(GOP - 1))
    ledger.finish()
    assert ledger.lost == 1


def test_reorder_writes_in_order_and_skips_a_stuck_group_at_the_next_keyframe():
    out: list[tuple[int, int]] = []
    r = _Reorder(lambda f: out.append(f))
    for key in [(0, 0), (0, 2), (0, 1), (1, 0), (1, 1), (2, 1), (3, 0), (4, 0), (5, 0)]:
        r.add(*key, key)
    r.flush()
    assert out[:5] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert (2, 1) not in out and out[-3:] == [(3, 0), (4, 0), (5, 0)]
    assert r.gaps == 1


class _MediaTimeSource(SyntheticSource):
    """Paced like a live source, but stamped with media time (exact timestamps)."""

    def _make(self, index: int) -> list:
        return [replace(ev, pts_us=round(index * 1e6 / self.fps), wallclock=False) if isinstance(ev, Frame) else ev
                for ev in super()._make(index)]


def test_over_quic_nothing_lost_and_a_slow_subscriber_counts_what_the_relay_skipped(tmp_path):
    """Live delivery loses nothing; a rate far beyond what the subscriber's connection takes in makes
    the relay skip groups and reset streams, and the subscriber counts what it did not get."""
    cert, key = self_signed(["127.0.0.1"])
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)

    async def run(relay: Relay, source: SyntheticSource):
        port = free_port()
        server = await serve_relay(relay, "127.0.0.1", port, str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
        url = f"moqt://127.0.0.1:{port}"
        try:
            pub = asyncio.create_task(publish(url, NS, TRACK, source, wait_subscriber=5))
            await asyncio.wait_for(announced(relay), 5)
            sub = asyncio.create_task(subscribe(url, NS, TRACK, codec="raw", duration=15,
                                                verify=verify_synthetic_payload))
            return await pub, await sub
        finally:
            server.close()

    sent, got = asyncio.run(run(Relay(), SyntheticSource(object_size=900, fps=300, gop=30, count=300,
                                                         realtime=True)))
    assert got.objects == sent.objects == 300 and (got.lost, got.gaps, got.bad) == (0, 0, 0)

    slow = Relay(max_backlog=20_000)
    sent, got = asyncio.run(run(slow, _MediaTimeSource(object_size=8000, fps=2000, gop=30, count=2000,
                                                       realtime=True)))
    assert slow.stats.dropped_objects > 0 and got.bad == 0 and got.duplicates == 0
    missing = sent.objects - got.objects
    assert missing - 30 < got.lost <= missing  # all but what followed the last object received
    assert got.summary()["lost"] == got.lost


def test_goaway_ends_the_subscription_with_a_decodable_file(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastrelay.subscribe")
    out = tmp_path / "out.h264"

    async def main():
        async with relay_server(tmp_path) as (relay, url):
            source = H264Source(pattern="testsrc", width=320, height=240, fps=30, gop=15, duration=20, realtime=True)
            pub = asyncio.create_task(publish(url, NS, TRACK, source, wait_subscriber=5))
            await asyncio.wait_for(announced(relay), 5)
            sub = asyncio.create_task(subscribe(url, NS, TRACK, out=str(out), duration=30))
            await asyncio.sleep(1.5)
            relay.goaway()
            t0 = time.monotonic()
            got = await asyncio.wait_for(sub, 5)
            ended_in = time.monotonic() - t0
            await asyncio.wait_for(pub, 5)
            return got, ended_in

    got, ended_in = asyncio.run(main())
    assert got.ended == "goaway" and ended_in < 1.0 and got.objects > 15
    probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                            "stream=nb_read_frames", "-of", "csv=p=0", str(out)], capture_output=True, text=True)
    assert probe.returncode == 0 and not probe.stderr.strip() and probe.stdout.strip() == str(got.written)
    lines = [r.getMessage() for r in caplog.records if "GOAWAY" in r.getMessage()]
    assert lines == [f"relay sent GOAWAY: ending the subscription after {got.objects} objects"]


@pytest.mark.parametrize("version", [Version.DRAFT_16, Version.DRAFT_14], ids=["draft16", "draft14"])
def test_a_late_joiner_subscribes_from_the_largest_object_before_its_joining_fetch(tmp_path, version):
    """Drafts 14 and 16 allow a joining FETCH only for a SUBSCRIBE with filter Largest Object."""
    async def main():
        async with relay_server(tmp_path) as (relay, url):
            seen: list[m.Message] = []
            on_event = relay.on_event

            def spy(peer, ev):
                if isinstance(ev, MessageReceived) and isinstance(ev.message, m.Subscribe | m.Fetch):
                    seen.append(ev.message)
                on_event(peer, ev)

            relay.on_event = spy
            pub = asyncio.create_task(publish(url, NS, TRACK, SyntheticSource(object_size=500, fps=150, gop=30,
                                                                              count=300, realtime=True),
                                              version=version, wait_subscriber=5))
            await asyncio.wait_for(announced(relay), 5)
            first = asyncio.create_task(subscribe(url, NS, TRACK, version=version, codec="raw", duration=15))
            await asyncio.sleep(0.7)  # mid-group
            late = await subscribe(url, NS, TRACK, version=version, codec="raw", duration=15)
            await pub
            return seen, late, await first

    seen, late, first = asyncio.run(main())
    fetches = [msg for msg in seen if isinstance(msg, m.Fetch)]
    assert [f.fetch_type for f in fetches] == [m.FetchType.RELATIVE_JOINING]
    joined = next(msg for msg in seen
                  if isinstance(msg, m.Subscribe) and msg.request_id == fetches[0].joining_request_id)
    assert joined.params.subscription_filter == SubscriptionFilter(FilterType.LARGEST_OBJECT)
    assert late.ended.startswith("publish_done") and late.objects % 30 == 0 and late.bad == 0 and late.lost == 0
    assert first.objects == 300


class _CutSource(SyntheticSource):
    """Synthetic objects, every tenth cut short: to 20 bytes (inside its header) or to half its size."""

    def _make(self, index: int) -> list:
        events = super()._make(index)
        if index % 10 == 5:
            frame = events[-1]
            events[-1] = replace(frame, data=frame.data[:20 if index % 20 == 5 else len(frame.data) // 2])
        return events


def test_synthetic_payloads_are_verified_without_being_asked_and_cut_ones_are_bad(tmp_path):
    async def main(source):
        async with relay_server(tmp_path) as (relay, url):
            pub = asyncio.create_task(publish(url, NS, TRACK, source, wait_subscriber=5))
            await asyncio.wait_for(announced(relay), 5)
            got = await subscribe(url, NS, TRACK, codec="raw", duration=15)
            return await pub, got

    sent, got = asyncio.run(main(SyntheticSource(object_size=900, fps=300, gop=30, count=200, realtime=True)))
    assert got.objects == sent.objects == 200 and (got.verified, got.bad, got.lost) == (200, 0, 0)
    assert got.summary()["verified"] == 200 and got.summary()["bad"] == 0
    sent, got = asyncio.run(main(_CutSource(object_size=900, fps=300, gop=30, count=200, realtime=True)))
    assert got.objects == 200 and (got.verified, got.bad) == (180, 20)


def test_fastrelay_subscribe_reports_verified_and_bad_of_fastrelay_publish(tmp_path):
    """The commands as interop tests run them: the summary says every object was verified."""
    with relay_process(tmp_path) as (_, url):
        relay_log = tmp_path / f"relay-{url.rsplit(':', 1)[1]}.log"
        pub = subprocess.Popen([*FR, "publish", url, "-N", "live/cam", "-T", "video", "--source", "synthetic",
                                "--fps", "100", "--gop", "20", "--duration", "2", "--object-size", "700",
                                "--wait", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while "publishes namespace" not in relay_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        sub = subprocess.run([*FR, "subscribe", url, "-N", "live/cam", "-T", "video", "--raw", "--duration", "20"],
                             capture_output=True, text=True, timeout=60)
        out, err = pub.communicate(timeout=60)
    assert pub.returncode == 0, err
    sent, summary = json.loads(out.splitlines()[-1]), json.loads(sub.stdout.splitlines()[-1])
    assert summary["objects"] == summary["verified"] == sent["objects"] == 200, sub.stderr
    assert (summary["bad"], summary["lost"]) == (0, 0)
