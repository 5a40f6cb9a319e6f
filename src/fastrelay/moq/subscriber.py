"""`fastrelay subscribe`: subscribe to one track, rebuild the media, measure latency.

Objects of one group arrive on two subgroup streams (keyframe, dependent frames), so they
are put back in (group, object) order before being written; a group that cannot be
completed is skipped at the next keyframe and counted as a gap. End-to-end latency is the
subscriber's wall clock minus the publisher's send-time extension (same host or synced
clocks).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..media import loc
from ..media.writer import AnnexBWriter
from . import messages as m
from .data import FetchHeader
from .endpoint import MoqtClient
from .params import MessageParams, Version
from .session import Closed, MessageReceived, ObjectReceived, StreamEnded

log = logging.getLogger("fastrelay.subscribe")

DONE_GRACE_S = 2.0  # after PUBLISH_DONE, how long to wait for streams still in flight
REORDER_GROUPS = 2  # groups held back waiting for a missing object before skipping ahead


@dataclass
class SubscribeResult:
    objects: int = 0
    bytes: int = 0
    written: int = 0
    gaps: int = 0
    duplicates: int = 0
    bad: int = 0  # payloads that failed verification
    last_group: int | None = None
    latencies_ms: list[float] = field(default_factory=list)
    ended: str = ""

    def summary(self) -> dict[str, object]:
        lat = sorted(self.latencies_ms)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

        return {"objects": self.objects, "bytes": self.bytes, "frames_written": self.written, "gaps": self.gaps,
                "duplicates": self.duplicates, "bad": self.bad, "last_group": self.last_group,
                "latency_p50_ms": pct(0.5), "latency_p99_ms": pct(0.99),
                "latency_mean_ms": round(statistics.fmean(lat), 3) if lat else None, "ended": self.ended}


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
                    progress: Callable[[dict[str, object]], None] | None = None) -> SubscribeResult:
    """Subscribe and receive until PUBLISH_DONE, the session ends, or `duration` seconds pass."""
    result = SubscribeResult()
    writer = AnnexBWriter(out) if out else None
    seen: set[tuple[int, int]] = set()

    def write(frame: loc.LocFrame) -> None:
        if writer is not None:
            writer.write(frame)
            result.written += 1

    reorder = _Reorder(write)
    async with MoqtClient(url, version) as client:
        reply = await client.request(lambda rid: m.Subscribe(rid, namespace, track, MessageParams(forward=True)))
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
                if verify is not None and not verify(obj.group_id, obj.object_id,
                                                     loc.unpackage(obj.extensions, obj.payload, codec="raw").data):
                    result.bad += 1
                now_us = time.time_ns() // 1000
                frame = loc.unpackage(obj.extensions, obj.payload, codec=codec, group_id=obj.group_id,
                                      object_id=obj.object_id)
                sent_us = frame.send_time_us or (frame.pts_us if frame.wallclock else None)
                if sent_us:  # our private send time, else LOC's wall-clock TIMESTAMP (other publishers)
                    result.latencies_ms.append((now_us - sent_us) / 1000)
                reorder.add(obj.group_id, obj.object_id, frame)
            elif isinstance(ev, StreamEnded) and getattr(ev.header, "track_alias", None) == alias:
                streams_done += 1
            elif isinstance(ev, MessageReceived) and isinstance(ev.message, m.PublishDone):
                # the track is over, but its last streams may still be arriving: PUBLISH_DONE says
                # how many there were; wait for them (briefly: some may have been reset)
                done, done_deadline = ev.message, time.monotonic() + DONE_GRACE_S
                deadline = min(deadline, done_deadline) if deadline else done_deadline
            elif isinstance(ev, Closed):
                result.ended = f"closed({ev.reason})"
                break
    reorder.flush()
    result.gaps = reorder.gaps
    if writer is not None:
        writer.close()
    return result
