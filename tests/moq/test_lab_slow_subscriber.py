"""A rate-limited subscriber in the lab (TBF) through the real relay: it skips groups and stays
current; the other subscriber gets everything; the relay's buffering stays bounded."""

import json
import subprocess
import sys
import time

import pytest

from fastrelay.lab import impair
from fastrelay.lab.topology import Lab
from fastrelay.netns import exec_argv

pytestmark = pytest.mark.usefixtures("root")

PORT, METRICS = 4443, 9464
RATE, SIZE, GOP, SECONDS = 400, 1200, 20, 6  # about 3.8 Mbit/s of objects


def fr(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastrelay", *args]


def test_slow_subscriber_skips_ahead_and_does_not_hold_back_the_other(tmp_path):
    with Lab("tq", 2) as lab:
        impair.rate_limit(lab.relay_ns, lab.subscribers[1].relay_ifname, "1mbit", burst="16kb", latency="100ms")
        relay = subprocess.Popen(exec_argv(lab.relay_ns, fr("relay", f"moqt://0.0.0.0:{PORT}", "--state-dir",
                                                             str(tmp_path), "--max-backlog", "300000",
                                                             "--metrics", f"127.0.0.1:{METRICS}")),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs = [relay]
        try:
            time.sleep(1.5)
            pub = subprocess.Popen(exec_argv(lab.publisher.netns, fr(
                "publish", f"moqt://{lab.publisher.relay_ipv4}:{PORT}", "-N", "lab", "-T", "t", "--source",
                "synthetic", "--fps", str(RATE), "--object-size", str(SIZE), "--gop", str(GOP),
                "--duration", str(SECONDS), "--wait", "10")), stdout=subprocess.PIPE, text=True)
            procs.append(pub)
            time.sleep(0.3)
            subs = [subprocess.Popen(exec_argv(link.netns, fr(
                "subscribe", f"moqt://{link.relay_ipv4}:{PORT}", "-N", "lab", "-T", "t", "--raw",
                "--duration", str(SECONDS + 8))), stdout=subprocess.PIPE, text=True) for link in lab.subscribers]
            procs += subs
            sent = json.loads(pub.communicate(timeout=60)[0].strip().splitlines()[-1])
            fast, slow = (json.loads(p.communicate(timeout=60)[0].strip().splitlines()[-1]) for p in subs)
            text = relay_metrics(lab)
            dropped = float(next(line.split()[1] for line in text.splitlines()
                                 if line.startswith("fastrelay_moq_dropped_objects_total")))
            print(json.dumps({"sent": sent, "fast": fast, "slow": slow, "dropped": dropped}))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait(10)
    # the fast one may join a group or two after the slow one started the upstream subscription: from the
    # group it joined on it gets every object, once
    assert fast["first_group"] <= 5, fast
    assert fast["objects"] == sent["objects"] - fast["first_group"] * GOP, (sent, fast)
    assert fast["lost"] == 0 and fast["duplicates"] == 0 and fast["bad"] == 0, fast
    assert 0 < slow["objects"] < sent["objects"] and slow["duplicates"] == 0
    assert dropped > 0  # the relay skipped groups for the slow one instead of buffering them
    last = (sent["objects"] - 1) // GOP
    assert slow["last_group"] >= last - 2  # it kept up with the live edge
    assert slow["latency_p99_ms"] < 3000  # bounded backlog: no ever-growing delay


def relay_metrics(lab: Lab) -> str:
    """The relay's Prometheus text, fetched from inside its namespace (where it listens)."""
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{METRICS}/metrics').read().decode())"
    return subprocess.run(exec_argv(lab.relay_ns, [sys.executable, "-c", code]), capture_output=True, text=True,
                          check=True).stdout
