"""Resolve where a packet to an address leaves: interface, source address, MACs, MTU.

The BPF fast path has no ARP/NDP, so userspace resolves next hops (route + neighbour
table through netlink) and re-validates them periodically.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass

from pyroute2 import IPRoute

NUD_INCOMPLETE, NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE, NUD_FAILED, NUD_PERMANENT = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x80)
_USABLE = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT


class NextHopError(Exception):
    """No route or no link-layer address for a destination."""


@dataclass(frozen=True)
class NextHop:
    ifindex: int
    src_ip: str
    src_mac: str
    dst_mac: str
    mtu: int


def _poke(ip: str) -> None:
    """Make the kernel (re)resolve `ip`: one ICMP echo request (raw socket, root)."""
    v6 = ipaddress.ip_address(ip).version == 6
    fam, proto, kind = (socket.AF_INET6, socket.IPPROTO_ICMPV6, 128) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP, 8)
    hdr = struct.pack("!BBHHH", kind, 0, 0, os.getpid() & 0xFFFF, 1)
    if not v6:  # the kernel fills the ICMPv6 checksum itself
        total = sum(struct.unpack("!4H", hdr))
        total = (total & 0xFFFF) + (total >> 16)
        hdr = struct.pack("!BBHHH", kind, 0, ~total & 0xFFFF, os.getpid() & 0xFFFF, 1)
    with socket.socket(fam, socket.SOCK_RAW, proto) as s:
        try:
            s.sendto(hdr, (ip, 0))
        except OSError:
            pass  # unreachable now; the caller reports it if it stays so


class Resolver:
    """Route and neighbour look-ups in the current network namespace."""

    def __init__(self) -> None:
        self._ip = IPRoute()

    def close(self) -> None:
        self._ip.close()

    def _tables(self) -> tuple[dict[int, dict], dict[tuple[int, str], tuple[str, int]]]:
        """One dump each: links by index, neighbours by (ifindex, address)."""
        links = {link["index"]: link for link in self._ip.get_links()}
        neigh = {}
        for n in self._ip.get_neighbours():
            if n.get("NDA_DST") and n.get("NDA_LLADDR"):
                neigh[(n["ifindex"], n.get("NDA_DST"))] = (n.get("NDA_LLADDR"), n["state"])
        return links, neigh

    def _route(self, ip: str) -> tuple[int, str, str]:
        """(ifindex, next-hop address, source address) towards ip."""
        try:
            route = self._ip.route("get", dst=ip)[0]
        except Exception as exc:  # pyroute2 raises NetlinkError for unreachable destinations
            raise NextHopError(f"no route to {ip}: {exc}") from exc
        ifindex = route.get("RTA_OIF")
        src = route.get("RTA_PREFSRC")
        if src is None:  # IPv6 routes often carry no preferred source: take the interface's
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            addrs = [a.get("IFA_ADDRESS") for a in self._ip.get_addr(family=fam, index=ifindex) if a["scope"] == 0]
            if not addrs:
                raise NextHopError(f"no source address on the interface towards {ip}")
            src = addrs[0]
        return ifindex, route.get("RTA_GATEWAY") or ip, src

    def resolve_all(self, ips: list[str], revalidate: bool = False) -> dict[str, NextHop | NextHopError]:
        """Next hops for many addresses without waiting: unknown neighbours (and, with
        `revalidate`, stale ones) are probed, and a later call sees the answers."""
        links, neigh = self._tables()
        out: dict[str, NextHop | NextHopError] = {}
        for ip in ips:
            try:
                ifindex, hop, src = self._route(ip)
            except NextHopError as exc:
                out[ip] = exc
                continue
            n = neigh.get((ifindex, hop))
            if n is None or not n[1] & _USABLE or (revalidate and n[1] & NUD_STALE):
                _poke(hop)
            if n is None or not n[1] & _USABLE or ifindex not in links:
                out[ip] = NextHopError(f"{hop} does not answer neighbour discovery on ifindex {ifindex}")
                continue
            link = links[ifindex]
            out[ip] = NextHop(ifindex, src, link.get("IFLA_ADDRESS"), n[0], link.get("IFLA_MTU"))
        return out

    def resolve(self, ip: str, wait: float = 0.2) -> NextHop:
        """Next hop towards one address, waiting up to `wait` s for neighbour discovery."""
        deadline = time.monotonic() + wait
        while True:
            result = self.resolve_all([ip])[ip]
            if isinstance(result, NextHop):
                return result
            if time.monotonic() >= deadline:
                raise result
            time.sleep(0.005)

    def local_addresses(self, family: int) -> list[str]:
        """Every address of this namespace in `family`."""
        return [a.get("IFA_ADDRESS") for a in self._ip.get_addr(family=family)]
