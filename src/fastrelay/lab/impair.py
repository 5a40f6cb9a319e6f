"""Link impairments for the lab: random loss (BPF, since this kernel has no netem),
rate limiting (TBF) and delay (netem, where the kernel has it)."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess

from ..kernel import abi
from ..kernel.attach import TcLink, remove_stale
from ..kernel.objects import BpfObject
from ..netns import entered, exec_argv


class ImpairmentUnavailable(RuntimeError):
    """The kernel lacks what an impairment needs (e.g. sch_netem)."""


class RandomLoss:
    """Drop data packets on (netns, ifname, direction) with probability `p`.

    Neighbour discovery (ARP, ICMPv6 ND) is spared, so loss never stalls address resolution.
    """

    def __init__(self, netns: str, ifname: str, p: float, direction: str = "ingress") -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError("loss probability must be within 0..1")
        self.obj = BpfObject.load("lab_dropper")
        prog = self.obj.program("fr_lab_drop")
        self._stats = self.obj.map("fr_drop_stats", ctypes.c_uint32, ctypes.c_uint64)
        self._names = {v: k.removeprefix("FR_DC_").lower()
                       for k, v in self.obj.enum("fr_drop_counter").items() if k != "FR_DC_MAX"}
        cfg = self.obj.map("fr_drop_cfg", ctypes.c_uint32, abi.DropConfig)
        cfg.update(0, abi.DropConfig(threshold=min(int(p * 2**32), 2**32 - 1)))
        try:
            with entered(netns):
                self.link = TcLink(prog.fd, prog.name, socket.if_nametoindex(ifname), direction)
        except Exception:
            self.obj.close()
            raise

    def persist(self, pin_path: str) -> None:
        """Keep dropping after this process exits (see TcLink.persist); undo with clear_loss()."""
        self.link.persist(pin_path)
        self.obj.close()

    def counters(self) -> dict[str, int]:
        values = self._stats.sum_counters()
        return {name: values[i] for i, name in self._names.items()}

    def close(self) -> None:
        self.link.detach()
        self.obj.close()


def clear_loss(netns: str, ifname: str, pin_path: str, direction: str = "ingress") -> None:
    """Remove a persisted RandomLoss: its pin (tcx) or its clsact filter."""
    if os.path.exists(pin_path):
        os.unlink(pin_path)
    with entered(netns):
        remove_stale(socket.if_nametoindex(ifname), direction)


def _tc(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(exec_argv(netns, ["tc", *args]), capture_output=True, text=True, check=False)


def rate_limit(netns: str, ifname: str, rate: str, burst: str = "32kb", latency: str = "50ms") -> None:
    """Shape egress of `ifname` with TBF (rate like '5mbit')."""
    res = _tc(netns, "qdisc", "replace", "dev", ifname, "root", "tbf", "rate", rate, "burst", burst,
              "latency", latency)
    if res.returncode != 0:
        raise ImpairmentUnavailable(f"tbf on {netns}/{ifname}: {res.stderr.strip()}")


def delay(netns: str, ifname: str, ms: float, jitter_ms: float = 0.0) -> None:
    """Delay egress of `ifname` with netem; ImpairmentUnavailable where the kernel has no netem."""
    args = ["qdisc", "replace", "dev", ifname, "root", "netem", "delay", f"{ms}ms"]
    if jitter_ms:
        args.append(f"{jitter_ms}ms")
    res = _tc(netns, *args)
    if res.returncode != 0:
        raise ImpairmentUnavailable(f"netem delay needs sch_netem, which this kernel lacks ({res.stderr.strip()})")


def clear(netns: str, ifname: str) -> None:
    """Remove the root qdisc (TBF or netem) of `ifname`."""
    _tc(netns, "qdisc", "del", "dev", ifname, "root")
