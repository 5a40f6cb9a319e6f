"""Plaintext packet protection (quic/plaintext.py): two real aioquic connections driven sans-I/O with a
fake clock (packet bytes inspected), and QuicLink endpoints over loopback UDP through a recording hop."""

import asyncio
import inspect
import logging
import os

import pytest
from aioquic import tls as aioquic_tls
from aioquic.asyncio import connect, serve
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection, QuicConnectionError
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.events import ConnectionTerminated, DatagramFrameReceived, HandshakeCompleted, StreamDataReceived
from aioquic.quic.packet import QuicErrorCode, pull_ack_frame, pull_quic_header

from fastrelay.quic import plaintext
from fastrelay.quic.link import QuicLink, configuration
from fastrelay.quic.plaintext import (
    TRANSPORT_PARAMETER_ID,
    IdentityAEAD,
    PlaintextCryptoPair,
    install,
    is_plaintext,
    parse_short_header,
)
from fastrelay.quic.tls import self_signed

ALPN = "fr-plain"
CID_LEN = 8  # aioquic's default connection_id_length
CLIENT_ADDR = ("10.0.0.1", 4433)
SERVER_ADDR = ("10.0.0.2", 4433)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(["127.0.0.1", "localhost"])
    (d / "c.pem").write_bytes(cert)
    (d / "k.pem").write_bytes(key)
    return str(d / "c.pem"), str(d / "k.pem")


def insecure_lines(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith("INSECURE")]


# ---------------------------------------------------------------- sans-I/O: two QuicConnections, fake clock
class Wire:
    """A client and a server QuicConnection exchanging datagrams by hand; every datagram is kept."""

    def __init__(self, tls_files, client_offers: bool, server_offers: bool) -> None:
        self.client = QuicConnection(configuration=configuration(client=True, alpn=[ALPN], verify=False))
        self.server = QuicConnection(
            configuration=configuration(client=False, alpn=[ALPN], cert=tls_files[0], key=tls_files[1]),
            original_destination_connection_id=self.client.original_destination_connection_id)
        if client_offers:
            install(self.client)
        if server_offers:
            install(self.server)
        self.now = 0.0
        self.sent: list[tuple[str, bytes]] = []  # ("c2s" | "s2c", datagram)
        self.events: dict[QuicConnection, list] = {self.client: [], self.server: []}
        self.client.connect(SERVER_ADDR, now=self.now)

    def peer(self, quic):
        return self.server if quic is self.client else self.client

    def take(self, quic) -> list[bytes]:
        """Datagrams `quic` wants to send now (recorded, not delivered)."""
        out = [d for d, _ in quic.datagrams_to_send(self.now)]
        self.sent += [("c2s" if quic is self.client else "s2c", d) for d in out]
        return out

    def deliver(self, quic, datagrams) -> None:
        """Hand `datagrams` to `quic` (they came from its peer)."""
        for d in datagrams:
            quic.receive_datagram(d, CLIENT_ADDR if quic is self.server else SERVER_ADDR, self.now)
        self.drain()

    def drain(self) -> None:
        for quic, evs in self.events.items():
            while (ev := quic.next_event()) is not None:
                evs.append(ev)

    def pump(self, seconds: float = 0.3) -> None:
        """Exchange everything both ways for `seconds` of fake time (timers fire, ACKs flow)."""
        end = self.now + seconds
        while self.now < end:
            for quic in (self.client, self.server):
                timer = quic.get_timer()
                if timer is not None and timer <= self.now:
                    quic.handle_timer(self.now)
                self.deliver(self.peer(quic), self.take(quic))
            self.now += 0.005

    def handshake(self) -> None:
        self.pump()
        for quic in (self.client, self.server):
            assert any(isinstance(e, HandshakeCompleted) for e in self.events[quic])

    def received(self, quic, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.events[quic] if isinstance(e, StreamDataReceived)
                        and e.stream_id == stream_id)

    def datagrams(self, quic) -> list[bytes]:
        return [e.data for e in self.events[quic] if isinstance(e, DatagramFrameReceived)]

    def closed(self, quic) -> bool:
        return any(isinstance(e, ConnectionTerminated) for e in self.events[quic])


