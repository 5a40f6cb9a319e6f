"""MoQT relay core: namespaces, tracks, deduplicated upstream subscriptions, forwarding,
cache and late join. It reacts to session events and calls session methods; it opens no
sockets and keeps no timers, so tests can drive it with in-memory sessions.

Forwarding keeps one downstream subgroup stream per (subscriber, group, subgroup), in object
order. Objects wait in a per-session queue ordered as the draft's scheduling rules say
(subscriber priority, then publisher priority, then the subscription's group order) and are
handed to QUIC only while the connection's unacknowledged bytes stay below what its
congestion window can carry, so what QUIC sends next is always the most important object.

As in the draft, a SUBSCRIBE delivers objects published after it (per its filter); the past
comes from the cache through FETCH: a late joiner that wants the current group
from its start sends a relative joining FETCH (start 0), which is contiguous with its
subscription and does not overlap it. A FETCH response goes through the same queue, one
object at a time, so FETCH_CANCEL can stop it (the stream is reset). A FETCH that reaches
below what the cache holds completely (see cache.py) is refused with INVALID_RANGE.

Publisher priority: an object without one (DEFAULT_PRIORITY header bit) has the track's
DEFAULT_PUBLISHER_PRIORITY (128 if the publisher gave none); the relay schedules with that
value and writes it explicitly downstream. Group order: the subscriber's GROUP_ORDER, else
the publisher's DEFAULT_PUBLISHER_GROUP_ORDER (ascending if none).

Data can overtake the SUBSCRIBE_OK that names its track alias (another QUIC stream): while
a SUBSCRIBE to a publisher is unanswered, its objects and stream ends on unknown aliases are
held (bounded) and replayed once the alias is known, so a subgroup's first objects are not
lost; without such a SUBSCRIBE they are stray and dropped.

Namespaces: subscribers to a prefix hear of a namespace when its first publisher appears
and of its end when the last one withdraws it (PUBLISH_NAMESPACE_DONE, disconnect, or GOAWAY:
a publisher that sent GOAWAY gets no new SUBSCRIBEs, so the relay withdraws its namespaces
and tells it so with PUBLISH_NAMESPACE_CANCEL).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from . import messages as m
from .cache import CachedObject, TrackCache
from .data import Object, ObjectDatagram, ObjectStatus, SubgroupHeader, subgroup_header_for
from .params import FilterType, GroupOrder, MessageParams, Version
from .session import (
    Closed,
    Event,
    FetchWriter,
    GoawayReceived,
    MessageReceived,
    MoqtSession,
    ObjectReceived,
    Ready,
    RequestStreamClosed,
    StreamEnded,
    SubgroupWriter,
)
from .wire import ErrorCode, Location, render_name

log = logging.getLogger("fastrelay.relay")

Namespace = tuple[bytes, ...]
DEFAULT_PUBLISHER_PRIORITY = 128  # draft-16 section 11: a track's priority when the publisher names none
EARLY_DATA_LIMIT = 1 << 20  # bytes per publisher held for track aliases its SUBSCRIBE_OK has not named yet


class FastPath(Protocol):
    """A data path that delivers some subgroups itself (moq/kernel_path.py). The relay core
    tells it about tracks and subscriptions and asks, per subscriber and upstream stream,
    whether it sends the stream ("forward"), dropped it whole under congestion ("dropped"),
    or leaves it to the relay (None)."""

    def upstream_track(self, peer: Peer, alias: int, track: Track, default_priority: int) -> None: ...
    def downstream_ready(self, ds: Downstream) -> None: ...
    def downstream_gone(self, ds: Downstream) -> None: ...
    def peer_gone(self, peer: Peer) -> None: ...
    def stream_ended(self, peer: Peer, stream_id: int, reset: bool) -> None: ...
    def owns(self, ds: Downstream, peer: Peer, stream_id: int) -> Literal["forward", "dropped"] | None: ...
    def owns_datagrams(self, ds: Downstream) -> bool: ...
# track extensions a draft-14 SUBSCRIBE_OK can carry (as its Group Order field and parameters)
_D14_TRACK_EXTENSIONS = frozenset({m.TrackExtension.DEFAULT_PUBLISHER_GROUP_ORDER, m.TrackExtension.DELIVERY_TIMEOUT,
                                   m.TrackExtension.MAX_CACHE_DURATION})


@dataclass(eq=False)  # identity: one per session
class Peer:
    """One connected MoQT session and what the relay knows about it."""

    session: MoqtSession
    name: str
    namespaces: set[Namespace] = field(default_factory=set)
    upstream: dict[int, Track] = field(default_factory=dict)  # track alias from this publisher -> track
    requests: dict[int, Track] = field(default_factory=dict)  # our request id (to this publisher) -> track
    downstream: dict[int, Downstream] = field(default_factory=dict)  # their request id -> subscription
    ns_subs: dict[Namespace, int | None] = field(default_factory=dict)  # prefix -> request stream (None: d14)
    aliases: itertools.count = field(default_factory=itertools.count)
    ns_requests: dict[int, Namespace] = field(default_factory=dict)  # PUBLISH_NAMESPACE request id -> namespace
    announced: dict[Namespace, int] = field(default_factory=dict)  # draft-14: PUBLISH_NAMESPACE we sent it -> id
    fetches: dict[int, FetchStream] = field(default_factory=dict)  # their FETCH request id -> response in progress
    # objects waiting for the connection: (priority, seq, downstream, object or None = FIN, (group, subgroup)),
    # or for a FETCH response (priority, seq, fetch stream, its next object, None)
    queue: list[tuple] = field(default_factory=list)
    queued_bytes: int = 0
    seq: itertools.count = field(default_factory=itertools.count)
    # data that came before the SUBSCRIBE_OK naming its track alias: alias -> events, replayed then
    early: dict[int, list[ObjectReceived | StreamEnded]] = field(default_factory=dict)
    early_bytes: int = 0


@dataclass(eq=False)  # identity: one per subscription
class Downstream:
    peer: Peer
    request_id: int
    alias: int
    track: Track
    established: bool = False
    writers: dict[tuple[int, int], SubgroupWriter] = field(default_factory=dict)  # (group, subgroup)
    sent: dict[tuple[int, int], int] = field(default_factory=dict)  # (group, subgroup) -> last object id
    abandoned: set[tuple[int, int]] = field(default_factory=set)  # reset because the subscriber fell behind
    params: MessageParams = field(default_factory=MessageParams)
    start: Location = field(default_factory=lambda: Location(0, 0))  # first location delivered
    end_group: int | None = None  # AbsoluteRange: last group delivered
    largest: Location | None = None  # the track's largest location when the subscription began
    forward: bool = True  # REQUEST_UPDATE with FORWARD 0 pauses delivery
    active: bool = True
    queued: dict[tuple[int, int], tuple] = field(default_factory=dict)  # key -> priority of its last queued item
    group: int = -1  # newest group started for this subscriber
    objects: int = 0
    fast_objects: int = 0  # of its objects, those the fast path delivered
    dropped: int = 0
    streams: int = 0  # subgroup streams opened for it (PUBLISH_DONE's stream count)


@dataclass(eq=False)  # identity: one per FETCH
class FetchStream:
    """A FETCH response being written: its objects go through the session's priority queue
    one at a time (the next one is queued when one is written), in the response's order."""

    peer: Peer
    request_id: int
    writer: FetchWriter
    pending: deque[CachedObject]
    subscriber_priority: int


