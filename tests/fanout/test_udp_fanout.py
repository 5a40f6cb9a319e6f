"""UDP fan-out relay, both data paths, for real in network namespaces."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from labtools import lab_name, wait_no_leftovers, wait_until

from fastrelay.lab.capture import capture, udp_frames
from fastrelay.lab.topology import Lab
from fastrelay.netns import entered, exec_argv

from .conftest import (
    PORT,
    SUB_PORT,
    Sender,
    addr,
    relay_ip,
    running_relay,
    source,
    stream,
)

DATAPATHS = ["kernel", "userspace"]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_every_subscriber_gets_every_datagram_byte_exact(lab, datapath, v6, sub_sockets):
    n = 5000
    socks = sub_sockets(lab, v6)
    cap = capture(lab.subscribers[1])
    subs = [addr(s, v6) for s in lab.subscribers]
    with running_relay(lab, datapath, subs, v6=v6) as relay:
        sent, stats = stream(lab, socks, v6, rate=20000, count=n, size=1200)
        st = relay.call("stats")
    assert sent["sent"] == n
    for s in stats:
        assert (len(s.seqs), s.duplicates, s.bad) == (n, 0, 0), s.summary()

    # on the wire: valid IP and UDP checksums (the sender computed them in software), relay's addresses
    frames = udp_frames(cap, SUB_PORT)
    cap.close()
    link = lab.subscribers[1]
    assert len(frames) == n
    assert all(f["ip_ok"] and f["udp_ok"] for f in frames)
    assert {f["src"] for f in frames} == {relay_ip(lab, v6)}  # from the address subscribers talk to
    assert {f["sport"] for f in frames} == {PORT}
    assert {(f["src_mac"], f["dst_mac"]) for f in frames} == {(link.relay_mac, link.mac)}

    kernel_copies = sum(s["kernel_copies"] for s in st["subscribers"])
    user_copies = sum(s["user_copies"] for s in st["subscribers"])
    if datapath == "kernel":
        assert (kernel_copies, user_copies) == (4 * n, 0)  # proof: the copies never visited userspace
        assert st["kernel"]["copies"] == 4 * n and st["kernel"]["fanned"] == n and st["received"] == 0
    else:
        assert (kernel_copies, user_copies) == (0, 4 * n) and st["received"] == n


def contiguous(seqs: set[int]) -> bool:
    return bool(seqs) and seqs == set(range(min(seqs), max(seqs) + 1))


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_subscribers_added_and_removed_during_traffic(lab, datapath, sub_sockets):
    n, rate = 30000, 5000  # 6 s of stream: the joins and leaves below need about 3 s, with slack
    socks = sub_sockets(lab)
    from fastrelay.lab.traffic import UdpSink

    with running_relay(lab, datapath, [addr(s, False) for s in lab.subscribers[:2]]) as relay, UdpSink(socks) as sink:
        sender = Sender(source(lab, rate=rate, count=n, size=600))
        sink.collect(timeout=1.0)
        relay.call("add", addr=addr(lab.subscribers[2], False))
        sink.collect(timeout=1.0)
        relay.call("remove", addr=addr(lab.subscribers[1], False))
        # churn: sub 3 joins and leaves 20 times while the others stream
        for _ in range(20):
            new = relay.call("add", addr=addr(lab.subscribers[3], False))["id"]
            sink.collect(timeout=0.02)
            relay.call("remove", id=new)
        while sender.is_alive():  # keep reading: an unread socket would overflow
            sink.collect(timeout=0.2)
        stats = sink.collect(expected=None, timeout=0.5)
        listing = relay.call("list")["subscribers"]
    assert [s["addr"] for s in listing] == [addr(lab.subscribers[i], False) for i in (0, 2)]
    steady, left, joined, churned = stats
    assert len(steady.seqs) == n and steady.duplicates == 0 and steady.bad == 0
    # the leaver got a prefix, the joiner a suffix: no gap and no duplicate around the switch
    assert contiguous(left.seqs) and min(left.seqs) == 0 and max(left.seqs) < n - 1 and left.duplicates == 0
    assert contiguous(joined.seqs) and max(joined.seqs) == n - 1 and min(joined.seqs) > 0 and joined.duplicates == 0
    assert churned.duplicates == 0 and churned.bad == 0


def test_gso_merged_packets_go_up_and_are_still_delivered(root, sub_sockets):
    # with tx checksum offload on, a UDP_SEGMENT send crosses the veth as one GSO skb
    with Lab(lab_name("tg"), 2, checksum_offload=True) as lab:
        socks = sub_sockets(lab)
        with running_relay(lab, "kernel", [addr(s, False) for s in lab.subscribers]) as relay:
            _, stats = stream(lab, socks, rate=2000, count=400, size=1000, gso_segments=4)
            st = relay.call("stats")
    assert all(len(s.seqs) == 400 and s.bad == 0 for s in stats)
    assert st["kernel"]["pass_gso"] == 100 and st["kernel"]["copies"] == 0
    assert [s["user_copies"] for s in st["subscribers"]] == [400, 400]


def test_packets_larger_than_an_egress_mtu_go_up_and_are_fragmented(root, sub_sockets):
    with Lab(lab_name("to"), 2, sub_mtu={1: 1280}) as lab:  # 1280: the IPv6 minimum
        socks = sub_sockets(lab)
        with running_relay(lab, "kernel", [addr(s, False) for s in lab.subscribers]) as relay:
            _, big = stream(lab, socks, rate=5000, count=200, size=1300)
            _, small = stream(lab, socks, rate=5000, count=200, size=1200)
            st = relay.call("stats")
    assert all(len(s.seqs) == 200 and s.bad == 0 for s in big + small)
    assert st["kernel"]["pass_oversize"] == 200
    assert st["kernel"]["copies"] == 400  # the small ones stayed in the kernel


def raw_frame(lab, ip_len_delta: int = 0, udp_len_delta: int = 0, ihl: int = 5, payload: int = 100) -> bytes:
    """An IPv4/UDP frame publisher -> relay port with chosen length errors."""
    pub = lab.publisher
    udp = struct.pack("!HHHH", 40000, PORT, 8 + payload + udp_len_delta, 0) + b"\xab" * payload
    tot = 20 + len(udp) + ip_len_delta
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tot, 1, 0, 64, 17, 0,
                     socket.inet_aton(pub.ipv4), socket.inet_aton(pub.relay_ipv4))
    total = sum(struct.unpack("!10H", ip))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    ip = ip[:10] + struct.pack("!H", ~total & 0xFFFF) + ip[12:]
    eth = bytes.fromhex(pub.relay_mac.replace(":", "")) + bytes.fromhex(pub.mac.replace(":", "")) + b"\x08\x00"
    return eth + ip + udp


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_malformed_packets_are_dropped_and_the_relay_keeps_serving(lab, datapath, sub_sockets):
    socks = sub_sockets(lab, n=2)
    with running_relay(lab, datapath, [addr(s, False) for s in lab.subscribers[:2]]) as relay:
        with entered(lab.publisher.netns):
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        raw.bind((lab.publisher.ifname, 0))
        bad = [raw_frame(lab, ip_len_delta=+400),  # IP length beyond the frame: truncated
               raw_frame(lab, udp_len_delta=+50),  # UDP length beyond the IP payload
               raw_frame(lab, udp_len_delta=-50),  # UDP length short of the IP payload
               raw_frame(lab, ihl=4)]  # impossible header length
        for frame in bad:
            raw.send(frame)
        raw.close()
        _, stats = stream(lab, socks, rate=5000, count=500, size=300)
        st = relay.call("stats")
    for s in stats:
        # the valid datagrams, plus the one with a short UDP length as Linux reads it (trimmed): both paths alike
        assert (len(s.seqs), s.received, s.bad) == (500, 501, 1)
        assert "bad magic 0xabababab" in s.first_error
    if datapath == "kernel":
        k = st["kernel"]
        assert (k["drop_malformed"], k["pass_irregular"], k["copies"]) == (2, 1, 1000)


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_source_filter(lab, datapath, sub_sockets):
    socks = sub_sockets(lab, n=1)
    with running_relay(lab, datapath, [addr(lab.subscribers[0], False)], extra=["--source", "10.200.0.99"]) as relay:
        _, stats = stream(lab, socks, rate=5000, count=200, size=300)
        st = relay.call("stats")
    assert stats[0].received == 0
    assert (st["kernel"]["drop_source"] if datapath == "kernel" else st["dropped_source"]) == 200


@contextmanager
def arp_locktime(netns: str, ifname: str, centiseconds: int) -> Iterator[None]:
    """ARP's locktime of `ifname` in `netns` set for a while (restored after): how long after an
    entry's last update the kernel ignores a new address for it."""
    path = f"/proc/sys/net/ipv4/neigh/{ifname}/locktime"
    with entered(netns), open(path) as f:
        old = f.read().strip()
    with entered(netns), open(path, "w") as f:
        f.write(str(centiseconds))
    try:
        yield
    finally:
        with entered(netns), open(path, "w") as f:
            f.write(old)


