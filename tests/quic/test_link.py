"""QuicLink over real aioquic on loopback: streams, datagrams, resets, close; with standard crypto and in
plaintext mode (details of that mode: test_plaintext.py)."""

import asyncio

import pytest
from aioquic.asyncio import connect, serve

from fastrelay.quic.link import QuicLink, configuration
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
