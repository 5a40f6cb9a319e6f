"""`fastrelay bench moq --datapath ...`: real relay, publisher and subscriber processes on loopback."""

import json
import subprocess
import sys

KEYS = {"relay", "datapath", "fanout", "objects_per_s", "latency_p50_ms", "latency_p99_ms", "cpu_ms_per_object",
        "lost"}
FANOUT, SECONDS, RATE = 2, 1, 200


def test_userspace_run_reports_every_relay_with_its_data_path(tmp_path):
    report_md = tmp_path / "BENCHMARKS.md"
    res = subprocess.run([sys.executable, "-m", "fastrelay", "bench", "moq", "--datapath", "userspace", "--fanouts",
                          str(FANOUT), "--seconds", str(SECONDS), "--rate", str(RATE), "--size", "300", "--json",
                          "--write", str(report_md)],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["failed"] == []
    cases = {c["relay"]: c for c in report["cases"]}
    assert set(cases) == {"fastrelay", "aiomoqt", "moq-dev"}  # the dev extras install both peers
    assert all(set(c) == KEYS and c["datapath"] == "userspace" and c["fanout"] == FANOUT for c in cases.values())
    c = cases["fastrelay"]
    assert c["lost"] == 0 and 300 < c["objects_per_s"] <= 400
    assert 0 < c["latency_p50_ms"] <= c["latency_p99_ms"] and c["cpu_ms_per_object"] > 0
    # moq-dev's relay forwards a group's first subgroup only (object 0 of 30) and drops the objects'
    # extension headers, the publisher's send time with them
    m = cases["moq-dev"]
    assert 0 < m["objects_per_s"] < c["objects_per_s"] / 4
    assert m["lost"] > 0 and m["latency_p50_ms"] is None and m["cpu_ms_per_object"] > 0
    text = report_md.read_text()
    assert "vs aiomoqt's and moq-dev's relays" in text and "moq-dev's relay takes one stream per group" in text


def test_a_data_path_that_does_not_exist_yet_is_refused():
    res = subprocess.run([sys.executable, "-m", "fastrelay", "bench", "moq", "--datapath", "kernel"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "invalid choice: 'kernel'" in res.stderr
