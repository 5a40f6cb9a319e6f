"""The one place that reads aioquic private state (aioquic is pinned in pyproject.toml).

tests/quic/test_internals.py exercises every function here against a real connection, so
an aioquic upgrade that moves these attributes fails loudly instead of silently.
"""

from __future__ import annotations

from collections.abc import Callable

from aioquic import tls
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import decode_packet_number
from aioquic.quic.packet_builder import QuicDeliveryHandler, QuicDeliveryState, QuicSentPacket
from aioquic.quic.rangeset import RangeSet
from aioquic.quic.recovery import MAX_ACK_RANGES, QuicPacketRecovery, QuicPacketSpace
from aioquic.quic.stream import QuicStream


def congestion_window(quic: QuicConnection) -> int:
    """The sender's congestion window in bytes."""
    return quic._loss.congestion_window


def send_backlog(quic: QuicConnection) -> int:
    """Bytes written to live streams and not yet acknowledged by the peer (reset and
    finished streams excluded): how far this connection's sender is behind."""
    total = 0
    for stream in quic._streams.values():
        sender = stream.sender
        if sender._reset_error_code is None and not sender.is_finished:
            total += sender._buffer_stop - sender._buffer_start
    return total


# ---- packets sent outside aioquic (quic/registration.py)
# All of these act on the 1-RTT packet number space, the only one a kernel data path touches.

AckObserver = Callable[[RangeSet, float, float], None]  # (acked ranges, ack delay in s, arrival time)


def _one_rtt_space(quic: QuicConnection) -> QuicPacketSpace:
    return quic._spaces[tls.Epoch.ONE_RTT]


def one_rtt_crypto(quic: QuicConnection) -> CryptoPair:
    """The connection's 1-RTT packet protection (`.send` protects what this endpoint sends)."""
    return quic._cryptos[tls.Epoch.ONE_RTT]


def peer_cid(quic: QuicConnection) -> bytes:
    """The destination connection id this endpoint currently puts on its packets."""
    return quic._peer_cid.cid


def next_packet_number(quic: QuicConnection) -> int:
    """The number aioquic gives its next packet."""
    return quic._packet_number


def reserve_packet_numbers(quic: QuicConnection, below: int) -> None:
    """Make aioquic number its next packets from `below` up (never moves the counter back)."""
    quic._packet_number = max(quic._packet_number, below)


def bytes_in_flight(quic: QuicConnection) -> int:
    """Bytes of in-flight packets neither acknowledged nor declared lost."""
    return quic._loss.bytes_in_flight


def smoothed_rtt(quic: QuicConnection) -> float | None:
    """The smoothed RTT in seconds, None before the first sample."""
    return quic._loss._rtt_smoothed if quic._loss._rtt_initialized else None


def sent_packet_numbers(quic: QuicConnection) -> list[int]:
    """Numbers of the 1-RTT packets awaiting acknowledgement, in recovery's stored order."""
    return list(_one_rtt_space(quic).sent_packets)


def connection_credit(quic: QuicConnection) -> int:
    """Stream bytes the peer's MAX_DATA still allows on this connection."""
    return quic._remote_max_data - quic._remote_max_data_used


def peer_max_streams_uni(quic: QuicConnection) -> int:
    """How many unidirectional streams the peer lets this endpoint open (its MAX_STREAMS)."""
    return quic._remote_max_streams_uni


def _local_uni(quic: QuicConnection, stream_id: int) -> bool:
    return stream_id >= 0 and stream_id & 3 == (2 if quic.configuration.is_client else 3)


def is_stream_open(quic: QuicConnection, stream_id: int) -> bool:
    """Whether aioquic holds state for the stream (not yet finished and discarded)."""
    return stream_id in quic._streams


