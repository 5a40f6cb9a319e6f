"""Fault injection over real QUIC on loopback: one peer's misbehaviour never ends another's session.

Each scenario runs a publisher and an honest subscriber next to a faulty peer, counts the honest
subscriber's objects (every one must arrive, verified), checks that the publisher ends normally,
and then restarts a publisher on the same track for a new subscriber, which must be served too.
Junk datagrams at the relay's socket (random bytes, undecryptable Initials, unknown versions,
valid Initials from clients that never answer) open no state beyond a bound, are counted by
reason, and cost the honest sessions nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
import urllib.request
from collections.abc import Awaitable, Callable

import pytest
from aioquic.asyncio import connect
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicFrameType, QuicPacketType, QuicProtocolVersion, pull_quic_header
from aioquic.quic.packet_builder import QuicPacketBuilder
from moqtools import NS, TRACK, announced, free_port, relay_process, relay_server, synthetic

from fastrelay.endpoints.endpoint import MoqtClient
from fastrelay.endpoints.publisher import PublishResult, publish
from fastrelay.endpoints.subscriber import SubscribeResult, subscribe
from fastrelay.media.h264 import verify_synthetic_payload
from fastrelay.moq import messages as m
from fastrelay.moq.params import MessageParams
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import Closed, MessageReceived, ObjectReceived
from fastrelay.quic.link import RETRY_ABOVE, SUMMARY_INTERVAL_S, QuicLink, configuration, serve
from fastrelay.quic.tls import self_signed

COUNT = 450  # objects per publisher run: 15 groups of 30 at 150 per second

Fault = Callable[[str], Awaitable[None]]  # a misbehaving peer, given the relay's URL


async def _connected(url: str) -> MoqtClient:
    """A raw client with a session (the caller leaves it, or leaves it to the end of the loop)."""
    client = MoqtClient(url)
    await client.__aenter__()
    return client


async def _subscribed(url: str) -> MoqtClient:
    """A raw client subscribed to the track (its request 0)."""
    client = await _connected(url)
    reply = await client.request(lambda rid: m.Subscribe(rid, NS, TRACK, MessageParams(forward=True)))
    assert isinstance(reply, m.SubscribeOk), reply
    return client


async def _until(client: MoqtClient, stop: Callable[[object], bool], timeout: float = 10.0) -> object:
    """Events of `client` until one satisfies `stop` (returned) or the session closes."""
    async def loop() -> object:
        while True:
            ev = await client.events.get()
            if stop(ev) or isinstance(ev, Closed):
                return ev
    return await asyncio.wait_for(loop(), timeout)


def _publish_done(ev: object) -> bool:
    return isinstance(ev, MessageReceived) and isinstance(ev.message, m.PublishDone)


async def stop_every_other_stream(url: str) -> None:
    """STOP_SENDING on every other subgroup stream it receives; it still expects PUBLISH_DONE."""
    client = await _subscribed(url)
    streams: set[int] = set()

    def on(ev: object) -> bool:
        if isinstance(ev, ObjectReceived) and ev.stream_id is not None and ev.stream_id not in streams:
            streams.add(ev.stream_id)
            if len(streams) % 2 == 0:
                client.link.stop(ev.stream_id, 0x1)
        return _publish_done(ev)

    try:
        assert _publish_done(await _until(client, on)), "the track's end never reached the stopping subscriber"
        assert len(streams) >= 4
    finally:
        await client.__aexit__(None, None, None)


async def vanish_mid_group(url: str) -> None:
    """Subscribe, then lose the network mid-group: no CONNECTION_CLOSE, no more packets either way."""
    client = await _subscribed(url)
    await _until(client, lambda ev: isinstance(ev, ObjectReceived) and ev.object.object_id == 7)
    # from now on the client neither sends nor reads: to the relay it is gone without a word, and
    # its connection only ends at the idle timeout (after this test)
    client.link._transport.sendto = lambda data, addr=None: None
    client.link.datagram_received = lambda data, addr: None


async def garbage_on_data_streams(url: str) -> None:
    """Open unidirectional streams and send garbage: random bytes, and a subgroup header for an
    alias that does not exist followed by malformed objects. Only its own session may suffer."""
    client = await _subscribed(url)
    try:
        await _until(client, lambda ev: isinstance(ev, ObjectReceived))
        good_header = bytes([0x10, 0x05, 0x00, 0x80])  # SUBGROUP_HEADER type 0x10, alias 5, group 0, priority
        for payload, fin in ((os.urandom(300), False), (good_header + os.urandom(300), True),
                             (os.urandom(50), True)):
            if client.closed:
                break
            sid = client.link.open_stream(unidirectional=True)
            client.link.send(sid, payload, fin)
            await asyncio.sleep(0.1)
    finally:
        await client.__aexit__(None, None, None)


FAULTS: dict[str, Fault] = {"stop_every_other_stream": stop_every_other_stream,
                            "vanish_mid_group": vanish_mid_group,
                            "garbage_on_data_streams": garbage_on_data_streams}


async def _honest(url: str) -> SubscribeResult:
    return await subscribe(url, NS, TRACK, codec="raw", duration=20, verify=verify_synthetic_payload)


async def _served_run(relay: Relay, url: str, fault: Fault | None) -> tuple[PublishResult, SubscribeResult]:
    """A publisher waiting for the honest subscriber, the fault running next to them."""
    pub = asyncio.create_task(publish(url, NS, TRACK, synthetic(COUNT, fps=150), wait_subscriber=5))
    await asyncio.wait_for(announced(relay), 5)
    honest = asyncio.create_task(_honest(url))
    if fault is not None:
        await asyncio.sleep(0.3)  # the publisher is sending
        await fault(url)
    return await pub, await honest


def _whole(sent: PublishResult, got: SubscribeResult) -> None:
    """Every object published reached the honest subscriber, intact. (Counted by id: its `lost`
    estimate from timestamps can see a frame in a publisher's stall on a busy machine.)"""
    assert sent.ended == "source ended" and sent.objects == COUNT
    assert (got.objects, got.bad, got.duplicates) == (COUNT, 0, 0), got.summary()
    assert got.ended.startswith("publish_done"), got.ended


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_faulty_subscriber_costs_nobody_else_an_object(tmp_path, caplog, name):
    caplog.set_level(logging.INFO)

    async def main():
        async with relay_server(tmp_path) as (relay, url):
            first = await _served_run(relay, url, FAULTS[name])
            await asyncio.sleep(0.2)
            tracks_after = dict(relay.tracks)
            second = await _served_run(relay, url, None)  # a restarted publisher on the same track
            return first, tracks_after, second

    (sent, got), tracks_after, (sent2, got2) = asyncio.run(main())
    _whole(sent, got)
    assert not tracks_after  # the track ended with its publisher
    _whole(sent2, got2)
    errors = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()
              or r.levelno >= logging.ERROR]
    assert not errors, errors


