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
                "kernel_path": self.hop is not None}


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
    """

    name = "kernel"
    MIN_FLIP_INTERVAL_S = 0.002
    RECORD_BUDGET = 1 << 16  # in-flight packets finish with the old set well within this

    def __init__(self, sock: socket.socket, listen: Endpoint, interfaces: list[int],
                 source: str | None = None, neighbour_refresh: float = 5.0) -> None:
        super().__init__(sock)
        self._refresh_s = neighbour_refresh
        self.obj = BpfObject.load("udp_fanout")
        self.prog = self.obj.program("fr_udp_fanout")
        self._cfg = self.obj.map("fr_fanout_cfg", ctypes.c_uint32, abi.FanoutConfig)
        self._sets = self.obj.map("fr_fanout_sets", ctypes.c_uint32, abi.FanoutSet)
        self._active = self.obj.map("fr_fanout_active", ctypes.c_uint32, ctypes.c_uint32)
        self._stats = self.obj.map("fr_fanout_stats", ctypes.c_uint32, ctypes.c_uint64)
        self._counter_names = {v: k.removeprefix("FR_FC_").lower()
                               for k, v in self.obj.enum("fr_fanout_counter").items() if k != "FR_FC_MAX"}
        self._events = self.obj.ringbuf("fr_fanout_events", abi.FanoutEvent, "fr_fanout_event")
        self._resolver = Resolver()
        self._family = listen.family
        self._port = listen.port
        # copies come from the address subscribers talk to, as a socket bound to it would send;
        # with a wildcard listen address, from the route's preferred source (like an unbound socket)
        self._src_ip = None if ipaddress.ip_address(listen.ip).is_unspecified else listen.ip
        self._source = source
        self._active_idx = 0
        self._generation = 0
        self._last_flip = 0.0
        self._next_refresh = time.monotonic() + self._refresh_s
        prog_run_stats(self.prog.fd)  # loads the kernel BTF layout once, at start rather than mid-run
        self._publish([])
        self._write_config(max_len=0)
        self.links: list[TcLink] = []
        try:
            for ifindex in interfaces:
                self.links.append(TcLink(self.prog.fd, self.prog.name, ifindex, "ingress"))
        except Exception:
            self.close()
            raise
        log.info("kernel data path attached (%s) to ifindex %s",
                 ", ".join(sorted({link.mode for link in self.links})), interfaces)

    def _write_config(self, max_len: int) -> None:
        cfg = abi.FanoutConfig(port=socket.htons(self._port), family=self._family, max_len=max_len)
        if self._source:
            cfg.src_filter = 1
            raw = socket.inet_pton(self._family, self._source)
            ctypes.memmove(cfg.src_addr, raw, len(raw))
        self._cfg.update(0, cfg)


    def _resolve(self, sub: Subscriber, revalidate: bool = False) -> bool:
        """Look the subscriber's next hop up; True if it changed. A refresh never blocks the loop."""
        try:
            hop = self._resolver.resolve(sub.endpoint.ip, wait=0.0 if revalidate else 0.2, revalidate=revalidate)
        except NextHopError as exc:
            lost = sub.hop is not None
            if lost or not revalidate:
                log.warning("subscriber %s: %s; kept out of the kernel path until it resolves", sub.endpoint, exc)
            sub.hop = None
            return lost
        changed = hop != sub.hop
        sub.hop = hop
        return changed

    def _publish(self, subs: list[Subscriber]) -> None:
        """Write the inactive set whole, then flip the active index (one 4-byte update)."""
        wait = self._last_flip + self.MIN_FLIP_INTERVAL_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        nxt = 1 - self._active_idx
        self._generation += 1
        fs = abi.FanoutSet(count=len(subs), generation=self._generation)
        for i, sub in enumerate(subs):
            hop = sub.hop
            e = fs.subs[i]
            e.id, e.ifindex = sub.id, hop.ifindex
            e.dst_mac[:] = bytes.fromhex(hop.dst_mac.replace(":", ""))
            e.src_mac[:] = bytes.fromhex(hop.src_mac.replace(":", ""))
            e.dst_port, e.src_port = socket.htons(sub.endpoint.port), socket.htons(self._port)
            dst = socket.inet_pton(self._family, sub.endpoint.ip)
            src = socket.inet_pton(self._family, self._src_ip or hop.src_ip)
            ctypes.memmove(e.dst_ip, dst, len(dst))
            ctypes.memmove(e.src_ip, src, len(src))
        self._sets.update(nxt, fs)
        self._active.update(0, ctypes.c_uint32(nxt))
        self._active_idx = nxt
        self._last_flip = time.monotonic()

    def _rebuild(self) -> None:
        ready = [s for s in self.subs.values() if s.hop is not None]
        if len(ready) > abi.FR_MAX_SUBSCRIBERS:
            raise ValueError(f"at most {abi.FR_MAX_SUBSCRIBERS} subscribers on the kernel path")
        # the kernel forwards only what fits every egress link; larger packets go up to userspace
        self._write_config(max_len=min((s.hop.mtu for s in ready), default=0))
        self._publish(ready)

    def add(self, sub: Subscriber) -> None:
        if sub.endpoint.family != self._family:
            raise ValueError(f"{sub.endpoint}: address family differs from the relay's listen address")
        if len(self.subs) >= abi.FR_MAX_SUBSCRIBERS:
            raise ValueError(f"at most {abi.FR_MAX_SUBSCRIBERS} subscribers on the kernel path")
        super().add(sub)
        self._resolve(sub)
        self._rebuild()

    def remove(self, sub_id: int) -> Subscriber | None:
        sub = super().remove(sub_id)
        if sub is not None:
            self._rebuild()
            self.poll_events()  # records of its last copies
        return sub

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
                    if sub is not None:  # records of a removed subscriber are dropped
                        sub.kernel_copies += int(copies[sub_id])
                        sub.bytes += int(nbytes[sub_id])
            if len(recs) < self.RECORD_BUDGET:
                return total

    def poll(self) -> None:
        self.poll_events()
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + self._refresh_s
            changed = [self._resolve(s, revalidate=True) for s in list(self.subs.values())]
            if any(changed):
                log.info("next hops changed; kernel subscriber set rebuilt")
                self._rebuild()

    def counters(self) -> dict[str, int]:
        values = self._stats.sum_counters()
        out = {name: values[i] for i, name in self._counter_names.items()}
        run = prog_run_stats(self.prog.fd)
        out["bpf_run_ns"], out["bpf_run_cnt"] = run.run_time_ns, run.run_cnt
        out["ringbuf_foreign_records"] = self._events.foreign_records
        return out

    def close(self) -> None:
        for link in getattr(self, "links", []):
            link.detach()
        self.links = []
        if hasattr(self, "_events"):
            self._events.close()
        if hasattr(self, "_resolver"):
            self._resolver.close()
        self.obj.close()
