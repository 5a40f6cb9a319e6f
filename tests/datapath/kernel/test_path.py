"""The MoQT relay's kernel data path end to end in the lab: real relay, publisher and
subscriber processes over real QUIC (plaintext mode), real TC programs.

Every object must reach every subscriber byte-exact (synthetic payloads verified), with the
relay's counters proving the kernel, not userspace, forwarded them."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
from labtools import PORT, assert_complete, fr, lab_name, last_json, metrics, relay, wait_until

from fastrelay.lab import impair
from fastrelay.lab.topology import Lab
from fastrelay.netns import exec_argv

from .conftest import RelayMaps, bpf_held, clsact_filters, still_loaded

pytestmark = pytest.mark.usefixtures("root")

RATE, SIZE, GOP, SECONDS = 200, 1000, 20, 3


@pytest.fixture(scope="module")
def lab(root):
    with Lab(lab_name("tkp"), 2) as lab:
        yield lab


def publisher(lab: Lab, seconds: float = SECONDS, rate: int = RATE, size: int = SIZE, track: str = "v",
              plaintext: bool = True) -> subprocess.Popen:
    return subprocess.Popen(exec_argv(lab.publisher.netns, fr(
        "publish", f"moqt://{lab.publisher.relay_ipv4}:{PORT}", "-N", "live", "-T", track, "--source", "synthetic",
        "--fps", str(rate), "--object-size", str(size), "--gop", str(GOP), "--duration", str(seconds), "--wait", "10",
        *(["--insecure-plaintext"] if plaintext else []))), stdout=subprocess.PIPE, text=True)


def subscribers(lab: Lab, i: int, n: int, seconds: float = SECONDS + 8, plaintext: bool = True,
                track: str = "v") -> subprocess.Popen:
    link = lab.subscribers[i]
    return subprocess.Popen(exec_argv(link.netns, [
        sys.executable, "-m", "fastrelay.lab.moq_load", f"moqt://{link.relay_ipv4}:{PORT}", "-N", "live", "-T", track,
        "--subscribers", str(n), "--verify", "--duration", str(seconds),
        *(["--insecure-plaintext"] if plaintext else [])]), stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("fanout", [1, 8, 32])
def test_every_object_reaches_every_subscriber_through_the_kernel(lab, tmp_path, fanout):
    # the subscribers are Python processes on the same two cores: keep their total load fixed
    rate = min(RATE, 1600 // fanout)
    with relay(lab, tmp_path) as r:
        pub = publisher(lab, rate=rate)
        r.published()
        split = [fanout - fanout // 2, fanout // 2]
        subs = [subscribers(lab, i, n) for i, n in enumerate(split) if n]
        sent = last_json(pub)
        results = [s for p in subs for s in last_json(p)]
        m = metrics(lab)
    per_sub = r.kernel_lines()
    assert len(results) == fanout
    for summary in results:
        assert_complete(summary, sent["objects"], GOP)
    delivered = sum(s["objects"] for s in results)
    fast = m["fastrelay_moq_fast_objects_total"]
    # the kernel carried the subgroups that began after each subscriber joined: all but the
    # joining group's (served by the joining FETCH and userspace)
    assert fast >= delivered - fanout * 2 * GOP, (fast, delivered)
    assert m['fastrelay_moq_kernel_packets_total{counter="sent"}'] >= fast
    assert m['fastrelay_moq_kernel_packets_total{counter="err"}'] == 0
    # every subscriber connection was served by the kernel, userspace sent it only control and repairs
    assert len(per_sub) == fanout and all(k > u for k, u in per_sub), per_sub
    # and the kernel read their ACK-only packets (the relay's sockets did not)
    acks = r.acks_read()
    print("kernel packets and ACK-only packets read per subscriber:", list(zip(per_sub, acks, strict=True)))
    assert len(acks) == fanout and all(a > 0 for a in acks), acks
    assert m['fastrelay_moq_kernel_packets_total{counter="acks_absorbed"}'] >= sum(acks)


def test_with_pass_acks_the_subscribers_acks_reach_the_socket_and_nothing_changes(lab, tmp_path):
    with relay(lab, tmp_path, "--pass-acks") as r:
        pub = publisher(lab, rate=100)
        r.published()
        subs = [subscribers(lab, 0, 1), subscribers(lab, 1, 1)]
        sent = last_json(pub)
        results = [s for p in subs for s in last_json(p)]
        m = metrics(lab)
    for summary in results:
        assert_complete(summary, sent["objects"], GOP)
    assert r.acks_read() == [0, 0] and m['fastrelay_moq_kernel_packets_total{counter="acks_absorbed"}'] == 0
    assert all(k > u for k, u in r.kernel_lines()), r.kernel_lines()


def test_loss_on_one_link_is_repaired_and_the_others_are_unaffected(lab, tmp_path):
    """5% loss into one subscriber: it stays on the kernel path and userspace (aioquic) re-sends
    what the kernel sent and the link lost; the subscribers on clean links need (almost) no
    userspace packets."""
    lossy = lab.subscribers[0]
    loss = impair.RandomLoss(lossy.netns, lossy.ifname, 0.05)
    try:
        with relay(lab, tmp_path) as r:
            pub = publisher(lab)
            r.published()
            subs = [subscribers(lab, 0, 1), subscribers(lab, 1, 2)]
            sent = last_json(pub)
            (bad_link,), others = (last_json(p) for p in subs)
            m = metrics(lab)
        dropped = loss.counters()["dropped"]
    finally:
        loss.close()
    assert dropped > 10
    for summary in (bad_link, *others):
        assert_complete(summary, sent["objects"], GOP)
    assert m["fastrelay_moq_fast_objects_total"] > 0
    # the lossy subscriber was on the kernel path from start to end: it joined once, and the
    # kernel sent it as many packets as it sent each clean one (the same stream, bar the
    # joining group) ...
    assert sorted(ip for ip, _ in r.joined()) == [lossy.ipv4, *[lab.subscribers[1].ipv4] * 2], r.joined()
    left = r.left()
    (lossy_left,) = [s for s in left if s.ip == lossy.ipv4]
    clean = [s for s in left if s.ip != lossy.ipv4]
    print("dropped", dropped, "lossy", lossy_left, "clean", clean)
    assert lossy_left.kernel_packets >= 0.9 * min(s.kernel_packets for s in clean), (lossy_left, clean)
    # ... and the repairs were userspace packets: at least half a packet per packet the link
    # dropped beyond what the clean subscribers got from userspace
    baseline = max(s.user_packets for s in clean)
    assert lossy_left.user_packets - baseline >= dropped / 2, (dropped, lossy_left, clean)
    # the clean ones needed (almost) nothing from userspace: control and the joining group's
    # rest only, a small fraction of what the kernel sent them
    assert all(s.user_packets < 0.1 * s.kernel_packets for s in clean), clean


def relay_interfaces(lab: Lab) -> set[str]:
    """The relay namespace's interfaces the kernel path attaches to (all but loopback)."""
    return {lab.publisher.relay_ifname, *(s.relay_ifname for s in lab.subscribers)}


