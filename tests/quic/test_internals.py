"""The aioquic private state fastrelay reads (quic/internals.py), against a real connection."""

import asyncio
import ssl
from collections.abc import Callable

import pytest
from aioquic import tls
from aioquic.asyncio import connect, serve
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived
from aioquic.quic.logger import QuicLogger
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicSentPacket
from aioquic.quic.rangeset import RangeSet
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fastrelay.quic import internals
from fastrelay.quic.link import QuicLink, configuration
from fastrelay.quic.tls import self_signed


def test_send_backlog_counts_unacknowledged_bytes_and_ignores_reset_streams(tmp_path):
    cert, key = self_signed(["127.0.0.1"])
    (tmp_path / "c").write_bytes(cert)
    (tmp_path / "k").write_bytes(key)

    async def main():
        server = await serve("127.0.0.1", 0, configuration=configuration(client=False, alpn=["t"],
                                                                          cert=str(tmp_path / "c"),
                                                                          key=str(tmp_path / "k")),
                             create_protocol=QuicLink)
        port = server._transport.get_extra_info("sockname")[1]
        async with connect("127.0.0.1", port, configuration=configuration(client=True, alpn=["t"], verify=False),
                           create_protocol=QuicLink) as link:
            assert link.backlog() == 0 and link.send_window() >= 2 * 10 * 1200  # aioquic's initial window
            a = link.open_stream(unidirectional=True)
            link._quic.send_stream_data(a, b"x" * 50_000)  # queued, not yet transmitted
            b = link.open_stream(unidirectional=True)
            link._quic.send_stream_data(b, b"y" * 30_000)
            assert link.backlog() == 80_000
            link._quic.reset_stream(b, 1)
            assert link.backlog() == 50_000
            link.transmit()
            for _ in range(100):  # acknowledged data leaves the backlog
                await asyncio.sleep(0.02)
                if link.backlog() == 0:
                    break
            assert link.backlog() == 0
        server.close()

    asyncio.run(main())


# ---- sans-I/O harness: a real aioquic client and server joined by a fake clock (also used by
# test_registration.py), and 1-RTT packets built outside aioquic with the server's own keys

SERVER_ADDR = ("10.0.0.1", 4433)
CLIENT_ADDR = ("10.0.0.2", 50000)
STEP = 0.005  # one-way delay: what is sent in one step arrives in the next


class Pair:
    """A handshaken client/server pair. `egress` may rewrite or drop (None) the server's datagrams;
    `before_server_input` runs before each datagram the server receives."""

    def __init__(self, client_max_data: int = 1 << 20) -> None:
        cert, key = self_signed(["localhost"])
        scfg = QuicConfiguration(is_client=False, alpn_protocols=["t"], quic_logger=QuicLogger())
        scfg.certificate = x509.load_pem_x509_certificate(cert)
        scfg.private_key = serialization.load_pem_private_key(key, password=None)
        ccfg = QuicConfiguration(is_client=True, alpn_protocols=["t"], verify_mode=ssl.CERT_NONE,
                                 max_data=client_max_data)
        self.now = 1.0
        self.client = QuicConnection(configuration=ccfg)
        self.server = QuicConnection(configuration=scfg,
                                     original_destination_connection_id=self.client.original_destination_connection_id)
        self.qlog = scfg.quic_logger
        self.egress: Callable[[bytes], bytes | None] | None = None
        self.before_server_input: Callable[[], None] | None = None
        self.server_filter: Callable[[bytes], bool] | None = None  # False: the datagram is taken away
        self.to_client: list[bytes] = []
        self.to_server: list[bytes] = []
        self.received: dict[int, bytes] = {}  # the client application's stream bytes
        self.fins: set[int] = set()
        self.terminated: list[ConnectionTerminated] = []
        self.client.connect(SERVER_ADDR, now=self.now)
        self.to_server += [d for d, _ in self.client.datagrams_to_send(self.now)]
        self.run(20)
        assert not self.terminated

    def collect(self) -> None:
        """Take what both sides want to send now."""
        self.to_server += [d for d, _ in self.client.datagrams_to_send(self.now)]
        for d, _ in self.server.datagrams_to_send(self.now):
            out = self.egress(d) if self.egress else d
            if out is not None:
                self.to_client.append(out)

    def step(self) -> None:
        self.now += STEP
        to_client, self.to_client = self.to_client, []
        to_server, self.to_server = self.to_server, []
        for d in to_client:
            self.client.receive_datagram(d, SERVER_ADDR, self.now)
        for d in to_server:
            if self.before_server_input:
                self.before_server_input()
            if self.server_filter and not self.server_filter(d):
                continue
            self.server.receive_datagram(d, CLIENT_ADDR, self.now)
        for conn in (self.client, self.server):
            timer = conn.get_timer()
            if timer is not None and timer <= self.now:
                conn.handle_timer(self.now)
        while (event := self.client.next_event()) is not None:
            if isinstance(event, StreamDataReceived):
                self.received[event.stream_id] = self.received.get(event.stream_id, b"") + event.data
                if event.end_stream:
                    self.fins.add(event.stream_id)
            elif isinstance(event, ConnectionTerminated):
                self.terminated.append(event)
        while (event := self.server.next_event()) is not None:
            if isinstance(event, ConnectionTerminated):
                self.terminated.append(event)
        self.collect()

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()

    def server_events(self, name: str) -> list[dict]:
        return [e["data"] for e in self.qlog.to_dict()["traces"][0]["events"] if e["name"] == name]

    def stream_frames_sent(self, stream_id: int) -> list[tuple[int, int]]:
        """(offset, length) of every STREAM frame of `stream_id` aioquic built."""
        return [(f["offset"], f["length"]) for p in self.server_events("transport:packet_sent")
                for f in p["frames"] if f["frame_type"] == "stream" and f["stream_id"] == stream_id]


