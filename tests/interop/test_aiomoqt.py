"""Interoperability with aiomoqt 0.13.3, an independent MoQT stack (picoquic via aiopquic).

Every test runs the real programs as subprocesses on loopback, raw QUIC (moqt://), and
checks from the subscriber's own output that objects were delivered:

* A: fastrelay relay   <- aiomoqt pub_example  -> aiomoqt sub_example
* B: aiomoqt relay     <- fastrelay publish    -> fastrelay subscribe --raw
* C: fastrelay relay   <- aiomoqt pub_example  -> fastrelay subscribe --raw
* D: fastrelay relay   <- fastrelay publish    -> aiomoqt sub_example

each with draft-16 (ALPN moqt-16) and draft-14 (ALPN moq-00, version in CLIENT_SETUP).
Relays are pinned to the draft under test, and the relay's log must show that draft
negotiated. aiomoqt is a third-party peer: `.venv/bin/pip install aiomoqt==0.13.3`.

aiomoqt's pub_example publishes with PUBLISH (Forward State 0) and sends objects only
once PUBLISH_OK sets Forward State 1; fastrelay's publisher uses PUBLISH_NAMESPACE and
answers the relay's SUBSCRIBE.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastrelay.quic.tls import self_signed

AIOMOQT_VERSION = "0.13.3"
DRAFTS = ["16", "14"]
NAMESPACE = "interop"
SUB_SECONDS = 3  # how long each subscriber listens
MIN_OBJECTS = 45  # both publishers send 30 objects/s: at least half of that must arrive
START_TIMEOUT = 10.0


@pytest.fixture(scope="module", autouse=True)
def aiomoqt_installed() -> None:
    """The peer must be there: a missing peer is a failure, not a skip."""
    try:
        version = importlib.metadata.version("aiomoqt")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"aiomoqt is not installed: {sys.executable} -m pip install aiomoqt=={AIOMOQT_VERSION}")
    if version != AIOMOQT_VERSION:
        pytest.fail(f"aiomoqt {version} installed, these tests target {AIOMOQT_VERSION}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("DRAFT", "MOQT_DRAFT"):  # aiomoqt's relay reads these; the tests pin --draft instead
        env.pop(name, None)
    return env


class Proc:
    """A child process whose stdout/stderr go to files under the test's tmp_path."""

    def __init__(self, name: str, argv: list[str], tmp_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.out_path = tmp_path / f"{name}.out"
        self.err_path = tmp_path / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=_env())

    def output(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.out_path, self.err_path) if p.exists())

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> bool:
        """True once `pattern` (regex) appears in the output; False on timeout or exit."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            if rx.search(self.output()):
                return True
            if self.proc.poll() is not None:
                return bool(rx.search(self.output()))
            time.sleep(0.05)
        return False

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)

    def tail(self, lines: int = 25) -> str:
        text = self.output().splitlines()
        return f"--- {self.name} (rc={self.proc.poll()}): {' '.join(self.argv[1:])}\n" + "\n".join(text[-lines:])


class Run:
    """Children of one test; all are stopped at the end, whatever happened."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str]) -> Proc:
        p = Proc(name, argv, self.tmp_path)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    r = Run(tmp_path)
    try:
        yield r
    finally:
        r.stop_all()


PY = sys.executable


# ---- the programs -------------------------------------------------------------------

def start_fastrelay_relay(run: Run, draft: str) -> tuple[Proc, str]:
    port = free_port()
    url = f"moqt://127.0.0.1:{port}"
    relay = run.start("fastrelay-relay", [PY, "-m", "fastrelay", "relay", url, "--drafts", draft,
                                          "--state-dir", str(run.tmp_path / "state")])
    assert relay.wait_for(r"MoQT relay on"), run.logs()
    return relay, url


def start_aiomoqt_relay(run: Run, draft: str) -> tuple[Proc, str]:
    cert, key = self_signed(["127.0.0.1"])
    (run.tmp_path / "cert.pem").write_bytes(cert)
    (run.tmp_path / "key.pem").write_bytes(key)
    port = free_port()
    relay = run.start("aiomoqt-relay", [PY, "-m", "aiomoqt.tools.moq_interop_relay", "--bind", "127.0.0.1",
                                        "--port", str(port), "--cert", str(run.tmp_path / "cert.pem"),
                                        "--key", str(run.tmp_path / "key.pem"), "--quic", "--draft", draft])
    assert relay.wait_for(r"Listening on .*UDP port"), run.logs()
    return relay, f"moqt://127.0.0.1:{port}"


def start_aiomoqt_pub(run: Run, url: str, track: str, draft: str, *extra: str) -> Proc:
    pub = run.start("aiomoqt-pub", [PY, "-m", "aiomoqt.examples.pub_example", url, "-N", NAMESPACE, "-T", track,
                                    "-k", "--draft", draft, "-t", "60", *extra])
    assert pub.wait_for(r"MOQT app: published"), run.logs()
    return pub


def start_fastrelay_pub(run: Run, url: str, track: str, draft: str, relay: Proc, announced: str) -> Proc:
    pub = run.start("fastrelay-pub", [PY, "-m", "fastrelay", "publish", url, "-N", NAMESPACE, "-T", track,
                                      "--draft", draft, "--source", "synthetic", "--duration", "60"])
    assert relay.wait_for(announced), run.logs()  # the relay accepted the PUBLISH_NAMESPACE
    return pub


