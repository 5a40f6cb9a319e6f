"""One-way delay probes: a BPF timestamp at the publisher's egress and at each receiver's
ingress (same clock), aggregated in the kernel into per-receiver histograms.

Receivers are identified by their interface MAC (the destination MAC of what they get).
"""

from __future__ import annotations

import ctypes
import socket
from dataclasses import dataclass
from typing import Self

from ..kernel import abi
from ..kernel.attach import TcLink
from ..kernel.objects import BpfObject, Program
from ..netns import entered


def bucket_low(idx: int) -> int:
    """Smallest delay (ns) counted in histogram bucket `idx` (inverse of bucket_of in lab_probe.bpf.c)."""
    if idx < 16:
        return idx
    msb, sub = idx // 16 + 3, idx % 16
    return (16 + sub) << (msb - 4)


def bucket_mid(idx: int) -> float:
    return (bucket_low(idx) + bucket_low(idx + 1)) / 2 if idx >= 16 else float(idx)


@dataclass
class Delays:
    """Aggregated results of one receiver (or of several, merged)."""

    packets: int
    bytes: int
    matched: int
    max_ns: int
    buckets: list[int]

    def percentile(self, q: float) -> float:
        """Delay in ns at quantile q (0..1), bucket midpoint; nan when nothing matched."""
        total = sum(self.buckets)
        if not total:
            return float("nan")
        rank, seen = q * total, 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank and n:
                return min(bucket_mid(i), float(self.max_ns))
        return float(self.max_ns)

    def cdf(self) -> tuple[list[float], list[float]]:
        """(delay ns, cumulative fraction) points for plotting."""
        total = sum(self.buckets) or 1
        xs, ys, seen = [], [], 0
        for i, n in enumerate(self.buckets):
            if n:
                seen += n
                xs.append(bucket_mid(i))
                ys.append(seen / total)
        return xs, ys

    def __add__(self, other: Delays) -> Delays:
        return Delays(self.packets + other.packets, self.bytes + other.bytes, self.matched + other.matched,
                      max(self.max_ns, other.max_ns), [a + b for a, b in zip(self.buckets, other.buckets, strict=True)])


def _mac_key(mac: str) -> abi.ProbeMac:
    key = abi.ProbeMac()
    key.addr[:] = bytes.fromhex(mac.replace(":", ""))
    return key


class DelayProbe:
    """Attach the probe pair. `tx` = (netns, ifname) of the sender; `rx` = [(netns, ifname, mac)]."""

    def __init__(self, tx: tuple[str, str], rx: list[tuple[str, str, str]], *, sink: bool = False,
                 tag_offset: int = 0, scan: int = 0) -> None:
        """`scan` > 0: the tag is the first found in that many payload bytes from `tag_offset`
        (tags inside QUIC frames sit at varying offsets); 0: exactly at `tag_offset`."""
        if not 0 <= scan <= abi.FR_PROBE_SCAN_MAX:
            raise ValueError(f"scan must be within 0..{abi.FR_PROBE_SCAN_MAX}")
        if len(rx) > abi.FR_PROBE_SLOTS:
            raise ValueError(f"at most {abi.FR_PROBE_SLOTS} probe receivers")
        self.obj = BpfObject.load("lab_probe")
        self.links: list[TcLink] = []
        self._cfg = self.obj.map("fr_probe_cfg", ctypes.c_uint32, abi.ProbeConfig)
        self._slots = self.obj.map("fr_probe_slots", abi.ProbeMac, ctypes.c_uint32)
        self._hist = self.obj.map("fr_probe_hist", ctypes.c_uint32, abi.ProbeHist)
        self.obj.map("fr_probe_ts", ctypes.c_uint32, abi.ProbeTs)
        self._cfg.update(0, abi.ProbeConfig(tag_offset=tag_offset, sink=int(sink), scan=scan))
        self.n = len(rx)
        try:
            tx_prog, rx_prog = self.obj.program("fr_probe_tx"), self.obj.program("fr_probe_rx")
            self._attach(tx_prog, tx[0], tx[1], "egress")
            for slot, (ns, ifname, mac) in enumerate(rx):
                self._slots.update(_mac_key(mac), ctypes.c_uint32(slot))
                self._attach(rx_prog, ns, ifname, "ingress")
        except Exception:
            self.close()
            raise

    def _attach(self, prog: Program, ns: str, ifname: str, direction: str) -> None:
        with entered(ns):
            self.links.append(TcLink(prog.fd, prog.name, socket.if_nametoindex(ifname), direction))

    def set_sink(self, sink: bool) -> None:
        cfg = self._cfg.lookup(0)
        cfg.sink = int(sink)
        self._cfg.update(0, cfg)

    def reset(self) -> None:
        """Zero every receiver's histogram."""
        for slot in range(self.n):
            self._hist.update(slot, abi.ProbeHist())

    def read(self) -> list[Delays]:
        """Per-receiver results, summed over CPUs."""
        out = []
        for slot in range(self.n):
            per_cpu = self._hist.lookup(slot)
            d = Delays(0, 0, 0, 0, [0] * abi.FR_HIST_BUCKETS)
            for h in per_cpu:
                d = d + Delays(h.packets, h.bytes, h.matched, h.max_ns, list(h.buckets))
            out.append(d)
        return out

    def close(self) -> None:
        for link in self.links:
            link.detach()
        self.links = []
        self.obj.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
