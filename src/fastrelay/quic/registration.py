"""Packets a kernel data path sends on an aioquic connection, registered so aioquic treats them as its own.

The downstream egress program sends 1-RTT packets on a connection aioquic owns, and renumbers every
1-RTT packet aioquic builds for it, all from one counter: the numbers on the wire ("wire numbers"). Each
packet becomes a ring-buffer record. Userspace replays the records here in the order it drains them,
and drains them before it hands the connection any datagram it received; then aioquic's loss recovery,
congestion control, flow control and stream state behave as if aioquic had sent those packets.

Sans-I/O: no sockets, time is passed in. After calling into an ExternalSender the caller transmits as
after any other aioquic call (a registration can acknowledge or lose packets, and moves timers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

from aioquic import tls
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.quic.rangeset import RangeSet

from . import internals


class SentStreamFrame(NamedTuple):
    """Stream bytes one STREAM frame of a kernel-sent packet carried."""

    stream_id: int
    offset: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True)
class _HeldAck:
    time: float  # when the ACK frame arrived
    delay: float  # its ACK delay, seconds
    largest: int  # its largest acknowledged number


class ExternalSender:
    """Registration of packets sent outside aioquic on one connection's 1-RTT packet number space.

    From construction on, the wire numbers start at `first_packet_number` and every 1-RTT packet
    aioquic builds waits for `renumber()` (identity included) before an ACK can reach it.
    """

    def __init__(self, quic: QuicConnection) -> None:
        self._quic = quic
        self._first = internals.next_packet_number(quic)
        self._registered = RangeSet()  # wire numbers (>= first) known to recovery
        self._allocated = self._first  # every wire number below was handed out
        self._held: dict[int, _HeldAck] = {}  # acknowledged before registered
        self._unnumbered: dict[int, QuicSentPacket] = {}  # aioquic's packets by local number
        self._placeholders: dict[int, RangeSet] = {}  # per stream: gaps below bytes registered ahead
        self._skipped = RangeSet()  # stream indexes (id // 4) open_stream passed over
        self.allocation_probe: Callable[[], int] | None = None
        """If set, asked for the kernel's next wire number when an ACK names a number at or above
        every one known to be handed out (cheaper than calling allocated_below before each input)."""
        self.hold_unregistered = True
        """ACKs of wire numbers not registered yet wait for their registration. Off when the packets
        the kernel sends are not registered here at all (their recovery runs in the kernel)."""
        self.ack_listener: Callable[[RangeSet, float, float], None] | None = None
        """If set, called with every ACK frame aioquic itself parsed (not those given to acknowledge())."""
        internals.intercept_one_rtt_sent(quic, self._take)
        internals.observe_one_rtt_acks(quic, self._observed)
        self._lost = internals.count_losses(quic)

    @property
    def first_packet_number(self) -> int:
        """The first wire number the kernel's counter may hand out; lower numbers are packets aioquic
        sent before this object existed, which the egress program passes unchanged."""
        return self._first

    @property
    def packets_lost(self) -> int:
        """How many packets aioquic declared lost since this object exists (its own and registered ones)."""
        return self._lost()

    @property
    def awaiting_renumber(self) -> int:
        """How many packets aioquic built are waiting for their wire number."""
        return len(self._unnumbered)

    # ---- streams
    def open_stream(self, stream_id: int) -> None:
        """Make `stream_id`, a locally initiated unidirectional stream chosen outside aioquic, an aioquic
        send stream. Ids may be skipped, and skipped ids opened later; aioquic's own allocator never
        hands out any of them. Raises ValueError for an id of another type, one aioquic already used,
        or one beyond the peer's stream limit."""
        next_id = self._quic.get_next_available_stream_id(is_unidirectional=True)
        if stream_id < 0 or stream_id % 4 != next_id % 4:
            raise ValueError(f"stream {stream_id} is not a unidirectional stream this endpoint initiates")
        index = stream_id // 4
        if stream_id >= next_id:
            internals.open_send_stream(self._quic, stream_id)
            if index > next_id // 4:
                self._skipped.add(next_id // 4, index)
        elif index in self._skipped:
            internals.open_send_stream(self._quic, stream_id)
            self._skipped.subtract(index, index + 1)
        else:
            raise ValueError(f"stream {stream_id} was already used on this connection")

    # ---- packets
    def register(self, packet_number: int, sent_time: float, sent_bytes: int,
                 frames: Sequence[SentStreamFrame], ack_eliciting: bool = True) -> None:
        """Register a 1-RTT packet the kernel sent as `packet_number` at `sent_time` (`sent_bytes` long,
        counted in flight), carrying `frames` on open send streams. Its bytes count against flow
        control, its ACK releases them, its loss makes aioquic re-send the lost ranges on the same
        streams and offsets. An ACK that arrived before is applied now. Raises ValueError (changing
        nothing) for a number registered twice or below `first_packet_number`, and for stream bytes
        that contradict what the stream already holds."""
        self._check_new(packet_number)
        if sent_bytes <= 0:
            raise ValueError(f"packet {packet_number}: sent_bytes must be positive, not {sent_bytes}")
        self._check_frames(frames)
        handlers = []
        for f in frames:
            placeholders = self._placeholders.setdefault(f.stream_id, RangeSet())
            internals.hold_sent_stream_data(self._quic, f.stream_id, f.offset, f.data, f.fin, placeholders)
            if not len(placeholders):
                del self._placeholders[f.stream_id]
            handlers.append((internals.stream_delivery_handler(self._quic, f.stream_id),
                             (f.offset, f.offset + len(f.data), f.fin)))
        packet = QuicSentPacket(epoch=tls.Epoch.ONE_RTT, in_flight=True, is_ack_eliciting=ack_eliciting,
                                is_crypto_packet=False, packet_number=packet_number,
                                packet_type=QuicPacketType.ONE_RTT, sent_time=sent_time, sent_bytes=sent_bytes,
                                delivery_handlers=handlers)
        internals.count_sent_packet(self._quic, packet)
        internals.insert_sent_packet(self._quic, packet)
        self._numbered(packet_number)

    def renumber(self, local_pn: int, wire_pn: int) -> QuicSentPacket:
        """The packet aioquic built as `local_pn` left as `wire_pn`: from now on ACKs of `wire_pn` reach
        it (one that arrived before is applied now). Raises ValueError for an unknown local number or a
        wire number already registered."""
        if local_pn not in self._unnumbered:
            raise ValueError(f"no packet built by aioquic awaits a wire number for local number {local_pn}")
        self._check_new(wire_pn)
        packet = self._unnumbered.pop(local_pn)
        packet.packet_number = wire_pn
        internals.insert_sent_packet(self._quic, packet)
        self._numbered(wire_pn)
        return packet

    def awaiting(self, truncated: int, bits: int = 16) -> int | None:
        """The local number of the oldest aioquic packet still waiting for its wire number whose low
        `bits` bits are `truncated` (what the egress program reads off the wire), or None."""
        mask = (1 << bits) - 1
        return min((pn for pn in self._unnumbered if pn & mask == truncated), default=None)

    def acknowledge(self, ranges: RangeSet, ack_delay: float, now: float) -> None:
        """An ACK frame of the peer read outside aioquic (`ack_delay` in seconds, arrived at `now`):
        applied exactly as aioquic applies one it parsed (numbers not registered yet are held)."""
        self._on_ack(ranges, ack_delay, now)
        internals.apply_ack(self._quic, ranges, ack_delay, now)

    def allocated_below(self, next_packet_number: int) -> None:
        """The kernel has handed out every wire number below `next_packet_number`: ACKs for those not
        registered yet are held until they are (ACKs of higher unknown numbers are ignored, as aioquic
        does)."""
        self._allocated = max(self._allocated, next_packet_number)

    # ---- what the kernel may send
    def budget(self) -> int:
        """Bytes the congestion window leaves for more packets in flight."""
        return max(0, internals.congestion_window(self._quic) - internals.bytes_in_flight(self._quic))

    def flow_credit(self) -> tuple[int, int]:
        """(stream bytes the peer's MAX_DATA still allows, the peer's limit on unidirectional streams)."""
        return max(0, internals.connection_credit(self._quic)), internals.peer_max_streams_uni(self._quic)

    def stream_credit(self, stream_id: int) -> int:
        """Bytes the peer's MAX_STREAM_DATA still allows on an open send stream."""
        return max(0, internals.stream_credit(self._quic, stream_id))

    # ---- internals
    def _check_new(self, wire_pn: int) -> None:
        if wire_pn < self._first:
            raise ValueError(f"packet number {wire_pn} is below the first kernel number {self._first}")
        if wire_pn in self._registered:
            raise ValueError(f"packet number {wire_pn} is already registered")

    def _check_frames(self, frames: Sequence[SentStreamFrame]) -> None:
        by_stream: dict[int, list[SentStreamFrame]] = {}
        for f in frames:
            if not isinstance(f.data, bytes | bytearray | memoryview):
                raise ValueError(f"stream {f.stream_id}: frame data must be bytes")
            by_stream.setdefault(f.stream_id, []).append(f)
        for stream_id, group in by_stream.items():
            group.sort(key=lambda f: f.offset)
            for a, b in pairwise(group):
                if a.offset + len(a.data) > b.offset:
                    raise ValueError(f"stream {stream_id}: frames of one packet overlap at offset {b.offset}")
            if any(f.fin for f in group[:-1]):
                raise ValueError(f"stream {stream_id}: a FIN frame is followed by more data in the same packet")
            for f in group:
                internals.check_sent_stream_data(self._quic, stream_id, f.offset, len(f.data), f.fin,
                                                 self._placeholders.get(stream_id, RangeSet()))

    def _numbered(self, wire_pn: int) -> None:
        self._registered.add(wire_pn)
        self._allocated = max(self._allocated, wire_pn + 1)
        internals.reserve_packet_numbers(self._quic, wire_pn + 1)
        held = self._held.pop(wire_pn, None)
        if held is not None:
            # with the frame's largest number in the ranges, RTT is sampled only if this packet was it
            ranges = RangeSet([range(wire_pn, wire_pn + 1), range(held.largest, held.largest + 1)])
            internals.apply_ack(self._quic, ranges, held.delay, held.time)

    def _take(self, packet: QuicSentPacket) -> None:
        self._unnumbered[packet.packet_number] = packet

    def _observed(self, ranges: RangeSet, ack_delay: float, now: float) -> None:
        self._on_ack(ranges, ack_delay, now)
        if self.ack_listener is not None:
            self.ack_listener(ranges, ack_delay, now)

    def _on_ack(self, ranges: RangeSet, ack_delay: float, now: float) -> None:
        if not self.hold_unregistered:
            return
        largest = ranges.bounds().stop - 1
        if largest >= self._allocated and self.allocation_probe is not None:
            self.allocated_below(self.allocation_probe())
        for r in ranges:
            for pn in self._unregistered(max(r.start, self._first), min(r.stop, self._allocated)):
                self._held.setdefault(pn, _HeldAck(now, ack_delay, largest))

    def _unregistered(self, start: int, stop: int) -> Iterator[int]:
        cursor = start
        for r in self._registered:
            if cursor >= stop or r.start >= stop:
                break
            if r.stop <= cursor:
                continue
            yield from range(cursor, r.start)
            cursor = r.stop
        yield from range(cursor, stop)