def attached_filters(lab: Lab, programs: tuple[int, ...]) -> set[tuple[int, int, str]]:
    """(program id, ifindex, direction) of the clsact filters in the relay namespace running `programs`."""
    return {(f["id"], f["ifindex"], f["kind"].removeprefix("clsact/")) for f in clsact_filters(lab.relay_ns)
            if f["id"] in programs}


@pytest.mark.parametrize("tc_mode", ["tcx", "clsact"])
def test_kill_9_leaves_no_kernel_state(lab, tmp_path, tc_mode):
    """SIGKILL while the kernel serves two subscribers: with tcx nothing of the relay's survives
    it; with clsact (older kernels) its filters do, until the next relay start removes them."""
    names = relay_interfaces(lab)
    with relay(lab, tmp_path, tc_mode=tc_mode) as r:
        pub = publisher(lab, seconds=30)
        r.published()
        sub = subscribers(lab, 0, 2, seconds=30)
        slots = [slot for _, slot in r.wait_joined(2)]
        maps = RelayMaps(r.proc.pid)
        # there is kernel state to leave behind (a relay that never loaded or attached anything
        # would pass the checks after the kill): both subscribers in the maps, served by the
        # kernel, both programs attached to every interface in the mode asked for
        wait_until(lambda: all(maps.kernel_packets(slot) > 0 for slot in slots), 10,
                   "the kernel to send packets to both subscribers")
        assert set(slots) <= maps.connections()["conns"], (slots, maps.connections())
        held = bpf_held(r.proc.pid)
        programs = held.program_ids()
        ingress, egress = programs["fr_moq_ingress"], programs["fr_moq_egress"]
        ifindex = {name: lab.ifindex(lab.relay_ns, name) for name in names}
        expected = {(prog, ifindex[name], direction) for name in names
                    for prog, direction in ((ingress, "ingress"), (egress, "egress"))}
        if tc_mode == "tcx":
            assert {(t.prog_id, t.ifindex, t.direction) for t in held.tcx} == expected, held.tcx
            assert not [f for f in clsact_filters(lab.relay_ns) if f["id"] in (ingress, egress)]
        else:
            assert not held.tcx, held.tcx
            assert attached_filters(lab, (ingress, egress)) == expected
        r.proc.send_signal(signal.SIGKILL)
        r.proc.wait()
        for p in (pub, sub):
            p.kill()
            p.communicate()
    if tc_mode == "clsact":
        # a clsact filter outlives its loader: the programs still run (holding their maps) ...
        assert attached_filters(lab, (ingress, egress)) == expected
        assert still_loaded(held)["programs"] >= {ingress, egress}
        # ... until the next start, which removes the filters no live process owns
        with relay(lab, tmp_path, tc_mode=tc_mode, log_name="relay-again.log") as again:
            removed = re.findall(r"removed stale clsact filter (fr_moq_\w+)", again.log)
        assert sorted(removed) == sorted(["fr_moq_ingress", "fr_moq_egress"] * len(names)), again.log
    wait_until(lambda: still_loaded(held), 10, "the killed relay's programs and maps to be freed",
               ok=lambda left: not any(left.values()))
    assert not [f for f in clsact_filters(lab.relay_ns) if f["name"].startswith("fr_moq")]


