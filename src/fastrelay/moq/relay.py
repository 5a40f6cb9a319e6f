"""MoQT relay core: namespaces, tracks, deduplicated upstream subscriptions, forwarding,
cache and late join. It reacts to session events and calls session methods; it opens no
sockets and keeps no timers, so tests can drive it with in-memory sessions.

Forwarding keeps one downstream subgroup stream per (subscriber, group, subgroup), in object
order. Objects wait in a per-session queue ordered as the draft's scheduling rules say
(subscriber priority, then publisher priority, then the subscription's group order) and are
handed to QUIC only while the connection's unacknowledged bytes stay below what its
congestion window can carry, so what QUIC sends next is always the most important object.
The queue is bounded with the unacknowledged bytes: `max_backlog` bounds both together, a
subscriber beyond it skips to the next group (older subgroups are reset or dropped whole,
never left with holes), and beyond four times it its current subgroup goes too.

As in the draft, a SUBSCRIBE delivers objects published after it (per its filter); the past
comes from the cache through FETCH: a late joiner that wants the current group from its
start sends a relative joining FETCH (start 0), which is contiguous with its subscription and
does not overlap it; only a SUBSCRIBE with filter Largest Object may be joined (draft-14 and
-16: anything else closes the session, PROTOCOL_VIOLATION). A FETCH response is read from
the cache as it is written, one object at a time through the same queue, so FETCH_CANCEL can
stop it (the stream is reset) and it holds no copy of the range. Draft-16 fetch streams carry
no Object Status: an End of Group or End of Track object is left out (the gap it leaves means
"does not exist") and FETCH_OK says End Of Track; draft-14 ones carry the status objects.
A FETCH that reaches below what the cache holds completely (see cache.py) is refused with
INVALID_RANGE; if eviction overtakes a response in progress, its stream is reset
(UNKNOWN_OBJECT_STATUS in draft-16).

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
and tells it so with PUBLISH_NAMESPACE_CANCEL). A namespace subscriber that asked for tracks
(draft-16 Subscribe Options PUBLISH or both; always in draft-14) is sent a PUBLISH for every
track being relayed under its prefix, now and as tracks go live; objects follow once it
answers PUBLISH_OK (with its Forward State and filter), from what follows the Largest
Location the PUBLISH named.

Limits per session: requests in progress (`max_requests`: MAX_REQUEST_ID is raised only as
earlier requests finish), FETCH responses in progress (`max_fetches`), one subscription per
track (a second gets DUPLICATE_SUBSCRIPTION), and the queue above.

Failures: a relay error while serving one request fails that request only (REQUEST_ERROR,
PUBLISH_DONE, a reset fetch stream, UNSUBSCRIBE upstream...) with one log line; the session
and its other requests go on. Only a failure outside any request closes the session
(INTERNAL_ERROR), as its state is then unknown.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from ..datapath.interface import Datapath, Owner
from . import messages as m
from .cache import CachedObject, TrackCache
from .data import Object, ObjectDatagram, ObjectStatus, SubgroupHeader, subgroup_header_for
from .params import FilterType, GroupOrder, MessageParams, SubscriptionFilter, Version
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
    StreamStopped,
    SubgroupWriter,
)
from .wire import ErrorCode, Location, render_name

log = logging.getLogger("fastrelay.relay")

Namespace = tuple[bytes, ...]
DEFAULT_PUBLISHER_PRIORITY = 128  # draft-16 section 11: a track's priority when the publisher names none
EARLY_DATA_LIMIT = 1 << 20  # bytes per publisher held for track aliases its SUBSCRIBE_OK has not named yet
BUSY_RETRY_MS = 500  # draft-16 Retry Interval suggested with a FETCH refused for too many in progress
# data stream reset codes (draft-16 section 10.4.3; draft-14 has the first only)
RESET_INTERNAL_ERROR = 0x0
RESET_UNKNOWN_OBJECT_STATUS = 0x4
D14_NO_OBJECTS = 0x6  # draft-14 FETCH_ERROR NO_OBJECTS (draft-16 answers an empty range with an empty stream)


# track extensions a draft-14 SUBSCRIBE_OK or PUBLISH can carry (as its Group Order field and parameters)
_D14_TRACK_EXTENSIONS = frozenset({m.TrackExtension.DEFAULT_PUBLISHER_GROUP_ORDER, m.TrackExtension.DELIVERY_TIMEOUT,
                                   m.TrackExtension.MAX_CACHE_DURATION})
_KIND_OF = {m.Subscribe: m.RequestKind.SUBSCRIBE, m.Publish: m.RequestKind.PUBLISH, m.Fetch: m.RequestKind.FETCH,
            m.TrackStatus: m.RequestKind.TRACK_STATUS, m.PublishNamespace: m.RequestKind.PUBLISH_NAMESPACE,
            m.SubscribeNamespace: m.RequestKind.SUBSCRIBE_NAMESPACE, m.RequestUpdate: m.RequestKind.REQUEST_UPDATE}


@dataclass
class NamespaceSub:
    """A peer's SUBSCRIBE_NAMESPACE: what it wants to hear of under its prefix."""

    request_id: int
    stream_id: int | None  # draft-16 request stream; None: draft-14 (control stream)
    namespaces: bool  # NAMESPACE (draft-14: PUBLISH_NAMESPACE) for matching namespaces
    tracks: bool  # PUBLISH for matching tracks
    forward: bool  # the Forward State those PUBLISHes offer


