"""`fastrelay publish` / `subscribe` when no session comes up: one line and one exit code for
each way connecting fails (no answer, certificate refused, draft refused, SETUP failed), real
processes and sockets on loopback."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
from aioquic.asyncio import serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.events import QuicEvent, StreamDataReceived
from moqtools import free_port, relay_process

from fastrelay.cli import parser
from fastrelay.endpoints.endpoint import ALPN_OF, CONNECT_TIMEOUT_S, ConnectFailed, ConnectFailure, MoqtClient
from fastrelay.moq import messages as m
from fastrelay.moq.params import Version
from fastrelay.moq.wire import ErrorCode
from fastrelay.quic.link import configuration
from fastrelay.quic.tls import self_signed

FR = [sys.executable, "-m", "fastrelay"]
CLIENT_ARGS = {"publish": ["-N", "a/b", "-T", "t", "--source", "synthetic"], "subscribe": ["-N", "a/b", "-T", "t"]}


def run_client(command: str, url: str, *extra: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    """Run `fastrelay publish|subscribe URL`; (result, seconds it took)."""
    start = time.monotonic()
    res = subprocess.run([*FR, command, url, *CLIENT_ARGS[command], *extra], capture_output=True, text=True,
                         timeout=timeout)
    return res, time.monotonic() - start


def error_line(res: subprocess.CompletedProcess) -> str:
    """The one error line of a failed client (and no traceback around it)."""
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("fastrelay: error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


@contextmanager
def silent_udp(host: str) -> Iterator[int]:
    """A bound UDP port on `host` that never answers (its datagrams are never read)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        yield s.getsockname()[1]


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# ---- no QUIC answer

@pytest.mark.parametrize("command", ["publish", "subscribe"])
def test_no_answer_fails_after_the_connect_timeout_with_one_line(command):
    with silent_udp("127.0.0.1") as port:
        res, took = run_client(command, f"moqt://127.0.0.1:{port}", "--connect-timeout", "1")
    assert res.returncode == ConnectFailure.NO_ANSWER == 3, res.stderr
    assert f"connecting to 127.0.0.1:{port}" in res.stderr
    assert error_line(res) == f"fastrelay: error: no QUIC answer from 127.0.0.1:{port} within 1 s"
    assert sum("connecting to" in line for line in res.stderr.splitlines()) == 1
    assert took < 4, took  # the timeout, closing, and the interpreter's start; not aioquic's 30 s idle timeout


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_no_answer_over_ipv6_names_the_address_in_brackets():
    with silent_udp("::1") as port:
        res, _ = run_client("subscribe", f"moqt://[::1]:{port}", "--connect-timeout", "0.5")
    assert res.returncode == ConnectFailure.NO_ANSWER
    assert f"connecting to [::1]:{port}" in res.stderr
    assert error_line(res).endswith(f"no QUIC answer from [::1]:{port} within 0.5 s")


def test_connect_timeout_defaults_to_5_s():
    for command in ("publish", "subscribe"):
        args = parser().parse_args([command, "moqt://127.0.0.1:4443", *CLIENT_ARGS[command]])
        assert args.connect_timeout == CONNECT_TIMEOUT_S == 5.0


@pytest.mark.parametrize("value", ["0", "abc", "-1", "nan", "inf"])
def test_bad_connect_timeout_is_an_argparse_error(value, capsys):
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["subscribe", "moqt://127.0.0.1:4443", "-N", "a", "-T", "t", "--connect-timeout", value])
    assert exc.value.code == 2
    assert "--connect-timeout" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "abc"])
def test_bad_connect_timeout_from_the_command_line(value):
    res, _ = run_client("publish", "moqt://127.0.0.1:4443", "--connect-timeout", value)
    assert res.returncode == 2
    assert "argument --connect-timeout" in res.stderr and "positive number of seconds" in res.stderr
    assert "Traceback" not in res.stderr and "connecting to" not in res.stderr


# ---- against a real `fastrelay relay`: certificate and draft refused

def test_self_signed_relay_certificate_refused_when_verifying(tmp_path):
    (tmp_path / "other.crt").write_bytes(self_signed(["127.0.0.1"])[0])
    with relay_process(tmp_path) as (_, url):
        address = url.removeprefix("moqt://")
        for command, flags in (("subscribe", ["--verify-cert"]), ("publish", ["--ca", str(tmp_path / "other.crt")])):
            res, _ = run_client(command, url, *flags)
            assert res.returncode == ConnectFailure.CERTIFICATE_REFUSED == 4, res.stderr
            line = error_line(res)
            assert f"TLS certificate of relay {address} refused: self-signed certificate" in line
            assert "--ca FILE" in line and "leave out --verify-cert" in line
            assert "BEGIN" not in res.stderr and "PRIVATE" not in res.stderr
        # trusting the relay's own certificate gets past TLS (to the relay's answer: nobody publishes a/b)
        res, _ = run_client("subscribe", url, "--ca", str(tmp_path / "state" / "selfsigned.crt"))
        assert res.returncode == 1 and "SUBSCRIBE refused" in error_line(res)
        # and by default the certificate is not verified, as before
        res, _ = run_client("subscribe", url)
        assert res.returncode == 1 and "SUBSCRIBE refused" in error_line(res)


