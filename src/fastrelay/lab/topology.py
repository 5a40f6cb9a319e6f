"""A relay / publisher / subscribers testbed built from network namespaces.

Every endpoint lives in its own namespace and is wired to the relay namespace
with a veth pair. Link ``k`` (0 for the publisher, ``i + 1`` for subscriber
``i``) uses ``10.{200 + k // 256}.{k % 256}.0/24`` and ``fd00:fa57:0:{k:x}::/64``;
the relay side is ``.1`` / ``::1``, the endpoint side ``.2`` / ``::2``
(IPv6 addresses are given in their canonical, compressed form).
The relay namespace does not forward: the relay is an application, not a router.
"""

import contextlib
import ipaddress
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from pyroute2 import IPRoute, NetNS, NlEthtool
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from fastrelay.kernel.stats import PIN_ROOT
from fastrelay.netns import entered

MAX_SUBSCRIBERS = 56 * 256 - 1  # link numbers must keep 10.{200 + k // 256} below 10.256
HOST_IFNAME = "eth0"

_LAB_NAME = re.compile(r"[a-z0-9]{1,8}")
_LAB_NS = re.compile(r"fr-([a-z0-9]{1,8})-(relay|pub|s([0-9]+))")


@dataclass(frozen=True)
class Link:
    """One veth pair between the relay and an endpoint namespace, with its addressing."""

    index: int
    netns: str
    ifname: str
    mac: str
    ipv4: str
    ipv6: str
    relay_ifname: str
    relay_mac: str
    relay_ipv4: str
    relay_ipv6: str


def _check_name(name: str) -> str:
    if not _LAB_NAME.fullmatch(name):
        raise ValueError(f"lab name must match ^[a-z0-9]{{1,8}}$, got {name!r}")
    return name


def _make_link(k: int, ns: str, relay_ifname: str) -> Link:
    mac = f"02:fa:57:{k >> 8:02x}:{k & 255:02x}:0"
    ipv4 = f"10.{200 + k // 256}.{k % 256}."
    ipv6 = ipaddress.IPv6Address(f"fd00:fa57:0:{k:x}::")
    return Link(
        index=k,
        netns=ns,
        ifname=HOST_IFNAME,
        mac=mac + "2",
        ipv4=ipv4 + "2",
        ipv6=str(ipv6 + 2),
        relay_ifname=relay_ifname,
        relay_mac=mac + "1",
        relay_ipv4=ipv4 + "1",
        relay_ipv6=str(ipv6 + 1),
    )


def _write_sysctls(ns: str, values: dict[str, str]) -> None:
    """Write ``/proc/sys/<key>`` entries as seen from namespace ``ns``."""
    with entered(ns):
        for key, value in values.items():
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)


