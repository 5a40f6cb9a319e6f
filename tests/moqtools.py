"""Helpers the MoQT tests of several folders share (tests/moq, tests/endpoints; imported as
`moqtools`, like labtools: pytest puts tests/ on sys.path).

- In memory, no sockets: Pipe and pair() (two sessions), connect() (a session attached to a
  Relay), Publisher (a publisher endpoint writing groups), messages()/objects() (what events
  carried).
- Over real QUIC on loopback: free_port(), relay_server() (serve_relay in this process),
  relay_process() (`fastrelay relay` as a process), announced(), synthetic().
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager, contextmanager

from fastrelay.endpoints.endpoint import serve_relay
from fastrelay.media.h264 import SyntheticSource
from fastrelay.moq import messages as m
from fastrelay.moq.data import Object, subgroup_header_for
from fastrelay.moq.params import FilterType, MessageParams, SubscriptionFilter, Version
from fastrelay.moq.relay import Relay
from fastrelay.moq.session import MessageReceived, MoqtSession, ObjectReceived
from fastrelay.quic.tls import self_signed

NS, TRACK = (b"live", b"cam"), b"video"
# the filter a SUBSCRIBE needs for a joining FETCH to name it (draft-16 / -14 section 9.16.2)
LARGEST = MessageParams(subscription_filter=SubscriptionFilter(FilterType.LARGEST_OBJECT))


# ---- in memory ------------------------------------------------------------------------------------

class Pipe:
    """One side of an in-memory QUIC-like connection; delivers synchronously to its peer."""

    def __init__(self, client: bool) -> None:
        self.client = client
        self.peer: Pipe | None = None
        self.session: MoqtSession | None = None
        self._next = {False: 0 if client else 1, True: 2 if client else 3}
        self.closed_with: tuple[int, str] | None = None
        self.stopped: list[tuple[int, int]] = []
        self.backlog_bytes = 0  # what backlog() reports: tests make a subscriber "slow" with it
        self.window_bytes = 1 << 30

    def backlog(self) -> int:
        return self.backlog_bytes

    def send_window(self) -> int:
        return self.window_bytes

    def open_stream(self, unidirectional: bool) -> int:
        sid = self._next[unidirectional]
        self._next[unidirectional] += 4
        return sid

    def send(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        self.peer.session.stream_data(stream_id, data, fin)

    def send_datagram(self, data: bytes) -> None:
        self.peer.session.datagram(data)

    def reset(self, stream_id: int, code: int) -> None:
        self.peer.session.stream_reset(stream_id, code)

    def stop(self, stream_id: int, code: int) -> None:
        self.stopped.append((stream_id, code))

    def close(self, code: int = 0, reason: str = "") -> None:
        self.closed_with = (code, reason)
        self.peer.session.terminated(code, reason)


def pair(version: Version, window: int = 8):
    c, s = Pipe(True), Pipe(False)
    c.peer, s.peer = s, c
    cev, sev = [], []
    c.session = MoqtSession(c, client=True, version=version, on_event=cev.append, max_request_id=window)
    s.session = MoqtSession(s, client=False, version=version, on_event=sev.append, max_request_id=window)
    c.session.start()
    return c, s, cev, sev


def connect(relay: Relay, version: Version, name: str):
    c, s = Pipe(True), Pipe(False)
    c.peer, s.peer = s, c
    events: list = []
    c.session = MoqtSession(c, client=True, version=version, on_event=events.append)
    holder = {}
    s.session = MoqtSession(s, client=False, version=version, on_event=lambda e: relay.on_event(holder["peer"], e))
    holder["peer"] = relay.attach(s.session, name)
    c.session.start()
    return c, events


def messages(events, cls):
    return [e.message for e in events if isinstance(e, MessageReceived) and isinstance(e.message, cls)]


def objects(events, alias=None):
    return [(e.object.group_id, e.object.object_id, e.object.payload) for e in events
            if isinstance(e, ObjectReceived) and (alias is None or e.track_alias == alias)]


class Publisher:
    """A publisher endpoint answering the relay's SUBSCRIBE and writing groups (one subgroup
    stream per group, opened by its first object)."""

    def __init__(self, relay: Relay, version: Version, namespace: tuple[bytes, ...] = NS) -> None:
        self.pipe, self.events = connect(relay, version, "pub")
        self.version = version
        s = self.pipe.session
        self.ns_request = s.next_request_id()
        s.send(m.PublishNamespace(self.ns_request, namespace))
        assert messages(self.events, m.RequestOk)
        self.alias = 42
        self.writers: dict = {}

    def answer_subscribes(self, extensions: tuple = (), largest=None) -> int:
        from fastrelay.moq.params import MessageParams

        subs = messages(self.events, m.Subscribe)
        for sub in subs:
            self.pipe.session.send(m.SubscribeOk(sub.request_id, self.alias, MessageParams(largest_object=largest),
                                                 extensions))
        self.events.clear()
        return len(subs)

    def write(self, group: int, obj: int, fin: bool = False, priority: int | None = 10, size: int = 0) -> None:
        """`priority` None: the header's DEFAULT_PRIORITY bit (the track's priority, draft-16)."""
        writer = self.writers.get(group)
        if writer is None:
            prio = 10 if priority is None else priority
            header = subgroup_header_for(self.alias, group, 0, 0, publisher_priority=prio,
                                         default_priority=prio if priority is None else None,
                                         version=self.version, extensions=True)
            writer = self.writers[group] = self.pipe.session.open_subgroup(header)
        payload = f"g{group}o{obj}".encode().ljust(size, b".")
        writer.write(Object(group, 0, obj, priority, extensions=[(2, obj)], payload=payload), fin=fin)


# ---- over QUIC on loopback ------------------------------------------------------------------------

def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A free loopback port (UDP by default)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def relay_server(tmp_path, relay: Relay | None = None):
    """A relay (by default one caching 4 groups) served on a free loopback port: (relay, url)."""
    relay = relay if relay is not None else Relay(cache_groups=4)
    cert, key = self_signed(["127.0.0.1"])
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    port = free_port()
    server = await serve_relay(relay, "127.0.0.1", port, str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    try:
        yield relay, f"moqt://127.0.0.1:{port}"
    finally:
        server.close()


async def announced(relay: Relay) -> None:
    """Until the publisher's PUBLISH_NAMESPACE has reached the relay (a SUBSCRIBE before it is refused)."""
    while not any(p.namespaces for p in relay.peers.values()):
        await asyncio.sleep(0.01)


def synthetic(count: int, fps: float = 300.0) -> SyntheticSource:
    return SyntheticSource(object_size=900, keyframe_size=3000, fps=fps, gop=30, count=count, realtime=True)


@contextmanager
def relay_process(tmp_path, *args: str, metrics: int | None = None):
    """`fastrelay relay` on a free loopback port; yields (process, url) once it listens."""
    port = free_port(socket.SOCK_DGRAM)
    log = tmp_path / f"relay-{port}.log"
    extra = ["--metrics", f"127.0.0.1:{metrics}"] if metrics else []
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fastrelay", "relay", f"moqt://127.0.0.1:{port}",
                                 "--state-dir", str(tmp_path / "state"), *extra, *args],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        for _ in range(200):
            if "MoQT relay on" in log.read_text() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()
        yield proc, f"moqt://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