def open_send_stream(quic: QuicConnection, stream_id: int) -> None:
    """Create the local unidirectional stream `stream_id` as aioquic does on a first write, and move
    aioquic's allocator past it. The caller decides that the id was never used before."""
    if not _local_uni(quic, stream_id):
        raise ValueError(f"stream {stream_id} is not a unidirectional stream this endpoint initiates")
    if stream_id in quic._streams:
        raise ValueError(f"stream {stream_id} is already open")
    if stream_id // 4 >= quic._remote_max_streams_uni:
        raise ValueError(f"stream {stream_id} is beyond the peer's limit of {quic._remote_max_streams_uni}"
                         " unidirectional streams")
    stream = QuicStream(stream_id=stream_id, max_stream_data_local=0,
                        max_stream_data_remote=quic._remote_max_stream_data_uni, readable=False)
    quic._streams[stream_id] = stream
    quic._streams_queue.append(stream)
    quic._local_next_stream_id_uni = max(quic._local_next_stream_id_uni, stream_id + 4)


def _send_stream(quic: QuicConnection, stream_id: int) -> QuicStream:
    stream = quic._streams.get(stream_id)
    if stream is None or not _local_uni(quic, stream_id):
        raise ValueError(f"stream {stream_id} is not an open send stream")
    return stream


def stream_credit(quic: QuicConnection, stream_id: int) -> int:
    """Bytes the peer's MAX_STREAM_DATA still allows beyond the highest offset sent on the stream."""
    stream = _send_stream(quic, stream_id)
    return stream.max_stream_data_remote - stream.sender.highest_offset


def stream_delivery_handler(quic: QuicConnection, stream_id: int) -> QuicDeliveryHandler:
    """The handler aioquic attaches to a STREAM frame of `stream_id`: called with (state, start, stop, fin)."""
    return _send_stream(quic, stream_id).sender.on_data_delivery


def check_sent_stream_data(quic: QuicConnection, stream_id: int, offset: int, size: int, fin: bool,
                           placeholders: RangeSet) -> None:
    """Raise ValueError unless bytes [offset, offset+size) (+FIN) can be held as sent on the stream:
    above what was acknowledged, within the final size, and not overlapping bytes the sender already
    holds, except its `placeholders` (gaps left by data registered ahead of them)."""
    sender = _send_stream(quic, stream_id).sender
    stop = offset + size
    if offset < 0 or size < 0:
        raise ValueError(f"stream {stream_id}: negative offset or size")
    if sender._reset_error_code is not None:
        return  # bytes sent after a reset only count for flow control
    if offset < sender._buffer_start:
        raise ValueError(f"stream {stream_id}: offset {offset} is below acknowledged offset {sender._buffer_start}")
    final = sender._buffer_fin
    if final is not None and (stop > final or (fin and stop != final)):
        raise ValueError(f"stream {stream_id}: bytes up to {stop} (fin={fin}) contradict final size {final}")
    if fin and stop < sender._buffer_stop:
        raise ValueError(f"stream {stream_id}: FIN at {stop} below bytes held up to {sender._buffer_stop}")
    overlap_stop = min(stop, sender._buffer_stop)
    if offset < overlap_stop and not any(r.start <= offset and overlap_stop <= r.stop for r in placeholders):
        raise ValueError(f"stream {stream_id}: bytes {offset}..{overlap_stop} are already held")


def hold_sent_stream_data(quic: QuicConnection, stream_id: int, offset: int, data: bytes, fin: bool,
                          placeholders: RangeSet) -> None:
    """Put bytes that left outside aioquic into the stream's sender as sent and in flight (not pending):
    an ACK releases them, a loss re-queues exactly that range. Bytes above the stream's highest offset
    are charged to connection flow control. A gap below `offset` becomes a placeholder in
    `placeholders`; bytes that fill one remove it. Call check_sent_stream_data first."""
    stream = _send_stream(quic, stream_id)
    sender = stream.sender
    stop = offset + len(data)
    if stop > sender.highest_offset:
        quic._remote_max_data_used += stop - sender.highest_offset
        sender.highest_offset = stop
    if sender._reset_error_code is not None:
        return
    if offset > sender._buffer_stop:
        placeholders.add(sender._buffer_stop, offset)
    if stop > sender._buffer_stop:
        sender._buffer += bytes(stop - sender._buffer_stop)
        sender._buffer_stop = stop
    if data:
        placeholders.subtract(offset, stop)
        base = sender._buffer_start
        sender._buffer[offset - base : stop - base] = data
    if fin:
        sender._buffer_fin = stop
        sender._pending_eof = False


