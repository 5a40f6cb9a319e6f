"""A rate-limited subscriber in the lab (TBF) through the real relay's userspace data path: it
skips groups and stays current; the other subscriber gets everything; the relay's buffering
stays bounded."""

import subprocess

import pytest
from labtools import (
    PORT,
    assert_complete,
    broken_subgroups,
    fr,
    lab_name,
    last_json,
    metrics,
    received_argv,
    received_objects,
    relay,
)

from fastrelay.lab import impair
from fastrelay.lab.topology import Lab
from fastrelay.netns import exec_argv

pytestmark = pytest.mark.usefixtures("root")

RATE, SIZE, GOP, SECONDS = 400, 1200, 20, 6  # about 3.8 Mbit/s of objects


def test_slow_subscriber_skips_ahead_and_does_not_hold_back_the_other(tmp_path):
    with Lab(lab_name("tq"), 2) as lab:
        slow_link = lab.subscribers[1]
        impair.rate_limit(lab.relay_ns, slow_link.relay_ifname, "1mbit", burst="16kb", latency="100ms")
        with relay(lab, tmp_path, "--max-backlog", "300000", datapath="userspace") as r:
            pub = subprocess.Popen(exec_argv(lab.publisher.netns, fr(
                "publish", f"moqt://{lab.publisher.relay_ipv4}:{PORT}", "-N", "lab", "-T", "t", "--source",
                "synthetic", "--fps", str(RATE), "--object-size", str(SIZE), "--gop", str(GOP),
                "--duration", str(SECONDS), "--wait", "10")), stdout=subprocess.PIPE, text=True)
            r.published()
            link = lab.subscribers[0]
            fast_proc = subprocess.Popen(exec_argv(link.netns, fr(
                "subscribe", f"moqt://{link.relay_ipv4}:{PORT}", "-N", "lab", "-T", "t", "--raw",
                "--duration", str(SECONDS + 8))), stdout=subprocess.PIPE, text=True)
            # the slow one lists what it received: which objects of each group it lost
            slow_proc = subprocess.Popen(exec_argv(slow_link.netns, received_argv(
                f"moqt://{slow_link.relay_ipv4}:{PORT}", "lab", "t", SECONDS + 8)), stdout=subprocess.PIPE, text=True)
            try:
                sent = last_json(pub)
                fast, slow = last_json(fast_proc), last_json(slow_proc)
                dropped = metrics(lab)["fastrelay_moq_dropped_objects_total"]
            finally:
                for p in (pub, fast_proc, slow_proc):
                    if p.poll() is None:
                        p.kill()
                        p.communicate()
    received = received_objects(slow)
    print({"sent": sent, "fast": fast, "slow": slow, "dropped": dropped})
    # the fast one may join a group or two after the slow one started the upstream subscription: from the
    # group it joined on it gets every object, once (counted: see assert_complete)
    assert fast["first_group"] <= 5, fast
    assert_complete(fast, sent["objects"], GOP)
    assert 0 < slow["objects"] < sent["objects"] and slow["duplicates"] == 0 and slow["bad"] == 0, slow
    assert dropped > 0  # the relay skipped groups for the slow one instead of buffering them
    # what the slow one lost went whole subgroups at a time (or their ends, a stream reset part
    # way): never an object missing with later ones of its subgroup delivered
    broken = broken_subgroups(received, GOP)
    assert not broken, broken
    last = (sent["objects"] - 1) // GOP
    assert slow["last_group"] >= last - 2  # it kept up with the live edge
    assert slow["latency_p99_ms"] < 3000  # bounded backlog: no ever-growing delay
