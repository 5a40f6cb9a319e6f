"""`fastrelay publish`: a MoQT publisher of one track fed by a media source.

One Group per GOP, one Object per frame, packaged per LOC. A keyframe travels in subgroup
0 at high publisher priority, the frames that depend on it in subgroup 1 at lower
priority, so a congested relay can drop dependent frames first and still deliver
decodable keyframes. Frames produced while nobody is subscribed are not sent (live). When
the relay sends GOAWAY, publishing stops: PUBLISH_DONE (GOING_AWAY) and a normal close.

How the track is announced (`announce`): "namespace" (default) sends PUBLISH_NAMESPACE only and
answers the relay's SUBSCRIBE for the track. "publish" sends PUBLISH for the track as well, once
PUBLISH_NAMESPACE is accepted (Forward 0: nothing is sent before the relay's PUBLISH_OK), so a
relay can offer the track to subscribers that know only the namespace; objects go out while
the relay's Forward State is 1 (PUBLISH_OK, then any REQUEST_UPDATE). A relay that refuses the
PUBLISH (REQUEST_ERROR, e.g. moq-dev's) or never answers it is served as with "namespace".
`wait_subscriber` waits for Forward State 1: fastrelay's relay answers PUBLISH_OK with Forward
1 at once, so there the source starts before anyone subscribes (why "publish" is not the
default); aiomoqt's relay answers Forward 0 until a subscriber comes. Each subscription (our
PUBLISH's, a SUBSCRIBE's) has its own Track Alias and streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from ..media import loc
from ..media.h264 import Frame, FrameSource, Gop
from ..moq import messages as m
from ..moq.data import Object, subgroup_header_for
from ..moq.params import MessageParams, Version
from ..moq.session import GoawayReceived, MessageReceived, SubgroupWriter
from ..moq.wire import Location
from .endpoint import CONNECT_TIMEOUT_S, MoqtClient

log = logging.getLogger("fastrelay.publish")

KEYFRAME_PRIORITY = 0x10  # lower value = more important
DEPENDENT_PRIORITY = 0x80
TRACK_ALIAS = 1  # the first subscription's (the PUBLISH's, when it is sent)
ANNOUNCE_MODES = ("publish", "namespace")
DRAIN_TIMEOUT_S = 5.0  # at the end, how long to wait for what was sent to be acknowledged


@dataclass
class PublishResult:
    objects: int = 0
    bytes: int = 0
    groups: int = 0
    subscribed: bool = False
    ended: str = ""  # "source ended", or "goaway" (the relay is going away)
    published: str = ""  # the PUBLISH: "" (not sent), "pending", "accepted" or "refused"


async def publish(url: str, namespace: tuple[bytes, ...], track: bytes, source: FrameSource, *,
                  version: Version = Version.DRAFT_16, wait_subscriber: float | None = None,
                  plaintext: bool = False, verify_cert: bool = False, cafile: str | None = None,
                  connect_timeout: float = CONNECT_TIMEOUT_S,
                  announce: Literal["publish", "namespace"] = "namespace") -> PublishResult:
    """Publish `source` as (namespace, track) through the relay at `url` until the source ends or
    the relay sends GOAWAY; either way PUBLISH_DONE goes out and the session closes normally.
    `announce` "publish" also sends PUBLISH for the track, "namespace" only PUBLISH_NAMESPACE
    (the relay must SUBSCRIBE); see the module docstring. `wait_subscriber` waits (seconds) for
    a subscription with Forward State 1 before the source starts.
    The relay's certificate is checked only with `verify_cert` or `cafile`; ConnectFailed if no
    session comes up (see MoqtClient)."""
    if announce not in ANNOUNCE_MODES:
        raise ValueError(f"announce must be one of {ANNOUNCE_MODES}, not {announce!r}")
    result = PublishResult()
    async with MoqtClient(url, version, plaintext=plaintext, verify=verify_cert, cafile=cafile,
                          connect_timeout=connect_timeout) as client:
        reply = await client.request(lambda rid: m.PublishNamespace(rid, namespace))
        if isinstance(reply, m.RequestError):
            raise ConnectionError(f"PUBLISH_NAMESPACE refused: {reply.error_reason or reply.error_code}")
        state = _Publisher(client, namespace, track, version)
        events = asyncio.create_task(state.serve(client))
        if announce == "publish":
            state.send_publish()
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
        result.subscribed = bool(state.subs)
        result.published = state.published
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


@dataclass
class _Subscription:
    """One subscription to our track: the relay's SUBSCRIBE, or our accepted PUBLISH."""

    request_id: int
    alias: int
    forward: bool
    writers: dict[int, SubgroupWriter] = field(default_factory=dict)
    streams: int = 0
    group: int | None = None  # the group its open streams belong to

    def end_group(self) -> None:
        for w in self.writers.values():
            w.finish()
        self.writers.clear()
        self.group = None