@dataclass
class Track:
    namespace: Namespace
    name: bytes
    publisher: Peer
    cache: TrackCache
    upstream_request_id: int | None = None
    upstream_alias: int | None = None
    live: bool = False
    extensions: tuple[tuple[int, int | bytes], ...] = ()  # the publisher's Track Extensions
    default_priority: int = DEFAULT_PUBLISHER_PRIORITY
    group_order: GroupOrder = GroupOrder.ASCENDING  # the publisher's preference
    subscribers: list[Downstream] = field(default_factory=list)
    stream_keys: dict[int, tuple[int, int]] = field(default_factory=dict)  # upstream stream -> (group, subgroup)
    objects_in: int = 0
    streams_ended: int = 0  # upstream subgroup streams finished or reset
    done: m.PublishDone | None = None  # the publisher's PUBLISH_DONE, applied once its streams have ended

    @property
    def label(self) -> str:
        return render_name(self.namespace, self.name)


@dataclass
class RelayStats:
    objects_in: int = 0
    objects_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    cache_hits: int = 0
    sessions: int = 0
    dropped_objects: int = 0  # not sent to a subscriber that fell behind
    fast_objects: int = 0  # objects a fast path (the kernel) delivered instead of the relay


class Relay:
    """The relay core; call `attach(session, name)` per session and feed it the session's events."""

    def __init__(self, cache_groups: int = 8, cache_bytes: int = 64 << 20, max_backlog: int = 1 << 20,
                 fastpath: FastPath | None = None) -> None:
        self.fastpath = fastpath
        self.cache_groups = cache_groups
        self.cache_bytes = cache_bytes
        # a subscriber with more than this unacknowledged skips to the next group; four times
        # this, and even the current subgroup is reset: buffering per subscriber stays bounded
        self.max_backlog = max_backlog
        self.peers: dict[int, Peer] = {}
        self.tracks: dict[tuple[Namespace, bytes], Track] = {}
        self.stats = RelayStats()

    # ---- sessions
    def attach(self, session: MoqtSession, name: str) -> Peer:
        peer = Peer(session, name)
        self.peers[id(session)] = peer
        self.stats.sessions += 1
        return peer

    def on_event(self, peer: Peer, ev: Event) -> None:
        """Handle one session event; a failure here closes that session only (INTERNAL_ERROR)."""
        try:
            self._dispatch(peer, ev)
        except Exception as exc:
            log.exception("session %s: internal error handling %s", peer.name, type(ev).__name__)
            peer.session.fail(ErrorCode.INTERNAL_ERROR, f"relay error: {exc}")

    def _dispatch(self, peer: Peer, ev: Event) -> None:
        if isinstance(ev, ObjectReceived):
            if not self._held(peer, ev, ev.track_alias):
                self._object(peer, ev)
        elif isinstance(ev, StreamEnded):
            alias = ev.header.track_alias if isinstance(ev.header, SubgroupHeader) else None
            if not self._held(peer, ev, alias):
                self._stream_ended(peer, ev)
        elif isinstance(ev, MessageReceived):
            if isinstance(ev.message, m.SubscribeNamespace):
                self._subscribe_namespace(peer, ev.message, ev.stream_id)
            else:
                self._message(peer, ev.message)
        elif isinstance(ev, RequestStreamClosed):
            peer.ns_subs = {p: s for p, s in peer.ns_subs.items() if s != ev.stream_id}
        elif isinstance(ev, GoawayReceived):
            self._peer_going_away(peer)
        elif isinstance(ev, Closed):
            self._peer_gone(peer)
        elif isinstance(ev, Ready):
            log.info("session %s ready (%s)", peer.name, ev.version.name)

    def goaway(self, new_uri: str = "") -> int:
        """Tell every session the relay is going away (GOAWAY); returns how many were told."""
        told = 0
        for peer in list(self.peers.values()):
            if peer.session.ready and not peer.session.closed and not peer.session.goaway_sent:
                peer.session.goaway(new_uri)
                told += 1
        return told

    def _peer_going_away(self, peer: Peer) -> None:
        """The peer sent GOAWAY: no new SUBSCRIBE can go to it, so its namespaces are withdrawn
        (subscribers to them hear NAMESPACE_DONE) and it is told with PUBLISH_NAMESPACE_CANCEL.
        Its established tracks keep flowing until it ends them or leaves."""
        log.info("%s sent GOAWAY", peer.name)
        for rid, ns in list(peer.ns_requests.items()):
            if ns in peer.namespaces:
                d16 = peer.session.version == Version.DRAFT_16
                peer.session.send(m.PublishNamespaceCancel(rid if d16 else None, m.RequestErrorCode.INTERNAL_ERROR,
                                                           "publisher sent GOAWAY: no new subscriptions here",
                                                           None if d16 else ns))
        self._withdraw(peer, set(peer.namespaces))

    # ---- control
    def _message(self, peer: Peer, msg: m.Message) -> None:
        handler = getattr(self, f"_on_{type(msg).__name__}", None)
        if handler is None:
            log.debug("%s: %s ignored", peer.name, type(msg).__name__)
            return
        handler(peer, msg)

    def _on_PublishNamespace(self, peer: Peer, msg: m.PublishNamespace) -> None:
        ns = msg.track_namespace
        first = not self._published(ns)
        peer.namespaces.add(ns)
        peer.ns_requests[msg.request_id] = ns
        peer.session.send(m.RequestOk(msg.request_id, request_kind=m.RequestKind.PUBLISH_NAMESPACE))
        log.info("%s publishes namespace %s", peer.name, render_name(ns))
        if first:
            self._tell_namespace_subscribers(ns, peer, gone=False)

    def _on_PublishNamespaceDone(self, peer: Peer, msg: m.PublishNamespaceDone) -> None:
        ns = msg.track_namespace if msg.track_namespace is not None else peer.ns_requests.get(msg.request_id)
        if ns in peer.namespaces:
            self._withdraw(peer, {ns})

    def _on_PublishNamespaceCancel(self, peer: Peer, msg: m.PublishNamespaceCancel) -> None:
        """A subscriber we sent PUBLISH_NAMESPACE (draft-14 namespace subscriptions) takes it back:
        it will not subscribe there, and it gets no PUBLISH_NAMESPACE_DONE for it later."""
        ns = msg.track_namespace if msg.track_namespace is not None else next(
            (n for n, rid in peer.announced.items() if rid == msg.request_id), None)
        if ns is None or peer.announced.pop(ns, None) is None:
            log.debug("%s: PUBLISH_NAMESPACE_CANCEL for a namespace already withdrawn", peer.name)
            return
        log.info("%s cancelled namespace %s (%s: %s)", peer.name, render_name(ns), msg.error_code, msg.error_reason)

    def _on_UnsubscribeNamespace(self, peer: Peer, msg: m.UnsubscribeNamespace) -> None:
        """Draft-14: the namespace subscription ends; nothing more is said about namespaces under it."""
        prefix = msg.track_namespace_prefix
        if prefix not in peer.ns_subs:
            log.debug("%s: UNSUBSCRIBE_NAMESPACE for a prefix it has no subscription to", peer.name)
            return
        del peer.ns_subs[prefix]
        for ns in [n for n in peer.announced if n[: len(prefix)] == prefix]:
            del peer.announced[ns]

    def _published(self, ns: Namespace) -> bool:
        return any(ns in p.namespaces for p in self.peers.values())

    def _withdraw(self, peer: Peer, namespaces: set[Namespace]) -> None:
        """`peer` no longer publishes `namespaces`; subscribers hear of those no one else publishes."""
        peer.namespaces -= namespaces
        for ns in sorted(namespaces):
            if not self._published(ns):
                self._tell_namespace_subscribers(ns, peer, gone=True)

    def _subscribe_namespace(self, peer: Peer, msg: m.SubscribeNamespace, stream_id: int | None) -> None:
        """Reply, then name every matching published namespace now and as they come and go
        (draft-16: NAMESPACE / NAMESPACE_DONE on the request stream; draft-14: PUBLISH_NAMESPACE
        and PUBLISH_NAMESPACE_DONE on the control stream)."""
        prefix = msg.track_namespace_prefix
        kind = m.RequestKind.SUBSCRIBE_NAMESPACE

        def reply(answer: m.Message, fin: bool = False) -> None:
            if stream_id is None:
                peer.session.send(answer)
            else:
                peer.session.send_on(stream_id, answer, fin)

        if any(p[: len(prefix)] == prefix or prefix[: len(p)] == p for p in peer.ns_subs):
            reply(m.RequestError(msg.request_id, m.RequestErrorCode.PREFIX_OVERLAP, 0, "overlapping prefix", kind),
                  fin=True)
            return
        peer.ns_subs[prefix] = stream_id
        reply(m.RequestOk(msg.request_id, request_kind=kind))
        if msg.subscribe_options == m.SubscribeOptions.PUBLISH:
            return  # only PUBLISH messages wanted: tracks are not pushed by this relay
        published = {ns for other in self.peers.values() if other is not peer for ns in other.namespaces}
        for ns in sorted(published):
            if ns[: len(prefix)] == prefix:
                self._tell(peer, prefix, ns, gone=False)

    def _tell_namespace_subscribers(self, ns: Namespace, publisher: Peer, gone: bool) -> None:
        for peer in list(self.peers.values()):
            if peer is publisher or peer.session.closed:
                continue
            for prefix in list(peer.ns_subs):
                if ns[: len(prefix)] == prefix:
                    self._tell(peer, prefix, ns, gone)

    def _tell(self, peer: Peer, prefix: Namespace, ns: Namespace, gone: bool) -> None:
        stream_id = peer.ns_subs[prefix]
        if stream_id is not None:  # draft-16
            suffix = ns[len(prefix):]
            peer.session.send_on(stream_id, m.NamespaceDone(suffix) if gone else m.Namespace(suffix))
        elif gone:
            if peer.announced.pop(ns, None) is not None:  # not if it cancelled it
                peer.session.send(m.PublishNamespaceDone(None, track_namespace=ns))
        elif ns not in peer.announced:
            try:
                rid = peer.session.next_request_id()
            except ConnectionError as exc:  # it sent GOAWAY, or allows no more requests
                log.info("%s not told of namespace %s: %s", peer.name, render_name(ns), exc)
                return
            peer.announced[ns] = rid
            peer.session.send(m.PublishNamespace(rid, ns))

    def _on_Publish(self, peer: Peer, msg: m.Publish) -> None:
        key = (msg.track_namespace, msg.track_name)
        old = self.tracks.get(key)
        if old is not None and old.publisher is not peer:
            self._end_track(old, m.PublishDoneCode.GOING_AWAY, "another publisher took the track over")
        track = self.tracks.get(key) or self._new_track(key, peer)
        self._upstream_established(track, msg.track_extensions, msg.params.largest_object)
        # echo the publisher's group order (draft-14 PUBLISH_OK requires one)
        peer.session.send(m.PublishOk(msg.request_id, MessageParams(forward=True, group_order=track.group_order)))
        track.upstream_request_id, track.upstream_alias, track.live = msg.request_id, msg.track_alias, True
        peer.upstream[msg.track_alias] = track
        if self.fastpath:
            self.fastpath.upstream_track(peer, msg.track_alias, track, track.default_priority)
        self._establish(track)
        self._replay_early(peer, msg.track_alias)

    def _upstream_established(self, track: Track, extensions: tuple[tuple[int, int | bytes], ...],
                              largest: Location | None) -> None:
        """Take the track's properties from the PUBLISH or SUBSCRIBE_OK that established it upstream."""
        ext = dict(extensions)
        track.extensions = tuple(extensions)
        track.default_priority = int(ext.get(m.TrackExtension.DEFAULT_PUBLISHER_PRIORITY, DEFAULT_PUBLISHER_PRIORITY))
        track.group_order = GroupOrder(ext.get(m.TrackExtension.DEFAULT_PUBLISHER_GROUP_ORDER, GroupOrder.ASCENDING))
        if largest is not None:
            track.cache.begin_after(largest)

    def _on_Subscribe(self, sub: Peer, msg: m.Subscribe) -> None:
        key = (msg.track_namespace, msg.track_name)
        track = self.tracks.get(key)
        if track is None:
            publisher = self._publisher_for(msg.track_namespace)
            reason = "no publisher for this namespace"
            if publisher is not None:
                try:
                    rid = publisher.session.next_request_id()
                except ConnectionError as exc:  # it sent GOAWAY, or allows no more requests now
                    publisher, reason = None, f"publisher cannot take a request: {exc}"
            if publisher is None:
                sub.session.send(m.RequestError(msg.request_id, m.RequestErrorCode.DOES_NOT_EXIST, 0, reason,
                                                m.RequestKind.SUBSCRIBE))
                return
            track = self._new_track(key, publisher)
            track.upstream_request_id = rid
            publisher.requests[rid] = track
            publisher.session.send(m.Subscribe(rid, msg.track_namespace, msg.track_name,
                                               MessageParams(forward=True)))
        ds = Downstream(sub, msg.request_id, next(sub.aliases), track, params=msg.params)
        sub.downstream[msg.request_id] = ds
        track.subscribers.append(ds)
        if track.live:
            self._accept(ds)

    def _on_SubscribeOk(self, peer: Peer, msg: m.SubscribeOk) -> None:
        # the session made sure it answers a SUBSCRIBE we sent; unknown here means we already
        # unsubscribed (the answer crossed our UNSUBSCRIBE)
        track = peer.requests.get(msg.request_id)
        if track is None:
            self._discard_early(peer, [msg.track_alias])
            self._replay_early(peer, None)
            return
        if track.live:
            peer.session.fail(ErrorCode.PROTOCOL_VIOLATION, f"second SUBSCRIBE_OK for request {msg.request_id}")
            return
        self._upstream_established(track, msg.track_extensions, msg.params.largest_object)
        track.upstream_alias, track.live = msg.track_alias, True
        peer.upstream[msg.track_alias] = track
        if self.fastpath:
            self.fastpath.upstream_track(peer, msg.track_alias, track, track.default_priority)
        self._establish(track)
        self._replay_early(peer, msg.track_alias)

    def _on_RequestError(self, peer: Peer, msg: m.RequestError) -> None:
        track = peer.requests.pop(msg.request_id, None)
        self._replay_early(peer, None)
        if track is None:
            refused = next((ns for ns, rid in peer.announced.items() if rid == msg.request_id), None)
            if refused is not None:  # a draft-14 namespace subscriber declined a namespace we named
                del peer.announced[refused]
            return
        for ds in list(track.subscribers):
            ds.peer.session.send(m.RequestError(ds.request_id, msg.error_code, msg.retry_interval, msg.error_reason,
                                                m.RequestKind.SUBSCRIBE))
            ds.peer.downstream.pop(ds.request_id, None)
        self.tracks.pop((track.namespace, track.name), None)

    def _on_RequestUpdate(self, sub: Peer, msg: m.RequestUpdate) -> None:
        ds = sub.downstream.get(msg.existing_request_id)
        if ds is None:
            # the session closes for requests that never existed; this one did, but is over (e.g. it
            # ended with PUBLISH_DONE while the update was on its way) or is not a subscription
            if sub.session.version == Version.DRAFT_16:  # draft-14's SUBSCRIBE_UPDATE has no reply
                sub.session.send(m.RequestError(msg.request_id, m.RequestErrorCode.DOES_NOT_EXIST, 0,
                                                f"request {msg.existing_request_id} is no active subscription",
                                                m.RequestKind.REQUEST_UPDATE))
            return
        p = msg.params
        if p.forward is not None:
            if p.forward and not ds.forward:  # resumes with what is published from now on (FETCH covers the gap)
                largest = ds.track.cache.largest()
                ds.start = max(ds.start, Location(largest.group, largest.object + 1)) if largest else ds.start
            ds.forward = p.forward
        if p.subscription_filter is not None and p.subscription_filter.end_group is not None:
            ds.end_group = p.subscription_filter.end_group
        ds.params = replace(ds.params, **{k: getattr(p, k) for k in p.present()})
        self._fast_subscription(ds)
        if sub.session.version == Version.DRAFT_14:
            return  # draft-14's SUBSCRIBE_UPDATE has no reply
        sub.session.send(m.RequestOk(msg.request_id, MessageParams(largest_object=ds.track.cache.largest()),
                                     request_kind=m.RequestKind.REQUEST_UPDATE))

    def _on_TrackStatus(self, peer: Peer, msg: m.TrackStatus) -> None:
        """Answered from the relay's own state (no upstream round trip): REQUEST_OK with what a
        SUBSCRIBE_OK would carry for a track being relayed, else DOES_NOT_EXIST."""
        track = self.tracks.get((msg.track_namespace, msg.track_name))
        if track is None or not track.live:
            peer.session.send(m.RequestError(msg.request_id, m.RequestErrorCode.DOES_NOT_EXIST, 0,
                                             "track not being relayed", m.RequestKind.TRACK_STATUS))
            return
        peer.session.send(m.RequestOk(msg.request_id, MessageParams(largest_object=track.cache.largest()),
                                      request_kind=m.RequestKind.TRACK_STATUS))

    def _on_Unsubscribe(self, sub: Peer, msg: m.Unsubscribe) -> None:
        ds = sub.downstream.pop(msg.request_id, None)
        if ds is not None:  # else it ended already (PUBLISH_DONE crossed the UNSUBSCRIBE)
            self._drop_downstream(ds)

    def _on_FetchCancel(self, peer: Peer, msg: m.FetchCancel) -> None:
        """Stop a FETCH response in progress: what is queued goes, the stream is reset."""
        fs = peer.fetches.pop(msg.request_id, None)
        if fs is None:
            return  # already complete (FIN sent) or refused: nothing to stop
        self._purge(peer, lambda it: it[2] is fs)
        fs.writer.reset()
        log.info("%s cancelled FETCH %d (%d objects not sent)", peer.name, msg.request_id, len(fs.pending))

    def _on_PublishDone(self, peer: Peer, msg: m.PublishDone) -> None:
        track = peer.requests.get(msg.request_id) or next(
            (t for t in peer.upstream.values() if t.upstream_request_id == msg.request_id), None)
        if track is None:
            return
        # its last streams may still be in flight (another QUIC stream may overtake them):
        # end the track once as many streams as PUBLISH_DONE counts have ended
        track.done = msg
        self._maybe_done(track)

    def _maybe_done(self, track: Track) -> None:
        if track.done is not None and track.streams_ended >= track.done.stream_count:
            self._end_track(track, track.done.status_code, track.done.error_reason)

    # ---- helpers
    def _new_track(self, key: tuple[Namespace, bytes], publisher: Peer) -> Track:
        track = Track(key[0], key[1], publisher, TrackCache(self.cache_groups, self.cache_bytes))
        self.tracks[key] = track
        return track

    def _publisher_for(self, ns: Namespace) -> Peer | None:
        """The publisher of the longest registered namespace that is a prefix of `ns`."""
        best: tuple[int, Peer] | None = None
        for peer in self.peers.values():
            if not peer.session.accepts_requests:
                continue
            for pns in peer.namespaces:
                if ns[: len(pns)] == pns and (best is None or len(pns) > best[0]):
                    best = (len(pns), peer)
        return best[1] if best else None

    def _establish(self, track: Track) -> None:
        for ds in list(track.subscribers):
            if not ds.established:
                self._accept(ds)

    def _accept(self, ds: Downstream) -> None:
        """SUBSCRIBE_OK; the subscription then delivers what is published from its start on."""
        largest = ds.track.cache.largest()
        after = Location(largest.group, largest.object + 1) if largest else Location(0, 0)
        f = ds.params.subscription_filter
        if f is None or f.filter_type == FilterType.LARGEST_OBJECT:
            ds.start = after
        elif f.filter_type == FilterType.NEXT_GROUP_START:
            ds.start = Location(largest.group + 1, 0) if largest else Location(0, 0)
        else:  # absolute: never the past (that is FETCH's job)
            if f.end_group is not None and (f.end_group < f.start_location.group
                                            or (largest is not None and f.end_group < largest.group)):
                ds.peer.session.send(m.RequestError(ds.request_id, m.RequestErrorCode.INVALID_RANGE, 0,
                                                    "the end group is before the start or already over",
                                                    m.RequestKind.SUBSCRIBE))
                ds.peer.downstream.pop(ds.request_id, None)
                self._drop_downstream(ds)
                return
            ds.start = max(f.start_location, after)
            ds.end_group = f.end_group
        ds.largest = largest
        ext = ds.track.extensions
        if ds.peer.session.version == Version.DRAFT_14:  # only what its SUBSCRIBE_OK has fields for
            ext = tuple({k: v for k, v in reversed(ext) if k in _D14_TRACK_EXTENSIONS}.items())
        ds.peer.session.send(m.SubscribeOk(ds.request_id, ds.alias, MessageParams(largest_object=largest),
                                           tuple(sorted(ext, key=lambda kv: kv[0]))))
        ds.established = True
        self._fast_subscription(ds)

    def _fast_subscription(self, ds: Downstream) -> None:
        """Open-ended, forwarding subscriptions may be served by the fast path from the next
        subgroup on; paused or bounded ones are the relay's alone."""
        if self.fastpath is None or not ds.established:
            return
        if ds.forward and ds.end_group is None and ds.active:
            self.fastpath.downstream_ready(ds)
        else:
            self.fastpath.downstream_gone(ds)

    def _on_Fetch(self, peer: Peer, msg: m.Fetch) -> None:
        """Answer a FETCH from the cache: FETCH_OK, then one fetch stream in the requested group
        order, fed through the priority queue."""
        def refuse(code: int, reason: str) -> None:
            peer.session.send(m.RequestError(msg.request_id, code, 0, reason, m.RequestKind.FETCH))

        if msg.fetch_type == m.FetchType.STANDALONE:
            track = self.tracks.get((msg.track_namespace, msg.track_name))
            if track is None:
                return refuse(m.RequestErrorCode.DOES_NOT_EXIST, "track not known here")
            start, end = msg.start_location, msg.end_location
            last = Location(end.group, (1 << 62) - 1) if end.object == 0 else Location(end.group, end.object - 1)
        else:
            ds = peer.downstream.get(msg.joining_request_id)
            if ds is None:
                return refuse(m.RequestErrorCode.INVALID_JOINING_REQUEST_ID, "no such subscription")
            if ds.largest is None:
                return refuse(m.RequestErrorCode.INVALID_RANGE, "nothing published before the subscription")
            track, last = ds.track, ds.largest
            group = ds.largest.group - msg.joining_start if msg.fetch_type == m.FetchType.RELATIVE_JOINING \
                else msg.joining_start
            start = Location(max(group, 0), 0)
        floor = track.cache.floor
        if start < floor:  # objects of unknown status in the range: never leave them out silently
            return refuse(m.RequestErrorCode.INVALID_RANGE,
                          f"objects before group {floor.group} object {floor.object} are not cached here")
        # draft-16: no GROUP_ORDER means ascending; draft-14's 0 means the publisher's order
        order = msg.params.group_order or (track.group_order if peer.session.version == Version.DRAFT_14
                                           else GroupOrder.ASCENDING)
        objects = deque(track.cache.range(start, last, descending=order == GroupOrder.DESCENDING))
        if not objects:
            return refuse(m.RequestErrorCode.INVALID_RANGE, "nothing cached in that range")
        end_loc = max(o.location for o in objects)
        ext = track.extensions if peer.session.version == Version.DRAFT_16 else (
            (m.TrackExtension.DEFAULT_PUBLISHER_GROUP_ORDER, order),)
        peer.session.send(m.FetchOk(msg.request_id, False, Location(end_loc.group, end_loc.object + 1),
                                    track_extensions=ext))
        sub = msg.params.subscriber_priority
        fs = FetchStream(peer, msg.request_id, peer.session.open_fetch(msg.request_id), objects,
                         128 if sub is None else sub)
        peer.fetches[msg.request_id] = fs
        self._queue_fetch(fs)
        self.pump(peer)

    def _queue_fetch(self, fs: FetchStream) -> None:
        obj = _from_cache(fs.pending.popleft())
        prio = (fs.subscriber_priority, obj.publisher_priority, obj.group_id, obj.subgroup_id or 0, obj.object_id)
        heapq.heappush(fs.peer.queue, (prio, next(fs.peer.seq), fs, obj, None))
        fs.peer.queued_bytes += len(obj.payload)

    def _fetch_write(self, fs: FetchStream, obj: Object) -> None:
        fs.writer.write(obj)
        self.stats.cache_hits += 1
        if fs.pending:
            self._queue_fetch(fs)
        else:
            fs.writer.finish()
            fs.peer.fetches.pop(fs.request_id, None)

    def _drop_downstream(self, ds: Downstream) -> None:
        ds.active = False
        if self.fastpath:
            self.fastpath.downstream_gone(ds)
        self._purge(ds.peer, lambda it: it[2] is ds)
        for w in ds.writers.values():
            w.reset()
        ds.writers.clear()
        track = ds.track
        if ds in track.subscribers:
            track.subscribers.remove(ds)
        upstream = track.upstream_request_id
        if (not track.subscribers and upstream is not None and upstream in track.publisher.requests
                and not track.publisher.session.closed):
            # nobody left: end the upstream subscription (a PUBLISHed track stays)
            track.publisher.session.send(m.Unsubscribe(track.upstream_request_id))
            track.publisher.requests.pop(track.upstream_request_id, None)
            track.publisher.upstream.pop(track.upstream_alias, None)
            self.tracks.pop((track.namespace, track.name), None)
            self._replay_early(track.publisher, None)

    def _end_track(self, track: Track, code: int, reason: str) -> None:
        for peer in {ds.peer for ds in track.subscribers}:
            self.pump(peer, force=True)  # what was queued still goes out before PUBLISH_DONE
        for ds in list(track.subscribers):
            for w in ds.writers.values():
                w.finish()
            if self.fastpath:
                self.fastpath.downstream_gone(ds)
            if not ds.peer.session.closed and ds.established:
                ds.peer.session.send(m.PublishDone(ds.request_id, code, ds.streams, reason[:1024]))
            ds.peer.downstream.pop(ds.request_id, None)
        track.subscribers.clear()
        track.publisher.requests.pop(track.upstream_request_id, None)
        track.publisher.upstream.pop(track.upstream_alias, None)
        self.tracks.pop((track.namespace, track.name), None)
        self._replay_early(track.publisher, None)
        log.info("track %s ended (%s)", track.label, reason or code)

    def _peer_gone(self, peer: Peer) -> None:
        self.peers.pop(id(peer.session), None)
        self._withdraw(peer, set(peer.namespaces))
        for track in [t for t in self.tracks.values() if t.publisher is peer]:
            self._end_track(track, m.PublishDoneCode.GOING_AWAY, f"publisher {peer.name} went away")
        for ds in list(peer.downstream.values()):
            ds.writers.clear()  # its connection is gone: nothing to reset
            self._drop_downstream(ds)
        peer.downstream.clear()
        peer.fetches.clear()
        if self.fastpath:
            self.fastpath.peer_gone(peer)
        log.info("session %s gone", peer.name)

    # ---- data
    def _awaiting_alias(self, peer: Peer) -> bool:
        return any(not t.live for t in peer.requests.values())

    def _held(self, peer: Peer, ev: ObjectReceived | StreamEnded, alias: int | None) -> bool:
        """Hold `ev` if it is on a track alias not known yet while a SUBSCRIBE to `peer` awaits
        its SUBSCRIBE_OK (draft-16 sections 10.2/10.4.2: buffer briefly for that reordering)."""
        if alias is None or alias in peer.upstream or not self._awaiting_alias(peer):
            return False
        if isinstance(ev, StreamEnded) and alias not in peer.early:
            return False  # nothing of that stream held: the end is stray too
        size = _held_size(ev)
        if peer.early_bytes + size > EARLY_DATA_LIMIT:
            log.warning("%s: more than %d bytes on track aliases not established yet: dropping them",
                        peer.name, EARLY_DATA_LIMIT)
            self._discard_early(peer, list(peer.early))
            return False
        peer.early.setdefault(alias, []).append(ev)
        peer.early_bytes += size
        return True

    def _replay_early(self, peer: Peer, alias: int | None) -> None:
        """`alias` became known (None: a request ended otherwise): deliver what was held for it;
        once no SUBSCRIBE awaits an answer, what is still held belongs to no track and goes."""
        events = peer.early.pop(alias, []) if alias is not None else []
        peer.early_bytes -= sum(_held_size(e) for e in events)
        if not self._awaiting_alias(peer):
            self._discard_early(peer, list(peer.early))
        for ev in events:
            if isinstance(ev, ObjectReceived):
                self._object(peer, ev)
            else:
                self._stream_ended(peer, ev)

    def _discard_early(self, peer: Peer, aliases: list[int]) -> None:
        """Drop what was held for `aliases`; the ends of those streams still reach the fast path,
        so it forgets the streams (their alias being unknown, nothing else happens)."""
        for alias in aliases:
            for ev in peer.early.pop(alias, []):
                peer.early_bytes -= _held_size(ev)
                if isinstance(ev, StreamEnded):
                    self._stream_ended(peer, ev)

    def _object(self, peer: Peer, ev: ObjectReceived) -> None:
        track = peer.upstream.get(ev.track_alias) if ev.track_alias is not None else None
        if track is None:
            return  # not (or no longer) subscribed: stray data is dropped
        obj = ev.object
        if obj.publisher_priority is None:  # DEFAULT_PRIORITY: the track's, written explicitly downstream
            obj = replace(obj, publisher_priority=track.default_priority)
        track.objects_in += 1
        self.stats.objects_in += 1
        self.stats.bytes_in += len(obj.payload)
        if ev.stream_id is not None:
            track.stream_keys[ev.stream_id] = (obj.group_id, obj.subgroup_id)
        track.cache.add(CachedObject(Location(obj.group_id, obj.object_id), obj.subgroup_id,
                                     obj.publisher_priority, int(obj.status), tuple(obj.extensions), obj.payload))
        for ds in track.subscribers:
            if not ds.established:
                continue
            if self.fastpath and ds.forward:
                fast = (("forward" if self.fastpath.owns_datagrams(ds) else None) if ev.stream_id is None
                        else self.fastpath.owns(ds, peer, ev.stream_id))
                if fast == "dropped":
                    self._drop(ds)
                    continue
                if fast == "forward":
                    ds.fast_objects += 1
                    self.stats.fast_objects += 1
                    continue
            if not self._admit(ds, obj):
                continue
            if ev.stream_id is None:
                ds.peer.session.send_datagram(ObjectDatagram(ds.alias, obj))
                self._count_out(ds, obj)
            else:
                self._enqueue(ds, obj)
        for peer in {ds.peer for ds in track.subscribers}:
            self.pump(peer)

    # ---- scheduling
    def _priority(self, ds: Downstream, obj: Object) -> tuple[int, int, int, int, int]:
        """Draft-16 scheduling order: subscriber priority, publisher priority (resolved on arrival),
        then the subscription's group order: the subscriber's, else the publisher's."""
        sub = ds.params.subscriber_priority if ds.params.subscriber_priority is not None else 128
        order = ds.params.group_order or ds.track.group_order
        group = -obj.group_id if order == GroupOrder.DESCENDING else obj.group_id
        return (sub, obj.publisher_priority, group, obj.subgroup_id or 0, obj.object_id)

    def _enqueue(self, ds: Downstream, obj: Object) -> None:
        prio = self._priority(ds, obj)
        key = (obj.group_id, obj.subgroup_id or 0)
        heapq.heappush(ds.peer.queue, (prio, next(ds.peer.seq), ds, obj, key))
        ds.peer.queued_bytes += len(obj.payload)
        ds.queued[key] = prio

    def pump(self, peer: Peer, force: bool = False) -> None:
        """Hand queued objects to QUIC in priority order while the connection can carry them
        (all of them with `force`)."""
        transport = peer.session.transport
        if peer.session.closed:
            peer.queue.clear()
            peer.queued_bytes = 0
            return
        window = transport.send_window()
        while peer.queue and (force or transport.backlog() < window):
            _, _, ds, obj, key = heapq.heappop(peer.queue)
            if isinstance(ds, FetchStream):
                peer.queued_bytes -= len(obj.payload)
                self._fetch_write(ds, obj)
                continue
            if obj is None:  # the subgroup's FIN, queued behind its objects
                writer = ds.writers.pop(key, None)
                if writer is not None:
                    writer.finish()
                continue
            peer.queued_bytes -= len(obj.payload)
            if ds.active and key not in ds.abandoned:
                self._send(ds, obj, fin=False)

    def _purge(self, peer: Peer, drop: Callable[[tuple], bool]) -> int:
        """Remove queued items matching `drop`; returns how many objects went."""
        keep = [it for it in peer.queue if not drop(it)]
        gone = [it for it in peer.queue if drop(it) and it[3] is not None]
        if len(keep) != len(peer.queue):
            peer.queue = keep
            heapq.heapify(peer.queue)
            peer.queued_bytes -= sum(len(it[3].payload) for it in gone)
        return len(gone)

    def _admit(self, ds: Downstream, obj: Object) -> bool:
        """Whether a live object goes to this subscriber; a subscriber that fell behind skips
        to newer groups (its older subgroup streams are reset, never left with holes)."""
        key = (obj.group_id, obj.subgroup_id or 0)
        peer = ds.peer
        if not ds.forward or Location(obj.group_id, obj.object_id) < ds.start or (
                ds.end_group is not None and obj.group_id > ds.end_group):
            return False  # paused, or outside the subscription's range: not part of it
        backlog = peer.session.transport.backlog() + peer.queued_bytes
        if obj.group_id > ds.group:
            if backlog > self.max_backlog and (ds.writers or ds.queued):
                older = {k for k in (*ds.writers, *ds.queued) if k[0] < obj.group_id}
                for old in older:
                    writer = ds.writers.pop(old, None)
                    if writer is not None:
                        writer.reset()
                    ds.queued.pop(old, None)
                    ds.abandoned.add(old)
                for _ in range(self._purge(peer, lambda it: it[2] is ds and it[4] in older)):
                    self._drop(ds)
                log.info("%s is %d bytes behind on %s: skipped to group %d", peer.name, backlog,
                         ds.track.label, obj.group_id)
            ds.group = obj.group_id
        if key in ds.abandoned or (obj.group_id < ds.group and key not in ds.writers and key not in ds.sent):
            return self._drop(ds)
        if backlog > 4 * self.max_backlog:
            writer = ds.writers.pop(key, None)
            if writer is not None:
                writer.reset()
            ds.abandoned.add(key)
            ds.queued.pop(key, None)
            for _ in range(self._purge(peer, lambda it: it[2] is ds and it[4] == key)):
                self._drop(ds)
            return self._drop(ds)
        return True

    def _drop(self, ds: Downstream) -> bool:
        ds.dropped += 1
        self.stats.dropped_objects += 1
        return False

    def _send(self, ds: Downstream, obj: Object, fin: bool) -> None:
        key = (obj.group_id, obj.subgroup_id or 0)
        last = ds.sent.get(key)
        if last is not None and obj.object_id <= last:
            return  # already sent (from the cache)
        writer = ds.writers.get(key)
        if writer is None:
            # extensions on: later objects of the subgroup may carry some (one byte per object)
            header = subgroup_header_for(ds.alias, obj.group_id, key[1], obj.object_id,
                                         publisher_priority=obj.publisher_priority,
                                         version=ds.peer.session.version, extensions=True)
            writer = ds.writers[key] = ds.peer.session.open_subgroup(header)
            ds.streams += 1
        writer.write(obj, fin=fin)
        ds.sent[key] = obj.object_id
        self._count_out(ds, obj)
        if fin:
            ds.writers.pop(key, None)

    def _count_out(self, ds: Downstream, obj: Object) -> None:
        ds.objects += 1
        self.stats.objects_out += 1
        self.stats.bytes_out += len(obj.payload)

    def _stream_ended(self, peer: Peer, ev: StreamEnded) -> None:
        if self.fastpath:
            self.fastpath.stream_ended(peer, ev.stream_id, ev.reset_code is not None)
        header = ev.header
        if not isinstance(header, SubgroupHeader):
            return
        track = peer.upstream.get(header.track_alias)
        if track is None:
            return
        track.streams_ended += 1
        key = track.stream_keys.pop(ev.stream_id, None)
        if key is None:
            self._maybe_done(track)
            return
        for ds in track.subscribers:
            prio = ds.queued.pop(key, None)
            if ev.reset_code is None:
                if prio is not None:  # FIN after the subgroup's queued objects
                    heapq.heappush(ds.peer.queue, ((*prio[:4], 1 << 62), next(ds.peer.seq), ds, None, key))
                elif key in ds.writers:
                    ds.writers.pop(key).finish()
            else:
                self._purge(ds.peer, lambda it, ds=ds: it[2] is ds and it[4] == key)
                writer = ds.writers.pop(key, None)
                if writer is not None:
                    writer.reset(ev.reset_code)
        for peer in {ds.peer for ds in track.subscribers}:
            self.pump(peer)
        self._maybe_done(track)


def _held_size(ev: ObjectReceived | StreamEnded) -> int:
    """What holding an event costs against EARLY_DATA_LIMIT (payload, extensions, a fixed part)."""
    if isinstance(ev, StreamEnded):
        return 64
    ext = sum(len(v) if isinstance(v, bytes | bytearray) else 8 for _, v in ev.object.extensions)
    return 64 + len(ev.object.payload) + ext


def _from_cache(obj: CachedObject) -> Object:
    return Object(obj.location.group, obj.subgroup_id, obj.location.object, obj.publisher_priority,
                  ObjectStatus(obj.status), list(obj.extensions), obj.payload)