def stream_frame(stream_id: int, offset: int, data: bytes, fin: bool = False) -> bytes:
    buf = Buffer(capacity=len(data) + 32)
    buf.push_uint_var(0x08 | 0x04 | 0x02 | int(fin))  # STREAM with offset and length
    buf.push_uint_var(stream_id)
    buf.push_uint_var(offset)
    buf.push_uint_var(len(data))
    buf.push_bytes(data)
    return buf.data


def one_rtt_packet(quic: QuicConnection, packet_number: int, frames: bytes) -> bytes:
    """A short-header packet from `quic`'s side, protected with its 1-RTT keys, padded for the
    header-protection sample."""
    crypto = internals.one_rtt_crypto(quic)
    header = bytes([0x40 | crypto.key_phase << 2 | 1]) + internals.peer_cid(quic) + (packet_number & 0xFFFF).to_bytes(2)
    return crypto.send.encrypt_packet(header, frames.ljust(20, b"\0"), packet_number)


def test_packets_built_outside_aioquic_reach_the_peer_and_reserve_their_numbers():
    pair = Pair()
    server = pair.server
    pn = internals.next_packet_number(server)
    pair.to_client.append(one_rtt_packet(server, pn + 2, stream_frame(3, 0, b"hello", fin=True)))
    internals.reserve_packet_numbers(server, pn + 3)
    internals.reserve_packet_numbers(server, pn)  # never moves back
    assert internals.next_packet_number(server) == pn + 3
    pair.run(2)
    assert pair.received[3] == b"hello" and 3 in pair.fins
    server.send_ping(1)
    pair.collect()
    assert internals.sent_packet_numbers(server)[-1] == pn + 3


def test_open_send_stream_and_held_stream_data_follow_the_sender_rules():
    pair = Pair()
    server = pair.server
    assert internals.peer_max_streams_uni(server) == 128  # aioquic's default, from the client
    credit = internals.connection_credit(server)
    internals.open_send_stream(server, 7)
    assert server.get_next_available_stream_id(is_unidirectional=True) == 11
    assert internals.is_stream_open(server, 7) and not internals.is_stream_open(server, 3)
    for bad in (7, 1, 2, 4 * 128 + 3):  # open, bidirectional, client's, beyond the peer's limit
        with pytest.raises(ValueError):
            internals.open_send_stream(server, bad)
    window = internals.stream_credit(server, 7)

    data = bytes(range(200))
    holes = RangeSet()
    internals.check_sent_stream_data(server, 7, 100, 100, True, holes)
    internals.hold_sent_stream_data(server, 7, 100, data[100:], True, holes)
    assert list(holes) == [range(0, 100)]
    assert internals.connection_credit(server) == credit - 200
    assert internals.stream_credit(server, 7) == window - 200
    for offset, size, fin in ((150, 10, False), (0, 300, False), (0, 50, True)):
        with pytest.raises(ValueError):
            internals.check_sent_stream_data(server, 7, offset, size, fin, holes)
    internals.check_sent_stream_data(server, 7, 0, 100, False, holes)
    internals.hold_sent_stream_data(server, 7, 0, data[:100], False, holes)
    assert not list(holes) and internals.connection_credit(server) == credit - 200
    pair.collect()
    assert pair.stream_frames_sent(7) == []  # held as sent, not pending

    handler = internals.stream_delivery_handler(server, 7)
    handler(QuicDeliveryState.LOST, 0, 200, True)  # aioquic re-sends a lost range from the held bytes
    pair.collect()
    assert pair.stream_frames_sent(7) == [(0, 200)]
    pair.run(4)
    assert pair.received[7] == data and 7 in pair.fins


