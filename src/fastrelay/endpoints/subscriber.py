"""`fastrelay subscribe`: subscribe to one track, rebuild the media, measure latency.

Objects of one group arrive on two subgroup streams (keyframe, dependent frames), so they
are put back in (group, object) order before being written; a group that cannot be
completed is skipped at the next keyframe and counted as a gap. Objects that never arrived
are counted as lost (:class:`LossLedger`). End-to-end latency is the subscriber's wall
clock minus the publisher's send-time extension (same host or synced clocks).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..media import loc
from ..media.h264 import is_synthetic_payload, verify_synthetic_payload
from ..media.writer import AnnexBWriter
from ..moq import messages as m
from ..moq.data import FetchHeader
from ..moq.params import FilterType, MessageParams, SubscriptionFilter, Version
from ..moq.session import Closed, GoawayReceived, MessageReceived, ObjectReceived, StreamEnded
from .endpoint import CONNECT_TIMEOUT_S, MoqtClient

log = logging.getLogger("fastrelay.subscribe")

DONE_GRACE_S = 2.0  # after PUBLISH_DONE, how long to wait for streams still in flight
REORDER_GROUPS = 2  # groups held back waiting for a missing object before skipping ahead
SETTLE_GROUPS = 2  # a group's losses are counted once a group this much newer has begun
INTERVAL_GROUPS = 15  # recent groups whose timestamps give the frame interval
SLOPE_POINTS = 40  # objects per group used for its interval
KEEP_SETTLED = 256  # settled groups whose late objects still correct the loss count


@dataclass
class SubscribeResult:
    objects: int = 0
    bytes: int = 0
    written: int = 0
    gaps: int = 0
    lost: int = 0  # objects known to be missing (LossLedger)
    duplicates: int = 0
    verified: int = 0  # payloads that passed verification
    bad: int = 0  # payloads that failed verification
    first_group: int | None = None
    last_group: int | None = None
    latencies_ms: list[float] = field(default_factory=list)
    ended: str = ""

    def summary(self) -> dict[str, object]:
        lat = sorted(self.latencies_ms)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

        return {"objects": self.objects, "bytes": self.bytes, "frames_written": self.written, "gaps": self.gaps,
                "lost": self.lost, "duplicates": self.duplicates, "verified": self.verified, "bad": self.bad,
                "first_group": self.first_group, "last_group": self.last_group,
                "latency_p50_ms": pct(0.5), "latency_p99_ms": pct(0.99),
                "latency_mean_ms": round(statistics.fmean(lat), 3) if lat else None, "ended": self.ended}


@dataclass
class _GroupSeen:
    stamps: dict[int, int | None] = field(default_factory=dict)  # object id -> LOC timestamp (us)

    def interval(self) -> tuple[float, int] | None:
        """(timestamp step per object id, ids it spans): the median slope over pairs of stamped
        objects (Theil-Sen: precise over the group, robust to a late burst); None below two."""
        known = sorted((o, s) for o, s in self.stamps.items() if s is not None)
        known = known[:: max(1, -(-len(known) // SLOPE_POINTS))]  # a subsample bounds the pairs
        slopes = [(s2 - s1) / (o2 - o1) for (o1, s1), (o2, s2) in itertools.combinations(known, 2)]
        return (statistics.median(slopes), known[-1][0] - known[0][0]) if slopes else None

    def start(self, interval: float) -> float | None:
        """Where the group begins, in frame intervals: the median over its objects of
        timestamp / interval - object id (robust to jitter and to a late burst)."""
        starts = [s / interval - o for o, s in self.stamps.items() if s is not None]
        return statistics.median(starts) if starts else None


@dataclass
class _Settled:
    """Groups settled together (one received group and those skipped whole after it)."""

    lost: int  # objects counted lost in them that have not arrived since
    ids: dict[int, set[int]]  # group -> object ids received


class LossLedger:
    """Counts objects known to be missing, from the object ids and LOC timestamps received.

    Inside a group, every id below the highest one received that never arrived is lost. The
    end of a group (a stream the relay reset, or never opened, for a slow subscriber) and
    groups skipped whole are counted from the timestamps: the frame interval (per group the
    Theil-Sen slope of timestamp over object id, then a median over recent groups) places
    each group's start on the frame schedule; the frames from one received group's start to
    the next one's, minus those received, were lost. Without timestamps only the ids count.
    Counting starts at the first group whose object 0 arrived (what precedes the subscription
    is not lost). A group is settled once a group SETTLE_GROUPS newer has begun, and
    `finish()` settles the rest (past the last object received nothing is known); an object
    counted lost that arrives late after all (another stream, lower priority) is taken off
    the count again.
    """

    def __init__(self) -> None:
        self.lost = 0
        self._groups: dict[int, _GroupSeen] = {}
        self._intervals: deque[tuple[float, int]] = deque(maxlen=INTERVAL_GROUPS)  # (step, ids spanned)
        self._settled: int | None = None  # newest settled group (its objects count as late)
        self._counted: dict[int, _Settled] = {}  # recent settled groups
        self._started = False

    def add(self, group: int, obj: int, stamp_us: int | None) -> None:
        """An object arrived (`stamp_us`: its LOC timestamp in microseconds, if any)."""
        if self._settled is not None and group <= self._settled:
            settled = self._counted.get(group)
            ids = settled.ids.setdefault(group, set()) if settled else set()
            if settled and settled.lost > 0 and obj not in ids:  # counted lost, came late after all
                ids.add(obj)
                settled.lost -= 1
                self.lost -= 1
            return
        self._groups.setdefault(group, _GroupSeen()).stamps[obj] = stamp_us
        newest = max(self._groups)
        for g in sorted(self._groups):
            if g > newest - SETTLE_GROUPS:
                break
            self._settle(g)

    def finish(self) -> None:
        """Settle every group (end of the run)."""
        for g in sorted(self._groups):
            self._settle(g)

    def _interval(self) -> float | None:
        """The frame interval: median of recent groups' steps (groups still open included), each
        weighted by the ids it spans (a group cut short says less)."""
        samples = [*self._intervals, *filter(None, (g.interval() for g in self._groups.values()))]
        total = sum(w for _, w in samples)
        for step, weight in sorted(samples):
            total -= 2 * weight
            if total <= 0:
                return step
        return None

    def _settle(self, group: int) -> None:
        seen = self._groups.pop(group)
        self._settled = group
        if (own := seen.interval()) is not None:
            self._intervals.append(own)
        if not self._started:
            if 0 not in seen.stamps:
                return  # joined mid-group
            self._started = True
        expected = max(seen.stamps) + 1
        following = min(self._groups) if self._groups else group + 1
        self._settled = following - 1  # and the groups skipped whole up to the next received one
        interval = self._interval()
        if self._groups and interval is not None and interval > 0:
            here, there = seen.start(interval), self._groups[following].start(interval)
            if here is not None and there is not None:
                expected = max(expected, round(there - here))  # this group and any skipped whole
        self.lost += expected - len(seen.stamps)
        settled = _Settled(expected - len(seen.stamps), {group: set(seen.stamps)})
        for g in range(group, min(following, group + KEEP_SETTLED)):
            self._counted[g] = settled
        while len(self._counted) > KEEP_SETTLED:
            del self._counted[min(self._counted)]


class _Reorder:
    """Puts frames back in (group, object) order; skips a stuck group at the next keyframe."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.buf: dict[tuple[int, int], loc.LocFrame] = {}
        self.next: tuple[int, int] | None = None
        self.gaps = 0

    def add(self, group: int, obj: int, frame: loc.LocFrame) -> None:
        if self.next is None:
            if obj != 0:
                return  # join at a group start
            self.next = (group, 0)
        if (group, obj) < self.next:
            return
        self.buf[(group, obj)] = frame
        self._drain()
        groups = {g for g, _ in self.buf}
        if len(groups) > REORDER_GROUPS:
            later = min(g for g in groups if g > self.next[0] and (g, 0) in self.buf) if any(
                g > self.next[0] and (g, 0) in self.buf for g in groups) else None
            if later is not None:
                self.gaps += 1
                self.buf = {k: v for k, v in self.buf.items() if k[0] >= later}
                self.next = (later, 0)
                self._drain()

    def _drain(self) -> None:
        while True:
            g, o = self.next
            if (g, o) in self.buf:
                self.sink(self.buf.pop((g, o)))
                self.next = (g, o + 1)
            elif (g + 1, 0) in self.buf and not any(k[0] == g for k in self.buf):
                self.next = (g + 1, 0)  # the group ended (no more of it buffered) and the next has begun
            else:
                return

    def flush(self) -> None:
        for key in sorted(self.buf):
            self.sink(self.buf.pop(key))