def test_kernel_path_follows_a_subscriber_mac_change(lab, sub_sockets):
    sub = lab.subscribers[0]
    socks = sub_sockets(lab, n=1)
    # the relay's kernel takes the subscriber's new MAC at once (by default it ignores a new
    # address within locktime, 1 s, of the entry's last update, which the first stream just made)
    with arp_locktime(lab.relay_ns, sub.relay_ifname, 0), \
            running_relay(lab, "kernel", [addr(sub, False)], extra=["--neighbour-refresh", "0.2"]) as relay:
        _, before = stream(lab, socks, rate=5000, count=500, size=300)
        new_mac = "02:aa:bb:cc:dd:01"
        for cmd in (["ip", "link", "set", "eth0", "address", new_mac], ["ip", "neigh", "flush", "dev", "eth0"]):
            subprocess.run(exec_argv(sub.netns, cmd), check=True)
        # the subscriber talks to the relay: its ARP request tells the relay's kernel the new address
        with entered(sub.netns):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"hello", (sub.relay_ipv4, 9))
        s.close()
        wait_until(lambda: relay.call("list")["subscribers"][0]["next_hop_mac"] == new_mac, 10,
                   "the relay to pick up the subscriber's new MAC")
        _, after = stream(lab, socks, rate=5000, count=500, size=300)
        st = relay.call("stats")
    subprocess.run(exec_argv(sub.netns, ["ip", "link", "set", "eth0", "address", sub.mac]), check=True)
    assert len(before[0].seqs) == 500 and len(after[0].seqs) == 500
    assert st["subscribers"][0]["kernel_copies"] == 1000
    assert "next hops changed" in relay.stderr


