"""The UDP fan-out relay: one socket, one data path, a control socket, one selector loop."""

from __future__ import annotations

import ipaddress
import itertools
import logging
import resource
import selectors
import signal
import socket
import time
from typing import Any

from pyroute2 import IPRoute

from .control import ControlServer
from .datapath import Datapath, KernelDatapath, Subscriber, UserspaceDatapath
from .endpoints import Endpoint, parse_endpoint

log = logging.getLogger("fastrelay.fanout")

RECV_BATCH = 256
KERNEL_TICK_S = 0.05  # records are consumed at least this often (and whenever 256 KiB wait)
IDLE_TICK_S = 0.5


def interfaces_for(listen: Endpoint, names: list[str] | None) -> list[int]:
    """Ingress interfaces to attach to: the named ones; else the interface owning the listen
    address; for a wildcard address, every interface but loopback."""
    if names:
        try:
            return [socket.if_nametoindex(n) for n in names]
        except OSError:
            raise ValueError(f"unknown interface in {names}") from None
    if ipaddress.ip_address(listen.ip).is_unspecified:
        return [idx for idx, name in socket.if_nameindex() if name != "lo"]
    with IPRoute() as ip:
        owners = sorted({a["index"] for a in ip.get_addr(family=listen.family) if a.get("IFA_ADDRESS") == listen.ip})
    if not owners:
        raise ValueError(f"{listen.ip} is not an address of this host")
    return owners


class FanoutRelay:
    """Receives datagrams on `listen` and copies each to every subscriber."""

    def __init__(self, listen: Endpoint, datapath: str = "kernel", *, control: str | None = None,
                 interfaces: list[str] | None = None, source: str | None = None,
                 neighbour_refresh: float = 5.0) -> None:
        if datapath not in ("kernel", "userspace"):
            raise ValueError(f"unknown data path {datapath!r} (kernel or userspace)")
        if source is not None and parse_endpoint(source, 1).family != listen.family:
            raise ValueError("--source must be of the listen address's family")
        self.listen = listen
        self.source = source and parse_endpoint(source, 1).ip
        self._ids = itertools.count(1)
        self.received = 0
        self.dropped_source = 0
        self._buf = bytearray(65536)
        self._stop = False
        self.control: ControlServer | None = None
        self.datapath: Datapath | None = None
        self.sock = socket.socket(listen.family, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            self.sock.bind(listen.sockaddr)
            self.sock.setblocking(False)
            if datapath == "kernel":
                self.datapath = KernelDatapath(self.sock, listen, interfaces_for(listen, interfaces), self.source,
                                               neighbour_refresh)
            else:
                self.datapath = UserspaceDatapath(self.sock)
            self.control = ControlServer(control, self.handle) if control else None
        except BaseException:
            self.close()  # nothing of ours stays in the kernel when start-up fails half-way
            raise

    # ---- control
    def add(self, addr: str) -> Subscriber:
        ep = parse_endpoint(addr)
        if ep.family != self.listen.family:
            raise ValueError(f"{ep}: address family differs from the relay's ({self.listen})")
        if any(s.endpoint == ep for s in self.datapath.subs.values()):
            raise ValueError(f"{ep} is already subscribed")
        sub = Subscriber(next(self._ids), ep)
        self.datapath.add(sub)
        log.info("subscriber %d added: %s", sub.id, ep)
        return sub

    def remove(self, sub_id: int | None = None, addr: str | None = None) -> Subscriber:
        if sub_id is None and addr is not None:
            ep = parse_endpoint(addr)
            sub_id = next((s.id for s in self.datapath.subs.values() if s.endpoint == ep), None)
        sub = self.datapath.remove(sub_id) if sub_id is not None else None
        if sub is None:
            raise ValueError(f"no such subscriber ({sub_id if sub_id is not None else addr})")
        log.info("subscriber %d removed: %s", sub.id, sub.endpoint)
        return sub

    def stats(self) -> dict[str, Any]:
        out = {
            "datapath": self.datapath.name,
            "listen": str(self.listen),
            "received": self.received,
            "dropped_source": self.dropped_source,
            "subscribers": [s.as_dict() for s in self.datapath.subs.values()],
            "kernel": self.datapath.counters(),
        }
        ru = resource.getrusage(resource.RUSAGE_SELF)  # last, so the snapshot covers building the reply
        out["cpu_s"] = ru.ru_utime + ru.ru_stime
        return out

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "add":
            return {"id": self.add(str(req["addr"])).id}
        if op == "remove":
            sub = self.remove(req.get("id"), req.get("addr"))
            return {"removed": sub.as_dict()}
        if op == "list":
            return {"subscribers": [s.as_dict() for s in self.datapath.subs.values()]}
        if op == "stats":
            self.datapath.poll()
            return self.stats()
        raise ValueError(f"unknown op {op!r} (add, remove, list, stats)")

    # ---- data
    def _drain(self) -> None:
        for _ in range(RECV_BATCH):
            try:
                n, addr = self.sock.recvfrom_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP errors reported on the socket
                log.debug("recv: %s", exc)
                continue
            self.received += 1
            if self.source and addr[0] != self.source:
                self.dropped_source += 1
                continue
            self.datapath.forward(memoryview(self._buf)[:n])

    def stop(self, *_: object) -> None:
        self._stop = True

    def run(self) -> None:
        """Serve until stop() (SIGTERM/SIGINT call it)."""
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "data")
        if self.datapath.fileno() is not None:
            sel.register(self.datapath.fileno(), selectors.EVENT_READ, "datapath")
        if self.control:
            sel.register(self.control.sock, selectors.EVENT_READ, "listen")
        tick = KERNEL_TICK_S if isinstance(self.datapath, KernelDatapath) else IDLE_TICK_S
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        next_poll = time.monotonic()
        try:
            while not self._stop:
                for key, _ in sel.select(tick):
                    if key.data == "data":
                        self._drain()
                    elif key.data == "datapath":
                        self.datapath.poll()
                    elif key.data == "listen":
                        conn = self.control.accept()
                        if conn:
                            sel.register(conn, selectors.EVENT_READ, "conn")
                    elif key.data == "conn" and not self.control.on_readable(key.fileobj):
                        sel.unregister(key.fileobj)
                now = time.monotonic()
                if now >= next_poll:
                    self.datapath.poll()
                    next_poll = now + tick
        finally:
            sel.close()

    def close(self) -> None:
        """Detach programs, free maps, close sockets (safe on a half-built relay)."""
        if self.control:
            self.control.close()
        if self.datapath:
            self.datapath.close()
        self.sock.close()