def frames(payload: bytes) -> list[tuple]:
    """Decode the frames of a 1-RTT payload (the ones aioquic sends after a handshake)."""
    buf = Buffer(data=payload)
    out: list[tuple] = []
    while not buf.eof():
        t = buf.pull_uint_var()
        if t == 0x00:
            out.append(("padding",))
        elif t == 0x01:
            out.append(("ping",))
        elif t in (0x02, 0x03):
            ranges, _delay = pull_ack_frame(buf)
            if t == 0x03:
                for _ in range(3):
                    buf.pull_uint_var()
            out.append(("ack", ranges))
        elif t == 0x06:
            buf.pull_uint_var()
            out.append(("crypto", buf.pull_bytes(buf.pull_uint_var())))
        elif t == 0x07:
            out.append(("new_token", buf.pull_bytes(buf.pull_uint_var())))
        elif 0x08 <= t <= 0x0F:
            sid = buf.pull_uint_var()
            offset = buf.pull_uint_var() if t & 0x04 else 0
            data = buf.pull_bytes(buf.pull_uint_var()) if t & 0x02 else buf.pull_bytes(buf.capacity - buf.tell())
            out.append(("stream", sid, offset, data, bool(t & 0x01)))
        elif t in (0x10, 0x12, 0x13, 0x19):
            out.append(("limit_or_retire", t, buf.pull_uint_var()))
        elif t == 0x11:
            out.append(("max_stream_data", buf.pull_uint_var(), buf.pull_uint_var()))
        elif t == 0x18:
            buf.pull_uint_var()
            buf.pull_uint_var()
            out.append(("new_connection_id", buf.pull_bytes(buf.pull_uint8()), buf.pull_bytes(16)))
        elif t == 0x1E:
            out.append(("handshake_done",))
        elif t in (0x30, 0x31):
            data = buf.pull_bytes(buf.pull_uint_var()) if t & 1 else buf.pull_bytes(buf.capacity - buf.tell())
            out.append(("datagram", data))
        else:
            raise AssertionError(f"unexpected frame type 0x{t:x}")
    return out


def one_rtt(datagrams: list[bytes]) -> list[bytes]:
    """The datagrams that hold a single 1-RTT packet (short header)."""
    return [d for d in datagrams if not d[0] & 0x80]


def assert_plaintext_packet(datagram: bytes, dcid: bytes) -> tuple[plaintext.ShortHeader, list[tuple]]:
    h = parse_short_header(datagram, CID_LEN)
    assert h.dcid == dcid
    assert h.pn_len == 2  # aioquic's packet number size, readable because the header is not masked
    assert datagram[-16:] == bytes(16)
    return h, frames(datagram[h.payload_offset:-16])


def server_scid(wire: Wire) -> bytes:
    first = next(d for way, d in wire.sent if way == "s2c")
    return pull_quic_header(Buffer(data=first), host_cid_length=CID_LEN).source_cid


def client_scid(wire: Wire) -> bytes:
    first = next(d for way, d in wire.sent if way == "c2s")
    return pull_quic_header(Buffer(data=first), host_cid_length=CID_LEN).source_cid