def run_aiomoqt_sub(run: Run, url: str, track: str, draft: str) -> tuple[int, int]:
    """(objects, groups) from sub_example's closing 'Total:' line (0, 0 if it received nothing)."""
    sub = run.start("aiomoqt-sub", [PY, "-m", "aiomoqt.examples.sub_example", url, "-N", NAMESPACE, "-T", track,
                                    "-k", "--draft", draft, "-t", str(SUB_SECONDS)])
    sub.wait(SUB_SECONDS + 15)
    m = re.search(r"Total: ([\d,]+) objects, ([\d,]+) groups", sub.output())
    if m is None:
        assert "No data received" in sub.output(), run.logs()
        return 0, 0
    return int(m[1].replace(",", "")), int(m[2].replace(",", ""))


def run_fastrelay_sub(run: Run, url: str, track: str, draft: str) -> dict:
    """The JSON summary `fastrelay subscribe` prints last."""
    sub = run.start("fastrelay-sub", [PY, "-m", "fastrelay", "subscribe", url, "-N", NAMESPACE, "-T", track,
                                      "--draft", draft, "--raw", "--duration", str(SUB_SECONDS)])
    sub.wait(SUB_SECONDS + 15)
    lines = [line for line in sub.out_path.read_text().splitlines() if line.startswith("{")]
    assert lines, run.logs()
    return json.loads(lines[-1])


def fastrelay_negotiated(relay: Proc, draft: str) -> int:
    return relay.output().count(f"ready (DRAFT_{draft})")


def aiomoqt_negotiated(relay: Proc, draft: str) -> int:
    return relay.output().count(f"setup complete: draft-{draft}")


# ---- A: fastrelay relay between aiomoqt's publisher and subscriber --------------------

@pytest.mark.parametrize("draft", DRAFTS)
def test_a_aiomoqt_pub_fastrelay_relay_aiomoqt_sub(run: Run, draft: str) -> None:
    relay, url = start_fastrelay_relay(run, draft)
    track = f"a-{draft}"
    start_aiomoqt_pub(run, url, track, draft)
    objects, groups = run_aiomoqt_sub(run, url, track, draft)
    assert fastrelay_negotiated(relay, draft) == 2, run.logs()
    assert objects >= MIN_OBJECTS and groups >= 2, f"aiomoqt sub got {objects} objects, {groups} groups\n" + run.logs()


# ---- B: aiomoqt relay between fastrelay's publisher and subscriber --------------------

@pytest.mark.parametrize("draft", DRAFTS)
def test_b_fastrelay_pub_aiomoqt_relay_fastrelay_sub(run: Run, draft: str) -> None:
    relay, url = start_aiomoqt_relay(run, draft)
    track = f"b-{draft}"
    start_fastrelay_pub(run, url, track, draft, relay, r"relay: announce ns=\(b'interop',\)")
    summary = run_fastrelay_sub(run, url, track, draft)
    assert aiomoqt_negotiated(relay, draft) == 2, run.logs()
    assert summary["objects"] >= MIN_OBJECTS, f"fastrelay sub: {summary}\n" + run.logs()
    assert (summary["bad"], summary["duplicates"]) == (0, 0), summary


# ---- C: aiomoqt publisher -> fastrelay relay -> fastrelay subscriber ------------------

@pytest.mark.parametrize("draft", DRAFTS)
def test_c_aiomoqt_pub_fastrelay_relay_fastrelay_sub(run: Run, draft: str) -> None:
    relay, url = start_fastrelay_relay(run, draft)
    track = f"c-{draft}"
    start_aiomoqt_pub(run, url, track, draft)
    summary = run_fastrelay_sub(run, url, track, draft)
    assert fastrelay_negotiated(relay, draft) == 2, run.logs()
    assert summary["objects"] >= MIN_OBJECTS, f"fastrelay sub: {summary}\n" + run.logs()
    assert summary["duplicates"] == 0, summary


# ---- D: fastrelay publisher -> fastrelay relay -> aiomoqt subscriber ------------------

@pytest.mark.parametrize("draft", DRAFTS)
def test_d_fastrelay_pub_fastrelay_relay_aiomoqt_sub(run: Run, draft: str) -> None:
    relay, url = start_fastrelay_relay(run, draft)
    track = f"d-{draft}"
    start_fastrelay_pub(run, url, track, draft, relay, r"publishes namespace interop")
    objects, groups = run_aiomoqt_sub(run, url, track, draft)
    assert fastrelay_negotiated(relay, draft) == 2, run.logs()
    assert objects >= MIN_OBJECTS and groups >= 2, f"aiomoqt sub got {objects} objects, {groups} groups\n" + run.logs()


# ---- E: objects as datagrams (aiomoqt publisher --datagram) through the fastrelay relay ---

@pytest.mark.parametrize("draft", DRAFTS)
def test_e_datagrams_through_the_fastrelay_relay(run: Run, draft: str) -> None:
    relay, url = start_fastrelay_relay(run, draft)
    track = f"e-{draft}"
    start_aiomoqt_pub(run, url, track, draft, "--datagram")
    objects, groups = run_aiomoqt_sub(run, url, track, draft)
    assert objects >= MIN_OBJECTS and groups >= 2, f"aiomoqt sub got {objects} objects\n" + run.logs()
    summary = run_fastrelay_sub(run, url, track, draft)
    assert summary["objects"] >= MIN_OBJECTS and summary["duplicates"] == 0, f"{summary}\n" + run.logs()
