"""Tests for fastrelay.lab.traffic over loopback."""

import json
import socket
import struct
import subprocess
import sys
import threading

import pytest

from fastrelay.lab.traffic import MAGIC, PayloadError, UdpSink, UdpSource, check, main, payload

HOSTS = ["127.0.0.1", "::1"]


def _send(source: UdpSource) -> tuple[threading.Thread, dict[str, float]]:
    """Run source in a thread; its result dict is filled in when the thread ends."""
    result: dict[str, float] = {}
    thread = threading.Thread(target=lambda: result.update(source.run()))
    thread.start()
    return thread, result


def _transfer(host: str, expected: int, **options: object) -> tuple[dict[str, float], list]:
    with UdpSink([(host, 0)]) as sink:
        port = sink.sockets[0].getsockname()[1]
        with UdpSource((host, port), **options) as source:  # type: ignore[arg-type]
            thread, result = _send(source)
            stats = sink.collect(expected, timeout=5)
            thread.join()
    return result, stats


@pytest.mark.parametrize("size", [16, 17, 1200, 65507])
def test_payload_round_trip(size: int) -> None:
    for seq in (0, 1, 63, 64, 2**64 - 1):
        data = payload(7, seq, size)
        assert len(data) == size
        assert data[:16] == struct.pack("<IIQ", MAGIC, 7, seq)
        assert check(data) == seq
        assert check(bytearray(data), stream=7) == seq
        assert check(memoryview(data)) == seq


def test_pattern_depends_on_stream_seq_mod_64_and_size() -> None:
    body = payload(1, 5, 100)[16:]
    assert payload(1, 69, 100)[16:] == body
    assert payload(1, 6, 100)[16:] != body
    assert payload(2, 5, 100)[16:] != body
    assert payload(1, 5, 101)[16:100] != body


@pytest.mark.parametrize(
    ("data", "stream", "message"),
    [
        (payload(1, 0, 100)[:15], None, "shorter than the 16-byte tag"),
        (bytes(65508), None, "longer than the maximum 65507"),
        (b"X" + payload(1, 0, 100)[1:], None, "bad magic"),
        (payload(1, 3, 100), 2, "stream 1, expected 2 (seq 3)"),
        (payload(1, 3, 100)[:50] + b"\xff" + payload(1, 3, 100)[51:], None, "mismatch at byte 50 of 100"),
        (payload(1, 3, 100)[:99], None, "mismatch at byte 16 of 99"),
    ],
)
def test_check_rejects(data: bytes, stream: int | None, message: str) -> None:
    with pytest.raises(PayloadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(data, stream)


@pytest.mark.parametrize(
    ("stream", "seq", "size"),
    [(0, 0, 15), (0, 0, 65508), (-1, 0, 16), (2**32, 0, 16), (0, -1, 16), (0, 2**64, 16)],
)
def test_payload_rejects_bad_arguments(stream: int, seq: int, size: int) -> None:
    with pytest.raises(ValueError):
        payload(stream, seq, size)


@pytest.mark.parametrize(
    "options",
    [
        {"count": 10, "size": 15},
        {"count": 10, "rate": 0},
        {"count": 10, "rate": float("inf")},
        {},
        {"count": 0},
        {"duration": -1.0},
        {"count": 10, "gso_segments": 0},
        {"count": 10, "gso_segments": 65},
        {"count": 10, "size": 20000, "gso_segments": 4},
    ],
)
def test_source_rejects_bad_options(options: dict) -> None:
    with pytest.raises(ValueError):
        UdpSource(("127.0.0.1", 9), **options)


def test_source_rejects_hostnames() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        UdpSource(("localhost", 9), count=1)


@pytest.mark.parametrize("host", HOSTS)
def test_paced_transfer_arrives_complete(host: str) -> None:
    result, [stats] = _transfer(host, 5000, count=5000, rate=50_000, stream=9)
    assert result["sent"] == 5000 and result["errors"] == 0
    assert stats.seqs == set(range(5000))
    assert (stats.received, stats.duplicates, stats.bad) == (5000, 0, 0)
    assert stats.bytes == 5000 * 1200
    assert stats.summary()["missing"] == 0


@pytest.mark.parametrize("host", HOSTS)
def test_unpaced_count_is_exact(host: str) -> None:
    result, [stats] = _transfer(host, 1000, count=1000, size=100)
    assert result["sent"] == 1000
    assert stats.seqs == set(range(1000)) and stats.bad == 0


def test_rate_pacing() -> None:
    result, [stats] = _transfer("127.0.0.1", 1000, rate=1000, duration=1.0, size=200)
    assert 900 <= result["sent"] <= 1100
    assert 0.9 <= result["seconds"] <= 1.3
    assert len(stats.seqs) == result["sent"]


@pytest.mark.parametrize("host", HOSTS)
def test_gso_sends_separate_datagrams(host: str) -> None:
    result, [stats] = _transfer(host, 402, count=402, rate=20_000, size=1000, gso_segments=4)
    assert result["sent"] == 402
    assert stats.seqs == set(range(402))
    assert (stats.received, stats.bytes, stats.bad) == (402, 402 * 1000, 0)


@pytest.mark.parametrize(("host", "family"), [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)])
def test_gso_send_is_one_merged_datagram(host: str, family: socket.AddressFamily) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as rx:
        rx.bind((host, 0))
        rx.setsockopt(socket.SOL_UDP, 104, 1)  # UDP_GRO: receive GSO skbs unsegmented
        rx.settimeout(2)
        with UdpSource(rx.getsockname()[:2], count=6, size=500, gso_segments=4) as source:
            source.run()
        merged = [rx.recv(65536), rx.recv(65536)]
    assert [len(data) for data in merged] == [2000, 1000]
    assert [check(data[i : i + 500]) for data in merged for i in range(0, len(data), 500)] == list(range(6))


