"""The two fan-out data paths behind one interface.

The relay core calls `add`/`remove`/`forward`/`poll`/`stats` and never knows which one
runs. Userspace sends every copy from Python; kernel copies in a TC program and only
reads a ring-buffer record per copy afterwards.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from ..kernel import abi
from ..kernel.attach import TcLink
from ..kernel.features import l4_csum_ipv6_flag
from ..kernel.objects import BpfObject
from ..kernel.stats import prog_run_stats
from ..nexthop import NextHop, NextHopError, Resolver
from .endpoints import Endpoint

log = logging.getLogger("fastrelay.fanout")


@dataclass
class Subscriber:
    id: int
    endpoint: Endpoint
    kernel_copies: int = 0
    user_copies: int = 0
    bytes: int = 0
    send_errors: int = 0
    hop: NextHop | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "addr": str(self.endpoint), "kernel_copies": self.kernel_copies,
                "user_copies": self.user_copies, "bytes": self.bytes, "send_errors": self.send_errors,
                "kernel_path": self.hop is not None, "next_hop_mac": self.hop.dst_mac if self.hop else None}


class Datapath(ABC):
    """What the relay core needs from a data path."""

    name: str

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.subs: dict[int, Subscriber] = {}

    def add(self, sub: Subscriber) -> None:
        self.subs[sub.id] = sub

    def remove(self, sub_id: int) -> Subscriber | None:
        return self.subs.pop(sub_id, None)

    def forward(self, data: memoryview) -> None:
        """Send one datagram that reached userspace to every subscriber."""
        for sub in self.subs.values():
            try:
                self.sock.sendto(data, sub.endpoint.sockaddr)
                sub.user_copies += 1
                sub.bytes += len(data)
            except OSError:
                sub.send_errors += 1

    def fileno(self) -> int | None:
        """An fd to wait on for data-path work, if any."""
        return None

    def poll(self) -> None:
        """Do pending data-path work (drain records, refresh state)."""

    @abstractmethod
    def counters(self) -> dict[str, int]: ...

    def close(self) -> None:
        """Release everything the data path holds in the kernel."""


class UserspaceDatapath(Datapath):
    """Every copy is a sendto() from Python."""

    name = "userspace"

    def counters(self) -> dict[str, int]:
        return {}


class KernelDatapath(Datapath):
    """Copies are made by bpf/udp_fanout.bpf.c at TC ingress of `interfaces`.

    Only what the kernel passes up reaches `forward` (GSO-merged skbs arrive segmented,
    oversize packets, reassembled fragments): userspace sends those, so nothing is lost.
    A new subscriber whose next hop is not known yet gets a resolution window during which
    every packet goes through userspace (the kernel's neighbour queue then holds its copies,
    as for the userspace path); one still unresolved after it is kept out of the kernel set.
    """

    name = "kernel"
    RECORD_BUDGET = 1 << 16  # records decoded per batch; a full batch means "read again"
    RESOLVE_WINDOW_S = 3.0  # about the kernel's own ARP/ND retry time
    RESOLVE_RETRY_S = 0.05

    def __init__(self, sock: socket.socket, listen: Endpoint, interfaces: list[int],
                 source: str | None = None, neighbour_refresh: float = 5.0) -> None:
        super().__init__(sock)
        self._refresh_s = neighbour_refresh
        self._family = listen.family
        self._port = listen.port
        self._listen_ip = None if ipaddress.ip_address(listen.ip).is_unspecified else listen.ip
        # copies come from the address subscribers talk to, as a socket bound to it would send;
        # with a wildcard listen address, from the route's preferred source (like an unbound socket)
        self._source = source
        self._pending: dict[int, float] = {}  # subscriber id -> end of its resolution window
        self._active_idx = 0
        self.links: list[TcLink] = []
        self.obj = BpfObject.load("udp_fanout")
        try:
            self.prog = self.obj.program("fr_udp_fanout")
            self._cfg = self.obj.map("fr_fanout_cfg", ctypes.c_uint32, abi.FanoutConfig)
            self._sets = self.obj.map("fr_fanout_sets", ctypes.c_uint32, abi.FanoutSet)
            self._active = self.obj.map("fr_fanout_active", ctypes.c_uint32, ctypes.c_uint32)
            self._local = self.obj.map("fr_fanout_local", abi.Addr, ctypes.c_uint8)
            self._sync = self.obj.map("fr_fanout_sync", ctypes.c_uint32, ctypes.c_uint32)
            self._sync_inner = ctypes.c_uint32(self.obj.map_fd("fr_fanout_sync_inner"))
            self._stats = self.obj.map("fr_fanout_stats", ctypes.c_uint32, ctypes.c_uint64)
            self._counter_names = {v: k.removeprefix("FR_FC_").lower()
                                   for k, v in self.obj.enum("fr_fanout_counter").items() if k != "FR_FC_MAX"}
            self._events = self.obj.ringbuf("fr_fanout_events", abi.FanoutEvent, "fr_fanout_event")
            self._resolver = Resolver()
            prog_run_stats(self.prog.fd)  # loads the kernel BTF layout once, at start rather than mid-run
            self._sync_local_addresses()
            self._publish([])
            self._write_config(max_len=0)
            self._next_refresh = time.monotonic() + self._refresh_s
            self._next_retry = 0.0
            for ifindex in interfaces:
                self.links.append(TcLink(self.prog.fd, self.prog.name, ifindex, "ingress"))
        except BaseException:
            self.close()
            raise
        log.info("kernel data path attached (%s) to ifindex %s",
                 ", ".join(sorted({link.mode for link in self.links})), interfaces)

    # ---- kernel state
    def _write_config(self, max_len: int) -> None:
        cfg = abi.FanoutConfig(port=socket.htons(self._port), family=self._family, max_len=max_len,
                               csum_v6_flags=l4_csum_ipv6_flag() if self._family == socket.AF_INET6 else 0)
        if self._listen_ip:
            raw = socket.inet_pton(self._family, self._listen_ip)
            ctypes.memmove(cfg.dst_addr, raw, len(raw))
        else:
            cfg.dst_any = 1
        if self._source:
            cfg.src_filter = 1
            raw = socket.inet_pton(self._family, self._source)
            ctypes.memmove(cfg.src_addr, raw, len(raw))
        self._cfg.update(0, cfg)

    def _sync_local_addresses(self) -> None:
        """For a wildcard listen address: the kernel relays only what is addressed to us."""
        if self._listen_ip:
            return
        want = {socket.inet_pton(self._family, a).ljust(16, b"\0")
                for a in self._resolver.local_addresses(self._family)}
        have = {bytes(k.bytes) for k in self._local.keys()}  # noqa: SIM118 (Map.keys iterates the map)
        for raw in want - have:
            key = abi.Addr()
            key.bytes[:] = raw
            self._local.update(key, ctypes.c_uint8(1))
        for raw in have - want:
            key = abi.Addr()
            key.bytes[:] = raw
            self._local.delete(key)

    def _publish(self, subs: list[Subscriber]) -> None:
        """Write the inactive set whole, flip the active index, then wait for a grace period
        (updating the map-in-map returns only when every running program has finished), so
        the set flipped away from is no longer read by anyone when it is next rewritten."""
        nxt = 1 - self._active_idx
        fs = abi.FanoutSet(count=len(subs))
        for i, sub in enumerate(subs):
            hop = sub.hop
            e = fs.subs[i]
            e.id, e.ifindex = sub.id, hop.ifindex
            e.dst_mac[:] = bytes.fromhex(hop.dst_mac.replace(":", ""))
            e.src_mac[:] = bytes.fromhex(hop.src_mac.replace(":", ""))
            e.dst_port, e.src_port = socket.htons(sub.endpoint.port), socket.htons(self._port)
            dst = socket.inet_pton(self._family, sub.endpoint.ip)
            src = socket.inet_pton(self._family, self._listen_ip or hop.src_ip)
            ctypes.memmove(e.dst_ip, dst, len(dst))
            ctypes.memmove(e.src_ip, src, len(src))
        self._sets.update(nxt, fs)
        self._active.update(0, ctypes.c_uint32(nxt))
        self._active_idx = nxt
        self._sync.update(0, self._sync_inner)

    def _rebuild(self) -> None:
        ready = [s for s in self.subs.values() if s.hop is not None]
        # while a new subscriber resolves, everything goes up so it misses nothing; otherwise
        # the kernel forwards what fits every egress link and larger packets go up
        max_len = 0 if self._pending else min((s.hop.mtu for s in ready), default=0)
        self._write_config(max_len)
        self._publish(ready)

    # ---- next hops
    def _apply(self, results: dict[str, NextHop | NextHopError], subs: list[Subscriber]) -> bool:
        """Store resolution results; True if the kernel set must change."""
        changed = False
        for sub in subs:
            res = results[sub.endpoint.ip]
            if isinstance(res, NextHop):
                if res != sub.hop:
                    sub.hop, changed = res, True
                if self._pending.pop(sub.id, None) is not None:
                    changed = True
            elif sub.hop is not None:
                log.warning("subscriber %s: %s; kept out of the kernel path until it resolves", sub.endpoint, res)
                sub.hop, changed = None, True
        return changed

    def add(self, sub: Subscriber) -> None:
        if sub.endpoint.family != self._family:
            raise ValueError(f"{sub.endpoint}: address family differs from the relay's listen address")
        if len(self.subs) >= abi.FR_MAX_SUBSCRIBERS:
            raise ValueError(f"at most {abi.FR_MAX_SUBSCRIBERS} subscribers on the kernel path")
        super().add(sub)
        try:
            sub.hop = self._resolver.resolve(sub.endpoint.ip, wait=0.2)
        except NextHopError as exc:
            log.info("subscriber %s: %s; relaying through userspace while it resolves", sub.endpoint, exc)
            self._pending[sub.id] = time.monotonic() + self.RESOLVE_WINDOW_S
        self._rebuild()

    def remove(self, sub_id: int) -> Subscriber | None:
        self.poll_events()  # its last copies are accounted before it goes
        sub = super().remove(sub_id)
        if sub is not None:
            self._pending.pop(sub_id, None)
            self._rebuild()
        return sub

    # ---- periodic work
    def fileno(self) -> int:
        return self._events.fileno()

    def poll_events(self) -> int:
        """Account every copy the kernel reported (one record each) to its subscriber."""
        total = 0
        while True:
            # one batch per call unless it was full: "until empty" never ends under sustained traffic
            recs = self._events.consume(self.RECORD_BUDGET)
            total += len(recs)
            if len(recs):
                # subscriber ids are small, dense-ish integers: count by id in O(n)
                copies = np.bincount(recs["sub_id"])
                nbytes = np.bincount(recs["sub_id"], weights=recs["bytes"])
                for sub_id in np.flatnonzero(copies).tolist():
                    sub = self.subs.get(sub_id)
                    if sub is not None:  # records of a subscriber removed meanwhile are dropped
                        sub.kernel_copies += int(copies[sub_id])
                        sub.bytes += int(nbytes[sub_id])
            if len(recs) < self.RECORD_BUDGET:
                return total

    def poll(self) -> None:
        self.poll_events()
        now = time.monotonic()
        changed = False
        if self._pending and now >= self._next_retry:
            self._next_retry = now + self.RESOLVE_RETRY_S
            waiting = [self.subs[i] for i in self._pending]
            changed = self._apply(self._resolver.resolve_all([s.endpoint.ip for s in waiting]), waiting)
            for sub_id, deadline in list(self._pending.items()):
                if now >= deadline:
                    del self._pending[sub_id]
                    changed = True
                    log.warning("subscriber %s does not answer neighbour discovery; kept out of the kernel"
                                " path (it gets only what userspace sends) until it does",
                                self.subs[sub_id].endpoint)
        if now >= self._next_refresh:
            self._next_refresh = now + self._refresh_s
            subs = list(self.subs.values())
            if self._apply(self._resolver.resolve_all([s.endpoint.ip for s in subs], revalidate=True), subs):
                log.info("next hops changed; kernel subscriber set rebuilt")
                changed = True
            self._sync_local_addresses()
        if changed:
            self._rebuild()

    def counters(self) -> dict[str, int]:
        values = self._stats.sum_counters()
        out = {name: values[i] for i, name in self._counter_names.items()}
        run = prog_run_stats(self.prog.fd)
        out["bpf_run_ns"], out["bpf_run_cnt"] = run.run_time_ns, run.run_cnt
        out["ringbuf_foreign_records"] = self._events.foreign_records
        return out

    def close(self) -> None:
        for link in self.links:
            link.detach()
        self.links = []
        if hasattr(self, "_events"):
            self._events.close()
        if hasattr(self, "_resolver"):
            self._resolver.close()
        self.obj.close()
