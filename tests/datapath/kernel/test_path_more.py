"""More of the MoQT relay's kernel data path in the lab (issue 4): a rate-limited subscriber,
join/leave churn, standard-crypto and plaintext peers side by side, IPv6.

Real relay, publisher and subscriber processes in the lab's namespaces; the helpers of
test_path.py and labtools start them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

import pytest
from labtools import (
    PORT,
    Relay,
    assert_complete,
    broken_subgroups,
    fr,
    lab_name,
    last_json,
    metrics,
    received_argv,
    received_objects,
    relay,
    wait_until,
)

from fastrelay.lab import impair
from fastrelay.lab.topology import Lab
from fastrelay.netns import exec_argv

from .conftest import RelayMaps
from .test_path import GOP, SIZE, publisher, subscribers

pytestmark = pytest.mark.usefixtures("root")


@pytest.fixture(scope="module")
def lab(root):
    with Lab(lab_name("tkq"), 3) as lab:
        yield lab


def subscriber_objects(lab: Lab, i: int, seconds: float) -> subprocess.Popen:
    """One plaintext subscriber on link `i` whose summary lists every (group, object) received."""
    link = lab.subscribers[i]
    return subprocess.Popen(exec_argv(link.netns, received_argv(f"moqt://{link.relay_ipv4}:{PORT}", "live", "v",
                                                                seconds, plaintext=True)),
                            stdout=subprocess.PIPE, text=True)


def churn(lab: Lab, i: int, n: int, seconds: float, stagger: float) -> subprocess.Popen:
    """`n` plaintext subscriber sessions on link `i`, one starting every `stagger` s, each `seconds` long."""
    link = lab.subscribers[i]
    return subprocess.Popen(exec_argv(link.netns, [
        sys.executable, "-m", "fastrelay.lab.moq_load", f"moqt://{link.relay_ipv4}:{PORT}", "-N", "live", "-T", "v",
        "--subscribers", str(n), "--stagger", str(stagger), "--duration", str(seconds), "--verify",
        "--insecure-plaintext"]), stdout=subprocess.PIPE, text=True)


def aiomoqt_subscriber(lab: Lab, i: int, seconds: float) -> subprocess.Popen:
    """aiomoqt's example subscriber (standard QUIC crypto, draft 16) on link `i`."""
    link = lab.subscribers[i]
    env = {k: v for k, v in os.environ.items() if k not in ("DRAFT", "MOQT_DRAFT")}
    return subprocess.Popen(exec_argv(link.netns, [
        sys.executable, "-m", "aiomoqt.examples.sub_example", f"moqt://{link.relay_ipv4}:{PORT}", "-N", "live",
        "-T", "v", "-k", "--draft", "16", "-t", str(seconds)]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env)


def aiomoqt_total(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, int]:
    """(objects, groups) from sub_example's closing 'Total:' line."""
    out = proc.communicate(timeout=timeout)[0]
    found = re.search(r"Total: ([\d,]+) objects, ([\d,]+) groups", out)
    assert found, out[-3000:]
    return int(found[1].replace(",", "")), int(found[2].replace(",", ""))


def on_kernel_path(r: Relay) -> list[str]:
    """The addresses of the subscribers that took the kernel path."""
    return [ip for ip, _ in r.joined()]


def test_rate_limited_subscriber_loses_only_low_priority_subgroups(lab, tmp_path):
    """TBF below the stream's rate on one subscriber's link: the kernel skips or abandons whole
    dependent-frame subgroups (priority 0x80 > --protect-priority 64) for it, keeps sending its
    keyframe subgroups; the other subscriber gets everything."""
    # 300 objects/s of 1000 bytes: about 2.5 Mbit/s on the wire into a 1 Mbit/s link; the
    # keyframes (subgroup 0, priority 0x10, one object per group) need a twentieth of that
    rate, seconds = 300, 5
    slow = lab.subscribers[1]
    impair.rate_limit(lab.relay_ns, slow.relay_ifname, "1mbit")
    try:
        with relay(lab, tmp_path) as r:
            pub = publisher(lab, seconds=seconds, rate=rate)
            r.published()
            fast_proc = subscribers(lab, 0, 1)
            slow_proc = subscriber_objects(lab, 1, seconds + 8)
            sent = last_json(pub)
            (fast,) = last_json(fast_proc)
            got = last_json(slow_proc)
            m = metrics(lab)
    finally:
        impair.clear(lab.relay_ns, slow.relay_ifname)
    published, last = sent["objects"], (sent["objects"] - 1) // GOP
    assert_complete(fast, published, GOP)
    received = received_objects(got)
    assert got["duplicates"] == 0 and got["bad"] == 0 and len(received) == got["objects"], got
    groups = range(got["first_group"], last + 1)
    keys = sum((g, 0) in received for g in groups) / len(groups)
    deps = (len(received) - keys * len(groups)) / (len(groups) * (GOP - 1))
    # the link was too slow for everything: the kernel skipped or abandoned low-priority subgroups ...
    assert m['fastrelay_moq_kernel_packets_total{counter="skip_congestion"}'] > 0, m
    assert deps < 0.8, (keys, deps, got)
    # ... whole: in every group the dependent frames that arrived are one run from the group's
    # start (a subgroup skipped leaves none, one given up part way its first ones), never a
    # frame missing with later ones of its subgroup delivered
    broken = broken_subgroups(received, GOP)
    assert not broken, broken
    # ... while every keyframe subgroup arrived, to the live edge
    # (a keyframe lost at the TBF queue is re-sent by aioquic; the kernel's low-priority subgroups
    # yield the congestion window to it: repair holds)
    missing = [g for g in groups if (g, 0) not in received]
    runs = Counter(sum(1 for group, obj in received if group == g and obj) for g in groups)
    print("dependent share", deps, "groups by dependent frames received", sorted(runs.items()),
          "keyframes missing in groups", missing, "repair holds",
          m['fastrelay_moq_kernel_path_events_total{event="repair_holds"}'])
    assert not missing, (keys, deps, missing, got)
    assert got["last_group"] >= last - 2, got


def test_join_leave_churn_keeps_the_steady_subscriber_whole_and_leaves_no_map_entries(lab, tmp_path):
    """100 sessions of half a second each join (cache, then the kernel at the next group) and
    leave while one subscriber stays throughout."""
    # keep the relay below overload: a CONNECTION_CLOSE its socket drops keeps that connection
    # (and its map entries) until the idle timeout
    rate, seconds, sessions = 50, 14, 100
    with relay(lab, tmp_path) as r:
        pub = publisher(lab, seconds=seconds, rate=rate)
        r.published()
        steady_proc = subscribers(lab, 0, 1, seconds=seconds + 8)
        ((_, steady_slot),) = r.wait_joined(1)  # the steady one is on the kernel path before any churn
        maps = RelayMaps(r.proc.pid)
        churners = [churn(lab, i, sessions // 2, 0.5, 0.15) for i in (1, 2)]
        short = [s for p in churners for s in last_json(p)]
        assert pub.poll() is None, "the churn outlasted the stream"
        joined = r.joined()
        assert joined[0] == (lab.subscribers[0].ipv4, steady_slot), joined

        def steady_only(c: dict[str, set[int]]) -> bool:  # its open streams may have no entry between groups
            return c["dstream"] <= {steady_slot} and all(v == {steady_slot} for k, v in c.items() if k != "dstream")

        # every per-connection map forgot each session: slot, state, connection ids both ways (the
        # ACK absorption's fr_moq_hcid too), subscriptions, streams and the tracks' fan-out sets
        # (a departing QUIC connection drains first: wait for it)
        wait_until(maps.connections, 10, "only the steady subscriber in the per-connection maps", ok=steady_only)
        sent = last_json(pub)
        (steady,) = last_json(steady_proc)
        # and once the steady one and the publisher left too, every map is empty
        wait_until(maps.connections, 10, "empty per-connection maps", ok=lambda c: not any(c.values()))
        wait_until(maps.publishers, 10, "empty per-publisher maps", ok=lambda p: not any(p.values()))
        left = r.kernel_lines()
    assert len(short) == sessions
    for summary in short:
        assert "error" not in summary and summary["objects"] > 0, summary
        # (their "lost" is an estimate that counts the group a session was cut off in)
        assert summary["duplicates"] == summary["bad"] == 0, summary
    assert_complete(steady, sent["objects"], GOP)
    # every session took the kernel path and left it again
    assert len(joined) == sessions + 1 and len(left) == sessions + 1, (len(joined), len(left))


def test_standard_crypto_and_plaintext_subscribers_side_by_side(lab, tmp_path):
    """aiomoqt and a fastrelay subscriber without plaintext mode stay on the userspace path of the
    relay whose kernel serves the plaintext subscribers, at the same time; all get the stream."""
    seconds = 4
    with relay(lab, tmp_path) as r:
        pub = publisher(lab, seconds=seconds)
        r.published()
        plain = subscribers(lab, 0, 2)
        crypto = subscribers(lab, 1, 1, plaintext=False)
        other = aiomoqt_subscriber(lab, 2, seconds + 5)  # its own timer must not cut the tail
        sent = last_json(pub)
        results = last_json(plain)
        (standard,) = last_json(crypto)
        objects, groups = aiomoqt_total(other)
        m = metrics(lab)
    for summary in (*results, standard):
        assert_complete(summary, sent["objects"], GOP)
    # only the plaintext subscribers were served by the kernel, the others by userspace
    assert on_kernel_path(r) == [lab.subscribers[0].ipv4] * 2, r.log
    assert [k > u for k, u in r.kernel_lines()] == [True, True], r.kernel_lines()
    assert m["fastrelay_moq_fast_objects_total"] > 0
    # ... and the others spoke standard QUIC crypto: plaintext were the publisher and those two
    assert r.log.count("packet protection disabled on connection") == 3, r.log
    for link in lab.subscribers[1:]:
        assert f"session ('{link.ipv4}'," in r.log
    # aiomoqt subscribed on the live edge and received the rest of the stream: every group after
    # the one it joined in is whole. (When it joins depends on how fast Python starts it on a
    # loaded machine: at least half the stream is asked for, not a start within 0.2 s.)
    assert groups >= sent["objects"] // GOP // 2 and objects >= (groups - 1) * GOP, (objects, groups, sent)


def test_ipv6(lab, tmp_path):
    """Publisher and subscribers reach the relay over IPv6: the kernel path forwards in IPv6."""
    rate, seconds = 200, 3
    with relay(lab, tmp_path, listen="[::]") as r:
        pub = subprocess.Popen(exec_argv(lab.publisher.netns, fr(
            "publish", f"moqt://[{lab.publisher.relay_ipv6}]:{PORT}", "-N", "live", "-T", "v", "--source", "synthetic",
            "--fps", str(rate), "--object-size", str(SIZE), "--gop", str(GOP), "--duration", str(seconds),
            "--wait", "10", "--insecure-plaintext")), stdout=subprocess.PIPE, text=True)
        r.published()
        subs = [subprocess.Popen(exec_argv(link.netns, [
            sys.executable, "-m", "fastrelay.lab.moq_load", f"moqt://[{link.relay_ipv6}]:{PORT}", "-N", "live",
            "-T", "v", "--subscribers", "2", "--verify", "--duration", str(seconds + 8), "--insecure-plaintext"]),
            stdout=subprocess.PIPE, text=True) for link in lab.subscribers[:2]]
        sent = last_json(pub)
        results = [s for p in subs for s in last_json(p)]
        m = metrics(lab)
    assert len(results) == 4
    for summary in results:
        assert_complete(summary, sent["objects"], GOP)
    assert sorted(on_kernel_path(r)) == sorted(link.ipv6 for link in lab.subscribers[:2] for _ in range(2)), r.log
    delivered = sum(s["objects"] for s in results)
    assert m["fastrelay_moq_fast_objects_total"] >= delivered - 4 * 2 * GOP
    per_sub = r.kernel_lines()
    assert len(per_sub) == 4 and all(k > u for k, u in per_sub), per_sub
