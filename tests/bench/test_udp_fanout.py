"""`fastrelay bench udp-fanout --quick --json`: both data paths, fan-out 1/4/16/64, under 60 s, on its own lab."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from fastrelay.bench.udp_fanout import LAB
from fastrelay.lab.topology import list_labs

pytestmark = pytest.mark.usefixtures("root")

KEYS = {"datapath", "fanout", "copies_per_s", "loss", "cpu_us_per_copy", "delay_p50_us", "delay_p99_us"}
FANOUTS = [1, 4, 16, 64]


def wait_for_no_bench_lab(timeout: float = 180) -> None:
    """Another bench run owns the lab while its namespaces exist: never tear it down under it."""
    deadline = time.monotonic() + timeout
    while LAB in list_labs():
        assert time.monotonic() < deadline, f"lab {LAB!r} still present ({list_labs()[LAB][:3]}...)"
        time.sleep(1)


def test_quick_json_covers_every_fanout_and_both_paths_in_under_a_minute():
    wait_for_no_bench_lab()
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "fastrelay", "bench", "udp-fanout", "--quick", "--json"],
                         capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    assert elapsed < 60, f"--quick took {elapsed:.1f} s"
    assert LAB not in list_labs()  # its namespaces are gone

    cases = json.loads(res.stdout.strip().splitlines()[-1])["cases"]
    assert {(c["datapath"], c["fanout"]) for c in cases} == {(d, f) for d in ("kernel", "userspace") for f in FANOUTS}
    equal = {}
    for c in cases:
        assert c.keys() >= KEYS, c
        assert all(isinstance(c[k], float | int) and math.isfinite(c[k]) for k in KEYS - {"datapath"}), c
        assert c["copies_per_s"] > 0 and c["cpu_us_per_copy"] > 0, c
        # copies from one case must not spill into the next: more delivered than sent x fan-out is a leak
        assert -0.001 <= c["loss"] <= 1, c
        assert 0 < c["delay_p50_us"] <= c["delay_p99_us"], c
        if c["load"] == "equal":
            equal.setdefault(c["fanout"], {})[c["datapath"]] = c["offered_pps"]
    for fanout in FANOUTS:  # the same traffic for both data paths
        assert equal[fanout]["kernel"] == equal[fanout]["userspace"] > 0