def placeholder_stream_data(quic: QuicConnection, stream_id: int, end: int) -> None:
    """Bytes below `end` of a send stream left outside aioquic and are not aioquic's to re-send (the
    sender outside keeps them): the stream's buffer and highest offset reach `end` (zero filled, neither
    pending nor acknowledged) without charging connection flow control (the sender outside did)."""
    sender = _send_stream(quic, stream_id).sender
    if end > sender._buffer_stop:
        sender._buffer += bytes(end - sender._buffer_stop)
        sender._buffer_stop = end
    sender.highest_offset = max(sender.highest_offset, end)


def resend_stream_data(quic: QuicConnection, stream_id: int, offset: int, data: bytes, fin: bool) -> bool:
    """Queue bytes that left outside aioquic and were lost, for aioquic to send again at their offset
    (with the FIN); from then on they are aioquic's. False (nothing queued) if the stream was reset or
    those bytes were acknowledged already."""
    sender = _send_stream(quic, stream_id).sender
    stop = offset + len(data)
    if sender._reset_error_code is not None or offset < sender._buffer_start:
        return False
    placeholder_stream_data(quic, stream_id, stop)
    if data:
        base = sender._buffer_start
        sender._buffer[offset - base:stop - base] = data
        sender._pending.add(offset, stop)
    if fin:
        sender._buffer_fin = stop
        sender._pending_eof = True
    sender.buffer_is_empty = False
    return True


def acknowledge_stream_data(quic: QuicConnection, stream_id: int, ranges: RangeSet, final: int | None) -> None:
    """Bytes of a send stream the sender outside aioquic delivered (and, with `final`, the stream's
    size and its FIN): acknowledged as if aioquic had sent them; the stream finishes once everything
    it holds is acknowledged."""
    sender = _send_stream(quic, stream_id).sender
    if sender._reset_error_code is not None:
        return
    if final is not None:
        placeholder_stream_data(quic, stream_id, final)
        if sender._buffer_fin is None:
            sender._buffer_fin = final
    for r in ranges:
        if r.stop > sender._buffer_start:  # below it is acknowledged (and dropped) already
            sender.on_data_delivery(QuicDeliveryState.ACKED, max(r.start, sender._buffer_start), r.stop, False)
    if final is not None:
        sender.on_data_delivery(QuicDeliveryState.ACKED, final, final, sender._buffer_fin == final)


def charge_connection_data(quic: QuicConnection, size: int) -> None:
    """Stream bytes sent outside aioquic count against the peer's MAX_DATA, as aioquic's own do."""
    quic._remote_max_data_used += size


def set_congestion_window(quic: QuicConnection, window: int) -> None:
    """Make aioquic's congestion controller hold `window` bytes (a window computed elsewhere: what it
    lets aioquic send until the next call)."""
    quic._loss._cc.congestion_window = window


def remote_ack_delay_exponent(quic: QuicConnection) -> int:
    """The exponent the peer's ACK Delay fields are scaled by."""
    return quic._remote_ack_delay_exponent


def max_ack_delay(quic: QuicConnection) -> float:
    """The peer's max_ack_delay, seconds."""
    return quic._loss.max_ack_delay


def count_sent_packet(quic: QuicConnection, packet: QuicSentPacket) -> None:
    """Account a 1-RTT packet as sent (bytes in flight, congestion control, probe timer) without
    storing it for acknowledgement; insert_sent_packet stores it."""
    space = _one_rtt_space(quic)
    loss = quic._loss
    last_sent = loss._time_of_last_sent_ack_eliciting_packet
    stored, space.sent_packets = space.sent_packets, {}
    try:
        QuicPacketRecovery.on_packet_sent(loss, packet=packet, space=space)
    finally:
        space.sent_packets = stored
    # a packet registered late must not move the probe timer back
    loss._time_of_last_sent_ack_eliciting_packet = max(last_sent, loss._time_of_last_sent_ack_eliciting_packet)


