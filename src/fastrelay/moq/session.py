"""MoQT session state machine (sans-I/O over a small transport interface).

The session owns the control stream (setup, request IDs, MAX_REQUEST_ID), parses every
incoming data stream and datagram, and reports what happened through one callback of
small event dataclasses. It never blocks and knows no sockets: the transport is anything
with open_stream/send/send_datagram/reset/stop/close (QuicLink, or an in-memory pair in
tests), the way aioquic's H3Connection sits on a QuicConnection.

Request IDs are granted as the peer's requests finish: the peer may have a bounded number of
requests in progress (`limit_requests`), and MAX_REQUEST_ID is raised only as earlier ones
end. The session sees every message that ends one (our REQUEST_ERROR, PUBLISH_DONE or
UNSUBSCRIBE, the answer to a TRACK_STATUS or REQUEST_UPDATE, the end of a fetch stream, the
peer's UNSUBSCRIBE, FETCH_CANCEL, PUBLISH_DONE, PUBLISH_NAMESPACE_DONE, UNSUBSCRIBE_NAMESPACE,
the close of a request stream), so the application only has to answer and end requests.

Any violation by the peer closes the session with the draft's error code and one log
line; nothing else in the process is affected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import messages as m
from .data import (
    DataStreamParser,
    FetchHeader,
    MalformedTrack,
    Object,
    ObjectDatagram,
    ObjectTooLarge,
    SubgroupHeader,
    decode_datagram,
    encode_datagram,
    encode_fetch_header,
    encode_fetch_object,
    encode_subgroup_header,
    encode_subgroup_object,
)
from .params import SetupParams, Version
from .wire import ErrorCode, ProtocolError, violation

log = logging.getLogger("fastrelay.moq")

# requests that consume a Request ID (draft-16 section 9.1)
NEW_REQUESTS = (m.Subscribe, m.Fetch, m.RequestUpdate, m.SubscribeNamespace, m.Publish, m.PublishNamespace,
                m.TrackStatus)
_KIND_CODE = {cls: i + 1 for i, cls in enumerate(NEW_REQUESTS)}  # one byte per request ID in _Kinds
KINDS_KEPT = 1 << 16  # request IDs per side whose kind a session remembers (bounded memory for a long session)
_REQUEST_OF_KIND = {m.RequestKind.SUBSCRIBE: m.Subscribe, m.RequestKind.PUBLISH: m.Publish,
                    m.RequestKind.FETCH: m.Fetch, m.RequestKind.TRACK_STATUS: m.TrackStatus,
                    m.RequestKind.PUBLISH_NAMESPACE: m.PublishNamespace,
                    m.RequestKind.SUBSCRIBE_NAMESPACE: m.SubscribeNamespace,
                    m.RequestKind.REQUEST_UPDATE: m.RequestUpdate}
_UPDATABLE = (m.Subscribe, m.Publish, m.Fetch, m.TrackStatus, m.PublishNamespace, m.SubscribeNamespace)
# message -> (requests of ours it may refer to, requests of the peer's it may refer to)
_REFERS_TO: dict[type[m.Message], tuple[tuple[type[m.Message], ...], tuple[type[m.Message], ...]]] = {
    m.SubscribeOk: ((m.Subscribe,), ()),
    m.PublishOk: ((m.Publish,), ()),
    m.FetchOk: ((m.Fetch,), ()),
    m.RequestOk: ((m.RequestUpdate, m.TrackStatus, m.SubscribeNamespace, m.PublishNamespace), ()),
    m.RequestError: (NEW_REQUESTS, ()),
    m.PublishDone: ((m.Subscribe,), (m.Publish,)),
    m.Unsubscribe: ((m.Publish,), (m.Subscribe,)),
    m.FetchCancel: ((), (m.Fetch,)),
    m.PublishNamespaceDone: ((), (m.PublishNamespace,)),
    m.PublishNamespaceCancel: ((m.PublishNamespace,), ()),
}
STREAM_RESET_CANCELLED = 0x1  # data stream reset: the subscription or stream was cancelled


class Transport(Protocol):
    def backlog(self) -> int: ...  # bytes written and not yet acknowledged
    def send_window(self) -> int: ...  # how much is worth writing ahead of acknowledgements
    def open_stream(self, unidirectional: bool) -> int: ...
    def send(self, stream_id: int, data: bytes, fin: bool = False) -> None: ...
    def send_datagram(self, data: bytes) -> None: ...
    def reset(self, stream_id: int, code: int) -> None: ...
    def stop(self, stream_id: int, code: int) -> None: ...
    def close(self, code: int = 0, reason: str = "") -> None: ...


# ---- events
@dataclass(frozen=True)
class Ready:
    version: Version
    peer: SetupParams


@dataclass(frozen=True)
class MessageReceived:
    """A control message; `stream_id` is set when it came on a request stream (a bidirectional
    stream of its own, as draft-16 uses for SUBSCRIBE_NAMESPACE) rather than the control stream."""

    message: m.Message
    stream_id: int | None = None


@dataclass(frozen=True)
class RequestStreamClosed:
    """The peer ended a request stream (FIN or reset): the request it carried is over."""

    stream_id: int


@dataclass(frozen=True)
class ObjectReceived:
    """An object from a subgroup stream (stream_id) or a datagram (stream_id None), or a
    fetch stream (fetch_request_id set)."""

    stream_id: int | None
    header: SubgroupHeader | FetchHeader | None
    object: Object
    track_alias: int | None


@dataclass(frozen=True)
class StreamEnded:
    stream_id: int
    header: SubgroupHeader | FetchHeader | None
    reset_code: int | None  # None: FIN after the last object


@dataclass(frozen=True)
class StreamStopped:
    """The peer sent STOP_SENDING for a data stream this side writes: it wants no more of it
    (the transport has reset the stream; writes to it are dropped)."""

    stream_id: int
    code: int


@dataclass(frozen=True)
class GoawayReceived:
    """The peer sent GOAWAY: it will close the session soon; no new requests may be sent to it.
    `new_uri` is where to reconnect ("" = the current URI)."""

    new_uri: str


@dataclass(frozen=True)
class Closed:
    code: int
    reason: str
    by_peer: bool


Event = (Ready | MessageReceived | RequestStreamClosed | ObjectReceived | StreamEnded | StreamStopped | GoawayReceived
         | Closed)


class SubgroupWriter:
    """Writes one subgroup stream: header once, then objects in order."""

    def __init__(self, session: MoqtSession, header: SubgroupHeader) -> None:
        self._s = session
        self.header = header
        self.stream_id = session.transport.open_stream(unidirectional=True)
        self._prev: int | None = None
        self.bytes = 0
        self.done = False
        self._send(encode_subgroup_header(header, session.version))

    def _send(self, data: bytes, fin: bool = False) -> None:
        self.bytes += len(data)
        self._s.transport.send(self.stream_id, data, fin)

    def write(self, obj: Object, fin: bool = False) -> int:
        """Send an object; returns the stream offset where it starts."""
        offset = self.bytes
        self._send(encode_subgroup_object(obj, self.header, self._prev, self._s.version), fin)
        self._prev = obj.object_id
        self.done = fin
        return offset

    def finish(self) -> None:
        if not self.done:
            self._send(b"", fin=True)
            self.done = True

    def reset(self, code: int = STREAM_RESET_CANCELLED) -> None:
        if not self.done:
            self._s.transport.reset(self.stream_id, code)
            self.done = True


class FetchWriter:
    """Writes one fetch stream: FETCH_HEADER, then objects in the response's order. Its end
    (FIN or reset) ends the FETCH request."""

    def __init__(self, session: MoqtSession, request_id: int) -> None:
        self._s = session
        self.request_id = request_id
        self.stream_id = session.transport.open_stream(unidirectional=True)
        self._prev: Object | None = None
        self.done = False
        session.transport.send(self.stream_id, encode_fetch_header(FetchHeader(request_id)))

    def write(self, obj: Object) -> None:
        self._s.transport.send(self.stream_id, encode_fetch_object(obj, self._prev, self._s.version))
        self._prev = obj

    def finish(self) -> None:
        if not self.done:
            self._s.transport.send(self.stream_id, b"", fin=True)
            self.done = True
            self._s._finish(self.request_id)

    def reset(self, code: int = STREAM_RESET_CANCELLED) -> None:
        """Abandon the stream (e.g. on FETCH_CANCEL), even in the middle of an object."""
        if not self.done:
            self._s.transport.reset(self.stream_id, code)
            self.done = True
            self._s._finish(self.request_id)


class MoqtSession:
    """One MoQT session over one QUIC connection."""

    def __init__(self, transport: Transport, *, client: bool, version: Version, on_event: Callable[[Event], None],
                 max_request_id: int = 128, setup: SetupParams | None = None,
                 max_object_size: int = 16 << 20) -> None:
        """`max_request_id` is the MAX_REQUEST_ID of our SETUP; the peer may then have as many
        requests in progress as it allows (64 by default), see limit_requests()."""
        self.transport = transport
        self.client = client
        self.version = Version(version)
        self._emit = on_event
        self._setup = setup or SetupParams()
        self._max_object_size = max_object_size
        self.ready = False
        self.closed: Closed | None = None
        self.control_stream: int | None = None
        self._control = m.ControlStreamParser(self.version)
        self._data: dict[int, DataStreamParser] = {}
        self._requests: dict[int, m.ControlStreamParser] = {}  # request streams (draft-16)
        self._requests_opened: set[int] = set()  # peer-opened request streams whose request arrived
        # request IDs: ours are even for a client, odd for a server; the peer's the other parity
        self._next_request_id = 0 if client else 1
        self._peer_next_request_id = 1 if client else 0
        self._our_max = max_request_id          # what we allow the peer (MAX_REQUEST_ID sent)
        self._max_open = max(0, (max_request_id - self._peer_next_request_id + 1) // 2)  # IDs below it
        self._peer_max = 0                      # what the peer allows us
        self._blocked_at: int | None = None     # the limit our REQUESTS_BLOCKED named
        # the peer's requests in progress -> (kind, whether we answered it yet with an OK)
        self._open: dict[int, tuple[type[m.Message], bool]] = {}
        self._open_streams: dict[int, int] = {}  # request stream -> its request (draft-16 SUBSCRIBE_NAMESPACE)
        # draft-14 ends PUBLISH_NAMESPACE / SUBSCRIBE_NAMESPACE by namespace: (kind, namespace) -> request
        self._open_names: dict[tuple[type[m.Message], tuple[bytes, ...]], int] = {}
        # kind of the requests sent (ours) and received (the peer's): tells a reply to a request
        # that never existed from one to a request that is over
        self._our_kinds = _Kinds()
        self._peer_kinds = _Kinds()
        self.goaway_received: GoawayReceived | None = None
        self.goaway_sent = False
        self.peer_setup: SetupParams | None = None

    # ---- start
    def start(self) -> None:
        """Client: open the control stream and send CLIENT_SETUP. Server: wait for it."""
        if not self.client:
            return
        self.control_stream = self.transport.open_stream(unidirectional=False)
        params = _with_max_request_id(self._setup, self._our_max)
        versions = (Version.DRAFT_14,) if self.version == Version.DRAFT_14 else ()
        self._send_control(m.ClientSetup(versions, params))

    # ---- request accounting
    def limit_requests(self, count: int) -> None:
        """Let the peer have at most `count` requests in progress; before SETUP this is also what
        our first MAX_REQUEST_ID allows."""
        if count < 0:
            raise ValueError("a request limit cannot be negative")
        self._max_open = count
        if self.ready or (self.client and self.control_stream is not None):
            self._grant()  # SETUP went out: a lower limit takes effect as requests finish
        else:
            self._our_max = self._peer_next_request_id + 2 * count

    @property
    def requests_in_progress(self) -> int:
        """How many of the peer's requests are in progress (count against limit_requests())."""
        return len(self._open)

    def unanswered(self, request_id: int) -> bool:
        """Whether the peer's request `request_id` is in progress and we have not answered it yet."""
        return request_id in self._open and not self._open[request_id][1]

    def peer_request(self, request_id: int) -> type[m.Message] | None:
        """The kind of the peer's request `request_id` in progress (None if it is none)."""
        return self._open[request_id][0] if request_id in self._open else None

    def _is_peers(self, request_id: int) -> bool:
        return request_id & 0x1 == (1 if self.client else 0)

    def _finish(self, request_id: int) -> None:
        """The peer's request `request_id` is over: its Request ID may be granted again."""
        if self._open.pop(request_id, None) is None:
            return
        for key in [k for k, rid in self._open_names.items() if rid == request_id]:
            del self._open_names[key]
        self._grant()

    def _grant(self) -> None:
        """Raise MAX_REQUEST_ID as far as the requests in progress allow: once half the limit is
        free (one message per many requests), or at once when the peer has no Request ID left."""
        if not self.ready or self.closed:
            return
        unused = max(0, (self._our_max - self._peer_next_request_id + 1) // 2)  # IDs granted, not used yet
        free = self._max_open - len(self._open) - unused
        if free > 0 and (free >= max(1, self._max_open // 2) or unused == 0):
            self._our_max = self._peer_next_request_id + 2 * (unused + free)
            self._send_control(m.MaxRequestId(self._our_max))

    def _answered(self, msg: m.Message) -> None:
        """We are sending `msg`: note what it answers or ends of the peer's requests."""
        rid = getattr(msg, "request_id", None)
        if isinstance(msg, m.PublishNamespaceCancel) and rid is None:
            rid = self._open_names.get((m.PublishNamespace, msg.track_namespace))
        if rid is None or rid not in self._open:
            return
        if isinstance(msg, m.RequestError | m.PublishDone | m.Unsubscribe | m.PublishNamespaceCancel):
            self._finish(rid)  # refused, or its subscription / PUBLISH / namespace ended by us
        elif isinstance(msg, m.RequestOk) and self.peer_request(rid) in (m.TrackStatus, m.RequestUpdate):
            self._finish(rid)  # the answer is all there is to these
        elif isinstance(msg, m.SubscribeOk | m.FetchOk | m.PublishOk | m.RequestOk):
            self._open[rid] = (self._open[rid][0], True)

    def _ended_by_peer(self, msg: m.Message) -> None:
        """The peer sent `msg`: note which of its own requests it ends."""
        if isinstance(msg, m.Unsubscribe | m.FetchCancel | m.PublishDone):
            rid: int | None = msg.request_id  # its SUBSCRIBE, FETCH or PUBLISH (a PUBLISH_DONE may be about ours)
        elif isinstance(msg, m.PublishNamespaceDone):
            rid = msg.request_id if msg.request_id is not None else self._open_names.get(
                (m.PublishNamespace, msg.track_namespace))
        elif isinstance(msg, m.UnsubscribeNamespace):
            rid = self._open_names.get((m.SubscribeNamespace, msg.track_namespace_prefix))
        else:
            return
        if rid is not None and self._is_peers(rid):
            self._finish(rid)

    # ---- control out
    def _send_control(self, msg: m.Message) -> None:
        self.transport.send(self.control_stream, m.encode_message(msg, self.version))

    def send(self, msg: m.Message) -> None:
        """Send a control message (request IDs of new requests come from next_request_id()).
        ConnectionError for a new request after the peer's GOAWAY; ValueError for a GOAWAY the
        draft forbids (a second one, or one with a URI from a client)."""
        if self.closed:
            raise ConnectionError("session closed")
        if not self.ready:
            raise ConnectionError("session not set up yet")
        if isinstance(msg, m.Goaway):
            if self.goaway_sent:
                raise ValueError("GOAWAY already sent")
            if self.client and msg.new_session_uri:
                raise ValueError("a client's GOAWAY carries no new session URI")
            self.goaway_sent = True
        if isinstance(msg, NEW_REQUESTS):
            self._new_request(msg)
        self._send_control(msg)
        self._answered(msg)

    def goaway(self, new_uri: str = "") -> None:
        """Tell the peer this session ends soon (once per session); a server may name a new URI."""
        self.send(m.Goaway(new_uri))

    @property
    def accepts_requests(self) -> bool:
        """Whether new requests may be sent (set up, open, and no GOAWAY received)."""
        return self.ready and not self.closed and self.goaway_received is None

    def next_request_id(self, update: bool = False) -> int:
        """Take the next Request ID for a new request; ConnectionError if the peer's limit is reached
        (REQUESTS_BLOCKED is sent) or, unless it is for a REQUEST_UPDATE (`update`), if the peer sent
        GOAWAY (draft-16 section 9.4: no new requests after it)."""
        if self.goaway_received is not None and not update:
            raise ConnectionError("the peer sent GOAWAY: no new requests")
        rid = self._next_request_id
        if rid >= self._peer_max:
            if self._blocked_at != self._peer_max:  # once per limit (draft-16 section 9.6)
                self._blocked_at = self._peer_max
                self._send_control(m.RequestsBlocked(self._peer_max))
            raise ConnectionError(f"peer allows request IDs below {self._peer_max} only")
        self._next_request_id += 2
        return rid

    # ---- data out
    def open_subgroup(self, header: SubgroupHeader) -> SubgroupWriter:
        return SubgroupWriter(self, header)

    def open_request_stream(self, msg: m.Message) -> int:
        """Send a request on a new bidirectional stream of its own; replies arrive as
        MessageReceived with that stream_id."""
        if isinstance(msg, NEW_REQUESTS):
            self._new_request(msg)
        sid = self.transport.open_stream(unidirectional=False)
        self._requests[sid] = m.ControlStreamParser(self.version)
        self.transport.send(sid, m.encode_message(msg, self.version))
        return sid

    def send_on(self, stream_id: int, msg: m.Message, fin: bool = False) -> None:
        """Send a message on a request stream; `fin` ends the request it carries."""
        self.transport.send(stream_id, m.encode_message(msg, self.version), fin)
        self._answered(msg)
        if fin and stream_id in self._open_streams:
            self._finish(self._open_streams.pop(stream_id))

    def end_request_stream(self, stream_id: int) -> None:
        """Close our half of a request stream (FIN); for one the peer opened, that ends its request."""
        if self._requests.pop(stream_id, None) is not None:
            self.transport.send(stream_id, b"", fin=True)
            if stream_id in self._open_streams:
                self._finish(self._open_streams.pop(stream_id))

    def open_fetch(self, request_id: int) -> FetchWriter:
        return FetchWriter(self, request_id)

    def send_datagram(self, dg: ObjectDatagram) -> None:
        self.transport.send_datagram(encode_datagram(dg, self.version))

    # ---- input
    def stream_data(self, stream_id: int, data: bytes, fin: bool) -> None:
        if self.closed:
            return
        try:
            if self._is_bidi(stream_id):
                self._control_data(stream_id, data, fin)
            else:
                self._data_stream(stream_id, data, fin)
        except ProtocolError as exc:
            self.fail(exc.code, exc.reason)

    def datagram(self, data: bytes) -> None:
        if self.closed or not self.ready:
            return
        try:
            dg = decode_datagram(data, self.version)
        except MalformedTrack as exc:
            log.warning("malformed datagram object dropped: %s", exc.reason)
            return
        except ProtocolError as exc:
            self.fail(exc.code, exc.reason)
            return
        self._emit(ObjectReceived(None, None, dg.object, dg.track_alias))

    def stream_reset(self, stream_id: int, code: int) -> None:
        parser = self._data.pop(stream_id, None)
        if parser is not None:
            self._emit(StreamEnded(stream_id, parser.header, code))
        elif stream_id == self.control_stream:
            self.fail(ErrorCode.PROTOCOL_VIOLATION, "control stream reset")
        elif self._requests.pop(stream_id, None) is not None:
            self._requests_opened.discard(stream_id)
            self._request_stream_ended(stream_id)

    def _request_stream_ended(self, stream_id: int) -> None:
        """The peer closed a request stream: the request it carried (if the peer's) is over."""
        if stream_id in self._open_streams:
            self._finish(self._open_streams.pop(stream_id))
        self._emit(RequestStreamClosed(stream_id))

    def stop_sending(self, stream_id: int, code: int) -> None:
        """The peer no longer wants a stream we send on (e.g. it unsubscribed)."""
        if stream_id == self.control_stream:
            self.fail(ErrorCode.PROTOCOL_VIOLATION, "control stream stopped")
        elif not self.closed:
            self._emit(StreamStopped(stream_id, code))

    def terminated(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = Closed(code, reason, by_peer=True)
            self._data.clear()
            self._emit(self.closed)

    def fail(self, code: int, reason: str) -> None:
        """Close the session for a protocol error (one log line)."""
        if self.closed:
            return
        name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else hex(code)
        log.log(logging.INFO if code == ErrorCode.NO_ERROR else logging.WARNING, "closing MoQT session: %s (%s)",
                reason, name)
        self.closed = Closed(code, reason, by_peer=False)
        self._data.clear()
        self.transport.close(code, reason[:1024])
        self._emit(self.closed)

    def close(self, reason: str = "") -> None:
        """Close normally."""
        self.fail(ErrorCode.NO_ERROR, reason or "closed")

    # ---- internals
    def _is_bidi(self, stream_id: int) -> bool:
        return stream_id & 0x2 == 0

    def _control_data(self, stream_id: int, data: bytes, fin: bool) -> None:
        if self.control_stream is None and not self.client and stream_id & 0x1 == 0:
            self.control_stream = stream_id  # the client's first bidirectional stream
        if stream_id != self.control_stream:
            self._request_data(stream_id, data, fin)
            return
        if fin:
            raise violation("control stream closed")
        for msg in self._control.feed(data):
            self._on_control(msg)

    def _request_data(self, stream_id: int, data: bytes, fin: bool) -> None:
        """A request stream: draft-16 only, opened by the peer for SUBSCRIBE_NAMESPACE, or one we opened."""
        peer_opened = (stream_id & 0x1) == (1 if self.client else 0)
        parser = self._requests.get(stream_id)
        if parser is None:
            if not (self.ready and peer_opened and self.version == Version.DRAFT_16):
                raise violation(f"unexpected bidirectional stream {stream_id}")
            parser = self._requests[stream_id] = m.ControlStreamParser(self.version)
        for msg in parser.feed(data):
            if peer_opened and stream_id not in self._requests_opened:
                if not isinstance(msg, m.SubscribeNamespace):
                    raise violation(f"{type(msg).__name__} cannot open a request stream")
                self._check_peer_request(msg)
                self._requests_opened.add(stream_id)
                self._open_streams[stream_id] = msg.request_id
            else:
                self._check_reference(msg)
            self._emit(MessageReceived(msg, stream_id))
        if fin:
            self._requests.pop(stream_id, None)
            self._requests_opened.discard(stream_id)
            self._request_stream_ended(stream_id)

    def _on_control(self, msg: m.Message) -> None:
        if not self.ready:
            self._on_setup(msg)
            return
        if isinstance(msg, m.ClientSetup | m.ServerSetup):
            raise violation("second SETUP message")
        if isinstance(msg, m.MaxRequestId):
            if msg.max_request_id <= self._peer_max:
                raise violation("MAX_REQUEST_ID did not increase")
            self._peer_max = msg.max_request_id
            return
        if isinstance(msg, m.Goaway):
            self._on_goaway(msg)
            return
        if isinstance(msg, NEW_REQUESTS):
            self._check_peer_request(msg)
        self._check_reference(msg)
        self._ended_by_peer(msg)
        self._emit(MessageReceived(msg))

    def _on_goaway(self, msg: m.Goaway) -> None:
        if self.goaway_received is not None:
            raise violation("second GOAWAY")
        if not self.client and msg.new_session_uri:
            raise violation("GOAWAY from the client with a new session URI")
        self.goaway_received = GoawayReceived(msg.new_session_uri)
        log.debug("peer sent GOAWAY (new URI %r)", msg.new_session_uri)  # its handler says what it does
        self._emit(self.goaway_received)

    def _on_setup(self, msg: m.Message) -> None:
        if self.client:
            if not isinstance(msg, m.ServerSetup):
                raise violation(f"expected SERVER_SETUP, got {type(msg).__name__}")
            if self.version == Version.DRAFT_14 and msg.selected_version != Version.DRAFT_14:
                raise ProtocolError(ErrorCode.VERSION_NEGOTIATION_FAILED, "server selected an unoffered version")
        else:
            if not isinstance(msg, m.ClientSetup):
                raise violation(f"expected CLIENT_SETUP, got {type(msg).__name__}")
            if self.version == Version.DRAFT_14 and Version.DRAFT_14 not in msg.supported_versions:
                raise ProtocolError(ErrorCode.VERSION_NEGOTIATION_FAILED, "client does not offer draft-14")
            selected = Version.DRAFT_14 if self.version == Version.DRAFT_14 else None
            self._send_control(m.ServerSetup(selected, _with_max_request_id(self._setup, self._our_max)))
        self.peer_setup = msg.params
        self._peer_max = msg.params.max_request_id or 0
        self.ready = True
        self._emit(Ready(self.version, msg.params))

    def _new_request(self, msg: m.Message) -> None:
        """Check and note a request we are about to send."""
        if self.goaway_received is not None and not isinstance(msg, m.RequestUpdate):
            raise ConnectionError(f"the peer sent GOAWAY: {type(msg).__name__} is a new request")
        rid = msg.request_id
        if rid & 0x1 != (0 if self.client else 1) or rid >= self._next_request_id:
            raise ValueError(f"request ID {rid} was not taken from next_request_id()")
        self._our_kinds.record(rid, type(msg))

    def _check_reference(self, msg: m.Message) -> None:
        """A message naming a request (a reply, or one ending or updating it) must name one that
        exists or existed, of a kind it can refer to; anything else closes the session
        (PROTOCOL_VIOLATION). A request that is already over is fine: that is a race, not an error."""
        if isinstance(msg, m.RequestUpdate):
            ours, theirs, rid = (m.Publish,), _UPDATABLE, msg.existing_request_id
        elif type(msg) in _REFERS_TO and getattr(msg, "request_id", None) is not None:
            (ours, theirs), rid = _REFERS_TO[type(msg)], msg.request_id
            kind = getattr(msg, "request_kind", None)  # draft-14 replies name the kind of request
            if kind is not None:
                ours = (_REQUEST_OF_KIND[kind],)
        else:
            return
        mine = rid & 0x1 == (0 if self.client else 1)
        kinds, table = (ours, self._our_kinds) if mine else (theirs, self._peer_kinds)
        if table.forgotten(rid):
            return  # too old to check: taken as a race with its end
        kind = table.kind(rid)
        if kind not in kinds:
            what = kind.__name__ if kind else "none"
            raise violation(f"{type(msg).__name__} for request {rid}, which is no {'/'.join(k.__name__ for k in kinds)}"
                            f" {'we sent' if mine else 'the peer sent'} (request kind: {what})")

    def _check_peer_request(self, msg: m.Message) -> None:
        request_id = msg.request_id
        if request_id != self._peer_next_request_id:
            raise ProtocolError(ErrorCode.INVALID_REQUEST_ID,
                                f"request ID {request_id}, expected {self._peer_next_request_id}")
        if request_id >= self._our_max:
            raise ProtocolError(ErrorCode.TOO_MANY_REQUESTS, f"request ID {request_id} beyond {self._our_max}")
        self._peer_next_request_id += 2
        self._peer_kinds.record(request_id, type(msg))
        if not (isinstance(msg, m.RequestUpdate) and self.version == Version.DRAFT_14):  # no reply: over at once
            self._open[request_id] = (type(msg), False)
            if self.version == Version.DRAFT_14 and isinstance(msg, m.PublishNamespace):
                self._open_names[(m.PublishNamespace, msg.track_namespace)] = request_id
            elif self.version == Version.DRAFT_14 and isinstance(msg, m.SubscribeNamespace):
                self._open_names[(m.SubscribeNamespace, msg.track_namespace_prefix)] = request_id
        self._grant()

    def _data_stream(self, stream_id: int, data: bytes, fin: bool) -> None:
        if not self.ready:
            raise violation("data stream before setup")
        parser = self._data.get(stream_id)
        if parser is None:
            if stream_id & 0x1 == (0 if self.client else 1):
                raise violation(f"data on our own unidirectional stream {stream_id}")
            parser = self._data[stream_id] = DataStreamParser(self.version, self._max_object_size)
        try:
            events = parser.feed(data)
            if fin:
                parser.finish()
        except (MalformedTrack, ObjectTooLarge) as exc:
            log.warning("data stream %d abandoned: %s", stream_id, exc.reason)
            self._data.pop(stream_id, None)
            self.transport.stop(stream_id, getattr(exc, "reset_code", STREAM_RESET_CANCELLED))
            self._emit(StreamEnded(stream_id, parser.header, STREAM_RESET_CANCELLED))
            return
        for ev in events:
            if isinstance(ev, Object):
                header = parser.header
                alias = header.track_alias if isinstance(header, SubgroupHeader) else None
                self._emit(ObjectReceived(stream_id, header, ev, alias))
        if fin:
            self._data.pop(stream_id, None)
            self._emit(StreamEnded(stream_id, parser.header, None))


class _Kinds:
    """The kind of each request ID of one side (one byte each), for its latest KINDS_KEPT
    requests: older ones are forgotten, so a long session does not grow without bound."""

    def __init__(self) -> None:
        self._base = 0  # request ID // 2 of codes[0]
        self._codes = bytearray()

    def record(self, request_id: int, kind: type[m.Message]) -> None:
        index = (request_id >> 1) - self._base
        if index >= len(self._codes):
            self._codes.extend(bytes(index + 1 - len(self._codes)))
        self._codes[index] = _KIND_CODE[kind]
        if len(self._codes) >= 2 * KINDS_KEPT:
            del self._codes[:KINDS_KEPT]
            self._base += KINDS_KEPT

    def forgotten(self, request_id: int) -> bool:
        return request_id >> 1 < self._base

    def kind(self, request_id: int) -> type[m.Message] | None:
        """The request's kind; None if no such request was recorded."""
        index = (request_id >> 1) - self._base
        code = self._codes[index] if 0 <= index < len(self._codes) else 0
        return NEW_REQUESTS[code - 1] if code else None


def _with_max_request_id(params: SetupParams, max_request_id: int) -> SetupParams:
    from dataclasses import replace

    return replace(params, max_request_id=max_request_id)
