"""QuicLink over real aioquic on loopback: streams, datagrams, resets, close; with standard crypto and in
plaintext mode (details of that mode: test_plaintext.py)."""

import asyncio
import logging
import os
import socket

import pytest
from aioquic.asyncio import connect, serve

from fastrelay.quic import link as link_module
from fastrelay.quic.internals import is_stream_open
from fastrelay.quic.link import SOCKET_BUFFER, QuicLink, SocketBuffers, configuration, udp_socket_drops
from fastrelay.quic.tls import self_signed


class Recorder:
    def __init__(self, link):
        self.link = link
        self.events = []
        self.alpn = None
        self.got = asyncio.Event()

    def handshake_completed(self, link, alpn):
        self.alpn = alpn

    def stream_data(self, stream_id, data, fin):
        self.events.append(("stream", stream_id, data, fin))
        self.got.set()

    def stream_reset(self, stream_id, code):
        self.events.append(("reset", stream_id, code))
        self.got.set()

    def stop_sending(self, stream_id, code):
        self.events.append(("stop", stream_id, code))
        self.got.set()

    def datagram(self, data):
        self.events.append(("datagram", data))
        self.got.set()

    def input_processed(self):
        pass

    def terminated(self, code, reason):
        self.events.append(("closed", code, reason))
        self.got.set()


@pytest.fixture
def tls(tmp_path):
    cert, key = self_signed(["127.0.0.1", "localhost"])
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    return str(tmp_path / "c.pem"), str(tmp_path / "k.pem")


async def wait_for(rec, pred, timeout=3.0):
    async def loop():
        while not pred(rec.events):
            rec.got.clear()
            await rec.got.wait()
    await asyncio.wait_for(loop(), timeout)


def test_configuration_offers_plaintext_only_when_asked():
    assert configuration(client=True, alpn=["x"]).plaintext is False
    assert configuration(client=True, alpn=["x"], plaintext=True).plaintext is True


@pytest.mark.parametrize("plaintext", [False, True])
def test_streams_datagrams_reset_and_close(tls, plaintext):
    async def main():
        servers = []
        cfg = configuration(client=False, alpn=["fr-test"], cert=tls[0], key=tls[1], plaintext=plaintext)
        server = await serve("127.0.0.1", 0, configuration=cfg,
                             create_protocol=lambda *a, **k: QuicLink(*a, handler_factory=lambda link: (
                                 servers.append(Recorder(link)) or servers[-1]), **k))
        port = server._transport.get_extra_info("sockname")[1]
        ccfg = configuration(client=True, alpn=["fr-test"], verify=False, plaintext=plaintext)
        async with connect("127.0.0.1", port, configuration=ccfg, create_protocol=QuicLink) as client:
            rec = Recorder(client)
            client.handler = rec
            sid = client.open_stream(unidirectional=False)
            client.send(sid, b"hello", fin=True)
            client.send_datagram(b"dgram")
            uni = client.open_stream(unidirectional=True)
            client.send(uni, b"partial")
            client.reset(uni, 7)
            srv = servers[0]
            await wait_for(srv, lambda ev: ("stream", sid, b"hello", True) in ev and ("datagram", b"dgram") in ev
                           and any(e[0] == "reset" and e[1] == uni and e[2] == 7 for e in ev))
            assert srv.alpn == "fr-test"
            assert client.plaintext is plaintext and srv.link.plaintext is plaintext
            srv.link.send(sid, b"world", fin=True)
            await wait_for(rec, lambda ev: ("stream", sid, b"world", True) in ev)
            assert srv.link.peer_address[0] == "127.0.0.1"
            client.close(5, "bye")
            await wait_for(srv, lambda ev: any(e[0] == "closed" for e in ev))
            assert next(e for e in srv.events if e[0] == "closed")[1:] == (5, "bye")
        server.close()

    asyncio.run(main())


def test_rearm_timer_arms_what_transmit_would_without_sending(tls):
    """rearm_timer (after packets were registered or acknowledged from outside aioquic) sends
    nothing and leaves the timer armed at what aioquic asks for, like transmit() would."""
    async def main():
        cfg = configuration(client=False, alpn=["fr-test"], cert=tls[0], key=tls[1])
        server = await serve("127.0.0.1", 0, configuration=cfg, create_protocol=QuicLink)
        port = server._transport.get_extra_info("sockname")[1]
        ccfg = configuration(client=True, alpn=["fr-test"], verify=False)
        async with connect("127.0.0.1", port, configuration=ccfg, create_protocol=QuicLink) as client:
            loop = asyncio.get_running_loop()
            sent = []
            transport = client._transport
            real_sendto = transport.sendto
            transport.sendto = lambda data, addr=None: sent.append(data)
            try:
                due = client._quic.get_timer()
                for armed_at in (None, due + 60, due - 1):       # none, a later one, an earlier one
                    client._timer.cancel()
                    old = loop.call_at(armed_at, lambda: None) if armed_at is not None else None
                    client._timer, client._timer_at = old, armed_at
                    client.rearm_timer()
                    assert client._timer is not None and client._timer_at == due, armed_at
                    assert old is None or old.cancelled()
                kept = client._timer
                client.rearm_timer()                              # nothing moved: the same handle
                assert client._timer is kept and not kept.cancelled()
                assert sent == []
            finally:
                transport.sendto = real_sendto
                client.transmit()
        server.close()

    asyncio.run(main())


