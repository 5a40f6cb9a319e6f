"""Tests for the namespace testbed (fastrelay.lab.topology) and fastrelay.netns."""

import json
import os
import socket
import subprocess
from typing import Any

import pytest
from pyroute2 import netns as pyroute2_netns

from fastrelay import netns
from fastrelay.lab.topology import Lab, Link, destroy, list_labs


def _run(ns: str, *argv: str) -> str:
    return subprocess.run(netns.exec_argv(ns, list(argv)), check=True, capture_output=True, text=True).stdout


def _interface(ns: str, ifname: str) -> dict[str, Any]:
    (info,) = json.loads(_run(ns, "ip", "-j", "addr", "show", "dev", ifname))
    return info


def _global_addresses(info: dict[str, Any]) -> set[str]:
    return {f"{a['local']}/{a['prefixlen']}" for a in info["addr_info"] if a["scope"] == "global"}


def _default_gateway(ns: str, family: str) -> str:
    (route,) = json.loads(_run(ns, "ip", "-j", family, "route", "show", "default"))
    return route["gateway"]


def _sysctl(ns: str, key: str) -> str:
    with netns.entered(ns), open(f"/proc/sys/{key}") as f:
        return f.read().strip()


def _thread_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def _udp(src_ns: str, dst_ns: str, dst: str) -> str:
    """Send one datagram from ``src_ns`` to ``dst`` in ``dst_ns``; return its source address."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with netns.entered(dst_ns):
        rx = socket.socket(family, socket.SOCK_DGRAM)
    with netns.entered(src_ns):
        tx = socket.socket(family, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((dst, 0))
        rx.settimeout(2)
        tx.sendto(b"fastrelay", (dst, rx.getsockname()[1]))
        data, peer = rx.recvfrom(64)
    assert data == b"fastrelay"
    return peer[0]


def _leftovers(name: str) -> list[str]:
    return [ns for ns in pyroute2_netns.listnetns() if ns.startswith(f"fr-{name}-")]


def test_addressing_plan() -> None:
    lab = Lab("plan", 300)
    assert lab.relay_ns == "fr-plan-relay"
    assert lab.publisher == Link(
        index=0,
        netns="fr-plan-pub",
        ifname="eth0",
        mac="02:fa:57:00:00:02",
        ipv4="10.200.0.2",
        ipv6="fd00:fa57::2",
        relay_ifname="pub0",
        relay_mac="02:fa:57:00:00:01",
        relay_ipv4="10.200.0.1",
        relay_ipv6="fd00:fa57::1",
    )
    last = lab.subscribers[299]
    assert (last.index, last.netns, last.ifname, last.relay_ifname) == (300, "fr-plan-s299", "eth0", "sub299")
    assert (last.ipv4, last.relay_ipv4) == ("10.201.44.2", "10.201.44.1")
    assert (last.ipv6, last.relay_ipv6) == ("fd00:fa57:0:12c::2", "fd00:fa57:0:12c::1")
    assert (last.mac, last.relay_mac) == ("02:fa:57:01:2c:02", "02:fa:57:01:2c:01")
    assert lab.links[0] == lab.publisher and lab.links[1:] == lab.subscribers
    assert lab.namespaces[:3] == ["fr-plan-relay", "fr-plan-pub", "fr-plan-s0"]


@pytest.mark.parametrize("name", ["", "Lab", "toolongna", "a-b", "a/b", "ä"])
def test_invalid_lab_name(name: str) -> None:
    with pytest.raises(ValueError):
        Lab(name)
    with pytest.raises(ValueError):
        destroy(name)


@pytest.mark.parametrize(("subscribers", "sub_mtu"), [(-1, None), (56 * 256, None), (2, {2: 1400})])
def test_invalid_shape(subscribers: int, sub_mtu: dict[int, int] | None) -> None:
    with pytest.raises(ValueError):
        Lab("x", subscribers, sub_mtu=sub_mtu)


def test_exec_argv() -> None:
    argv = ["ping", "-c1", "10.200.0.1"]
    assert netns.exec_argv("fr-x-pub", argv) == ["ip", "netns", "exec", "fr-x-pub", *argv]


def test_entered_switches_the_thread_and_back(root: None) -> None:
    origin = _thread_netns()
    with netns.entered(None):
        assert _thread_netns() == origin
    with Lab("t0", 0) as lab:
        assert netns.exists(lab.relay_ns) and not netns.exists("fr-t0-missing")
        with pytest.raises(RuntimeError), netns.entered(lab.relay_ns):
            assert _thread_netns() != origin
            assert socket.if_nametoindex("pub0") == lab.ifindex(lab.relay_ns, "pub0")
            raise RuntimeError
        assert _thread_netns() == origin
        with pytest.raises(FileNotFoundError), netns.entered("fr-t0-missing"):
            pass
        assert _thread_netns() == origin


def test_lab_is_built_as_specified(root: None) -> None:
    with Lab("t1", 3) as lab:
        assert list_labs()["t1"] == ["fr-t1-relay", "fr-t1-pub", "fr-t1-s0", "fr-t1-s1", "fr-t1-s2"]
        assert all(netns.exists(ns) for ns in lab.namespaces)
        assert _sysctl(lab.relay_ns, "net/ipv4/ip_forward") == "0"
        assert _sysctl(lab.relay_ns, "net/ipv6/conf/all/forwarding") == "0"
        for link in lab.links:
            ends = [
                (link.netns, link.ifname, link.mac, link.ipv4, link.ipv6),
                (lab.relay_ns, link.relay_ifname, link.relay_mac, link.relay_ipv4, link.relay_ipv6),
            ]
            for ns, ifname, mac, ipv4, ipv6 in ends:
                assert "UP" in _interface(ns, "lo")["flags"]
                info = _interface(ns, ifname)
                assert (info["address"], info["operstate"], info["mtu"]) == (mac, "UP", 1500)
                assert _global_addresses(info) == {f"{ipv4}/24", f"{ipv6}/64"}
                assert lab.ifindex(ns, ifname) == info["ifindex"]
                assert "tx-checksumming: off" in _run(ns, "ethtool", "-k", ifname).splitlines()
            assert _default_gateway(link.netns, "-4") == link.relay_ipv4
            assert _default_gateway(link.netns, "-6") == link.relay_ipv6
        for link in lab.subscribers:
            for conf in ("all", "default", "eth0"):
                assert _sysctl(link.netns, f"net/ipv4/conf/{conf}/rp_filter") == "1"
    assert _leftovers("t1") == []


def test_udp_flows_publisher_to_relay_to_subscribers(root: None) -> None:
    with Lab("t2", 3) as lab:
        pub = lab.publisher
        assert _udp(pub.netns, lab.relay_ns, pub.relay_ipv4) == pub.ipv4
        assert _udp(pub.netns, lab.relay_ns, pub.relay_ipv6) == pub.ipv6
        for sub in lab.subscribers:
            assert _udp(lab.relay_ns, sub.netns, sub.ipv4) == sub.relay_ipv4
            assert _udp(lab.relay_ns, sub.netns, sub.ipv6) == sub.relay_ipv6


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_in_with_block_tears_down(root: None, error: type[BaseException]) -> None:
    with pytest.raises(error), Lab("t3", 3):
        assert len(_leftovers("t3")) == 5
        raise error
    assert _leftovers("t3") == []


def test_failed_up_tears_down(root: None) -> None:
    with pytest.raises(Exception, match="Invalid argument"):
        Lab("t4", 3, sub_mtu={2: 10}).up()  # MTU below the minimum: the third veth cannot be made
    assert _leftovers("t4") == []


def test_list_labs_and_destroy(root: None) -> None:
    lab = Lab("t5", 2).up()
    try:
        assert list_labs()["t5"] == lab.namespaces
        assert sorted(destroy("t5")) == sorted(lab.namespaces)
        assert "t5" not in list_labs() and _leftovers("t5") == []
        assert destroy("t5") == []
    finally:
        lab.down()  # idempotent: nothing left to remove


def test_up_replaces_a_stale_lab(root: None) -> None:
    Lab("t6", 3).up()
    with Lab("t6", 1) as lab:
        assert list_labs()["t6"] == ["fr-t6-relay", "fr-t6-pub", "fr-t6-s0"]
        assert _udp(lab.relay_ns, lab.subscribers[0].netns, lab.subscribers[0].ipv4) == "10.200.1.1"
    assert _leftovers("t6") == []


def test_sub_mtu_and_checksum_offload_kept(root: None) -> None:
    with Lab("t7", 2, checksum_offload=True, sub_mtu={1: 1400}) as lab:
        s0, s1 = lab.subscribers
        assert _interface(s0.netns, "eth0")["mtu"] == _interface(lab.relay_ns, "sub0")["mtu"] == 1500
        assert _interface(s1.netns, "eth0")["mtu"] == _interface(lab.relay_ns, "sub1")["mtu"] == 1400
        assert "tx-checksumming: on" in _run(s1.netns, "ethtool", "-k", "eth0").splitlines()
        assert _udp(lab.relay_ns, s1.netns, s1.ipv6) == s1.relay_ipv6
