"""Control socket protocol over a real unix socket, driven without the relay."""

import selectors
import threading

import pytest

from fastrelay.fanout.control import ControlServer, request


@pytest.fixture
def server(tmp_path):
    def handler(req):
        if req["op"] == "echo":
            return {"echo": req.get("value")}
        raise ValueError(f"unknown op {req['op']!r}")

    srv = ControlServer(str(tmp_path / "ctl.sock"), handler)
    stop = threading.Event()

    def loop():
        sel = selectors.DefaultSelector()
        sel.register(srv.sock, selectors.EVENT_READ, None)
        while not stop.is_set():
            for key, _ in sel.select(0.05):
                if key.data is None:
                    conn = srv.accept()
                    if conn:
                        sel.register(conn, selectors.EVENT_READ, "conn")
                elif not srv.on_readable(key.fileobj):
                    sel.unregister(key.fileobj)
        sel.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv
    stop.set()
    t.join()
    srv.close()


def test_request_reply(server):
    assert request(server.path, {"op": "echo", "value": 3}) == {"ok": True, "echo": 3}


def test_errors_are_replies_not_crashes(server):
    assert request(server.path, {"op": "nope"}) == {"ok": False, "error": "unknown op 'nope'"}
    assert request(server.path, {"value": 1})["ok"] is False
    assert request(server.path, {"op": "echo"})["ok"] is True  # still serving


def test_malformed_json_and_oversized_requests(server):
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server.path)
        s.sendall(b"{not json\n")
        assert b'"ok": false' in s.recv(4096)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server.path)
        s.sendall(b"x" * (70 * 1024))
        assert b"too large" in s.recv(4096)
    assert request(server.path, {"op": "echo"})["ok"] is True


def test_socket_is_private_and_removed_on_close(tmp_path):
    import os
    import stat

    srv = ControlServer(str(tmp_path / "c.sock"), lambda r: {})
    assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
    srv.close()
    assert not os.path.exists(srv.path)