def test_send_limited_says_whether_the_window_held_data_back(tls):
    """After transmit(): True while the congestion window (or pacing) keeps queued data back, False
    once everything went out and was acknowledged."""
    async def main():
        servers = []
        cfg = configuration(client=False, alpn=["fr-test"], cert=tls[0], key=tls[1])
        server = await serve("127.0.0.1", 0, configuration=cfg,
                             create_protocol=lambda *a, **k: QuicLink(*a, handler_factory=lambda link: (
                                 servers.append(Recorder(link)) or servers[-1]), **k))
        port = server._transport.get_extra_info("sockname")[1]
        ccfg = configuration(client=True, alpn=["fr-test"], verify=False)
        async with connect("127.0.0.1", port, configuration=ccfg, create_protocol=QuicLink) as client:
            assert client.send_limited is False
            sid = client.open_stream(unidirectional=False)
            data = bytes(1 << 20)
            client.send(sid, data, fin=True)
            client.transmit()
            assert client.send_limited is True
            srv = servers[0]
            await wait_for(srv, lambda ev: sum(len(e[2]) for e in ev if e[0] == "stream") == len(data), timeout=10)
            await asyncio.sleep(0.3)                  # the last ACKs come back, the pacer refills
            client.transmit()
            assert client.send_limited is False
        server.close()

    asyncio.run(main())


def test_writes_on_a_stream_the_peer_stopped_are_dropped_and_counted(tls, caplog):
    """After the peer's STOP_SENDING (aioquic resets the stream) and after aioquic discarded the reset
    stream, writes are no-ops, counted and logged once; STOP_SENDING on a stream that is over is one too."""
    caplog.set_level(logging.INFO, logger="fastrelay.quic")

    async def main():
        servers = []
        cfg = configuration(client=False, alpn=["fr-test"], cert=tls[0], key=tls[1])
        server = await link_module.serve("127.0.0.1", 0, cfg, lambda quic: QuicLink(
            quic, handler_factory=lambda link: servers.append(Recorder(link)) or servers[-1]))
        ccfg = configuration(client=True, alpn=["fr-test"], verify=False)
        async with connect(*server.socket.getsockname(), configuration=ccfg, create_protocol=QuicLink) as client:
            rec = Recorder(client)
            client.handler = rec
            await client.ping()
            srv = servers[0]
            sid = srv.link.open_stream(unidirectional=True)
            srv.link.send(sid, b"first")
            await wait_for(rec, lambda ev: ("stream", sid, b"first", False) in ev)
            client.stop(sid, 9)
            await wait_for(srv, lambda ev: ("stop", sid, 9) in ev)
            srv.link.send(sid, b"more")  # aioquic: "Cannot send data after the stream was reset"
            srv.link.send(sid, b"", fin=True)
            await asyncio.sleep(0.3)  # the reset is acknowledged and the stream discarded
            assert not is_stream_open(srv.link.quic, sid) and not is_stream_open(client.quic, sid)
            srv.link.send(sid, b"late")  # aioquic: "Cannot send data on a finished stream"
            client.stop(sid, 9)  # aioquic: "Cannot stop receiving on an unknown stream"
            other = srv.link.open_stream(unidirectional=True)
            srv.link.send(other, b"others go on", fin=True)
            await wait_for(rec, lambda ev: ("stream", other, b"others go on", True) in ev)
            dropped = srv.link.stats.dropped_writes
        server.close()
        return dropped

    assert asyncio.run(main()) == 3
    assert sum("writes on such streams are dropped" in r.getMessage() for r in caplog.records) == 1


BURST = 3000  # full-size datagrams: some 7 MB of kernel memory, far beyond the default buffer (~200 KiB)


def test_socket_buffers_hold_a_burst_that_the_default_would_drop(tls, root):
    """The server's socket gets SOCKET_BUFFER both ways (forced past the sysctl ceilings as root);
    a burst sent while the event loop does not read loses nothing there, and the same burst into a
    socket of the kernel's default size is dropped in part, as udp_socket_drops() counts."""
    async def main():
        cfg = configuration(client=False, alpn=["fr-test"], cert=tls[0], key=tls[1])
        server = await link_module.serve("127.0.0.1", 0, cfg, lambda quic: QuicLink(quic))
        ours = server.socket
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as default, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            default.bind(("127.0.0.1", 0))
            for _ in range(BURST):  # no await: the loop reads nothing meanwhile
                junk = os.urandom(1200)
                sender.sendto(junk, ours.getsockname())
                sender.sendto(junk, default.getsockname())
            drops = udp_socket_drops(ours), udp_socket_drops(default)
            await asyncio.sleep(0.5)
        server.close()
        return server.buffers, drops, server.stats.ignored.total()

    buffers, (ours, default), read = asyncio.run(main())
    assert buffers == SocketBuffers(SOCKET_BUFFER, SOCKET_BUFFER, forced=True)
    assert ours == 0 and default > BURST // 2
    assert read == BURST  # all of it was read (and ignored: junk) once the loop ran
