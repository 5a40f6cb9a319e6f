"""Prometheus exposition of relay state (in-memory sessions) and of its QUIC sockets (loopback)."""

import asyncio
import os
import socket

from moqtools import NS, TRACK, Publisher, connect, relay_server
from prometheus_client import CollectorRegistry, generate_latest

from fastrelay.endpoints.endpoint import MoqtClient
from fastrelay.endpoints.metrics import RelayCollector
from fastrelay.moq import messages as m
from fastrelay.moq.params import Version
from fastrelay.moq.relay import Relay
from fastrelay.quic.link import SOCKET_BUFFER


def test_metrics_follow_the_relay():
    relay = Relay()
    reg = CollectorRegistry()
    reg.register(RelayCollector(relay))
    pub = Publisher(relay, Version.DRAFT_16)
    for i in range(2):
        s, _ = connect(relay, Version.DRAFT_16, f"s{i}")
        s.session.send(m.Subscribe(s.session.next_request_id(), NS, TRACK))
    pub.answer_subscribes()
    for o in range(3):
        pub.write(0, o)
    text = generate_latest(reg).decode()
    for line in ("fastrelay_moq_sessions 3.0", "fastrelay_moq_tracks 1.0", "fastrelay_moq_subscribers 2.0",
                 "fastrelay_moq_objects_in_total 3.0", "fastrelay_moq_objects_out_total 6.0",
                 "fastrelay_moq_sessions_accepted_total 3.0"):
        assert line in text, line


def test_the_relays_sockets_report_what_they_ignored_and_dropped(tmp_path):
    """serve_relay's socket: junk by reason, Retry and Version Negotiation sent, half-open
    connections, writes dropped on stopped streams, the kernel's drops and the buffer size;
    clients' sockets get the same buffers."""
    async def main():
        async with relay_server(tmp_path) as (relay, url):
            reg = CollectorRegistry()
            reg.register(RelayCollector(relay))
            async with MoqtClient(url) as client:
                client_buffer = client.link.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
                address = client.link.peer_address  # the relay's
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
                    for _ in range(5):
                        junk.sendto(b"\x40" + os.urandom(40), address)  # short header, unknown connection
                    vn = b"\xc0" + bytes(4) + b"\x08" + os.urandom(8) + b"\x08" + os.urandom(8) + bytes(4)
                    junk.sendto(vn, address)  # a Version Negotiation packet: never answered
                await client.request(lambda rid: m.TrackStatus(rid, NS, TRACK))  # the junk was read by now
                return generate_latest(reg).decode(), client_buffer

    text, client_buffer = asyncio.run(main())
    assert client_buffer == SOCKET_BUFFER
    for line in ('fastrelay_quic_datagrams_ignored_total{reason="unknown_connection"} 5.0',
                 'fastrelay_quic_datagrams_ignored_total{reason="version_negotiation"} 1.0',
                 "fastrelay_quic_retries_sent_total 0.0", "fastrelay_quic_version_negotiations_sent_total 0.0",
                 "fastrelay_quic_half_open 0.0", "fastrelay_moq_dropped_writes_total 0.0",
                 "fastrelay_udp_receive_drops_total 0.0",
                 "fastrelay_udp_receive_buffer_bytes 8.388608e+06"):  # SOCKET_BUFFER
        assert line in text, line