def test_a_publisher_whose_streams_the_relay_stops_keeps_publishing(tmp_path):
    """The relay (as some do when the last subscriber leaves) sends STOP_SENDING on the publisher's
    open subgroup streams and UNSUBSCRIBE: the publisher goes on, the next subscriber is served."""
    received: list[tuple[int, int]] = []

    def recording(group: int, obj: int, payload: bytes) -> bool:
        received.append((group, obj))
        return verify_synthetic_payload(group, obj, payload)

    async def main():
        async with relay_server(tmp_path) as (relay, url):
            pub = asyncio.create_task(publish(url, NS, TRACK, synthetic(COUNT, fps=150), wait_subscriber=5))
            await asyncio.wait_for(announced(relay), 5)
            leaving = await _subscribed(url)
            await _until(leaving, lambda ev: isinstance(ev, ObjectReceived) and ev.object.object_id == 5)
            track = relay.tracks[(NS, TRACK)]
            publisher_link = track.publisher.session.transport
            stopped = list(track.stream_keys)
            for sid in stopped:
                publisher_link.stop(sid, 0x1)
            await asyncio.sleep(0.1)  # the publisher writes on into the stopped streams meanwhile
            leaving.session.send(m.Unsubscribe(0))  # its SUBSCRIBE
            await asyncio.sleep(0.3)
            await leaving.__aexit__(None, None, None)
            honest = await subscribe(url, NS, TRACK, codec="raw", duration=20, verify=recording)
            sent = await pub
            second = await _served_run(relay, url, None)
            return stopped, sent, honest, second

    stopped, sent, honest, (sent2, got2) = asyncio.run(main())
    assert stopped
    assert sent.ended == "source ended" and sent.objects > 0
    assert honest.objects > 0 and (honest.bad, honest.duplicates) == (0, 0), honest.summary()
    # from its first object to the last, none missing (the relay re-subscribed upstream, so its cache
    # starts there: a joining FETCH for the group's start is refused)
    assert sorted(received) == [divmod(i, 30) for i in range(COUNT - honest.objects, COUNT)]
    assert honest.ended.startswith("publish_done")
    _whole(sent2, got2)


