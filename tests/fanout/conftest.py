"""Helpers for fan-out relay tests: a running relay in the lab, sinks, wire captures."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from labtools import lab_name, wait_until

from fastrelay.fanout.control import request
from fastrelay.lab.topology import Lab, Link
from fastrelay.lab.traffic import UdpSink, UdpSource
from fastrelay.netns import entered, exec_argv

PORT = 5000
SUB_PORT = 6000


@pytest.fixture(scope="module")
def lab(root):
    with Lab(lab_name("tf"), 4) as lab:
        yield lab


def addr(link: Link, v6: bool, port: int = SUB_PORT) -> str:
    return f"[{link.ipv6}]:{port}" if v6 else f"{link.ipv4}:{port}"


def relay_ip(lab: Lab, v6: bool) -> str:
    return lab.publisher.relay_ipv6 if v6 else lab.publisher.relay_ipv4


class Relay:
    """A `fastrelay udp-fanout` process in the relay namespace."""

    def __init__(self, proc: subprocess.Popen, ctl: str) -> None:
        self.proc = proc
        self.ctl = ctl

    def call(self, op: str, **kw: object) -> dict:
        reply = request(self.ctl, {"op": op, **kw})
        assert reply["ok"], reply
        return reply


@contextmanager
def running_relay(lab: Lab, datapath: str, subs: list[str], *, v6: bool = False, extra: list[str] | None = None,
                  env: dict[str, str] | None = None) -> Iterator[Relay]:
    ctl = f"/run/fastrelay-test-{lab.name}.sock"
    listen = f"[{relay_ip(lab, v6)}]:{PORT}" if v6 else f"{relay_ip(lab, v6)}:{PORT}"
    argv = [sys.executable, "-m", "fastrelay", "udp-fanout", "--listen", listen, "--datapath", datapath,
            "--control", ctl, "--interface", lab.publisher.relay_ifname, *(extra or [])]
    for s in subs:
        argv += ["--sub", s]
    proc = subprocess.Popen(exec_argv(lab.relay_ns, argv), stderr=subprocess.PIPE, text=True, env=env)
    relay = Relay(proc, ctl)
    try:
        wait_until(lambda: _listening(relay, len(subs)), 20, "the relay to come up with its subscribers")
        yield relay
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        relay.stderr = proc.stderr.read()
        proc.stderr.close()


def _listening(relay: Relay, subscribers: int) -> bool:
    """The relay answers on its control socket and lists all its subscribers (fails at once if it exited)."""
    if relay.proc.poll() is not None:
        raise AssertionError(f"relay exited: {relay.proc.stderr.read()}")
    try:
        return len(request(relay.ctl, {"op": "list"})["subscribers"]) == subscribers
    except OSError:  # not listening yet
        return False


@pytest.fixture
def sub_sockets():
    """sub_sockets(lab, v6=False, n=None): bound receivers in the first n subscriber namespaces,
    closed after the test."""
    made: list[socket.socket] = []

    def make(lab: Lab, v6: bool = False, n: int | None = None) -> list[socket.socket]:
        socks = []
        for link in lab.subscribers[:n]:
            with entered(link.netns):
                s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
            made.append(s)
            s.bind((link.ipv6 if v6 else link.ipv4, SUB_PORT))
            socks.append(s)
        return socks

    yield make
    for s in made:
        s.close()


def source(lab: Lab, v6: bool = False, **kw: object) -> UdpSource:
    with entered(lab.publisher.netns):
        return UdpSource((relay_ip(lab, v6), PORT), **kw)


class Sender(threading.Thread):
    """Runs a UdpSource in the background so sinks can read concurrently."""

    def __init__(self, src: UdpSource) -> None:
        super().__init__(daemon=True)
        self.src = src
        self.result: dict | None = None
        self.start()

    def run(self) -> None:
        with self.src:
            self.result = self.src.run()


def stream(lab: Lab, socks: list[socket.socket], v6: bool = False, **kw: object):
    """Send with a UdpSource while UdpSink collects on `socks`; returns (sender result, sink stats)."""
    count = kw["count"]
    with UdpSink(socks) as sink:
        sender = Sender(source(lab, v6, **kw))
        stats = sink.collect(expected=count, timeout=count / kw.get("rate", 10000) + 3)
        sender.join()
    return sender.result, stats