@dataclass(eq=False)  # identity: one per session
class Peer:
    """One connected MoQT session and what the relay knows about it."""

    session: MoqtSession
    name: str
    namespaces: set[Namespace] = field(default_factory=set)
    upstream: dict[int, Track] = field(default_factory=dict)  # track alias from this publisher -> track
    requests: dict[int, Track] = field(default_factory=dict)  # our SUBSCRIBE's request id (to this publisher) -> track
    # request id of a subscription -> it (theirs for a SUBSCRIBE, ours for a PUBLISH we sent)
    downstream: dict[int, Downstream] = field(default_factory=dict)
    ns_subs: dict[Namespace, NamespaceSub] = field(default_factory=dict)  # prefix -> namespace subscription
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
    published: bool = False  # the relay began it with PUBLISH (request_id is ours), not the peer with SUBSCRIBE
    joinable: bool = False  # its SUBSCRIBE's filter is Largest Object: a joining FETCH may name it
    writers: dict[tuple[int, int], SubgroupWriter] = field(default_factory=dict)  # (group, subgroup)
    sent: dict[tuple[int, int], int] = field(default_factory=dict)  # (group, subgroup) -> last object id
    abandoned: set[tuple[int, int]] = field(default_factory=set)  # reset because the subscriber fell behind
    params: MessageParams = field(default_factory=MessageParams)
    start: Location = field(default_factory=lambda: Location(0, 0))  # first location delivered
    end_group: int | None = None  # AbsoluteRange: last group delivered
    largest: Location | None = None  # the track's largest location when the subscription began
    forward: bool = True  # REQUEST_UPDATE with FORWARD 0 pauses delivery
    active: bool = True
    # (group, subgroup) -> (priority of its last item in the queue, items of it in the queue, FIN included)
    queued: dict[tuple[int, int], tuple[tuple, int]] = field(default_factory=dict)
    group: int = -1  # newest group started for this subscriber
    skipped_below: int = -1  # it fell behind and skipped to this group: older subgroups never start
    objects: int = 0
    fast_objects: int = 0  # of its objects, those the data path delivered
    dropped: int = 0
    streams: int = 0  # subgroup streams opened for it (PUBLISH_DONE's stream count)


@dataclass(eq=False)  # identity: one per FETCH
class FetchStream:
    """A FETCH response being written: its objects are read from the cache one at a time (the
    next one is queued when one is written), in the response's order."""

    peer: Peer
    request_id: int
    writer: FetchWriter
    cache: TrackCache
    items: Iterator[CachedObject]  # the rest of the range, as the cache holds it when it is read
    start: Location
    descending: bool
    subscriber_priority: int
    after: Location | None = None  # the location following the last object written (None: none yet)


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
    refused_by: set[Peer] = field(default_factory=set)  # publishers of the namespace that refused the SUBSCRIBE

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
    fast_objects: int = 0  # objects a data path (the kernel) delivered instead of the relay
    failed_requests: int = 0  # requests ended because of a relay error