def insert_sent_packet(quic: QuicConnection, packet: QuicSentPacket) -> None:
    """Store a 1-RTT packet for acknowledgement and loss detection, keeping the packet-number order
    recovery relies on (it bisects the stored numbers and stops at the first above the largest acked)."""
    sent = _one_rtt_space(quic).sent_packets
    number = packet.packet_number
    if number in sent:
        raise ValueError(f"packet {number} is already awaiting acknowledgement")
    later: list[int] = []
    for n in reversed(sent):
        if n < number:
            break
        later.append(n)
    moved = [(n, sent.pop(n)) for n in reversed(later)]
    sent[number] = packet
    sent.update(moved)


def intercept_one_rtt_sent(quic: QuicConnection, take: Callable[[QuicSentPacket], None]) -> None:
    """From now on, 1-RTT packets aioquic builds are accounted as sent (count_sent_packet) and handed
    to `take` instead of being stored for acknowledgement: their number on the wire is not known yet."""
    loss = quic._loss
    if "on_packet_sent" in vars(loss):
        raise RuntimeError("this connection's sent packets are already intercepted")
    one_rtt = _one_rtt_space(quic)
    original = loss.on_packet_sent

    def on_packet_sent(*, packet: QuicSentPacket, space: QuicPacketSpace) -> None:
        if space is not one_rtt:
            original(packet=packet, space=space)
            return
        count_sent_packet(quic, packet)
        take(packet)

    loss.on_packet_sent = on_packet_sent


def observe_one_rtt_acks(quic: QuicConnection, observer: AckObserver) -> None:
    """Call `observer(ranges, ack_delay, now)` for every ACK frame of the 1-RTT space, before aioquic
    processes it."""
    loss = quic._loss
    if "on_ack_received" in vars(loss):
        raise RuntimeError("this connection's ACKs are already observed")
    one_rtt = _one_rtt_space(quic)
    original = loss.on_ack_received

    def on_ack_received(*, ack_rangeset: RangeSet, ack_delay: float, now: float, space: QuicPacketSpace) -> None:
        if space is one_rtt:
            observer(ack_rangeset, ack_delay, now)
        original(ack_rangeset=ack_rangeset, ack_delay=ack_delay, now=now, space=space)

    loss.on_ack_received = on_ack_received


def apply_ack(quic: QuicConnection, ranges: RangeSet, ack_delay: float, now: float) -> None:
    """Process an acknowledgement of 1-RTT packets as if an ACK frame with `ranges` arrived at `now`
    (acked handlers, RTT sample if the largest is newly acked, congestion control, loss detection),
    bypassing the observer."""
    QuicPacketRecovery.on_ack_received(quic._loss, ack_rangeset=ranges, ack_delay=ack_delay, now=now,
                                       space=_one_rtt_space(quic))


def ack_delay_seconds(quic: QuicConnection, encoded: int) -> float:
    """An ACK frame's ACK Delay field of the peer, in seconds (its ack_delay_exponent applied)."""
    return (encoded << quic._remote_ack_delay_exponent) / 1e6


def note_received(quic: QuicConnection, truncated_pn: int, now: float) -> bool:
    """Record a 1-RTT packet of the peer that carried only ACK and PADDING frames and was read
    outside aioquic (its 16-bit number `truncated_pn`, arrived at `now`), as aioquic records a
    packet it received: the idle timer restarts and the number is acknowledged in our next ACK
    (nothing is acknowledged sooner: it is not ack-eliciting). False for a duplicate."""
    space = _one_rtt_space(quic)
    if space.discarded:
        return False
    pn = decode_packet_number(truncated_pn, 16, space.largest_received_packet + 1)
    if pn in space.received_packets:
        return False
    quic._close_at = now + quic._idle_timeout()
    quic._ack_eliciting_sent_since_receipt = False
    if pn > space.largest_received_packet:
        space.largest_received_packet = pn
        space.largest_received_time = now
    space.ack_queue.add(pn)
    space.received_packets.add(pn)
    if len(space.ack_queue) > MAX_ACK_RANGES:
        space.ack_queue.shift()
    return True