async def subscribe(url: str, namespace: tuple[bytes, ...], track: bytes, *, version: Version = Version.DRAFT_16,
                    out: str | None = None, duration: float | None = None, codec: str = "h264",
                    verify: Callable[[int, int, bytes], bool] | None = None,
                    progress: Callable[[dict[str, object]], None] | None = None,
                    plaintext: bool = False, verify_cert: bool = False, cafile: str | None = None,
                    connect_timeout: float = CONNECT_TIMEOUT_S) -> SubscribeResult:
    """Subscribe and receive until PUBLISH_DONE, GOAWAY, the session ends, or `duration` seconds pass.
    `verify(group, object, payload)` checks payloads; without it, a track whose objects are
    synthetic (`fastrelay publish --source synthetic`) is verified from its first such object
    on, every later object included. The relay's certificate is checked only with `verify_cert`
    or `cafile`; ConnectFailed if no session comes up (see MoqtClient)."""
    result = SubscribeResult()
    writer = AnnexBWriter(out) if out else None
    seen: set[tuple[int, int]] = set()

    def write(frame: loc.LocFrame) -> None:
        if writer is not None:
            writer.write(frame)
            result.written += 1

    reorder = _Reorder(write)
    ledger = LossLedger()
    async with MoqtClient(url, version, plaintext=plaintext, verify=verify_cert, cafile=cafile,
                          connect_timeout=connect_timeout) as client:
        # from the largest object on: the only filter a joining FETCH may follow (drafts 14 and 16)
        live = MessageParams(forward=True, subscription_filter=SubscriptionFilter(FilterType.LARGEST_OBJECT))
        reply = await client.request(lambda rid: m.Subscribe(rid, namespace, track, live))
        if isinstance(reply, m.RequestError):
            raise ConnectionError(f"SUBSCRIBE refused: {reply.error_reason or reply.error_code}")
        alias = reply.track_alias
        fetch_id = None
        if reply.params.largest_object is not None:
            # joined mid-track: the current group from its start comes from the relay's cache
            # (a relative joining FETCH is contiguous with the subscription, no overlap)
            fetched = await client.request(lambda rid: m.Fetch(rid, m.FetchType.RELATIVE_JOINING,
                                                               joining_request_id=reply.request_id,
                                                               joining_start=0))
            fetch_id = fetched.request_id if isinstance(fetched, m.FetchOk) else None
        deadline = time.monotonic() + duration if duration else None
        next_report, last_objects = time.monotonic() + 1.0, 0
        streams_done, done, done_deadline = 0, None, 0.0
        while True:
            now = time.monotonic()
            if done is not None and (streams_done >= done.stream_count or now >= done_deadline):
                result.ended = f"publish_done({done.status_code})"
                break
            if progress is not None and now >= next_report:
                result.gaps, result.lost = reorder.gaps, ledger.lost
                snap = result.summary()
                snap["objects_per_s"] = result.objects - last_objects
                last_objects, next_report = result.objects, now + 1.0
                progress(snap)
            timeout = None if deadline is None else max(0.0, deadline - now)
            if progress is not None:
                timeout = min(timeout if timeout is not None else 1.0, max(0.0, next_report - now))
            try:
                ev = await asyncio.wait_for(client.events.get(), timeout)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    result.ended = f"publish_done({done.status_code})" if done else "duration"
                    break
                continue
            if isinstance(ev, ObjectReceived) and (
                    ev.track_alias == alias
                    or (isinstance(ev.header, FetchHeader) and ev.header.request_id == fetch_id)):
                obj = ev.object
                key = (obj.group_id, obj.object_id)
                if key in seen:
                    result.duplicates += 1
                    continue
                seen.add(key)
                result.objects += 1
                result.bytes += len(obj.payload)
                result.last_group = max(obj.group_id, result.last_group or 0)
                result.first_group = min(obj.group_id, obj.group_id if result.first_group is None
                                         else result.first_group)
                data = loc.unpackage(obj.extensions, obj.payload, codec="raw").data
                if verify is None and is_synthetic_payload(data):
                    verify = verify_synthetic_payload
                if verify is not None:
                    ok = verify(obj.group_id, obj.object_id, data)
                    result.verified += ok
                    result.bad += not ok
                now_us = time.time_ns() // 1000
                frame = loc.unpackage(obj.extensions, obj.payload, codec=codec, group_id=obj.group_id,
                                      object_id=obj.object_id)
                sent_us = frame.send_time_us or (frame.pts_us if frame.wallclock else None)
                if sent_us:  # our private send time, else LOC's wall-clock TIMESTAMP (other publishers)
                    result.latencies_ms.append((now_us - sent_us) / 1000)
                ledger.add(obj.group_id, obj.object_id, frame.pts_us)
                reorder.add(obj.group_id, obj.object_id, frame)
            elif isinstance(ev, StreamEnded) and getattr(ev.header, "track_alias", None) == alias:
                streams_done += 1
            elif isinstance(ev, MessageReceived) and isinstance(ev.message, m.PublishDone):
                # the track is over, but its last streams may still be arriving: PUBLISH_DONE says
                # how many there were; wait for them (briefly: some may have been reset)
                done, done_deadline = ev.message, time.monotonic() + DONE_GRACE_S
                deadline = min(deadline, done_deadline) if deadline else done_deadline
            elif isinstance(ev, GoawayReceived):
                # the relay is shutting down: keep what arrived, end now (a reconnect is the caller's choice)
                log.info("relay sent GOAWAY%s: ending the subscription after %d objects",
                         f" (new session URI {ev.new_uri})" if ev.new_uri else "", result.objects)
                result.ended = "goaway"
                break
            elif isinstance(ev, Closed):
                result.ended = f"closed({ev.reason})"
                break
    reorder.flush()
    ledger.finish()
    result.gaps, result.lost = reorder.gaps, ledger.lost
    if writer is not None:
        writer.close()
    summary = result.summary()
    log.info("%d objects (%d verified, %d bad), lost %d, gaps %d, latency p50 %s ms p99 %s ms; ended: %s",
             result.objects, result.verified, result.bad, result.lost, result.gaps, summary["latency_p50_ms"],
             summary["latency_p99_ms"], result.ended)
    return result