def test_both_offer_1rtt_packets_travel_in_clear_and_handshake_stays_encrypted(tls_files, caplog):
    caplog.set_level(logging.WARNING, logger="fastrelay.quic.plaintext")
    w = Wire(tls_files, client_offers=True, server_offers=True)
    w.handshake()
    assert is_plaintext(w.client) and is_plaintext(w.server)
    lines = insecure_lines(caplog)
    assert len(lines) == 2 and {"client side" in r.getMessage() for r in lines} == {True, False}
    assert all("plaintext mode, for the kernel fast path" in r.getMessage() for r in lines)
    # Initial/Handshake packets are still protected: neither ALPN nor certificate name is visible in them
    handshake_bytes = b"".join(d for _, d in w.sent if d[0] & 0x80)
    assert ALPN.encode() not in handshake_bytes and b"localhost" not in handshake_bytes

    # client -> server: the STREAM frame's payload is verbatim in the packet, the number readable
    sid = w.client.get_next_available_stream_id()
    marker = b"PLAINTEXT-UP-" + os.urandom(8).hex().encode()
    w.client.send_stream_data(sid, marker, end_stream=True)
    up = one_rtt(w.take(w.client))
    assert len(up) == 1
    h, fs = assert_plaintext_packet(up[0], server_scid(w))
    assert h.key_phase == 0
    assert ("stream", sid, 0, marker, True) in fs
    w.deliver(w.server, up)
    assert w.received(w.server, sid) == marker

    # the server acknowledges exactly the number read from the clear header; its reply is clear too
    w.now += 0.03  # past the server's ACK delay, so the ACK rides with the reply
    reply = b"PLAINTEXT-DOWN-" + os.urandom(8).hex().encode()
    w.server.send_stream_data(sid, reply, end_stream=True)
    w.server.send_datagram_frame(b"dgram-" + marker)
    down = one_rtt(w.take(w.server))
    assert down
    decoded = [assert_plaintext_packet(d, client_scid(w)) for d in down]
    found = [f for _, fs in decoded for f in fs]
    assert ("stream", sid, 0, reply, True) in found
    assert ("datagram", b"dgram-" + marker) in found
    acked = [f[1] for f in found if f[0] == "ack"]
    assert acked and any(h.packet_number_truncated in r for r in acked)
    numbers = [h.packet_number_truncated for h, _ in decoded]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    w.deliver(w.client, down)
    assert w.received(w.client, sid) == reply
    assert w.datagrams(w.client) == [b"dgram-" + marker]

    # bulk data both ways, byte-exact
    bulk_up, bulk_down = os.urandom(150_000), os.urandom(120_000)
    a = w.client.get_next_available_stream_id(is_unidirectional=True)
    w.client.send_stream_data(a, bulk_up, end_stream=True)
    b = w.server.get_next_available_stream_id(is_unidirectional=True)
    w.server.send_stream_data(b, bulk_down, end_stream=True)
    w.client.send_datagram_frame(b"d-up")
    w.pump(1.0)
    assert w.received(w.server, a) == bulk_up and w.received(w.client, b) == bulk_down
    assert w.datagrams(w.server) == [b"d-up"]
    assert not w.closed(w.client) and not w.closed(w.server)


@pytest.mark.parametrize("client_offers,server_offers", [(True, False), (False, True), (False, False)])
def test_without_both_offers_the_connection_keeps_standard_crypto(tls_files, caplog, client_offers, server_offers):
    caplog.set_level(logging.WARNING, logger="fastrelay.quic.plaintext")
    w = Wire(tls_files, client_offers, server_offers)
    w.handshake()
    assert not is_plaintext(w.client) and not is_plaintext(w.server)
    assert insecure_lines(caplog) == []
    sid = w.client.get_next_available_stream_id()
    marker = b"SECRET-" + os.urandom(8).hex().encode()
    w.client.send_stream_data(sid, marker, end_stream=True)
    w.pump()
    w.server.send_stream_data(sid, marker[::-1], end_stream=True)
    w.server.send_datagram_frame(marker + b"-dgram")
    w.pump()
    assert w.received(w.server, sid) == marker and w.received(w.client, sid) == marker[::-1]
    assert w.datagrams(w.client) == [marker + b"-dgram"]
    wire = b"".join(d for _, d in w.sent)
    assert marker not in wire and marker[::-1] not in wire
    assert all(d[-16:] != bytes(16) for d in one_rtt([d for _, d in w.sent]))


def test_packet_with_nonzero_tag_is_dropped_and_connection_survives(tls_files):
    w = Wire(tls_files, client_offers=True, server_offers=True)
    w.handshake()
    sid = w.client.get_next_available_stream_id()
    w.client.send_stream_data(sid, b"only once", end_stream=True)
    (packet,) = one_rtt(w.take(w.client))
    for forged in (packet[:-1] + b"\x01", packet[:-16] + b"\xff" * 16):
        w.deliver(w.server, [forged])
        assert w.received(w.server, sid) == b""
    assert w.take(w.server) == []  # nothing to acknowledge: the forged packets were not processed
    w.deliver(w.server, [packet])
    assert w.received(w.server, sid) == b"only once"
    w.server.send_stream_data(sid, b"still here", end_stream=True)
    w.pump()
    assert w.received(w.client, sid) == b"still here"
    assert not w.closed(w.client) and not w.closed(w.server)