def _tx_checksum_off(interfaces: list[tuple[str, str]]) -> None:
    """Run ``ethtool -K <if> tx off`` for every ``(namespace, ifname)``, concurrently."""
    procs = []
    for ns, ifname in interfaces:
        with entered(ns):  # the child inherits the thread's namespace
            procs.append(
                subprocess.Popen(
                    ["ethtool", "-K", ifname, "tx", "off"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
    results = [(proc, proc.communicate()[1]) for proc in procs]
    for proc, stderr in results:
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, stderr=stderr)


def _sync_link_state(ns: str, ifnames: list[str]) -> None:
    """Apply pending carrier changes of ``ifnames`` in ``ns`` now.

    The kernel's linkwatch may defer a veth's carrier-on handling (operstate UP,
    IPv6 link-local address) by up to a second; an ethtool link-state query runs
    the pending event at once, so the lab is settled when ``Lab.up`` returns.
    """
    with entered(ns):
        ethtool = NlEthtool()
    with ethtool:
        for ifname in ifnames:
            ethtool.get_linkstate(ifname=ifname)


def _configure(ipr: IPRoute, ifname: str, ipv4: str, ipv6: str) -> None:
    """Address ``ifname`` (IPv6 without DAD, so usable at once) and bring it up."""
    (index,) = ipr.link_lookup(ifname=ifname)
    ipr.addr("add", index=index, address=ipv4, prefixlen=24)
    ipr.addr("add", index=index, address=ipv6, prefixlen=64, flags=IFA_F_NODAD)
    ipr.link("set", index=index, state="up")


def _lo_up(ipr: IPRoute) -> None:
    (index,) = ipr.link_lookup(ifname="lo")
    ipr.link("set", index=index, state="up")


def list_labs() -> dict[str, list[str]]:
    """Map each lab name to its namespaces (relay, pub, s0, s1, ...) currently present."""
    found: dict[str, list[tuple[int, str]]] = {}
    for ns in pyroute2_netns.listnetns():
        if match := _LAB_NS.fullmatch(ns):
            lab, role, sub = match.groups()
            order = int(sub) if sub is not None else (-2 if role == "relay" else -1)
            found.setdefault(lab, []).append((order, ns))
    return {lab: [ns for _, ns in sorted(entries)] for lab, entries in sorted(found.items())}


def destroy(name: str) -> list[str]:
    """Remove every namespace of lab ``name`` and return the names removed."""
    removed = list_labs().get(_check_name(name), [])
    for ns in removed:
        pyroute2_netns.remove(ns)
    shutil.rmtree(pin_dir(name), ignore_errors=True)  # impairments persisted by `fastrelay lab impair`
    with contextlib.suppress(OSError):
        os.rmdir(PIN_ROOT)  # only when no other lab keeps pins there
    return removed


def pin_dir(name: str) -> str:
    """Where a lab's persisted BPF objects are pinned (bpffs)."""
    return f"{PIN_ROOT}/lab-{name}"


class Lab:
    """Relay, publisher and ``subscribers`` namespaces, each endpoint veth-linked to the relay.

    Use as a context manager (``with Lab("x", 8) as lab: ...``) so the
    namespaces are always removed, or call :meth:`up` and :meth:`down`.
    By default TX checksum offload is switched off on both ends of every veth
    so UDP checksums are really computed; ``sub_mtu`` maps subscriber numbers
    to an MTU for both ends of their link.
    """

    def __init__(
        self,
        name: str = "lab",
        subscribers: int = 4,
        *,
        checksum_offload: bool = False,
        sub_mtu: dict[int, int] | None = None,
    ) -> None:
        self.name = _check_name(name)
        if not 0 <= subscribers <= MAX_SUBSCRIBERS:
            raise ValueError(f"subscribers must be in [0, {MAX_SUBSCRIBERS}], got {subscribers}")
        self.sub_mtu = dict(sub_mtu or {})
        if bad := [i for i in self.sub_mtu if not 0 <= i < subscribers]:
            raise ValueError(f"sub_mtu names unknown subscribers: {bad}")
        self.checksum_offload = checksum_offload
        self.relay_ns = f"fr-{name}-relay"
        self.publisher = _make_link(0, f"fr-{name}-pub", "pub0")
        self.subscribers = [_make_link(i + 1, f"fr-{name}-s{i}", f"sub{i}") for i in range(subscribers)]

    @property
    def links(self) -> list[Link]:
        """The publisher link followed by the subscriber links."""
        return [self.publisher, *self.subscribers]

    @property
    def namespaces(self) -> list[str]:
        """All namespaces of this lab, relay first."""
        return [self.relay_ns, *(link.netns for link in self.links)]

    def up(self) -> Self:
        """Build the lab, replacing a stale one of the same name; on failure remove it again."""
        destroy(self.name)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Remove all namespaces of this lab (their veths go with them); idempotent."""
        destroy(self.name)

    def ifindex(self, netns: str, ifname: str) -> int:
        """Return the index of ``ifname`` in namespace ``netns`` (OSError if absent)."""
        with entered(netns):
            return socket.if_nametoindex(ifname)

    def __enter__(self) -> Self:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def _mtu(self, link: Link) -> dict[str, int]:
        mtu = self.sub_mtu.get(link.index - 1) if link.index else None
        return {} if mtu is None else {"mtu": mtu}

    def _build(self) -> None:
        for ns in self.namespaces:
            pyroute2_netns.create(ns)
        _write_sysctls(self.relay_ns, {"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0"})
        with NetNS(self.relay_ns, flags=0) as ipr:
            _lo_up(ipr)
            for link in self.links:
                mtu = self._mtu(link)
                ipr.link(
                    "add",
                    ifname=link.relay_ifname,
                    kind="veth",
                    address=link.relay_mac,
                    **mtu,
                    peer={"ifname": link.ifname, "address": link.mac, "net_ns_fd": link.netns, **mtu},
                )
                _configure(ipr, link.relay_ifname, link.relay_ipv4, link.relay_ipv6)
        for link in self.links:
            with NetNS(link.netns, flags=0) as ipr:
                _lo_up(ipr)
                _configure(ipr, link.ifname, link.ipv4, link.ipv6)
                ipr.route("add", dst="0.0.0.0/0", gateway=link.relay_ipv4)
                ipr.route("add", dst="::/0", gateway=link.relay_ipv6)
        for link in self.subscribers:
            keys = ("all", "default", link.ifname)
            _write_sysctls(link.netns, {f"net/ipv4/conf/{key}/rp_filter": "1" for key in keys})
        if not self.checksum_offload:
            _tx_checksum_off(
                [(self.relay_ns, link.relay_ifname) for link in self.links]
                + [(link.netns, link.ifname) for link in self.links]
            )
        _sync_link_state(self.relay_ns, [link.relay_ifname for link in self.links])
        for link in self.links:
            _sync_link_state(link.netns, [link.ifname])