def test_a_failure_sending_after_input_closes_that_session_only(tmp_path, caplog):
    """relay.pump() after a datagram's input runs under the relay's guard too: a failure closes the
    session it was for (INTERNAL_ERROR) and never escapes into the socket's read loop."""
    caplog.set_level(logging.INFO)

    async def main():
        async with relay_server(tmp_path) as (relay, url):
            victim = await _connected(url)
            names = {p.name for p in relay.peers.values()}
            pump = relay.pump

            def failing(peer, force=False):
                if peer.name in names and not peer.session.closed:
                    raise RuntimeError("boom")
                pump(peer, force)

            relay.pump = failing
            ping = asyncio.ensure_future(victim.link.ping())  # any datagram from it will do
            closed = await _until(victim, lambda ev: False)
            with contextlib.suppress(ConnectionError):
                await ping
            relay.pump = pump
            return closed, await _served_run(relay, url, None)

    closed, (sent, got) = asyncio.run(main())
    assert isinstance(closed, Closed) and closed.code == 0x1  # INTERNAL_ERROR, from the relay
    _whole(sent, got)
    assert not [r for r in caplog.records if r.name == "asyncio"]
    assert sum("internal error sending" in r.getMessage() for r in caplog.records) == 1


# ---- junk datagrams

def _long_header(first: int, version: int, dcid: bytes, rest: bytes = b"") -> bytes:
    """A long-header packet's start: type byte, version, connection ids (source: 8 random bytes)."""
    return bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid + b"\x08" + os.urandom(8) + rest


def random_datagrams(n: int) -> list[bytes]:
    return [os.urandom(size) for size in itertools.islice(itertools.cycle((37, 300, 1200)), n)]


def bad_initials(n: int, size: int = 1200) -> list[bytes]:
    """Initials of QUIC version 1 whose protected payload is random: they never decrypt."""
    body = size - 26  # type, version, 2 x (length + 8-byte id), token length, 2-byte length
    return [_long_header(0xC3, 1, os.urandom(8), b"\x00" + (0x4000 | body).to_bytes(2, "big") + os.urandom(body))
            for _ in range(n)]


def unknown_versions(n: int) -> list[bytes]:
    """Full-size long-header packets of versions nobody speaks (0x?a?a?a?a is reserved for that)."""
    return [_long_header(0xC0, int.from_bytes(os.urandom(4)) & 0xF0F0F0F0 | 0x0A0A0A0A, os.urandom(8),
                         os.urandom(1200 - 23)) for _ in range(n)]


def client_hello() -> tuple[bytes, bytes]:
    """A real ClientHello (ALPN moqt-16) taken out of an aioquic client's first Initial, and that
    client's connection id (its transport parameters name it: Initials that carry the hello must too)."""
    quic = QuicConnection(configuration=configuration(client=True, alpn=["moqt-16"], verify=False))
    quic.connect(("127.0.0.1", 9), now=0.0)
    ((data, _),) = quic.datagrams_to_send(now=0.0)
    buf = Buffer(data=data)
    header = pull_quic_header(buf, host_cid_length=8)
    crypto = CryptoPair()
    crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
    _, payload, _ = crypto.decrypt_packet(data[:header.packet_length], buf.tell(), 0)
    frames = Buffer(data=payload)
    assert (frames.pull_uint_var(), frames.pull_uint_var()) == (QuicFrameType.CRYPTO, 0)
    return frames.pull_bytes(frames.pull_uint_var()), header.source_cid