def exchange(w: Wire, label: bytes) -> tuple[list[plaintext.ShortHeader], list[plaintext.ShortHeader]]:
    """Send `label` each way on new streams; return the headers of the clear packets that carried it."""
    w.now += 0.01  # let aioquic's pacer release the packets
    sid = w.client.get_next_available_stream_id()
    w.client.send_stream_data(sid, label, end_stream=True)
    up = one_rtt(w.take(w.client))
    w.deliver(w.server, up)
    w.server.send_stream_data(sid, label[::-1], end_stream=True)
    down = one_rtt(w.take(w.server))
    w.deliver(w.client, down)
    w.pump()
    assert w.received(w.server, sid) == label and w.received(w.client, sid) == label[::-1]
    hu = [h for h, fs in (assert_plaintext_packet(d, server_scid(w)) for d in up)
          if ("stream", sid, 0, label, True) in fs]
    hd = [h for h, fs in (assert_plaintext_packet(d, client_scid(w)) for d in down)
          if ("stream", sid, 0, label[::-1], True) in fs]
    assert hu and hd
    return hu, hd


def identity_only(quic: QuicConnection) -> bool:
    pair = quic._cryptos[aioquic_tls.Epoch.ONE_RTT]
    return isinstance(pair, PlaintextCryptoPair) and all(isinstance(c.aead, IdentityAEAD)
                                                         for c in (pair.recv, pair.send))


def test_key_updates_keep_plaintext_in_both_directions(tls_files):
    w = Wire(tls_files, client_offers=True, server_offers=True)
    w.handshake()
    up, down = exchange(w, b"phase zero")
    assert {h.key_phase for h in up + down} == {0}
    w.client.request_key_update()  # client-initiated: the server follows when it sees the new phase
    up, down = exchange(w, b"phase one")
    assert {h.key_phase for h in up + down} == {1}
    w.server.request_key_update()  # and back, initiated by the server
    up, down = exchange(w, b"phase two")
    assert {h.key_phase for h in up} == {1} and {h.key_phase for h in down} == {0}  # client sent first
    up, down = exchange(w, b"phase two, both")
    assert {h.key_phase for h in up + down} == {0}
    # two updates in a row, one packet each: the server follows both
    for phase in (1, 0):
        w.client.request_key_update()
        sid, packet = send_one(w, w.client, b"phase %d" % phase)
        assert parse_short_header(packet, CID_LEN).key_phase == phase
        w.deliver(w.server, [packet])
        assert w.received(w.server, sid) == b"phase %d" % phase
    _, reply = send_one(w, w.server, b"reply")
    assert parse_short_header(reply, CID_LEN).key_phase == 0
    assert is_plaintext(w.client) and is_plaintext(w.server)
    assert identity_only(w.client) and identity_only(w.server)
    assert not w.closed(w.client) and not w.closed(w.server)


def send_one(w: Wire, quic, data: bytes) -> tuple[int, bytes]:
    """`data` on a new unidirectional stream of `quic`, taken as one clear packet (not delivered)."""
    sid = quic.get_next_available_stream_id(is_unidirectional=True)
    quic.send_stream_data(sid, data, end_stream=True)
    w.now += 0.01  # let aioquic's pacer release the packet
    (packet,) = one_rtt(w.take(quic))
    return sid, packet


def test_late_packets_of_the_previous_key_phase_are_accepted_without_flipping_back(tls_files):
    w = Wire(tls_files, client_offers=True, server_offers=True)
    w.handshake()
    late_sid, late = send_one(w, w.client, b"late")  # held back until the server is in the new phase
    w.client.request_key_update()
    first_sid, first = send_one(w, w.client, b"first of the new phase")  # held back too
    # the server, unaware of the update, still sends in the old phase: the initiator accepts that packet
    old_sid, old = send_one(w, w.server, b"old phase")
    w.deliver(w.client, [old])
    assert w.received(w.client, old_sid) == b"old phase"
    next_sid, nxt = send_one(w, w.client, b"still the new phase")
    assert [parse_short_header(p, CID_LEN).key_phase for p in (late, first, old, nxt)] == [0, 1, 0, 1]
    w.deliver(w.server, [first, nxt])  # the server follows the update...
    w.deliver(w.server, [late])  # ...and a packet of the old phase arriving later does not undo it
    assert [w.received(w.server, s) for s in (first_sid, next_sid, late_sid)] == [
        b"first of the new phase", b"still the new phase", b"late"]
    _, reply = send_one(w, w.server, b"reply")
    assert parse_short_header(reply, CID_LEN).key_phase == 1
    w.deliver(w.client, [reply])
    up, down = exchange(w, b"both in the new phase")
    assert {h.key_phase for h in up + down} == {1}


