"""`fastrelay relay` as a process: self-signed certificate, Prometheus endpoint, GOAWAY and exit."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_relay_process_serves_metrics_and_stops_cleanly(tmp_path):
    quic, http = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    relay = subprocess.Popen([sys.executable, "-m", "fastrelay", "relay", f"moqt://127.0.0.1:{quic}",
                              "--state-dir", str(tmp_path), "--metrics", f"127.0.0.1:{http}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        text = ""
        for _ in range(100):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=1).read().decode()
                break
            except OSError:
                time.sleep(0.05)
        assert "fastrelay_moq_sessions 0.0" in text and "fastrelay_moq_objects_out_total" in text
        sub = subprocess.run([sys.executable, "-m", "fastrelay", "subscribe", f"moqt://127.0.0.1:{quic}",
                              "-N", "x", "-T", "y", "--raw", "--duration", "1"], capture_output=True, text=True)
        assert sub.returncode == 1 and "SUBSCRIBE refused" in sub.stderr  # nobody publishes x: one clear line
        relay.send_signal(signal.SIGTERM)
        out, err = relay.communicate(timeout=10)
    finally:
        if relay.poll() is None:
            relay.kill()
    assert relay.returncode == 0
    assert json.loads(out.strip().splitlines()[-1])["sessions"] == 1
    assert "self-signed certificate" in err  # it says so
    assert (tmp_path / "selfsigned.crt").exists()


def test_bad_relay_arguments_get_one_clear_line(tmp_path):
    for args, message in ((["relay", "http://127.0.0.1:1"], "expected moqt://"),
                          (["relay", "moqt://127.0.0.1:4443", "--cert", "/nonexistent.pem", "--key", "/x"],
                           "no such file"),
                          (["publish", "moqt://127.0.0.1:4443", "-N", "a//b", "-T", "t"], "non-empty fields")):
        res = subprocess.run([sys.executable, "-m", "fastrelay", *args, "--state-dir", str(tmp_path)]
                             if args[0] == "relay" else [sys.executable, "-m", "fastrelay", *args],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 1 and message in res.stderr, (args, res.stderr)