def tc_filters(lab) -> str:
    return subprocess.run(exec_argv(lab.relay_ns, ["tc", "filter", "show", "dev", "pub0", "ingress"]),
                          capture_output=True, text=True).stdout


@pytest.mark.parametrize("mode", ["tcx", "clsact"])
def test_relay_leaves_nothing_behind_after_sigterm_or_kill9(lab, mode, monkeypatch):
    import os

    env = {**os.environ, "FASTRELAY_TC_MODE": mode}
    subs = [addr(lab.subscribers[0], False)]
    with running_relay(lab, "kernel", subs, env=env) as relay:
        assert ("fr_udp_fanout" in tc_filters(lab)) == (mode == "clsact")
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.proc.wait(10) == 0
    assert "fr_udp_fanout" not in tc_filters(lab)
    wait_no_leftovers()

    with running_relay(lab, "kernel", subs, env=env) as relay:
        relay.proc.kill()
        relay.proc.wait()
    if mode == "clsact":
        # a clsact filter outlives a killed loader; the next start (or `fastrelay cleanup`) removes it
        assert "fr_udp_fanout" in tc_filters(lab)
        with running_relay(lab, "kernel", subs, env=env) as relay:
            pass
        assert "removed stale clsact filter fr_udp_fanout" in relay.stderr
        assert "fr_udp_fanout" not in tc_filters(lab)
    wait_no_leftovers()