# ---- what the kernel data path needs to know of a connection (datapath/kernel/path.py)

def host_cid(quic: QuicConnection) -> bytes:
    """The connection id of this endpoint the peer currently addresses its packets to."""
    return quic.host_cid


def host_cids(quic: QuicConnection) -> set[bytes]:
    """This endpoint's connection ids the peer may address packets to (not retired)."""
    return {c.cid for c in quic._host_cids}


def peer_max_stream_data_uni(quic: QuicConnection) -> int:
    """The peer's initial MAX_STREAM_DATA for unidirectional streams this endpoint opens."""
    return quic._remote_max_stream_data_uni


def peer_cids(quic: QuicConnection) -> set[bytes]:
    """Every connection id of the peer this endpoint may put on its packets: the current one and
    those the peer issued for later use (NEW_CONNECTION_ID)."""
    return {quic._peer_cid.cid, *(c.cid for c in quic._peer_cid_available)}


def max_datagram_size(quic: QuicConnection) -> int:
    """The largest UDP payload aioquic sends on this connection."""
    return quic._max_datagram_size


def is_closing(quic: QuicConnection) -> bool:
    """The connection is closing, draining or gone: nothing may be sent on it any more (a
    CONNECTION_CLOSE arrived or was sent; aioquic reports termination only after draining)."""
    from aioquic.quic.connection import END_STATES

    return quic._state in END_STATES


def has_unsent(quic: QuicConnection) -> bool:
    """aioquic holds something to send besides ACKs and timer-driven probes: stream bytes, a FIN or a
    reset (new ones, or lost ones queued again), or DATAGRAM frames."""
    if quic._datagrams_pending:
        return True
    return any(not s.sender.buffer_is_empty or s.sender.reset_pending for s in quic._streams.values())


def count_losses(quic: QuicConnection) -> Callable[[], int]:
    """From now on count the packets aioquic declares lost (any packet number space); returns a
    function reading the count."""
    loss = quic._loss
    if "_on_packets_lost" in vars(loss):
        raise RuntimeError("this connection's losses are already counted")
    original = loss._on_packets_lost
    lost = [0]

    def on_packets_lost(*, packets, **kwargs) -> None:
        packets = list(packets)
        lost[0] += len(packets)
        original(packets=packets, **kwargs)

    loss._on_packets_lost = on_packets_lost
    return lambda: lost[0]


def stream_data_waiting(quic: QuicConnection, stream_id: int) -> bool:
    """An open send stream has bytes or a FIN queued (new or to re-send) and is not reset."""
    stream = quic._streams.get(stream_id)
    return stream is not None and not stream.sender.buffer_is_empty and stream.sender._reset_error_code is None


def congestion_budget(quic: QuicConnection) -> int:
    """Congestion window minus bytes in flight; negative when more is in flight than the window."""
    return quic._loss.congestion_window - quic._loss.bytes_in_flight


def stream_acked(quic: QuicConnection, stream_id: int) -> bool:
    """Everything sent on a send stream (FIN included) was acknowledged, or it was reset."""
    sender = _send_stream(quic, stream_id).sender
    return sender.is_finished or sender._reset_error_code is not None


# ---- writes a peer may have made impossible, and a server's routing of connection ids

def send_stream_closed(quic: QuicConnection, stream_id: int) -> bool:
    """Nothing more can be written on a stream this endpoint sends on: it was reset (by us, or by
    aioquic on the peer's STOP_SENDING), or, finished or reset, aioquic already discarded it."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return quic._stream_is_discarded(stream_id)
    return stream.sender._reset_error_code is not None


def route_connection(protocol: QuicConnectionProtocol, *, issued: Callable[[bytes], None],
                     retired: Callable[[bytes], None], terminated: Callable[[], None]) -> None:
    """Have an aioquic connection protocol report the connection ids it issues and retires, and its
    end, to its server (what aioquic's own QuicServer registers)."""
    protocol._connection_id_issued_handler = issued
    protocol._connection_id_retired_handler = retired
    protocol._connection_terminated_handler = terminated