def test_install_refused_after_start_or_twice(tls_files):
    w = Wire(tls_files, client_offers=True, server_offers=False)
    with pytest.raises(RuntimeError, match="before the connection starts"):
        install(w.client)  # connect() already ran
    fresh = QuicConnection(configuration=configuration(client=True, alpn=[ALPN]))
    install(fresh)
    with pytest.raises(RuntimeError, match="twice"):
        install(fresh)


def test_offer_with_a_value_is_a_transport_parameter_error():
    buf = Buffer(capacity=16)
    buf.push_uint_var(TRANSPORT_PARAMETER_ID)
    buf.push_uint_var(1)
    buf.push_uint8(1)
    with pytest.raises(QuicConnectionError) as exc:
        plaintext._offered(buf.data)
    assert exc.value.error_code == QuicErrorCode.TRANSPORT_PARAMETER_ERROR
    assert TRANSPORT_PARAMETER_ID == 0x3F5A57 and TRANSPORT_PARAMETER_ID % 31 != 27  # not a greasing id


def test_parse_short_header():
    dg = bytes([0x45]) + b"ABCDEFGH" + b"\x01\x02" + b"payload" + bytes(16)
    h = parse_short_header(dg, 8)
    assert h == (0x45, b"ABCDEFGH", 0x0102, 2, 11) and h.key_phase == 1
    assert parse_short_header(bytes([0x40, 7]), 0) == (0x40, b"", 7, 1, 2)
    for cut in range(11):
        with pytest.raises(ValueError):
            parse_short_header(dg[:cut], 8)
    with pytest.raises(ValueError, match="long header"):
        parse_short_header(b"\xc3" + dg[1:], 8)
    with pytest.raises(ValueError, match="fixed bit"):
        parse_short_header(b"\x05" + dg[1:], 8)
    with pytest.raises(ValueError, match="connection id length"):
        parse_short_header(dg, 21)


def test_aioquic_private_names_used_by_plaintext_still_exist():
    """If this fails after an aioquic upgrade, quic/plaintext.py must be ported to the new internals."""
    expected = {
        QuicConnection._serialize_transport_parameters: ["self"],
        QuicConnection._parse_transport_parameters: ["self", "data", "from_session_ticket"],
        QuicConnection._update_traffic_key: ["self", "direction", "epoch", "cipher_suite", "secret"],
        CryptoPair._update_key: ["self", "trigger"],
    }
    for fn, params in expected.items():
        assert list(inspect.signature(fn).parameters) == params, fn.__qualname__
    quic = QuicConnection(configuration=configuration(client=True, alpn=[ALPN]))
    assert quic._cryptos == {}  # filled when the connection starts
    quic.connect(SERVER_ADDR, now=0.0)
    pair = quic._cryptos[aioquic_tls.Epoch.ONE_RTT]
    assert type(pair) is CryptoPair and pair._update_key_requested is False
    assert callable(pair.recv._setup_cb) and callable(pair.send._teardown_cb)
    assert quic.tls.update_traffic_key_cb == quic._update_traffic_key


# ---------------------------------------------------------------- asyncio over loopback UDP via QuicLink
class Tap(asyncio.DatagramProtocol):
    """A real UDP hop between one client and a server that records every datagram it forwards."""

    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.up: list[bytes] = []
        self.down: list[bytes] = []
        self.client_addr = None
        self.front = None
        self.back = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        tap = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                tap.down.append(data)
                tap.front.sendto(data, tap.client_addr)

        self.back, _ = await loop.create_datagram_endpoint(Back, remote_addr=("127.0.0.1", self.server_port))
        self.front, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        return self.front.get_extra_info("sockname")[1]

    def datagram_received(self, data, addr):
        self.client_addr = addr
        self.up.append(data)
        self.back.sendto(data)

    def close(self) -> None:
        self.front.close()
        self.back.close()


class Sink:
    """LinkHandler that collects stream bytes and datagrams."""

    def __init__(self, link) -> None:
        self.link = link
        self.streams: dict[int, bytearray] = {}
        self.fins: set[int] = set()
        self.dgrams: list[bytes] = []
        self.changed = asyncio.Event()

    def handshake_completed(self, link, alpn):
        pass

    def stream_data(self, stream_id, data, fin):
        self.streams.setdefault(stream_id, bytearray()).extend(data)
        if fin:
            self.fins.add(stream_id)
        self.changed.set()

    def stream_reset(self, stream_id, code):
        pass

    def stop_sending(self, stream_id, code):
        pass

    def datagram(self, data):
        self.dgrams.append(data)
        self.changed.set()

    def terminated(self, code, reason):
        self.changed.set()

    def input_processed(self):
        pass

    async def until(self, pred, timeout=5.0):
        async def loop():
            while not pred():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(loop(), timeout)