def test_source_binds() -> None:
    with UdpSource(("127.0.0.1", 9), count=1, bind=("127.0.0.2", 0)) as source:
        assert source.local_address[0] == "127.0.0.2"


def test_sink_counts_bad_and_duplicate_datagrams() -> None:
    with (
        UdpSink([("127.0.0.1", 0)], stream=4) as sink,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        dest = sink.sockets[0].getsockname()
        for data in (payload(4, 0, 64), payload(4, 0, 64), payload(5, 1, 64), b"junk"):
            tx.sendto(data, dest)
        [stats] = sink.collect(timeout=0.2)
    assert (stats.received, stats.seqs, stats.duplicates, stats.bad) == (4, {0}, 1, 2)
    assert stats.first_error is not None and "stream 5, expected 4" in stats.first_error


def test_sink_uses_given_sockets_and_leaves_them_open() -> None:
    given = [
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM),
    ]
    given[0].bind(("127.0.0.1", 0))
    given[1].bind(("::1", 0))
    with UdpSink(given) as sink:
        for sock in given:
            host, port = sock.getsockname()[:2]
            with UdpSource((host, port), count=300, rate=30_000, stream=2) as source:
                source.run()
        stats = sink.collect(300, timeout=5)
    assert [len(s.seqs) for s in stats] == [300, 300]
    assert all(sock.fileno() != -1 for sock in given)
    for sock in given:
        sock.close()


def test_cli_send() -> None:
    with UdpSink([("::1", 0)], stream=3) as sink:
        port = sink.sockets[0].getsockname()[1]
        command = ["send", "--to", f"[::1]:{port}", "--count", "200", "--rate", "20000", "--stream", "3"]
        done = subprocess.run(
            [sys.executable, "-m", "fastrelay.lab.traffic", *command],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
        [stats] = sink.collect(200, timeout=2)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sent"] == 200
    assert stats.seqs == set(range(200)) and stats.bad == 0


def test_cli_sink() -> None:
    command = ["sink", "--bind", "127.0.0.1:0", "--timeout", "5", "--expect", "100"]
    with subprocess.Popen(
        [sys.executable, "-m", "fastrelay.lab.traffic", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stderr is not None
        ready = process.stderr.readline()
        assert ready.startswith("listening on 127.0.0.1:")
        port = int(ready.rsplit(":", 1)[1])
        with UdpSource(("127.0.0.1", port), count=100, rate=10_000) as source:
            source.run()
        out, _ = process.communicate(timeout=10)
    assert process.returncode == 0
    [summary] = json.loads(out)["sockets"]
    assert summary["unique"] == 100 and summary["missing"] == 0 and summary["bad"] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["send", "--count", "1"], "--to"),
        (["send", "--to", "127.0.0.1", "--count", "1"], "expected HOST:PORT"),
        (["send", "--to", "localhost:9", "--count", "1"], "not an IP address"),
        (["send", "--to", "127.0.0.1:70000", "--count", "1"], "expected HOST:PORT"),
        (["send", "--to", "127.0.0.1:0", "--count", "1"], "port must be 1..65535"),
        (["send", "--to", "127.0.0.1:9"], "--duration"),
        (["send", "--to", "127.0.0.1:9", "--count", "1", "--duration", "1"], "not allowed with"),
        (["send", "--to", "127.0.0.1:9", "--count", "x"], "not an integer"),
        (["send", "--to", "127.0.0.1:9", "--count", "1", "--size", "10"], "must be 16..65507"),
        (["send", "--to", "127.0.0.1:9", "--count", "1", "--rate", "0"], "positive"),
        (["send", "--to", "127.0.0.1:9", "--count", "1", "--stream", "-1"], "must be 0..4294967295"),
        (["send", "--to", "127.0.0.1:9", "--count", "1", "--gso", "40", "--size", "2000"], "exceeds 65507"),
        (["sink", "--bind", "127.0.0.1:0"], "--timeout"),
        (["sink", "--bind", "127.0.0.1:0", "--timeout", "nan"], "positive"),
    ],
)
def test_cli_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