class Relay:
    """The relay core; call `attach(session, name)` per session and feed it the session's events.

    `max_backlog` bounds, per session, unacknowledged plus queued bytes (see the module text);
    `max_requests` how many requests each session may have in progress (its MAX_REQUEST_ID
    grows only as they finish); `max_fetches` how many FETCH responses each session may have
    in progress (more are refused)."""

    def __init__(self, cache_groups: int = 8, cache_bytes: int = 64 << 20, max_backlog: int = 1 << 20,
                 datapath: Datapath | None = None, max_requests: int = 128, max_fetches: int = 16) -> None:
        if max_requests < 1 or max_fetches < 1:
            raise ValueError("max_requests and max_fetches must be positive")
        self.datapath = datapath
        self.cache_groups = cache_groups
        self.cache_bytes = cache_bytes
        # a subscriber with more than this unacknowledged or queued skips to the next group; four
        # times this, and even the current subgroup is reset: buffering per subscriber stays bounded
        self.max_backlog = max_backlog
        self.max_requests = max_requests
        self.max_fetches = max_fetches
        self.peers: dict[int, Peer] = {}
        self.tracks: dict[tuple[Namespace, bytes], Track] = {}
        self.stats = RelayStats()

    # ---- sessions
    def attach(self, session: MoqtSession, name: str) -> Peer:
        """Serve `session` (before its SETUP: the request limit goes into SERVER_SETUP)."""
        session.limit_requests(self.max_requests)
        peer = Peer(session, name)
        self.peers[id(session)] = peer
        self.stats.sessions += 1
        return peer

    def on_event(self, peer: Peer, ev: Event) -> None:
        """Handle one session event. Failures of one request are handled where it is served;
        one outside any request closes this session only (INTERNAL_ERROR)."""
        try:
            self._dispatch(peer, ev)
        except Exception as exc:
            _log_failure(f"session {peer.name}: handling {type(ev).__name__}", exc)
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
            self._message(peer, ev.message, ev.stream_id)
        elif isinstance(ev, StreamStopped):
            self._stream_stopped(peer, ev.stream_id)
        elif isinstance(ev, RequestStreamClosed):
            peer.ns_subs = {p: s for p, s in peer.ns_subs.items() if s.stream_id != ev.stream_id}
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
                self._cancel_namespace(peer, rid, ns, "publisher sent GOAWAY: no new subscriptions here")
        self._withdraw(peer, set(peer.namespaces))

    def _cancel_namespace(self, peer: Peer, rid: int, ns: Namespace, reason: str) -> None:
        d16 = peer.session.version == Version.DRAFT_16
        peer.session.send(m.PublishNamespaceCancel(rid if d16 else None, m.RequestErrorCode.INTERNAL_ERROR, reason,
                                                   None if d16 else ns))

    # ---- control
    def _message(self, peer: Peer, msg: m.Message, stream_id: int | None) -> None:
        """Handle a control message; a relay error in it fails the request it is about."""
        handler = getattr(self, f"_on_{type(msg).__name__}", None)
        if handler is None and not isinstance(msg, m.SubscribeNamespace):
            log.debug("%s: %s ignored", peer.name, type(msg).__name__)
            return
        try:
            if isinstance(msg, m.SubscribeNamespace):
                self._subscribe_namespace(peer, msg, stream_id)
            else:
                handler(peer, msg)
        except Exception as exc:
            rid = self._request_of(peer, msg)
            if rid is None:
                raise  # about no request: the session's own failure
            self._request_failed(peer, rid, type(msg).__name__, exc)

    def _request_of(self, peer: Peer, msg: m.Message) -> int | None:
        """The request `msg` is about: a request of the peer's, or one of ours it answers or ends."""
        rid = getattr(msg, "request_id", None)
        if rid is not None:
            return rid
        if isinstance(msg, m.PublishNamespaceDone):
            return next((r for r, ns in peer.ns_requests.items() if ns == msg.track_namespace), None)
        if isinstance(msg, m.UnsubscribeNamespace):
            sub = peer.ns_subs.get(msg.track_namespace_prefix)
            return sub.request_id if sub else None
        if isinstance(msg, m.PublishNamespaceCancel) and msg.track_namespace is not None:
            return peer.announced.get(msg.track_namespace)
        return None

    def _fail_request(self, peer: Peer, rid: int, reason: str) -> None:
        """End request `rid` of `peer`'s session (its or ours) after a relay error: whatever the
        relay holds for it goes, and the peer is told the way the request's state allows."""
        self.stats.failed_requests += 1
        try:
            self._end_request(peer, rid, reason)
        except Exception as exc:  # its state is beyond repair: leave it, keep the session
            _log_failure(f"{peer.name}: ending request {rid}", exc)

    def _end_request(self, peer: Peer, rid: int, reason: str) -> None:
        session = peer.session
        ds, fs = peer.downstream.get(rid), peer.fetches.get(rid)
        track = peer.requests.get(rid) or next(
            (t for t in peer.upstream.values() if t.upstream_request_id == rid), None)
        sub = next((s for s in peer.ns_subs.values() if s.request_id == rid), None)
        if ds is not None:
            self._fail_downstream(ds, reason)
        if fs is not None:
            self._fail_fetch(fs)
        if track is not None:
            self._end_track(track, m.PublishDoneCode.INTERNAL_ERROR, reason, unsubscribe=True)
        ns = peer.ns_requests.get(rid)
        if ns in peer.namespaces:
            self._withdraw(peer, {ns})
            if not session.unanswered(rid):
                self._cancel_namespace(peer, rid, ns, reason)
        if sub is not None:
            peer.ns_subs = {p: s for p, s in peer.ns_subs.items() if s is not sub}
            if sub.stream_id is not None and not session.unanswered(rid):
                session.end_request_stream(sub.stream_id)  # draft-16: ends the namespace subscription
        if session.unanswered(rid) and not session.closed:
            answer = m.RequestError(rid, m.RequestErrorCode.INTERNAL_ERROR, 0, reason[:1024],
                                    _KIND_OF.get(session.peer_request(rid)))
            if sub is not None and sub.stream_id is not None:
                session.send_on(sub.stream_id, answer, fin=True)
            else:
                session.send(answer)

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
        """Draft-14: the namespace subscription ends; nothing more is said about namespaces under
        it (subscriptions it accepted with PUBLISH_OK go on)."""
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
        peer.ns_requests = {rid: ns for rid, ns in peer.ns_requests.items() if ns in peer.namespaces}
        for ns in sorted(namespaces):
            if not self._published(ns):
                self._tell_namespace_subscribers(ns, peer, gone=True)

    def _subscribe_namespace(self, peer: Peer, msg: m.SubscribeNamespace, stream_id: int | None) -> None:
        """Reply, then name every matching published namespace and offer every matching track,
        now and as they come (draft-16: NAMESPACE / NAMESPACE_DONE on the request stream, as
        its Subscribe Options ask; draft-14: PUBLISH_NAMESPACE and PUBLISH_NAMESPACE_DONE on the
        control stream; both: PUBLISH on the control stream)."""
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
        options = msg.subscribe_options
        sub = NamespaceSub(msg.request_id, stream_id, namespaces=options != m.SubscribeOptions.PUBLISH,
                           tracks=options != m.SubscribeOptions.NAMESPACE, forward=msg.params.forward is not False)
        peer.ns_subs[prefix] = sub
        reply(m.RequestOk(msg.request_id, request_kind=kind))
        published = {ns for other in self.peers.values() if other is not peer for ns in other.namespaces}
        for ns in sorted(published):
            if ns[: len(prefix)] == prefix:
                self._tell(peer, prefix, ns, gone=False)
        for track in list(self.tracks.values()):
            if track.live and track.namespace[: len(prefix)] == prefix:
                self._offer(peer, sub, track)

    def _tell_namespace_subscribers(self, ns: Namespace, publisher: Peer, gone: bool) -> None:
        for peer in list(self.peers.values()):
            if peer is publisher or peer.session.closed:
                continue
            for prefix, sub in list(peer.ns_subs.items()):
                if ns[: len(prefix)] == prefix:
                    try:
                        self._tell(peer, prefix, ns, gone)
                    except Exception as exc:
                        self._request_failed(peer, sub.request_id, f"telling of namespace {render_name(ns)}", exc)

    def _tell(self, peer: Peer, prefix: Namespace, ns: Namespace, gone: bool) -> None:
        sub = peer.ns_subs[prefix]
        if not sub.namespaces:
            return
        if sub.stream_id is not None:  # draft-16
            suffix = ns[len(prefix):]
            peer.session.send_on(sub.stream_id, m.NamespaceDone(suffix) if gone else m.Namespace(suffix))
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

    def _offer_track(self, track: Track) -> None:
        """`track` went live: PUBLISH it to every namespace subscriber that wants its tracks."""
        for peer in list(self.peers.values()):
            if peer.session.closed:
                continue
            for prefix, sub in list(peer.ns_subs.items()):
                if track.namespace[: len(prefix)] == prefix:
                    try:
                        self._offer(peer, sub, track)
                    except Exception as exc:
                        self._request_failed(peer, sub.request_id, f"offering track {track.label}", exc)

    def _request_failed(self, peer: Peer, rid: int, what: str, exc: Exception) -> None:
        """A relay error in work done for request `rid` of `peer`'s session while handling
        something else (often another session's event): it fails that request only."""
        _log_failure(f"{peer.name}: {what} for request {rid}", exc)
        self._fail_request(peer, rid, f"relay error: {exc}")

    def _offer(self, peer: Peer, sub: NamespaceSub, track: Track) -> None:
        """PUBLISH `track` to `peer` (its namespace subscription `sub` matches the track), unless
        it subscribes to it already, publishes it, or wants no tracks. Objects follow its PUBLISH_OK."""
        if not sub.tracks or peer is track.publisher or self._subscription(peer, track.namespace, track.name):
            return
        try:
            rid = peer.session.next_request_id()
        except ConnectionError as exc:  # it sent GOAWAY, or allows no more requests now
            log.info("%s not offered track %s: %s", peer.name, track.label, exc)
            return
        largest = track.cache.largest()
        ds = Downstream(peer, rid, next(peer.aliases), track, published=True, forward=sub.forward, largest=largest,
                        start=_after(largest))
        peer.session.send(m.Publish(rid, track.namespace, track.name, ds.alias,
                                    MessageParams(largest_object=largest, forward=None if sub.forward else False),
                                    _track_extensions(track, peer.session.version)))
        peer.downstream[rid] = ds
        track.subscribers.append(ds)

    @staticmethod
    def _subscription(peer: Peer, namespace: Namespace, name: bytes) -> Downstream | None:
        return next((ds for ds in peer.downstream.values()
                     if ds.track.namespace == namespace and ds.track.name == name), None)

    def _on_PublishOk(self, peer: Peer, msg: m.PublishOk) -> None:
        """A namespace subscriber accepted a track we PUBLISHed: deliver from now on, with the
        Forward State, priority, group order and filter it chose."""
        ds = peer.downstream.get(msg.request_id)
        if ds is None or not ds.published:
            return  # the track ended (PUBLISH_DONE crossed the PUBLISH_OK)
        if ds.established:
            peer.session.fail(ErrorCode.PROTOCOL_VIOLATION, f"second PUBLISH_OK for request {msg.request_id}")
            return
        p = msg.params
        ds.params = replace(ds.params, **{k: getattr(p, k) for k in p.present()})
        if p.forward is not None:
            ds.forward = p.forward
        if not self._apply_filter(ds, p.subscription_filter):
            peer.downstream.pop(ds.request_id, None)
            self._drop_downstream(ds)
            peer.session.send(m.PublishDone(ds.request_id, m.PublishDoneCode.SUBSCRIPTION_ENDED, 0,
                                            "the filter's end group is before its start or already over"))
            return
        ds.established = True
        self._datapath_subscription(ds)

    def _on_Publish(self, peer: Peer, msg: m.Publish) -> None:
        key = (msg.track_namespace, msg.track_name)
        old = self.tracks.get(key)
        if old is not None and old.publisher is peer:
            if old.live:  # draft-16 section 5.1: one subscription per track and role
                peer.session.send(m.RequestError(msg.request_id, _duplicate(peer), 0,
                                                 f"already publishing {old.label}", m.RequestKind.PUBLISH))
                return
            # our SUBSCRIBE for it is unanswered: it ends before the PUBLISH is accepted (section 5.1)
            peer.session.send(m.Unsubscribe(old.upstream_request_id))
            peer.requests.pop(old.upstream_request_id, None)
        elif old is not None:
            self._end_track(old, m.PublishDoneCode.GOING_AWAY, "another publisher took the track over",
                            unsubscribe=True)
        track = self.tracks.get(key) or self._new_track(key, peer)
        self._upstream_established(track, msg.track_extensions, msg.params.largest_object)
        # echo the publisher's group order (draft-14 PUBLISH_OK requires one)
        peer.session.send(m.PublishOk(msg.request_id, MessageParams(forward=True, group_order=track.group_order)))
        track.upstream_request_id, track.upstream_alias, track.live = msg.request_id, msg.track_alias, True
        peer.upstream[msg.track_alias] = track
        if self.datapath:
            self.datapath.upstream_track(peer, msg.track_alias, track, track.default_priority)
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
        if self._subscription(sub, *key) is not None:  # draft-16 section 5.1: one per track and role
            sub.session.send(m.RequestError(msg.request_id, _duplicate(sub), 0, "already subscribed to this track",
                                            m.RequestKind.SUBSCRIBE))
            return
        track = self.tracks.get(key)
        if track is None:
            candidates = self._publishers_for(msg.track_namespace)
            track = self._new_track(key, candidates[0]) if candidates else None
            reason = self._subscribe_upstream(track) if track is not None else "no publisher for this namespace"
            if reason is not None:
                sub.session.send(m.RequestError(msg.request_id, m.RequestErrorCode.DOES_NOT_EXIST, 0, reason,
                                                m.RequestKind.SUBSCRIBE))
                return
        f = msg.params.subscription_filter
        ds = Downstream(sub, msg.request_id, next(sub.aliases), track, params=msg.params,
                        joinable=f is not None and f.filter_type == FilterType.LARGEST_OBJECT)
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
        if self.datapath:
            self.datapath.upstream_track(peer, msg.track_alias, track, track.default_priority)
        self._establish(track)
        self._replay_early(peer, msg.track_alias)

    def _on_RequestError(self, peer: Peer, msg: m.RequestError) -> None:
        ds = peer.downstream.get(msg.request_id)
        if ds is not None and ds.published:  # a namespace subscriber declined a track we PUBLISHed
            del peer.downstream[msg.request_id]
            self._drop_downstream(ds)
            return
        track = peer.requests.pop(msg.request_id, None)
        self._replay_early(peer, None)
        if track is None:
            refused = next((ns for ns, rid in peer.announced.items() if rid == msg.request_id), None)
            if refused is not None:  # a draft-14 namespace subscriber declined a namespace we named
                del peer.announced[refused]
            return
        if not track.live:
            track.refused_by.add(peer)
            if self._subscribe_upstream(track) is None:
                return  # another publisher of the namespace may have the track
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
        self._datapath_subscription(ds)
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

    def _stream_stopped(self, peer: Peer, stream_id: int) -> None:
        """The subscriber stopped one of its subgroup or fetch streams (STOP_SENDING; the transport
        reset it): that subgroup, or that FETCH response, ends for this subscriber alone, and
        nothing more of it is queued or written."""
        for ds in peer.downstream.values():
            key = next((k for k, w in ds.writers.items() if w.stream_id == stream_id), None)
            if key is not None:
                del ds.writers[key]
                ds.queued.pop(key, None)
                ds.abandoned.add(key)
                for _ in range(self._purge(peer, lambda it, ds=ds, key=key: it[2] is ds and it[4] == key)):
                    self._drop(ds)
                log.info("%s stopped subgroup %s of %s", peer.name, key, ds.track.label)
                return
        rid = next((r for r, fs in peer.fetches.items() if fs.writer.stream_id == stream_id), None)
        if rid is not None:
            fs = peer.fetches.pop(rid)
            self._purge(peer, lambda it: it[2] is fs)
            log.info("%s stopped the response to FETCH %d", peer.name, rid)

    def _on_FetchCancel(self, peer: Peer, msg: m.FetchCancel) -> None:
        """Stop a FETCH response in progress: what is queued goes, the stream is reset."""
        fs = peer.fetches.pop(msg.request_id, None)
        if fs is None:
            return  # already complete (FIN sent) or refused: nothing to stop
        self._purge(peer, lambda it: it[2] is fs)
        fs.writer.reset()
        log.info("%s cancelled FETCH %d", peer.name, msg.request_id)

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

    def _publishers_for(self, ns: Namespace) -> list[Peer]:
        """The publishers of a registered namespace that is a prefix of `ns`, the longest match
        first (they may publish different tracks of one namespace)."""
        found: list[tuple[int, Peer]] = []
        for peer in self.peers.values():
            if not peer.session.accepts_requests:
                continue
            longest = max((len(pns) for pns in peer.namespaces if ns[: len(pns)] == pns), default=0)
            if longest:
                found.append((longest, peer))
        return [peer for _, peer in sorted(found, key=lambda f: -f[0])]

    def _subscribe_upstream(self, track: Track) -> str | None:
        """SUBSCRIBE the track from the next matching publisher it was not refused by yet; None
        once asked, else why none could be asked. One publisher at a time: the first that
        accepts publishes the track (the others may publish other tracks of the namespace)."""
        reason = "no publisher for this namespace"
        for publisher in self._publishers_for(track.namespace):
            if publisher in track.refused_by:
                continue
            try:
                rid = publisher.session.next_request_id()
            except ConnectionError as exc:  # it sent GOAWAY, or allows no more requests now
                reason = f"publisher cannot take a request: {exc}"
                continue
            track.publisher, track.upstream_request_id = publisher, rid
            publisher.requests[rid] = track
            publisher.session.send(m.Subscribe(rid, track.namespace, track.name, MessageParams(forward=True)))
            return None
        return reason

    def _establish(self, track: Track) -> None:
        """The track is live upstream: answer the subscriptions waiting for it, offer it to
        namespace subscribers."""
        for ds in list(track.subscribers):
            if not ds.established and not ds.published:
                try:
                    self._accept(ds)
                except Exception as exc:
                    self._request_failed(ds.peer, ds.request_id, f"accepting the SUBSCRIBE to {track.label}", exc)
        self._offer_track(track)

    def _apply_filter(self, ds: Downstream, f: SubscriptionFilter | None) -> bool:
        """Set where the subscription starts (and ends) from its filter, relative to the track's
        largest location now; False if its range is already over or ends before it starts."""
        largest = ds.track.cache.largest()
        after = _after(largest)
        if f is None:  # unfiltered: what follows the Largest Location it was told of
            ds.start = _after(ds.largest) if ds.published else after
        elif f.filter_type == FilterType.LARGEST_OBJECT:
            ds.start = after
        elif f.filter_type == FilterType.NEXT_GROUP_START:
            ds.start = Location(largest.group + 1, 0) if largest else Location(0, 0)
        else:  # absolute: never the past (that is FETCH's job)
            if f.end_group is not None and (f.end_group < f.start_location.group
                                            or (largest is not None and f.end_group < largest.group)):
                return False
            ds.start = max(f.start_location, after)
            ds.end_group = f.end_group
        return True

    def _accept(self, ds: Downstream) -> None:
        """SUBSCRIBE_OK; the subscription then delivers what is published from its start on."""
        if not self._apply_filter(ds, ds.params.subscription_filter):
            ds.peer.session.send(m.RequestError(ds.request_id, m.RequestErrorCode.INVALID_RANGE, 0,
                                                "the end group is before the start or already over",
                                                m.RequestKind.SUBSCRIBE))
            ds.peer.downstream.pop(ds.request_id, None)
            self._drop_downstream(ds)
            return
        ds.largest = ds.track.cache.largest()
        ds.peer.session.send(m.SubscribeOk(ds.request_id, ds.alias, MessageParams(largest_object=ds.largest),
                                           _track_extensions(ds.track, ds.peer.session.version)))
        ds.established = True
        self._datapath_subscription(ds)

    def _datapath_subscription(self, ds: Downstream) -> None:
        """Open-ended, forwarding subscriptions may be served by the data path from the next
        subgroup on; paused or bounded ones are the relay's alone."""
        if self.datapath is None or not ds.established:
            return
        if ds.forward and ds.end_group is None and ds.active:
            self.datapath.downstream_ready(ds)
        else:
            self.datapath.downstream_gone(ds)

    def _on_Fetch(self, peer: Peer, msg: m.Fetch) -> None:
        """Answer a FETCH from the cache: FETCH_OK, then one fetch stream in the requested group
        order, read from the cache through the priority queue."""
        d16 = peer.session.version == Version.DRAFT_16

        def refuse(code: int, reason: str, retry_ms: int = 0) -> None:
            peer.session.send(m.RequestError(msg.request_id, code, retry_ms + 1 if retry_ms and d16 else 0, reason,
                                             m.RequestKind.FETCH))

        if len(peer.fetches) >= self.max_fetches:
            return refuse(m.RequestErrorCode.INTERNAL_ERROR, f"{len(peer.fetches)} FETCH responses in progress",
                          BUSY_RETRY_MS)
        if msg.fetch_type == m.FetchType.STANDALONE:
            track = self.tracks.get((msg.track_namespace, msg.track_name))
            if track is None:
                return refuse(m.RequestErrorCode.DOES_NOT_EXIST, "track not known here")
            start, end = msg.start_location, msg.end_location
            last = Location(end.group, (1 << 62) - 1) if end.object == 0 else Location(end.group, end.object - 1)
        else:
            ds = peer.downstream.get(msg.joining_request_id)
            if ds is None or ds.published:
                return refuse(m.RequestErrorCode.INVALID_JOINING_REQUEST_ID, "no subscription of yours with that id")
            if not ds.joinable:  # draft-16 (and -14) section 9.16.2
                peer.session.fail(ErrorCode.PROTOCOL_VIOLATION,
                                  f"joining FETCH for subscription {ds.request_id}, whose filter is not Largest Object")
                return
            if ds.largest is None:
                return refuse(m.RequestErrorCode.INVALID_RANGE, "nothing published before the subscription")
            track, last = ds.track, ds.largest
            end = Location(last.group, last.object + 1)
            group = last.group - msg.joining_start if msg.fetch_type == m.FetchType.RELATIVE_JOINING \
                else msg.joining_start
            start = Location(max(group, 0), 0)
        cache = track.cache
        largest = cache.largest()
        if largest is None or largest < start or last < start:
            return refuse(m.RequestErrorCode.INVALID_RANGE, "the range starts after the largest object or ends "
                                                            "before it starts")
        if start < cache.floor:  # objects of unknown status in the range: never leave them out silently
            return refuse(m.RequestErrorCode.INVALID_RANGE,
                          f"objects before group {cache.floor.group} object {cache.floor.object} are not cached here")
        # draft-16: no GROUP_ORDER means ascending; draft-14's 0 means the publisher's order
        order = msg.params.group_order or (track.group_order if not d16 else GroupOrder.ASCENDING)
        descending = order == GroupOrder.DESCENDING
        items: Iterator[CachedObject] = cache.range(start, min(last, largest), descending=descending)
        if d16:  # draft-16 fetch objects carry no status: the gap an End of Group / Track leaves says the same
            items = (o for o in items if o.status == ObjectStatus.NORMAL)
        first = next(items, None)
        if first is None and not d16:
            return refuse(D14_NO_OBJECTS, "no objects in that range")
        # FETCH_OK's End Location (section 9.17): the requested end, or just past the largest
        # object if the request reaches beyond it (then End Of Track if that object ends the track)
        end_of_track = False
        if largest < last:
            end = Location(largest.group, largest.object + 1)
            final = cache.get(largest)
            end_of_track = final is not None and final.status == ObjectStatus.END_OF_TRACK
        ext = track.extensions if d16 else ((m.TrackExtension.DEFAULT_PUBLISHER_GROUP_ORDER, order),)
        peer.session.send(m.FetchOk(msg.request_id, end_of_track, end, track_extensions=ext))
        sub = msg.params.subscriber_priority
        fs = FetchStream(peer, msg.request_id, peer.session.open_fetch(msg.request_id), cache, items, start,
                         descending, 128 if sub is None else sub, None if descending else start)
        peer.fetches[msg.request_id] = fs
        self._queue_fetch(fs, first)
        self.pump(peer)

    def _queue_fetch(self, fs: FetchStream, item: CachedObject | None) -> None:
        """Queue `item`, the response's next object, or end the response (None): FIN if all it
        left out is known not to exist, else a reset (the cache lost it meanwhile)."""
        floor = fs.cache.floor
        if fs.descending and (item is None or fs.after is None or item.location.group != fs.after.group):
            # the gap reaches down to the start of the next group written (or of the range)
            gap = fs.start if item is None else Location(item.location.group, fs.start.object
                                                         if item.location.group == fs.start.group else 0)
        else:
            gap = fs.after or fs.start
        if gap < floor:
            fs.peer.fetches.pop(fs.request_id, None)
            d16 = fs.peer.session.version == Version.DRAFT_16
            fs.writer.reset(RESET_UNKNOWN_OBJECT_STATUS if d16 else RESET_INTERNAL_ERROR)
            log.info("%s: FETCH %d reset: the cache evicted objects it had not sent yet", fs.peer.name, fs.request_id)
            return
        if item is None:
            fs.writer.finish()
            fs.peer.fetches.pop(fs.request_id, None)
            return
        obj = _from_cache(item)
        prio = (fs.subscriber_priority, obj.publisher_priority, obj.group_id, obj.subgroup_id or 0, obj.object_id)
        heapq.heappush(fs.peer.queue, (prio, next(fs.peer.seq), fs, obj, None))
        fs.peer.queued_bytes += len(obj.payload)

    def _fetch_write(self, fs: FetchStream, obj: Object) -> None:
        fs.writer.write(obj)
        fs.after = Location(obj.group_id, obj.object_id + 1)
        self.stats.cache_hits += 1
        self._queue_fetch(fs, next(fs.items, None))

    def _fail_fetch(self, fs: FetchStream) -> None:
        """A relay error in a FETCH response (FETCH_OK sent): reset its stream."""
        if fs.peer.fetches.get(fs.request_id) is fs:
            del fs.peer.fetches[fs.request_id]
        self._purge(fs.peer, lambda it: it[2] is fs)
        fs.writer.reset(RESET_INTERNAL_ERROR)

    def _fail_downstream(self, ds: Downstream, reason: str) -> None:
        """A relay error in a subscription: it ends (REQUEST_ERROR if not answered yet, else
        PUBLISH_DONE after its streams are reset); the peer's other requests go on."""
        peer = ds.peer
        if peer.downstream.get(ds.request_id) is ds:
            del peer.downstream[ds.request_id]
        try:
            self._drop_downstream(ds)
        finally:
            if not peer.session.closed:
                if peer.session.unanswered(ds.request_id):
                    peer.session.send(m.RequestError(ds.request_id, m.RequestErrorCode.INTERNAL_ERROR, 0,
                                                     reason[:1024], m.RequestKind.SUBSCRIBE))
                elif ds.established or ds.published:
                    peer.session.send(m.PublishDone(ds.request_id, m.PublishDoneCode.INTERNAL_ERROR, ds.streams,
                                                    reason[:1024]))

    def _fail_track(self, track: Track, exc: Exception) -> None:
        """A relay error handling a track's upstream data: the track ends everywhere."""
        _log_failure(f"track {track.label} from {track.publisher.name}", exc)
        self.stats.failed_requests += 1
        try:
            self._end_track(track, m.PublishDoneCode.INTERNAL_ERROR, f"relay error: {exc}", unsubscribe=True)
        except Exception as again:
            _log_failure(f"ending track {track.label}", again)

    def _drop_downstream(self, ds: Downstream) -> None:
        ds.active = False
        if self.datapath:
            self.datapath.downstream_gone(ds)
        self._purge(ds.peer, lambda it: it[2] is ds)
        ds.queued.clear()
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

    def _end_track(self, track: Track, code: int, reason: str, unsubscribe: bool = False) -> None:
        """The track ends: every subscription to it ends (PUBLISH_DONE, or REQUEST_ERROR if it
        was waiting for the track); `unsubscribe` also ends the upstream one (the publisher did not)."""
        publisher, rid = track.publisher, track.upstream_request_id
        if unsubscribe and rid is not None and not publisher.session.closed and (
                rid in publisher.requests or track.live):
            publisher.session.send(m.Unsubscribe(rid))
        for peer in {ds.peer for ds in track.subscribers}:
            self.pump(peer, force=True)  # what was queued still goes out before PUBLISH_DONE
        for ds in list(track.subscribers):
            try:
                self._end_downstream(ds, code, reason)
            except Exception as exc:
                _log_failure(f"{ds.peer.name}: ending subscription {ds.request_id} to {track.label}", exc)
        track.subscribers.clear()
        publisher.requests.pop(rid, None)
        publisher.upstream.pop(track.upstream_alias, None)
        if self.tracks.get((track.namespace, track.name)) is track:
            del self.tracks[(track.namespace, track.name)]
        self._replay_early(publisher, None)
        log.info("track %s ended (%s)", track.label, reason or code)

    def _end_downstream(self, ds: Downstream, code: int, reason: str) -> None:
        ds.active = False
        for w in ds.writers.values():
            w.finish()
        ds.writers.clear()
        if self.datapath:
            self.datapath.downstream_gone(ds)
        peer = ds.peer
        if peer.downstream.get(ds.request_id) is ds:
            del peer.downstream[ds.request_id]
        if peer.session.closed:
            return
        if ds.established or ds.published:
            peer.session.send(m.PublishDone(ds.request_id, code, ds.streams, reason[:1024]))
        else:  # its SUBSCRIBE was waiting for the track
            error = m.RequestErrorCode.INTERNAL_ERROR if code == m.PublishDoneCode.INTERNAL_ERROR \
                else m.RequestErrorCode.DOES_NOT_EXIST
            peer.session.send(m.RequestError(ds.request_id, error, 0, reason[:1024], m.RequestKind.SUBSCRIBE))

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
        peer.ns_subs.clear()
        if self.datapath:
            self.datapath.peer_gone(peer)
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
        """Drop what was held for `aliases`; the ends of those streams still reach the data path,
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
        try:
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
        except Exception as exc:
            return self._fail_track(track, exc)
        for ds in list(track.subscribers):
            if ds.established:
                try:
                    self._forward(ds, peer, ev.stream_id, obj)
                except Exception as exc:
                    self._request_failed(ds.peer, ds.request_id, f"forwarding {track.label}", exc)
        for sub in {ds.peer for ds in track.subscribers}:
            self.pump(sub)

    def _forward(self, ds: Downstream, peer: Peer, stream_id: int | None, obj: Object) -> None:
        """Hand one live object to a subscription: the data path's, a datagram, or the queue."""
        if self.datapath and ds.forward:
            owner = ((Owner.DATAPATH if self.datapath.owns_datagrams(ds) else Owner.RELAY) if stream_id is None
                     else self.datapath.owns(ds, peer, stream_id))
            if owner is Owner.DROPPED:
                self._drop(ds)
                return
            if owner is Owner.DATAPATH:
                ds.fast_objects += 1
                self.stats.fast_objects += 1
                return
        if not self._admit(ds, obj):
            return
        if stream_id is None:
            ds.peer.session.send_datagram(ObjectDatagram(ds.alias, obj))
            self._count_out(ds, obj)
        else:
            self._enqueue(ds, obj)

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
        ds.queued[key] = (prio, ds.queued.get(key, ((), 0))[1] + 1)

    def pump(self, peer: Peer, force: bool = False) -> None:
        """Hand queued objects to QUIC in priority order while the connection can carry them
        (all of them with `force`). A relay error writing one ends only its subscription or FETCH."""
        transport = peer.session.transport
        if peer.session.closed:
            peer.queue.clear()
            peer.queued_bytes = 0
            return
        window = transport.send_window()
        while peer.queue and (force or transport.backlog() < window):
            _, _, owner, obj, key = heapq.heappop(peer.queue)
            if obj is not None:
                peer.queued_bytes -= len(obj.payload)
            try:
                if isinstance(owner, FetchStream):
                    self._fetch_write(owner, obj)
                else:
                    self._dequeued(owner, obj, key)
            except Exception as exc:
                what = "its FETCH response" if isinstance(owner, FetchStream) else owner.track.label
                self._request_failed(peer, owner.request_id, f"writing {what}", exc)

    def _dequeued(self, ds: Downstream, obj: Object | None, key: tuple[int, int]) -> None:
        """An item of `ds` left the queue: write the object, or finish the subgroup (None)."""
        prio, count = ds.queued.get(key, ((), 1))
        if count > 1:
            ds.queued[key] = (prio, count - 1)
        else:
            ds.queued.pop(key, None)
        if obj is None:  # the subgroup's FIN, queued behind its objects
            writer = ds.writers.pop(key, None)
            if writer is not None:
                writer.finish()
        elif ds.active and key not in ds.abandoned:
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
                ds.skipped_below = obj.group_id
                log.info("%s is %d bytes behind on %s: skipped to group %d", peer.name, backlog,
                         ds.track.label, obj.group_id)
            ds.group = obj.group_id
            self._forget_older(ds)
        # A subgroup of an older group may start after a newer group did (QUIC does not order
        # streams): it is delivered, unless the subscriber skipped past its group.
        if key in ds.abandoned or (obj.group_id < ds.skipped_below and key not in ds.writers
                                   and key not in ds.queued):
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

    @staticmethod
    def _forget_older(ds: Downstream) -> None:
        """The subscriber moved to a new group: what it remembers of older subgroups that are
        neither open nor queued goes (they are over), so its state stays as small as the
        subgroups in flight."""
        live = {*ds.writers, *ds.queued}
        ds.sent = {k: v for k, v in ds.sent.items() if k[0] >= ds.group or k in live}
        # An abandoned subgroup must not start again mid-way on a late object. Rather than
        # remember every one, a subscriber that abandons subgroups (it is behind) starts nothing
        # older than the previous group any more.
        if any(k[0] < ds.group - 1 for k in ds.abandoned):
            ds.skipped_below = max(ds.skipped_below, ds.group - 1)
        ds.abandoned = {k for k in ds.abandoned if k[0] >= ds.skipped_below}

    def _drop(self, ds: Downstream) -> bool:
        ds.dropped += 1
        self.stats.dropped_objects += 1
        return False

    def _send(self, ds: Downstream, obj: Object, fin: bool) -> None:
        key = (obj.group_id, obj.subgroup_id or 0)
        last = ds.sent.get(key)
        if last is not None and obj.object_id <= last:
            return  # already sent (a duplicate from upstream)
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
        if self.datapath:
            self.datapath.stream_ended(peer, ev.stream_id, ev.reset_code is not None)
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
        for ds in list(track.subscribers):
            try:
                self._subgroup_ended(ds, key, ev.reset_code)
            except Exception as exc:
                self._request_failed(ds.peer, ds.request_id, f"ending a subgroup of {track.label}", exc)
        for sub in {ds.peer for ds in track.subscribers}:
            self.pump(sub)
        self._maybe_done(track)

    def _subgroup_ended(self, ds: Downstream, key: tuple[int, int], reset_code: int | None) -> None:
        """The upstream subgroup `key` ended: its FIN follows its queued objects, a reset goes at once."""
        queued = ds.queued.get(key)
        if reset_code is None:
            if queued is not None:  # FIN after the subgroup's queued objects
                prio, count = queued
                heapq.heappush(ds.peer.queue, ((*prio[:4], 1 << 62), next(ds.peer.seq), ds, None, key))
                ds.queued[key] = (prio, count + 1)
            elif key in ds.writers:
                ds.writers.pop(key).finish()
        else:
            self._purge(ds.peer, lambda it: it[2] is ds and it[4] == key)
            ds.queued.pop(key, None)
            writer = ds.writers.pop(key, None)
            if writer is not None:
                writer.reset(reset_code)