def forged_initial(hello: tuple[bytes, bytes], dcid: bytes | None = None, token: bytes = b"") -> bytes:
    """A valid client Initial carrying a client_hello() (a new connection each time) from a client
    that then never answers: what a spoofed-address flood looks like."""
    data, scid = hello
    dcid = dcid or os.urandom(8)
    crypto = CryptoPair()
    crypto.setup_initial(cid=dcid, is_client=True, version=QuicProtocolVersion.VERSION_1)
    builder = QuicPacketBuilder(host_cid=scid, peer_cid=dcid, version=QuicProtocolVersion.VERSION_1,
                                is_client=True, max_datagram_size=1200, peer_token=token)
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    frame = builder.start_frame(QuicFrameType.CRYPTO)
    frame.push_uint_var(0)
    frame.push_uint_var(len(data))
    frame.push_bytes(data)
    ((datagram,), _) = builder.flush()
    return datagram


def _retries(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    """(source connection id, token) of the Retry packets waiting at `sock`."""
    found = []
    with contextlib.suppress(BlockingIOError):
        while True:
            header = pull_quic_header(Buffer(data=sock.recv(2048)), host_cid_length=8)
            if header.packet_type == QuicPacketType.RETRY:
                found.append((header.source_cid, header.token))
    return found


def test_junk_opens_no_connection_half_open_ones_are_capped_and_all_is_counted(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastrelay.quic")
    cert, key = self_signed(["127.0.0.1"])
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    hello = client_hello()

    async def main():
        cfg = configuration(client=False, alpn=["moqt-16"], cert=str(tmp_path / "c.pem"), key=str(tmp_path / "k.pem"))
        server = await serve("127.0.0.1", 0, cfg, lambda quic: QuicLink(quic), retry_above=4, max_half_open=6,
                             summary_interval=0.5)
        addr = server.socket.getsockname()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
            flood.setblocking(False)
            for datagram in [*bad_initials(200), *unknown_versions(200), *random_datagrams(200),
                             *bad_initials(1, size=1000), *(forged_initial(hello) for _ in range(20))]:
                flood.sendto(datagram, addr)
                await asyncio.sleep(0)
            await asyncio.sleep(0.3)
            opened = len(server.half_open)
            ccfg = configuration(client=True, alpn=["moqt-16"], verify=False)
            async with connect(*addr, configuration=ccfg, create_protocol=QuicLink) as client:
                await client.ping()  # a real client still gets in (past a Retry; it completes its handshake)
            retried = _retries(flood)
            flood.sendto(forged_initial(hello, os.urandom(8), retried[0][1]), addr)  # a token for another id
            for scid, token in retried[:5]:  # those that come back from their address get in, up to the cap
                flood.sendto(forged_initial(hello, scid, token), addr)
            await asyncio.sleep(0.3)
            capped = len(server.half_open)
            await asyncio.sleep(0.6)  # the summary is due
        server.close()
        return server.stats, opened, len(retried), capped

    stats, opened, retried, capped = asyncio.run(main())
    assert (opened, retried, capped) == (4, 16, 6)
    ignored = dict(stats.ignored)
    random_reasons = sum(ignored.pop(r, 0) for r in ("unparsable", "unknown_connection", "version_negotiation"))
    assert ignored.pop("unsupported_version") + random_reasons == 200 + 200
    assert stats.version_negotiations >= 200  # full-size datagrams of unknown versions (random ones too)
    assert ignored == {"undecryptable_initial": 200, "short_initial": 1, "invalid_token": 1, "half_open_limit": 3}
    assert stats.retries == 16 + 1  # the flood's, and the real client's
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignored ")]
    assert len(summaries) == 1 and "undecryptable_initial 200" in summaries[0], summaries


def _metrics(port: int) -> dict[str, float]:
    """The relay's Prometheus text as {name or name{labels}: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


FLOOD = 10_000  # datagrams of each kind


def test_a_junk_flood_costs_the_honest_sessions_nothing_and_the_relay_little(tmp_path):
    """10,000 datagrams each of random bytes, undecryptable Initials, unknown versions and valid
    Initials from addresses that never answer, at a running relay: the honest subscriber gets every
    object, half-open connections stay under the Retry threshold, the relay's memory barely moves,
    every datagram is counted, and the log gets a summary per interval, not a line per datagram."""
    hello = client_hello()
    kinds = {"random": random_datagrams(FLOOD), "bad_initial": bad_initials(FLOOD),
             "unknown_version": unknown_versions(FLOOD),
             "forged_initial": [forged_initial(hello) for _ in range(FLOOD)]}
    flood = [d for batch in zip(*kinds.values(), strict=True) for d in batch]
    http = free_port(socket.SOCK_STREAM)
    count = 1500  # 10 s at 150 objects per second: the flood happens in the middle

    with relay_process(tmp_path, metrics=http) as (proc, url):
        relay_log = tmp_path / f"relay-{url.rsplit(':', 1)[1]}.log"
        host, port = url.removeprefix("moqt://").rsplit(":", 1)

        def send_flood() -> list[float]:
            """Send in bursts of 100 every 10 ms (10,000 datagrams per second: what this relay, in
            Python, can take in besides its honest sessions); the half-open gauge on the way."""
            half_open = []
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for i in range(0, len(flood), 100):
                    for d in flood[i:i + 100]:
                        s.sendto(d, (host, int(port)))
                    time.sleep(0.01)
                    if i % 4000 == 0:
                        half_open.append(_metrics(http)["fastrelay_quic_half_open"])
            return half_open

        async def main():
            pub = asyncio.create_task(publish(url, NS, TRACK, synthetic(count, fps=150), wait_subscriber=10))
            while "publishes namespace" not in relay_log.read_text():
                await asyncio.sleep(0.05)
            honest = asyncio.create_task(_honest(url))
            await asyncio.sleep(1.5)
            before = _rss_kib(proc.pid)
            started = time.monotonic()
            half_open = await asyncio.to_thread(send_flood)
            flood_s = time.monotonic() - started
            await asyncio.sleep(2)  # the relay works through what is queued
            grown = _rss_kib(proc.pid) - before
            sent, got = await pub, await honest
            return sent, got, half_open, grown, flood_s

        sent, got, half_open, grown_kib, flood_s = asyncio.run(main())
        after = _metrics(http)
        time.sleep(SUMMARY_INTERVAL_S + 1)  # the last summary
        summaries = [line for line in relay_log.read_text().splitlines() if "ignored " in line]

    drops = after["fastrelay_udp_receive_drops_total"]
    ignored = {k.split('"')[1]: v for k, v in after.items() if k.startswith("fastrelay_quic_datagrams_ignored_total")}
    retries = after["fastrelay_quic_retries_sent_total"]
    print(f"flood of {len(flood)} in {flood_s:.1f} s: relay RSS +{grown_kib} KiB, socket drops {drops:.0f}, "
          f"half-open max {max(half_open):.0f}, ignored {ignored}, retries {retries:.0f}")
    assert sent.objects == count and (got.objects, got.bad, got.duplicates) == (count, 0, 0), got.summary()
    assert max(half_open) <= RETRY_ABOVE
    assert grown_kib < 10 * 1024, grown_kib
    assert ignored["undecryptable_initial"] >= FLOOD - drops
    assert ignored["unsupported_version"] >= FLOOD - drops  # and the random ones with a long header
    assert after["fastrelay_quic_retries_sent_total"] >= FLOOD - RETRY_ABOVE - drops
    assert sum(ignored.values()) + after["fastrelay_quic_retries_sent_total"] >= 4 * FLOOD - RETRY_ABOVE - drops
    assert 1 <= len(summaries) <= flood_s / SUMMARY_INTERVAL_S + 3, summaries
