"""ExternalSender against a real aioquic client and server (sans-I/O, fake clock). The kernel is
simulated here: it builds 1-RTT packets with the server's keys from one wire counter, renumbers the
packets aioquic builds, and queues one record per packet for userspace to register."""

import os

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.packet import pull_ack_frame
from aioquic.quic.rangeset import RangeSet

from fastrelay.quic import internals
from fastrelay.quic.registration import ExternalSender, SentStreamFrame

from .test_internals import Pair, one_rtt_packet, stream_frame


class Kernel:
    """The egress program's stand-in: one wire counter for its packets and aioquic's, a lossy link
    (`drop`: wire numbers never delivered) and a ring of records, drained before the server's input
    unless `auto_drain` is off. The counter is always reported (allocated_below)."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.ext = ExternalSender(pair.server)
        self.next = self.ext.first_packet_number
        self.ring: list[tuple] = []
        self.sent: set[int] = set()  # numbers of the kernel's own packets
        self.drop: set[int] = set()
        self.auto_drain = True
        self.wire_of: dict[int, int] = {}  # aioquic's local number -> wire number
        pair.egress = self.renumber
        pair.before_server_input = self.before_input

    def send(self, *frames: SentStreamFrame, age: float = 0.0) -> int:
        """Send one packet with `frames`; `age` backdates the send time the record reports."""
        pn = self.next
        self.next += 1
        self.sent.add(pn)
        datagram = one_rtt_packet(self.pair.server, pn,
                                  b"".join(stream_frame(f.stream_id, f.offset, f.data, f.fin) for f in frames))
        self.ring.append(("sent", pn, self.pair.now - age, len(datagram), frames))
        if pn not in self.drop:
            self.pair.to_client.append(datagram)
        return pn

    def renumber(self, datagram: bytes) -> bytes | None:
        assert not datagram[0] & 0x80, "a long-header packet after the handshake"
        crypto = internals.one_rtt_crypto(self.pair.server).send
        header, payload, local, _ = crypto.decrypt_packet(datagram, 1 + len(internals.peer_cid(self.pair.server)),
                                                          internals.next_packet_number(self.pair.server))
        wire = self.next
        self.next += 1
        self.wire_of[local] = wire
        self.ring.append(("renumbered", local, wire))
        out = crypto.encrypt_packet(header[:-2] + (wire & 0xFFFF).to_bytes(2), payload, wire)
        return None if wire in self.drop else out

    def before_input(self) -> None:
        self.ext.allocated_below(self.next)
        if self.auto_drain:
            self.drain()

    def drain(self, order: list[int] | None = None) -> None:
        """Register the queued records, or only those at indexes `order` (in that order)."""
        order = list(range(len(self.ring))) if order is None else order
        records = [self.ring[i] for i in order]
        self.ring = [r for i, r in enumerate(self.ring) if i not in order]
        for record in records:
            if record[0] == "sent":
                _, pn, sent_time, size, frames = record
                self.ext.register(pn, sent_time, size, frames)
            else:
                self.ext.renumber(record[1], record[2])


def chunks(stream_id: int, data: bytes, size: int = 1000, fin: bool = True) -> list[SentStreamFrame]:
    return [SentStreamFrame(stream_id, o, data[o:o + size], fin and o + size >= len(data))
            for o in range(0, len(data), size)]


def assert_settled(pair: Pair, kernel: Kernel) -> None:
    """Once the ring is drained: nothing in flight, nothing waiting for a number, no error."""
    kernel.drain()
    assert internals.bytes_in_flight(pair.server) == 0  # only ACK-only packets may await acknowledgement
    assert not kernel.sent & set(internals.sent_packet_numbers(pair.server))
    assert kernel.ext.awaiting_renumber == 0
    assert not pair.terminated


def test_external_packets_are_delivered_and_acknowledged_like_aioquic_ones():
    pair = Pair()
    k = Kernel(pair)
    rtt, cwnd = internals.smoothed_rtt(pair.server), internals.congestion_window(pair.server)
    k.ext.open_stream(3)
    data = os.urandom(4500)
    for frame in chunks(3, data):
        k.send(frame, age=0.02)  # the send time the kernel reports: 20 ms earlier shows in the RTT samples
    sizes = sum(r[3] for r in k.ring)
    k.drain()
    assert internals.bytes_in_flight(pair.server) == sizes
    assert k.ext.budget() == cwnd - sizes
    pair.run(10)
    assert pair.received[3] == data and 3 in pair.fins
    assert_settled(pair, k)
    assert internals.smoothed_rtt(pair.server) > rtt + 0.002
    assert internals.congestion_window(pair.server) == cwnd + sizes  # slow start grew by the acked bytes
    assert not internals.is_stream_open(pair.server, 3)  # all acknowledged with the FIN: finished
    assert pair.stream_frames_sent(3) == [] and pair.server_events("recovery:packet_lost") == []


def test_a_lost_external_packet_is_resent_by_aioquic_on_the_same_stream_and_offset():
    pair = Pair()
    k = Kernel(pair)
    k.ext.open_stream(7)
    data = os.urandom(6000)
    k.drop.add(k.next + 2)
    for frame in chunks(7, data):
        k.send(frame)
    pair.run(20)
    assert [e["packet_number"] for e in pair.server_events("recovery:packet_lost")] == [k.ext.first_packet_number + 2]
    assert pair.stream_frames_sent(7) == [(2000, 1000)]  # exactly the lost range, by aioquic
    assert pair.received[7] == data and 7 in pair.fins
    assert_settled(pair, k)


def test_aioquic_and_kernel_packets_share_one_counter_and_register_out_of_order():
    pair = Pair()
    k = Kernel(pair)
    k.auto_drain = False
    k.ext.open_stream(3)
    own = pair.server.get_next_available_stream_id(is_unidirectional=True)
    assert own == 7
    kernel_data, own_data = os.urandom(5000), os.urandom(5000)
    for i, frame in enumerate(chunks(3, kernel_data)):
        k.send(frame)
        pair.server.send_stream_data(own, own_data[i * 1000:(i + 1) * 1000], end_stream=i == 4)
        pair.now += 0.002  # let the pacer release aioquic's packet
        pair.collect()  # aioquic's packet takes the next wire number
    assert k.ext.awaiting_renumber == 5
    order = list(range(len(k.ring)))
    order = order[::2][::-1] + order[1::2]  # kernel packets newest first, then aioquic's renumbering
    k.drain(order)
    numbers = internals.sent_packet_numbers(pair.server)
    assert numbers == sorted(numbers) and len(numbers) == len(order)
    assert internals.next_packet_number(pair.server) > max(numbers)  # aioquic never reuses a wire number
    k.auto_drain = True
    pair.run(10)
    assert pair.received[3] == kernel_data and pair.received[own] == own_data
    assert {3, own} <= pair.fins
    assert pair.server_events("recovery:packet_lost") == []
    assert_settled(pair, k)


def test_an_ack_that_overtakes_the_registration_is_held_and_applied():
    pair = Pair()
    k = Kernel(pair)
    k.auto_drain = False
    k.ext.open_stream(3)
    pn = k.send(SentStreamFrame(3, 0, b"early", True))
    pair.run(8)  # the client's ACK reaches the server before the record is drained
    assert pair.received[3] == b"early" and k.ring
    k.drain()
    assert pn not in internals.sent_packet_numbers(pair.server)  # acknowledged at registration
    k.auto_drain = True
    pair.run(200)  # a second: long past any loss timer
    assert pair.server_events("recovery:packet_lost") == [] and pair.stream_frames_sent(3) == []
    assert_settled(pair, k)


def test_acks_read_outside_aioquic_work_like_the_ones_it_parses():
    """What the ingress does with a subscriber's ACK-only packets: the relay's aioquic never sees
    them, their ACKs are applied from records and the packets are recorded as received."""
    pair = Pair()
    k = Kernel(pair)
    absorbed: list[int] = []

    def absorb(datagram: bytes) -> bool:
        crypto = internals.one_rtt_crypto(pair.server).recv
        space_largest = max(absorbed, default=0)
        _, payload, pn, _ = crypto.decrypt_packet(datagram, 1 + len(pair.server.host_cid), space_largest + 1)
        buf = Buffer(data=payload)
        if buf.pull_uint_var() != 0x02:
            return True
        ranges, delay = pull_ack_frame(buf)
        if any(payload[buf.tell():]):
            return True  # more than ACK and PADDING: aioquic reads it
        k.before_input()
        k.ext.acknowledge(ranges, internals.ack_delay_seconds(pair.server, delay), pair.now)
        assert internals.note_received(pair.server, pn & 0xFFFF, pair.now)
        assert not internals.note_received(pair.server, pn & 0xFFFF, pair.now)  # a duplicate
        absorbed.append(pn)
        return False

    rtt = internals.smoothed_rtt(pair.server)
    pair.server_filter = absorb
    k.ext.open_stream(3)
    data = os.urandom(4500)
    for frame in chunks(3, data):
        k.send(frame, age=0.02)
    pair.run(10)
    assert absorbed and pair.received[3] == data
    assert_settled(pair, k)
    assert internals.smoothed_rtt(pair.server) > rtt + 0.002  # RTT samples from the records
    assert pair.stream_frames_sent(3) == [] and pair.server_events("recovery:packet_lost") == []
    # the absorbed packets are acknowledged in the relay's next ACK, as packets it received
    pair.client.send_ping(1)
    pair.collect()
    pair.run(3)
    acked = [r for p in pair.server_events("transport:packet_sent") for f in p["frames"]
             if f["frame_type"] == "ack" for r in f["acked_ranges"]]
    assert all(any(lo <= pn <= hi for lo, hi in acked) for pn in absorbed), (absorbed, acked)


def test_the_allocation_probe_is_asked_only_when_an_ack_names_numbers_beyond_what_is_known():
    pair = Pair()
    k = Kernel(pair)
    k.auto_drain = False
    pair.before_server_input = None  # no report before input: the probe is the only source
    asked = []
    k.ext.allocation_probe = lambda: asked.append(k.next) or k.next
    k.ext.open_stream(3)
    pn = k.send(SentStreamFrame(3, 0, b"early", True))
    pair.run(8)  # the ACK overtakes the record: the probe says the number was handed out
    assert asked == [pn + 1]
    k.drain()
    assert pn not in internals.sent_packet_numbers(pair.server)  # held, applied at registration
    pn = k.send(SentStreamFrame(3, 5, b"", True))
    k.drain()
    pair.run(8)  # an ACK of registered numbers only: not asked again
    assert len(asked) == 1
    assert pn not in internals.sent_packet_numbers(pair.server)


def test_a_held_ack_samples_rtt_only_if_its_packet_was_the_largest_acknowledged():
    pair = Pair()
    k = Kernel(pair)
    k.auto_drain = False
    k.ext.open_stream(3)
    k.send(SentStreamFrame(3, 0, b"a" * 100), age=0.5)  # its record is drained late, with an old send time
    k.send(SentStreamFrame(3, 100, b"b" * 100, True))
    k.drain([1])
    pair.run(8)  # one ACK covers both
    rtt = internals.smoothed_rtt(pair.server)
    k.drain()
    assert internals.smoothed_rtt(pair.server) == rtt  # not the frame's largest: no 0.5 s sample
    k.auto_drain = True
    pair.run(20)
    assert pair.server_events("recovery:packet_lost") == []
    assert_settled(pair, k)


def test_registering_an_older_packet_late_does_not_pull_the_probe_timer_back():
    pair = Pair()
    k = Kernel(pair)
    k.auto_drain = False
    k.ext.open_stream(3)
    k.send(SentStreamFrame(3, 0, b"a" * 100), age=0.5)
    k.send(SentStreamFrame(3, 100, b"b" * 100, True))
    k.drain([1, 0])
    assert pair.server.get_timer() > pair.now + 0.02  # the probe timeout runs from the newest send


def test_an_ack_beyond_the_allocated_numbers_is_not_held():
    pair = Pair()
    k = Kernel(pair)
    k.auto_drain = False
    pair.before_server_input = None  # nobody reports the kernel's counter
    k.ext.open_stream(3)
    pn = k.send(SentStreamFrame(3, 0, b"late", True))
    pair.run(8)
    k.drain()
    assert pn in internals.sent_packet_numbers(pair.server)  # its ACK was not held: aioquic will re-send


def test_renumbered_aioquic_packets_are_acknowledged_under_their_wire_numbers():
    pair = Pair()
    k = Kernel(pair)
    k.auto_drain = False
    k.ext.open_stream(3)
    for frame in chunks(3, os.urandom(3000)):
        k.send(frame)  # the wire counter runs ahead of aioquic's, which learns of it only from the ring
    pair.server.send_stream_data(7, b"control", end_stream=True)
    pair.collect()
    local = max(k.wire_of)
    assert k.wire_of[local] == local + 3
    assert k.ext.awaiting(local & 0xFFFF) == local and k.ext.awaiting((local + 1) & 0xFFFF) is None
    pair.run(8)  # the ACK of the wire number arrives before the renumbering record
    k.drain()
    k.auto_drain = True
    pair.run(10)
    assert pair.received[7] == b"control"
    assert pair.server_events("recovery:packet_lost") == [] and pair.stream_frames_sent(7) == [(0, 7)]
    assert_settled(pair, k)
    with pytest.raises(ValueError, match="awaits"):
        k.ext.renumber(local, k.next)


def test_external_bytes_use_the_peers_flow_control_credit_and_fin_completes_the_stream():
    pair = Pair(client_max_data=4000)
    k = Kernel(pair)
    assert k.ext.flow_credit() == (4000, 128)
    k.ext.open_stream(3)
    kernel_data = os.urandom(3000)
    for frame in chunks(3, kernel_data):
        k.send(frame)
    k.drain()
    assert k.ext.flow_credit() == (1000, 128)
    own_data = os.urandom(5000)
    pair.server.send_stream_data(7, own_data, end_stream=True)
    pair.collect()
    assert sum(size for _, size in pair.stream_frames_sent(7)) == 1000  # aioquic stops at the peer's MAX_DATA
    pair.run(40)  # the client raises MAX_DATA as data arrives
    assert not pair.terminated  # no FLOW_CONTROL_ERROR from the client
    assert pair.received[3] == kernel_data and pair.received[7] == own_data and {3, 7} <= pair.fins
    assert not internals.is_stream_open(pair.server, 3)
    assert_settled(pair, k)


def test_open_stream_keeps_chosen_ids_away_from_aioquics_allocator():
    pair = Pair()
    ext = ExternalSender(pair.server)
    ext.open_stream(11)  # skips 3 and 7
    assert pair.server.get_next_available_stream_id(is_unidirectional=True) == 15
    ext.open_stream(3)  # a skipped id, opened later
    pair.server.send_stream_data(15, b"x")  # aioquic's own next stream
    for bad in (3, 15, 1, 2, -1, 4 * 128 + 3):  # open, aioquic's, bidirectional, client's, negative, over limit
        with pytest.raises(ValueError):
            ext.open_stream(bad)
    ext.open_stream(7)
    assert pair.server.get_next_available_stream_id(is_unidirectional=True) == 19
    assert ext.stream_credit(7) == ext.stream_credit(3) > 0


def test_bad_registrations_are_refused_without_changing_anything():
    pair = Pair()
    k = Kernel(pair)
    ext = k.ext
    ext.open_stream(3)
    first = ext.first_packet_number
    ext.register(first + 1, pair.now, 100, [SentStreamFrame(3, 100, b"b" * 100)])
    credit, numbers = ext.flow_credit(), internals.sent_packet_numbers(pair.server)
    bad = [
        (first - 1, [SentStreamFrame(3, 0, b"a")]),  # an aioquic number from before
        (first + 1, [SentStreamFrame(3, 0, b"a")]),  # registered twice
        (first, [SentStreamFrame(7, 0, b"a")]),  # stream not open
        (first, [SentStreamFrame(3, 150, b"c")]),  # bytes already held
        (first, [SentStreamFrame(3, 0, b"a" * 10, True)]),  # FIN below held bytes
        (first, [SentStreamFrame(3, 0, b"a" * 60), SentStreamFrame(3, 50, b"a" * 10)]),  # overlapping frames
        (first, [SentStreamFrame(3, 0, b"a", True), SentStreamFrame(3, 200, b"a")]),  # data after a FIN
    ]
    for pn, frames in bad:
        with pytest.raises(ValueError):
            ext.register(pn, pair.now, 100, frames)
    with pytest.raises(ValueError):
        ext.register(first, pair.now, 0, [])
    assert ext.flow_credit() == credit and internals.sent_packet_numbers(pair.server) == numbers
    ext.register(first, pair.now, 100, [SentStreamFrame(3, 0, b"a" * 100)])  # fills the gap
    assert internals.sent_packet_numbers(pair.server)[-2:] == [first, first + 1]


def test_losses_are_counted_and_the_lost_bytes_wait_to_be_sent():
    """What tells the kernel path a full transmit is due after an acknowledgement: packets declared
    lost (counted) and bytes queued again (has_unsent); both quiet when nothing was lost."""
    pair = Pair()
    k = Kernel(pair)
    k.ext.open_stream(7)
    first = k.next
    for frame in chunks(7, os.urandom(6000)):
        k.send(frame)
    k.drain()
    assert k.ext.packets_lost == 0 and not internals.has_unsent(pair.server)
    k.ext.acknowledge(RangeSet([range(first, first + 2)]), 0.0, pair.now)      # nothing lost yet
    assert k.ext.packets_lost == 0 and not internals.has_unsent(pair.server)
    k.ext.acknowledge(RangeSet([range(first + 3, first + 6)]), 0.0, pair.now)  # 3 above: first + 2 is lost
    assert k.ext.packets_lost == 1 and internals.has_unsent(pair.server)
    pair.run(10)
    assert not internals.has_unsent(pair.server) and 7 in pair.fins
    assert_settled(pair, k)
