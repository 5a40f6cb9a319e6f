"""Helpers for fan-out relay tests: a running relay in the lab, sinks, wire captures."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from fastrelay.fanout.control import request
from fastrelay.lab.topology import Lab, Link
from fastrelay.lab.traffic import SO_RCVBUFFORCE, UdpSink, UdpSource
from fastrelay.netns import entered, exec_argv

PORT = 5000
SUB_PORT = 6000


@pytest.fixture(scope="module")
def lab(root):
    with Lab("tf", 4) as lab:
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
        deadline = time.monotonic() + 20
        while True:
            try:
                if len(request(ctl, {"op": "list"})["subscribers"]) == len(subs):
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"relay exited: {proc.stderr.read()}")
            assert time.monotonic() < deadline, "relay did not come up"
            time.sleep(0.05)
        yield relay
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        relay.stderr = proc.stderr.read()
        proc.stderr.close()


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


def capture(link: Link) -> socket.socket:
    """A packet socket on a subscriber's eth0 that sees every frame it receives."""
    with entered(link.netns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        s.bind((link.ifname, 0))
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    s.setblocking(False)
    return s


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def udp_frames(sock: socket.socket, dport: int) -> list[dict]:
    """Drain a capture socket: every UDP frame to `dport`, with its checksums verified in Python."""
    out = []
    while True:
        try:
            frame = sock.recv(65536)
        except BlockingIOError:
            return out
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == 0x0800:
            ihl = (frame[14] & 0xF) * 4
            ip = frame[14:14 + ihl]
            if ip[9] != 17:
                continue
            tot = struct.unpack_from("!H", ip, 2)[0]
            udp = frame[14 + ihl:14 + tot]
            src, dst = ip[12:16], ip[16:20]
            pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
            ip_ok = _fold(_sum16(ip)) == 0xFFFF
            family = 4
        elif ethertype == 0x86DD:
            if frame[20] != 17:
                continue
            plen = struct.unpack_from("!H", frame, 18)[0]
            udp = frame[54:54 + plen]
            src, dst = frame[22:38], frame[38:54]
            pseudo = src + dst + struct.pack("!IxxxB", len(udp), 17)
            ip_ok = True
            family = 6
        else:
            continue
        sport, dp, ulen, csum = struct.unpack_from("!HHHH", udp)
        if dp != dport:
            continue
        udp_ok = (csum == 0 and family == 4) or _fold(_sum16(pseudo + udp)) == 0xFFFF
        out.append({"src": socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, src),
                    "sport": sport, "ip_ok": ip_ok, "udp_ok": udp_ok and ulen == len(udp) and csum != 0,
                    "dst_mac": frame[:6].hex(":"), "src_mac": frame[6:12].hex(":")})
