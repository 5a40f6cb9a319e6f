"""`fastrelay publish`: a MoQT publisher of one track fed by a media source.

One Group per GOP, one Object per frame, packaged per LOC. A keyframe travels in subgroup
0 at high publisher priority, the frames that depend on it in subgroup 1 at lower
priority, so a congested relay can drop dependent frames first and still deliver
decodable keyframes. Frames produced while nobody is subscribed are not sent (live). When
the relay sends GOAWAY, publishing stops: PUBLISH_DONE (GOING_AWAY) and a normal close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from ..media import loc
from ..media.h264 import Frame, FrameSource, Gop
from . import messages as m
from .data import Object, subgroup_header_for
from .endpoint import CONNECT_TIMEOUT_S, MoqtClient
from .params import MessageParams, Version
from .session import GoawayReceived, MessageReceived, SubgroupWriter
from .wire import Location

log = logging.getLogger("fastrelay.publish")

KEYFRAME_PRIORITY = 0x10  # lower value = more important
DEPENDENT_PRIORITY = 0x80
TRACK_ALIAS = 1
DRAIN_TIMEOUT_S = 5.0  # at the end, how long to wait for what was sent to be acknowledged


@dataclass
class PublishResult:
    objects: int = 0
    bytes: int = 0
    groups: int = 0
    subscribed: bool = False
    ended: str = ""  # "source ended", or "goaway" (the relay is going away)


async def publish(url: str, namespace: tuple[bytes, ...], track: bytes, source: FrameSource, *,
                  version: Version = Version.DRAFT_16, wait_subscriber: float | None = None,
                  plaintext: bool = False, verify_cert: bool = False, cafile: str | None = None,
                  connect_timeout: float = CONNECT_TIMEOUT_S) -> PublishResult:
    """Publish `source` as (namespace, track) through the relay at `url` until the source ends or
    the relay sends GOAWAY; either way PUBLISH_DONE goes out and the session closes normally.
    The relay's certificate is checked only with `verify_cert` or `cafile`; ConnectFailed if no
    session comes up (see MoqtClient)."""
    result = PublishResult()
    async with MoqtClient(url, version, plaintext=plaintext, verify=verify_cert, cafile=cafile,
                          connect_timeout=connect_timeout) as client:
        reply = await client.request(lambda rid: m.PublishNamespace(rid, namespace))
        if isinstance(reply, m.RequestError):
            raise ConnectionError(f"PUBLISH_NAMESPACE refused: {reply.error_reason or reply.error_code}")
        state = _Publisher(client, namespace, track, version)
        events = asyncio.create_task(state.serve(client))
        sending: asyncio.Task | None = None
        try:
            if wait_subscriber and not await _first(state.subscribed, state.going_away, timeout=wait_subscriber):
                raise ConnectionError(f"nobody subscribed within {wait_subscriber:g} s")
            sending = asyncio.create_task(_send_source(state, source, result))
            if await _first(_done(sending), state.going_away) is state.going_away:
                sending.cancel()  # it waits for the next frame: every object it wrote is whole
                with contextlib.suppress(asyncio.CancelledError):
                    await sending
            else:
                sending.result()  # its error, if the relay closed the session
            going_away = state.going_away.is_set()
            state.finish(m.PublishDoneCode.GOING_AWAY if going_away else m.PublishDoneCode.TRACK_ENDED)
            result.ended = "goaway" if going_away else "source ended"
        finally:
            events.cancel()
            if sending is not None:
                sending.cancel()
            source.close()
        result.subscribed = state.request_id is not None
        await _drained(client, DRAIN_TIMEOUT_S)  # the last objects and PUBLISH_DONE leave before the close
    return result


async def _send_source(state: _Publisher, source: FrameSource, result: PublishResult) -> None:
    async with contextlib.aclosing(source.events()) as events:
        async for ev in events:
            if isinstance(ev, Gop):
                state.end_group()
                result.groups += 1
            elif isinstance(ev, Frame) and state.send(ev):
                result.objects += 1
                result.bytes += ev.size
            if state.client.closed:
                raise ConnectionError(f"relay closed the session: {state.client.closed.reason}")


def _done(task: asyncio.Task) -> asyncio.Event:
    """An event set when `task` finishes."""
    done = asyncio.Event()
    task.add_done_callback(lambda _: done.set())
    return done


async def _first(*events: asyncio.Event, timeout: float | None = None) -> asyncio.Event | None:
    """Wait for the first of `events` to be set; returns it (None on timeout)."""
    waiters = {asyncio.ensure_future(e.wait()): e for e in events}
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    return next((e for e in events if e.is_set()), None) if done else None


async def _drained(client: MoqtClient, timeout: float) -> None:
    """Wait until everything sent is acknowledged (or the session closes, or `timeout`)."""
    deadline = time.monotonic() + timeout
    while client.session.transport.backlog() and not client.closed and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


class _Publisher:
    def __init__(self, client: MoqtClient, namespace: tuple[bytes, ...], track: bytes, version: Version) -> None:
        self.client = client
        self.namespace = namespace
        self.track = track
        self.version = version
        self.request_id: int | None = None
        self.subscribed = asyncio.Event()
        self.going_away = asyncio.Event()  # the relay sent GOAWAY
        self.writers: dict[int, SubgroupWriter] = {}
        self.largest: Location | None = None
        self.streams = 0

    async def serve(self, client: MoqtClient) -> None:
        """Answer the relay's SUBSCRIBE / UNSUBSCRIBE for our track; notice its GOAWAY."""
        while True:
            ev = await client.events.get()
            if isinstance(ev, GoawayReceived):
                log.info("relay sent GOAWAY%s: stopping, PUBLISH_DONE and close",
                         f" (new session URI {ev.new_uri})" if ev.new_uri else "")
                self.going_away.set()
            if not isinstance(ev, MessageReceived):
                continue
            msg = ev.message
            if isinstance(msg, m.Subscribe):
                if (msg.track_namespace, msg.track_name) != (self.namespace, self.track):
                    client.session.send(m.RequestError(msg.request_id, m.RequestErrorCode.DOES_NOT_EXIST, 0,
                                                       "unknown track", m.RequestKind.SUBSCRIBE))
                    continue
                self.request_id = msg.request_id
                client.session.send(m.SubscribeOk(msg.request_id, TRACK_ALIAS,
                                                  MessageParams(largest_object=self.largest)))
                self.subscribed.set()
                log.info("subscribed by the relay (request %d)", msg.request_id)
            elif isinstance(msg, m.Unsubscribe) and msg.request_id == self.request_id:
                self.request_id = None
                self.subscribed.clear()
                self.end_group()

    def end_group(self) -> None:
        for w in self.writers.values():
            w.finish()
        self.writers.clear()

    def send(self, frame: Frame) -> bool:
        if self.request_id is None:
            return False
        extensions, payload = loc.package(frame, send_time_us=time.time_ns() // 1000)
        subgroup = 0 if frame.keyframe else 1
        priority = KEYFRAME_PRIORITY if frame.keyframe else DEPENDENT_PRIORITY
        writer = self.writers.get(subgroup)
        if writer is None:
            header = subgroup_header_for(TRACK_ALIAS, frame.group_id, subgroup, frame.object_id,
                                         publisher_priority=priority, version=self.version,
                                         extensions=bool(extensions))
            writer = self.writers[subgroup] = self.client.session.open_subgroup(header)
            self.streams += 1
        writer.write(Object(frame.group_id, subgroup, frame.object_id, priority, extensions=list(extensions),
                            payload=payload))
        self.largest = Location(frame.group_id, frame.object_id)
        return True

    def finish(self, code: m.PublishDoneCode) -> None:
        """End the open groups and, if subscribed, send PUBLISH_DONE with `code`."""
        self.end_group()
        if self.request_id is not None and not self.client.closed:
            self.client.session.send(m.PublishDone(self.request_id, code, self.streams))
