"""Control socket of a running relay: JSON lines over a unix stream socket.

Requests: {"op": "add", "addr": "10.0.0.2:5000"}, {"op": "remove", "id": 3} (or "addr"),
{"op": "list"}, {"op": "stats"}. Replies: {"ok": true, ...} or {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fastrelay.control")

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_REQUEST = 64 * 1024


class ControlServer:
    """Non-blocking server; the relay's selector loop calls `on_readable` for its sockets."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        if os.path.exists(path):
            os.unlink(path)  # a stale socket of a dead relay
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self._bufs: dict[socket.socket, bytes] = {}

    def accept(self) -> socket.socket | None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return None
        conn.setblocking(False)
        self._bufs[conn] = b""
        return conn

    def on_readable(self, conn: socket.socket) -> bool:
        """Serve complete request lines; False when the connection is finished."""
        try:
            data = conn.recv(MAX_REQUEST)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return False
        buf = self._bufs[conn] + data
        if len(buf) > MAX_REQUEST:
            self._reply(conn, {"ok": False, "error": "request too large"})
            self._drop(conn)
            return False
        *lines, self._bufs[conn] = buf.split(b"\n")
        for line in lines:
            if line.strip():
                self._reply(conn, self._dispatch(line))
        return True

    def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise ValueError("expected a JSON object with an 'op'")
            return {"ok": True, **self._handler(req)}
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            return {"ok": False, "error": str(exc) or type(exc).__name__}
        except Exception as exc:  # a failing request must not take the relay down
            log.exception("control request %r failed", line[:200])
            return {"ok": False, "error": f"internal error: {exc}"}

    def _reply(self, conn: socket.socket, obj: dict[str, Any]) -> None:
        """Send without blocking the relay: a client that does not read its replies is dropped."""
        data = memoryview(json.dumps(obj).encode() + b"\n")
        try:
            while data:
                data = data[conn.send(data):]
        except BlockingIOError:
            log.warning("control client does not read its replies; disconnected")
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _drop(self, conn: socket.socket) -> None:
        self._bufs.pop(conn, None)
        conn.close()

    def close(self) -> None:
        for conn in list(self._bufs):
            self._drop(conn)
        self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def request(path: str, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to a relay's control socket and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"relay at {path} closed the connection")
            buf += chunk
    return json.loads(buf)
