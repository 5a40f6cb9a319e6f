"""In-memory MoQT session pairs for deterministic tests (no sockets)."""

from __future__ import annotations

from fastrelay.moq.params import Version
from fastrelay.moq.session import MoqtSession


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