def _after(loc: Location | None) -> Location:
    """The location that follows `loc` (the first one if None)."""
    return Location(loc.group, loc.object + 1) if loc is not None else Location(0, 0)


def _duplicate(peer: Peer) -> int:
    """The REQUEST_ERROR code for a second subscription to a track: draft-14 has no
    DUPLICATE_SUBSCRIPTION, so it gets the generic INTERNAL_ERROR (the reason says why)."""
    return (m.RequestErrorCode.DUPLICATE_SUBSCRIPTION if peer.session.version == Version.DRAFT_16
            else m.RequestErrorCode.INTERNAL_ERROR)


def _track_extensions(track: Track, version: Version) -> tuple[tuple[int, int | bytes], ...]:
    """The track's extensions for a SUBSCRIBE_OK or PUBLISH: all of them in draft-16, in draft-14
    only those its messages have fields for."""
    ext = track.extensions
    if version == Version.DRAFT_14:
        ext = tuple({k: v for k, v in reversed(ext) if k in _D14_TRACK_EXTENSIONS}.items())
    return tuple(sorted(ext, key=lambda kv: kv[0]))


def _log_failure(what: str, exc: Exception) -> None:
    """One line: what failed, the error and where it was raised (the traceback at DEBUG)."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}" if frame else ""
    log.error("%s failed: %r%s", what, exc, where)
    log.debug("traceback of the failure above", exc_info=exc)


def _held_size(ev: ObjectReceived | StreamEnded) -> int:
    """What holding an event costs against EARLY_DATA_LIMIT (payload, extensions, a fixed part)."""
    if isinstance(ev, StreamEnded):
        return 64
    ext = sum(len(v) if isinstance(v, bytes | bytearray) else 8 for _, v in ev.object.extensions)
    return 64 + len(ev.object.payload) + ext


def _from_cache(obj: CachedObject) -> Object:
    return Object(obj.location.group, obj.subgroup_id, obj.location.object, obj.publisher_priority,
                  ObjectStatus(obj.status), list(obj.extensions), obj.payload)
