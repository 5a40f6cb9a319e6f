"""The aioquic private state fastrelay reads (quic/internals.py), against a real connection."""

import asyncio

from aioquic.asyncio import connect, serve

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