def test_relay_without_our_draft_refuses_its_alpn(tmp_path):
    with relay_process(tmp_path, "--drafts", "14") as (_, url):
        address = url.removeprefix("moqt://")
        for command in ("publish", "subscribe"):
            res, took = run_client(command, url, "--draft", "16")
            assert res.returncode == ConnectFailure.VERSION_REFUSED == 5, res.stderr
            line = error_line(res)
            assert f"relay {address} refused MoQT draft-16 (ALPN moqt-16)" in line
            assert "No common ALPN protocols" in line and "--draft 14" in line
            assert took < 5
        res, _ = run_client("subscribe", url, "--draft", "14")  # the draft it speaks
        assert res.returncode == 1 and "SUBSCRIBE refused" in error_line(res)


# ---- SETUP failures: a tiny aioquic server that completes the handshake, then misbehaves

class _SetupServer(QuicConnectionProtocol):
    """Answers CLIENT_SETUP (the first bytes on stream 0) the way `behaviour` says."""

    def __init__(self, *args, behaviour: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.behaviour = behaviour

    def quic_event_received(self, event: QuicEvent) -> None:
        if not isinstance(event, StreamDataReceived) or event.stream_id != 0 or self.behaviour == "silent":
            return
        if self.behaviour == "close":  # an application close, as a relay refusing the session would
            self._quic.close(error_code=ErrorCode.VERSION_NEGOTIATION_FAILED,
                             reason_phrase="no common version\nsecond line")
        else:  # "wrong-version": a draft-14 SERVER_SETUP selecting a version the client did not offer
            self._quic.send_stream_data(0, m.encode_message(m.ServerSetup(Version.DRAFT_16), Version.DRAFT_14))
        self.transmit()


@asynccontextmanager
async def setup_server(tmp_path, behaviour: str, version: Version = Version.DRAFT_16):
    """A _SetupServer on a free loopback port; yields its moqt:// URL."""
    cert, key = self_signed(["127.0.0.1"])
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    cfg = configuration(client=False, alpn=[ALPN_OF[version]], cert=str(tmp_path / "c.pem"),
                        key=str(tmp_path / "k.pem"))
    port = free_port(socket.SOCK_DGRAM)
    server = await serve("127.0.0.1", port, configuration=cfg,
                         create_protocol=lambda *a, **k: _SetupServer(*a, behaviour=behaviour, **k))
    try:
        yield f"moqt://127.0.0.1:{port}"
    finally:
        server.close()


async def run_client_async(command: str, url: str, *extra: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*FR, command, url, *CLIENT_ARGS[command], *extra,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, err.decode()


@pytest.mark.parametrize(("behaviour", "version", "extra", "message"), [
    ("close", Version.DRAFT_16, [],
     "relay {a} closed the session during MoQT SETUP: VERSION_NEGOTIATION_FAILED (0x15) "
     "'no common version second line'"),
    ("wrong-version", Version.DRAFT_14, ["--draft", "14"],
     "MoQT SETUP with relay {a} failed: VERSION_NEGOTIATION_FAILED (0x15) 'server selected an unoffered version'"),
    ("silent", Version.DRAFT_16, ["--connect-timeout", "1"], "relay {a} sent no SERVER_SETUP within 1 s"),
], ids=["relay-closes", "bad-server-setup", "no-server-setup"])
@pytest.mark.parametrize("command", ["publish", "subscribe"])
def test_setup_failure_has_its_own_line_and_exit_code(tmp_path, command, behaviour, version, extra, message):
    async def main() -> tuple[str, int, str]:
        async with setup_server(tmp_path, behaviour, version) as url:
            return url, *await run_client_async(command, url, *extra)

    url, code, err = asyncio.run(main())
    res = subprocess.CompletedProcess([], code, "", err)
    assert code == ConnectFailure.SETUP_FAILED == 6, err
    assert error_line(res) == "fastrelay: error: " + message.format(a=url.removeprefix("moqt://"))


def test_endpoint_raises_connect_failed_for_a_setup_close(tmp_path):
    async def main() -> ConnectFailed:
        async with setup_server(tmp_path, "close") as url:
            client = MoqtClient(url, connect_timeout=2)
            with pytest.raises(ConnectFailed) as exc:
                await client.__aenter__()
            assert client.link.ended is not None and client.link.ended.error_code == 0x15
            return exc.value

    failure = asyncio.run(main())
    assert failure.failure == ConnectFailure.SETUP_FAILED
    assert isinstance(failure, ConnectionError) and "\n" not in str(failure)


@pytest.mark.parametrize("command", ["publish", "subscribe"])
def test_exit_codes_are_distinct_and_documented(command, capsys):
    codes = [int(f) for f in ConnectFailure]
    assert len(set(codes)) == len(codes) and not {0, 1, 2} & set(codes)
    with pytest.raises(SystemExit):
        parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert "--connect-timeout SECONDS" in text and "(default 5)" in text
    assert all(f"  {code}  " in text for code in codes)