class _Publisher:
    def __init__(self, client: MoqtClient, namespace: tuple[bytes, ...], track: bytes, version: Version) -> None:
        self.client = client
        self.namespace = namespace
        self.track = track
        self.version = version
        self.subs: dict[int, _Subscription] = {}  # request ID (the relay's SUBSCRIBE, our PUBLISH) ->
        self.subscribed = asyncio.Event()  # some subscription has Forward State 1
        self.going_away = asyncio.Event()  # the relay sent GOAWAY
        self.largest: Location | None = None
        self.publish_id: int | None = None  # our PUBLISH's request ID, while it is unanswered or accepted
        self.published = ""  # "" (no PUBLISH), "pending", "accepted", "refused"
        self._aliases = iter(range(TRACK_ALIAS, 1 << 62))

    def send_publish(self) -> None:
        """PUBLISH the track (Forward 0: objects wait for the relay's Forward State 1)."""
        session = self.client.session
        self.publish_id = session.next_request_id()
        self._publish_alias = next(self._aliases)
        session.send(m.Publish(self.publish_id, self.namespace, self.track, self._publish_alias,
                               MessageParams(largest_object=self.largest, forward=False)))
        self.published = "pending"
        log.info("PUBLISH sent for the track (request %d, alias %d)", self.publish_id, self._publish_alias)

    async def serve(self, client: MoqtClient) -> None:
        """Answer the relay's SUBSCRIBE / UNSUBSCRIBE for our track and its answer to our PUBLISH
        (PUBLISH_OK, REQUEST_ERROR, REQUEST_UPDATE, PUBLISH_DONE); notice its GOAWAY."""
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
                sub = _Subscription(msg.request_id, next(self._aliases), msg.params.forward is not False)
                self.subs[msg.request_id] = sub
                client.session.send(m.SubscribeOk(msg.request_id, sub.alias,
                                                  MessageParams(largest_object=self.largest)))
                log.info("subscribed by the relay (request %d)", msg.request_id)
            elif isinstance(msg, m.PublishOk) and msg.request_id == self.publish_id:
                forward = msg.params.forward is not False
                self.subs[msg.request_id] = _Subscription(msg.request_id, self._publish_alias, forward)
                self.published = "accepted"
                log.info("relay accepted the PUBLISH (request %d), forward %d", msg.request_id, forward)
            elif isinstance(msg, m.RequestError) and msg.request_id == self.publish_id:
                self.publish_id, self.published = None, "refused"
                log.info("relay refused the PUBLISH (%s%s): waiting for its SUBSCRIBE", msg.error_code,
                         f": {msg.error_reason}" if msg.error_reason else "")
            elif isinstance(msg, m.RequestUpdate):
                self._update(msg)
            elif isinstance(msg, m.Unsubscribe | m.PublishDone) and msg.request_id in self.subs:
                # UNSUBSCRIBE ends a SUBSCRIBE's or (draft-16) our PUBLISH's subscription;
                # PUBLISH_DONE from the relay (a subscriber's role) ends our PUBLISH's
                if msg.request_id == self.publish_id:
                    self.publish_id = None
                self.subs.pop(msg.request_id).end_group()
            self._forwarding_changed()

    def _update(self, msg: m.RequestUpdate) -> None:
        """REQUEST_UPDATE (draft-14 SUBSCRIBE_UPDATE) of one of our subscriptions: its Forward State."""
        sub = self.subs.get(msg.existing_request_id)
        if sub is None:
            if self.version == Version.DRAFT_16 and not self.client.closed:
                self.client.session.send(m.RequestError(msg.request_id, m.RequestErrorCode.DOES_NOT_EXIST, 0,
                                                        "no such subscription", m.RequestKind.REQUEST_UPDATE))
            return
        if msg.params.forward is not None and msg.params.forward != sub.forward:
            sub.forward = msg.params.forward
            if not sub.forward:
                sub.end_group()
            log.info("relay set forward %d (request %d)", sub.forward, sub.request_id)
        if self.version == Version.DRAFT_16 and not self.client.closed:
            self.client.session.send(m.RequestOk(msg.request_id, MessageParams(largest_object=self.largest),
                                                 request_kind=m.RequestKind.REQUEST_UPDATE))

    def _forwarding_changed(self) -> None:
        if any(s.forward for s in self.subs.values()):
            self.subscribed.set()
        else:
            self.subscribed.clear()

    def end_group(self) -> None:
        for sub in self.subs.values():
            sub.end_group()

    def send(self, frame: Frame) -> bool:
        targets = [s for s in self.subs.values() if s.forward]
        if not targets:
            return False
        extensions, payload = loc.package(frame, send_time_us=time.time_ns() // 1000)
        subgroup = 0 if frame.keyframe else 1
        priority = KEYFRAME_PRIORITY if frame.keyframe else DEPENDENT_PRIORITY
        for sub in targets:
            if sub.group is not None and sub.group != frame.group_id:
                sub.end_group()  # it resumed forwarding (or began) mid-group
            writer = sub.writers.get(subgroup)
            if writer is None:
                header = subgroup_header_for(sub.alias, frame.group_id, subgroup, frame.object_id,
                                             publisher_priority=priority, version=self.version,
                                             extensions=bool(extensions))
                writer = sub.writers[subgroup] = self.client.session.open_subgroup(header)
                sub.streams += 1
                sub.group = frame.group_id
            writer.write(Object(frame.group_id, subgroup, frame.object_id, priority, extensions=list(extensions),
                                payload=payload))
        self.largest = Location(frame.group_id, frame.object_id)
        return True

    def finish(self, code: m.PublishDoneCode) -> None:
        """End the open groups and send PUBLISH_DONE with `code` for each subscription."""
        self.end_group()
        if self.client.closed:
            return
        for sub in self.subs.values():
            self.client.session.send(m.PublishDone(sub.request_id, code, sub.streams))