async def start_server(tls_files, plaintext_flag: bool):
    sinks: list[Sink] = []
    cfg = configuration(client=False, alpn=[ALPN], cert=tls_files[0], key=tls_files[1], plaintext=plaintext_flag)
    server = await serve("127.0.0.1", 0, configuration=cfg, create_protocol=lambda *a, **k: QuicLink(
        *a, handler_factory=lambda link: sinks.append(Sink(link)) or sinks[-1], **k))
    return server, server._transport.get_extra_info("sockname")[1], sinks


async def run_client(port: int, plaintext_flag: bool, sinks: list[Sink], marker: bytes):
    """Connect through a Tap, exchange `marker`-tagged data both ways, return (client plaintext, server
    plaintext, tap)."""
    tap = Tap(port)
    tap_port = await tap.start()
    cfg = configuration(client=True, alpn=[ALPN], verify=False, plaintext=plaintext_flag)
    async with connect("127.0.0.1", tap_port, configuration=cfg, create_protocol=QuicLink) as link:
        mine = Sink(link)
        link.handler = mine
        bulk = marker + os.urandom(60_000)
        sid = link.open_stream(unidirectional=False)
        link.send(sid, bulk, fin=True)
        link.send_datagram(marker + b"-dgram")
        srv = None

        def server_side():
            nonlocal srv
            srv = next((s for s in sinks if bytes(s.streams.get(sid, b"")).startswith(marker)), None)
            return srv is not None and sid in srv.fins and marker + b"-dgram" in srv.dgrams

        for _ in range(250):
            if server_side():
                break
            await asyncio.sleep(0.02)
        assert server_side()
        assert bytes(srv.streams[sid]) == bulk
        back = marker[::-1] + os.urandom(40_000)
        srv.link.send(sid, back, fin=True)
        srv.link.send_datagram(marker[::-1] + b"-dgram")
        await mine.until(lambda: sid in mine.fins and marker[::-1] + b"-dgram" in mine.dgrams)
        assert bytes(mine.streams[sid]) == back
        result = (link.plaintext, srv.link.plaintext, tap)
    tap.close()
    return result


def test_plaintext_and_standard_clients_side_by_side_on_one_server(tls_files, caplog):
    caplog.set_level(logging.WARNING, logger="fastrelay.quic.plaintext")

    async def main():
        server, port, sinks = await start_server(tls_files, plaintext_flag=True)
        plain_marker, std_marker = b"CLEAR-" + os.urandom(6).hex().encode(), b"HIDDEN-" + os.urandom(6).hex().encode()
        plain, std = await asyncio.gather(run_client(port, True, sinks, plain_marker),
                                          run_client(port, False, sinks, std_marker))
        server.close()
        return plain, std, plain_marker, std_marker

    (p_client, p_server, p_tap), (s_client, s_server, s_tap), pm, sm = asyncio.run(main())
    assert p_client and p_server
    assert not s_client and not s_server
    assert any(pm in d for d in p_tap.up) and any(pm[::-1] in d for d in p_tap.down)
    assert any(pm + b"-dgram" in d for d in p_tap.up)
    assert not any(sm in d for d in s_tap.up + s_tap.down)
    assert len(insecure_lines(caplog)) == 2  # the plaintext connection, once on each side


def test_server_without_the_flag_gives_an_offering_client_standard_crypto(tls_files, caplog):
    caplog.set_level(logging.WARNING, logger="fastrelay.quic.plaintext")

    async def main():
        server, port, sinks = await start_server(tls_files, plaintext_flag=False)
        marker = b"HIDDEN-" + os.urandom(6).hex().encode()
        result = await run_client(port, True, sinks, marker)
        server.close()
        return result, marker

    (c, s, tap), marker = asyncio.run(main())
    assert not c and not s
    assert not any(marker in d or marker[::-1] in d for d in tap.up + tap.down)
    assert insecure_lines(caplog) == []