def test_sent_packets_are_counted_kept_in_number_order_and_acknowledged():
    pair = Pair()
    server = pair.server
    base = internals.next_packet_number(server) + 10
    in_flight, rtt = internals.bytes_in_flight(server), internals.smoothed_rtt(server)
    assert rtt is not None and internals.congestion_window(server) > 0

    def packet(pn):
        return QuicSentPacket(epoch=tls.Epoch.ONE_RTT, in_flight=True, is_ack_eliciting=True, is_crypto_packet=False,
                              packet_number=pn, packet_type=QuicPacketType.ONE_RTT, sent_time=pair.now - 0.5,
                              sent_bytes=1000)

    for pn in (base + 5, base + 1, base + 3):
        p = packet(pn)
        internals.count_sent_packet(server, p)
        internals.insert_sent_packet(server, p)
    assert internals.sent_packet_numbers(server)[-3:] == [base + 1, base + 3, base + 5]
    assert internals.bytes_in_flight(server) == in_flight + 3000
    with pytest.raises(ValueError):
        internals.insert_sent_packet(server, packet(base + 3))
    internals.apply_ack(server, RangeSet([range(base, base + 6)]), 0.0, pair.now)
    assert base + 5 not in internals.sent_packet_numbers(server)
    assert internals.bytes_in_flight(server) == in_flight
    assert internals.smoothed_rtt(server) > rtt  # sampled from the 0.5 s old packet


def test_hooks_take_aioquic_packets_and_observe_acks():
    pair = Pair()
    server = pair.server
    taken, acks = [], []
    internals.intercept_one_rtt_sent(server, taken.append)
    internals.observe_one_rtt_acks(server, lambda ranges, delay, now: acks.append((list(ranges), now)))
    for hook in (internals.intercept_one_rtt_sent, internals.observe_one_rtt_acks):
        with pytest.raises(RuntimeError):
            hook(server, lambda *a: None)
    stored, in_flight = internals.sent_packet_numbers(server), internals.bytes_in_flight(server)
    server.send_stream_data(3, b"x" * 100, end_stream=True)
    pair.collect()
    assert [p.packet_number for p in taken] == [internals.next_packet_number(server) - 1]
    assert internals.sent_packet_numbers(server) == stored  # counted, not stored
    assert internals.bytes_in_flight(server) == in_flight + taken[0].sent_bytes
    pair.run(4)
    assert pair.received[3] == b"x" * 100
    assert acks and any(taken[0].packet_number in r for ranges, _ in acks for r in ranges)


def test_connection_facts_for_the_kernel_path():
    pair = Pair()
    server, client = pair.server, pair.client
    cids = internals.host_cids(server)
    assert internals.peer_cid(client) in cids and all(len(c) == 8 for c in cids)
    assert internals.host_cid(server) == internals.peer_cid(client)  # the one the client addresses now
    assert internals.peer_max_stream_data_uni(server) == client.configuration.max_stream_data
    assert 1200 <= internals.max_datagram_size(server) <= 1500


def test_closing_and_an_unclamped_congestion_budget():
    pair = Pair()
    server = pair.server
    assert not internals.is_closing(server)
    window, flight = internals.congestion_window(server), internals.bytes_in_flight(server)
    assert internals.congestion_budget(server) == window - flight
    pair.client.close(error_code=0)
    pair.collect()
    pair.step()  # the server receives CONNECTION_CLOSE and starts draining, before it reports termination
    assert internals.is_closing(server)


def test_stream_acked_after_the_peer_acknowledged_everything_or_a_reset():
    pair = Pair()
    server = pair.server
    sid = server.get_next_available_stream_id(is_unidirectional=True)
    server.send_stream_data(sid, b"x" * 3000, end_stream=True)
    other = sid + 4
    server.send_stream_data(other, b"y" * 3000)
    assert not internals.stream_acked(server, sid)
    assert internals.stream_data_waiting(server, sid) and internals.stream_data_waiting(server, other)
    pair.collect()
    pair.run(10)
    assert not internals.is_stream_open(server, sid) or internals.stream_acked(server, sid)
    assert not internals.stream_acked(server, other)  # no FIN yet
    assert not internals.stream_data_waiting(server, other)  # all sent
    server.send_stream_data(other, b"z")
    assert internals.stream_data_waiting(server, other)
    server.reset_stream(other, 1)
    assert internals.stream_acked(server, other) and not internals.stream_data_waiting(server, other)