def run_cli(*args: str, netns: str | None = None, env: dict | None = None, prefix: list[str] | None = None):
    argv = [*(prefix or []), sys.executable, "-m", "fastrelay", *args]
    if netns:
        argv = exec_argv(netns, argv)
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)


def test_without_privileges_one_clear_line(lab):
    res = run_cli("udp-fanout", "--listen", f"{lab.publisher.relay_ipv4}:{PORT}", netns=lab.relay_ns,
                  prefix=["setpriv", "--inh-caps=-all", "--bounding-set=-all"])
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0
    assert "needs root" in res.stderr and "CAP_BPF" in res.stderr


def test_missing_toolchain_says_run_setup(lab, tmp_path):
    res = run_cli("udp-fanout", "--listen", f"{lab.publisher.relay_ipv4}:{PORT}", netns=lab.relay_ns,
                  prefix=["/usr/bin/env", f"PATH={tmp_path}", f"FASTRELAY_CACHE={tmp_path / 'empty'}"])
    assert res.returncode == 1
    assert "clang not found" in res.stderr and "make demo" in res.stderr


@pytest.mark.parametrize("args,message", [
    (["udp-fanout", "--listen", "nonsense:5000"], "not an IP address"),
    (["udp-fanout", "--listen", "127.0.0.1"], "expected ADDRESS:PORT"),
    (["udp-fanout", "--listen", "127.0.0.1:99999"], "port must be"),
    (["udp-fanout", "--listen", "127.0.0.1:5000", "--datapath", "userspace", "--sub", "[::1]:5"],
     "address family differs"),
    (["fanout-ctl", "--control", "/nonexistent.sock", "list"], "No such file"),
])
def test_bad_arguments_get_one_clear_line(args, message):
    res = run_cli(*args)
    assert res.returncode == 1, res
    assert res.stderr.startswith("fastrelay: error:") and message in res.stderr


def test_usage_errors_exit_2():
    assert run_cli("udp-fanout", "--listen", "127.0.0.1:5000", "--datapath", "bogus").returncode == 2


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_a_vanishing_subscriber_does_not_disturb_the_others(root, sub_sockets, datapath):
    from pyroute2 import netns as pr_netns

    from fastrelay.lab.traffic import UdpSink

    with Lab(lab_name("tv"), 3) as lab:
        socks = sub_sockets(lab, n=2)  # subscriber 2 has no socket: its namespace is about to vanish
        subs = [addr(s, False) for s in lab.subscribers]
        with running_relay(lab, datapath, subs, extra=["--neighbour-refresh", "0.2"]) as relay, \
                UdpSink(socks) as sink:
            sender = Sender(source(lab, rate=5000, count=10000, size=400))
            sink.collect(expected=500, timeout=5)  # the stream reaches both before the third one vanishes
            pr_netns.remove(lab.subscribers[2].netns)  # its veth, and the relay's end, go with it
            sender.join()
            stats = sink.collect(expected=10000, timeout=2)
            st = relay.call("stats")
            assert relay.proc.poll() is None, "the relay kept running"
    for s in stats:
        assert len(s.seqs) == 10000 and s.duplicates == 0 and s.bad == 0
    gone = st["subscribers"][2]
    if datapath == "kernel":
        assert gone["kernel_path"] is False  # dropped from the kernel set once its route vanished
        assert "kept out of the kernel path" in relay.stderr
    else:
        assert gone["send_errors"] > 0
