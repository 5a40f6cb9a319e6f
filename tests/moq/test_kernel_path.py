"""The MoQT relay's kernel data path end to end in the lab: real relay, publisher and
subscriber processes over real QUIC (plaintext mode), real TC programs.

Every object must reach every subscriber byte-exact (synthetic payloads verified), with the
relay's counters proving the kernel, not userspace, forwarded them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from fastrelay.kernel.stats import leftovers
from fastrelay.lab import impair
from fastrelay.lab.topology import Lab
from fastrelay.netns import exec_argv

pytestmark = pytest.mark.usefixtures("root")

PORT, METRICS = 4443, 9464
RATE, SIZE, GOP, SECONDS = 200, 1000, 20, 3


def fr(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastrelay", *args]


@pytest.fixture(scope="module")
def lab(root):
    with Lab("tkp", 2) as lab:
        yield lab


class Relay:
    def __init__(self, proc: subprocess.Popen, log_path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def published(self, timeout: float = 20) -> None:
        """Wait until a publisher's namespace is known to the relay (subscribing earlier is refused)."""
        deadline = time.monotonic() + timeout
        while "publishes namespace" not in self.log:
            assert self.proc.poll() is None and time.monotonic() < deadline, f"no publisher: {self.log}"
            time.sleep(0.05)

    def kernel_lines(self) -> list[tuple[int, int]]:
        """(packets by the kernel, packets by userspace) of each subscriber that left the kernel path."""
        found = re.findall(r"left the kernel path: (\d+) packets \(\d+ bytes\) sent by the kernel, (\d+) by",
                           self.log)
        return [(int(k), int(u)) for k, u in found]

    def acks_read(self) -> list[int]:
        """How many ACK-only packets the kernel read for each subscriber that left the kernel path."""
        return [int(n) for n in re.findall(r"(\d+) of its ACK-only packets read by the kernel", self.log)]


@contextmanager
def relay(lab: Lab, tmp_path, *extra: str, listen: str = "0.0.0.0"):
    log_path = tmp_path / "relay.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(exec_argv(lab.relay_ns, fr(
            "relay", f"moqt://{listen}:{PORT}", "--datapath", "kernel", "--insecure-plaintext", "--state-dir",
            str(tmp_path), "--metrics", f"127.0.0.1:{METRICS}", "--goaway-grace", "0.2", *extra)),
            stdout=subprocess.DEVNULL, stderr=log, text=True)
    r = Relay(proc, log_path)
    try:
        deadline = time.monotonic() + 20
        while "MoQT relay on" not in r.log:
            assert proc.poll() is None and time.monotonic() < deadline, f"relay did not start: {r.log}"
            time.sleep(0.05)
        yield r
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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


def last_json(proc: subprocess.Popen, timeout: float = 60):
    out = proc.communicate(timeout=timeout)[0]
    return json.loads(out.strip().splitlines()[-1])


def metrics(lab: Lab) -> dict[str, float]:
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{METRICS}/metrics').read().decode())"
    text = subprocess.run(exec_argv(lab.relay_ns, [sys.executable, "-c", code]), capture_output=True, text=True,
                          check=True).stdout
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def assert_complete(summary: dict, published: int) -> None:
    """Everything from the group it joined on, byte-exact, once."""
    assert "error" not in summary, summary
    assert summary["bad"] == 0 and summary["duplicates"] == 0 and summary["lost"] == 0, summary
    assert summary["last_group"] == (published - 1) // GOP, summary
    assert summary["objects"] == published - summary["first_group"] * GOP, summary


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
        assert_complete(summary, sent["objects"])
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
        assert_complete(summary, sent["objects"])
    assert r.acks_read() == [0, 0] and m['fastrelay_moq_kernel_packets_total{counter="acks_absorbed"}'] == 0
    assert all(k > u for k, u in r.kernel_lines()), r.kernel_lines()


def test_loss_on_one_link_is_repaired_and_the_others_are_unaffected(lab, tmp_path):
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
        assert_complete(summary, sent["objects"])
    assert m["fastrelay_moq_fast_objects_total"] > 0


def test_kill_9_leaves_no_kernel_state(lab, tmp_path):
    with relay(lab, tmp_path) as r:
        pub = publisher(lab, seconds=2)
        r.published()
        sub = subscribers(lab, 0, 2, seconds=4)
        time.sleep(1.5)
        r.proc.send_signal(signal.SIGKILL)
        r.proc.wait()
        pub.kill()
        sub.kill()
        pub.communicate()
        sub.communicate()
    deadline = time.monotonic() + 5
    while (left := leftovers()) != {"programs": [], "maps": [], "pinned": []} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == {"programs": [], "maps": [], "pinned": []}


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
