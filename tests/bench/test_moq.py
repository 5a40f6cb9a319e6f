"""`fastrelay bench moq --datapath ...`: real relay, publisher and subscriber processes on loopback."""

import json
import subprocess
import sys

KEYS = {"relay", "datapath", "fanout", "objects_per_s", "latency_p50_ms", "latency_p99_ms", "cpu_ms_per_object",
        "lost"}


def test_userspace_run_reports_every_case_with_its_data_path():
    res = subprocess.run([sys.executable, "-m", "fastrelay", "bench", "moq", "--datapath", "userspace", "--fanouts",
                          "2", "--seconds", "1", "--rate", "200", "--size", "300", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    cases = json.loads(res.stdout.strip().splitlines()[-1])["cases"]
    fast = [c for c in cases if c["relay"] == "fastrelay"]
    assert len(fast) == 1 and all(set(c) == KEYS and c["datapath"] == "userspace" for c in cases)
    c = fast[0]
    assert c["fanout"] == 2 and c["lost"] == 0 and 300 < c["objects_per_s"] <= 400
    assert 0 < c["latency_p50_ms"] <= c["latency_p99_ms"] and c["cpu_ms_per_object"] > 0


def test_a_data_path_that_does_not_exist_yet_is_refused():
    res = subprocess.run([sys.executable, "-m", "fastrelay", "bench", "moq", "--datapath", "kernel"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "invalid choice: 'kernel'" in res.stderr