def test_ffmpeg_h264_through_the_kernel_decodes(lab, tmp_path):
    """Real media: ffmpeg's H.264 test pattern through the kernel path; the received stream
    decodes frame for frame, and the kernel carried it."""
    out = tmp_path / "sub.h264"
    with relay(lab, tmp_path) as r:
        pub = subprocess.Popen(exec_argv(lab.publisher.netns, fr(
            "publish", f"moqt://{lab.publisher.relay_ipv4}:{PORT}", "-N", "live", "-T", "cam", "--source", "testsrc",
            "--duration", "3", "--wait", "10", "--insecure-plaintext")), stdout=subprocess.PIPE, text=True)
        r.published()
        link = lab.subscribers[0]
        sub = subprocess.Popen(exec_argv(link.netns, fr(
            "subscribe", f"moqt://{link.relay_ipv4}:{PORT}", "-N", "live", "-T", "cam", "--out", str(out),
            "--duration", "12", "--insecure-plaintext")), stdout=subprocess.PIPE, text=True)
        sent = last_json(pub)
        got = last_json(sub)
    # every object from the group it joined on (objects are counted, not estimated from timestamps)
    assert got["objects"] == sent["objects"] - got["first_group"] * 30 and got["duplicates"] == 0, (sent, got)
    probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                            "stream=nb_read_frames", "-of", "csv=p=0", str(out)], capture_output=True, text=True)
    assert probe.returncode == 0 and not probe.stderr.strip(), probe.stderr
    assert int(probe.stdout.strip()) == got["frames_written"] > 0
    ((kernel, user),) = r.kernel_lines()
    assert kernel > user, r.kernel_lines()
