"""`fastrelay bench moq-datapath`: the MoQT relay's kernel vs userspace data path, one lab, one run.

Per fan-out and data path: a `fastrelay relay --datapath X --insecure-plaintext` in the lab's
relay namespace, a plaintext publisher sending synthetic objects whose payloads start with
the lab probes' tag, and plaintext subscriber sessions (many per process, spread over the
subscriber namespaces). Both data paths get the same offered load. Measured over a steady
window:
- one-way packet delay publisher -> subscriber from the BPF probes (publisher egress, subscriber
  ingress, same clock; the tag is found inside the QUIC frames);
- delivered media packets/s (tagged packets reaching subscriber interfaces) and objects/s;
- relay CPU per delivered packet: every process in the relay namespace (schedstat) plus the run
  time of the relay's BPF programs (bpf_stats), so kernel work is not hidden;
- lost: objects a subscriber should have received (from the group it joined on) but did not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..kernel.stats import enable_run_stats, programs_run_ns
from ..lab.cpu import netns_cpu_s
from ..lab.probe import DelayProbe, Delays
from ..lab.topology import Lab
from ..netns import exec_argv
from .report import replace_section, table

LAB, PORT, NS, TRACK = "bmq", 4443, "bench", "moq"
SIZE, GOP = 1000, 30
TOTAL_RATE = 1600  # objects/s delivered in all: the subscriber processes share the same two cores
FANOUTS, QUICK_FANOUTS = (1, 8, 32, 128), (1, 8)
NAMESPACES = 4  # subscriber namespaces the sessions are spread over
KERNEL_PROGRAMS = {"fr_moq_ingress", "fr_moq_egress"}
DATAPATHS = ("kernel", "userspace")


@dataclass
class Case:
    datapath: str
    fanout: int
    objects_per_s: float
    packets_per_s: float
    delay_p50_us: float | None
    delay_p99_us: float | None
    cpu_us_per_packet: float | None
    lost: int
    rate: float  # objects/s the publisher offered
    kernel_packet_share: float  # of delivered media packets, the share the kernel sent (probe vs relay counters)


def _fr(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastrelay", *args]


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"relay did not start:\n{path.read_text()[-2000:]}")
        time.sleep(0.05)


def run_case(lab: Lab, probe: DelayProbe, datapath: str, fanout: int, seconds: float, state: str) -> Case:
    rate = min(200, TOTAL_RATE // fanout)
    log = Path(state, f"relay-{datapath}-{fanout}.log")
    with open(log, "w") as out:
        relay = subprocess.Popen(exec_argv(lab.relay_ns, _fr(
            "relay", f"moqt://0.0.0.0:{PORT}", "--datapath", datapath, "--insecure-plaintext", "--drafts", "16",
            "--state-dir", state, "--goaway-grace", "0.2")), stdout=subprocess.PIPE, stderr=out, text=True)
    procs: list[subprocess.Popen] = [relay]
    try:
        _wait_for(log, "MoQT relay on", relay)
        warmup = 2.0
        pub = subprocess.Popen(exec_argv(lab.publisher.netns, _fr(
            "publish", f"moqt://{lab.publisher.relay_ipv4}:{PORT}", "-N", NS, "-T", TRACK, "--source", "synthetic",
            "--tag", "--fps", str(rate), "--object-size", str(SIZE), "--gop", str(GOP), "--duration",
            str(seconds + warmup + 1), "--wait", "20", "--insecure-plaintext")), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        procs.append(pub)
        time.sleep(0.3)
        loads = []
        for i in range(NAMESPACES):
            n = fanout // NAMESPACES + (1 if i < fanout % NAMESPACES else 0)
            if n:
                link = lab.subscribers[i]
                loads.append(subprocess.Popen(exec_argv(link.netns, [
                    sys.executable, "-m", "fastrelay.lab.moq_load", f"moqt://{link.relay_ipv4}:{PORT}", "-N", NS,
                    "-T", TRACK, "--subscribers", str(n), "--insecure-plaintext",
                    "--duration", str(seconds + warmup + 15)]), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    text=True))
        procs += loads
        time.sleep(warmup)  # sessions up, joining groups behind them
        probe.reset()
        cpu0, bpf0, t0 = netns_cpu_s(lab.relay_ns), programs_run_ns(KERNEL_PROGRAMS), time.monotonic()
        time.sleep(seconds)
        cpu1, bpf1, t1 = netns_cpu_s(lab.relay_ns), programs_run_ns(KERNEL_PROGRAMS), time.monotonic()
        delays = probe.read()
        sent = json.loads(pub.communicate(timeout=seconds + 60)[0].strip().splitlines()[-1])
        summaries = [s for p in loads for s in json.loads(p.communicate(timeout=seconds + 60)[0].strip()
                                                           .splitlines()[-1])]
        relay.send_signal(signal.SIGTERM)
        stats = json.loads(relay.communicate(timeout=30)[0].strip().splitlines()[-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    window = t1 - t0
    total = sum(delays[1:], delays[0])
    packets = total.packets
    cpu_s = (cpu1 - cpu0) + (bpf1 - bpf0) / 1e9
    lost = 0
    for s in summaries:
        if "error" in s or s.get("first_group") is None:
            lost += sent["objects"]
        else:
            lost += max(0, sent["objects"] - s["first_group"] * GOP - s["objects"])
    kernel_sent = stats.get("kernel", {}).get("path_packets", 0)
    user_sent = sum(s["objects"] for s in summaries) - stats.get("fast_objects", 0)
    share = kernel_sent / (kernel_sent + max(0, user_sent)) if kernel_sent else 0.0
    return Case(datapath, fanout, sum(s.get("objects", 0) for s in summaries) / (seconds + warmup + 1),
                packets / window, _us(total, 0.5), _us(total, 0.99),
                cpu_s * 1e6 / packets if packets else None, lost, rate, round(share, 3))


def _us(d: Delays, q: float) -> float | None:
    return round(d.percentile(q) / 1e3, 1) if d.matched else None


def main(args: argparse.Namespace) -> int:
    fanouts = [int(x) for x in args.fanouts.split(",")] if args.fanouts else list(
        QUICK_FANOUTS if args.quick else FANOUTS)
    seconds = args.seconds or (3.0 if args.quick else 6.0)
    cases: list[Case] = []
    stats_fd = enable_run_stats()
    try:
        with Lab(LAB, NAMESPACES) as lab, tempfile.TemporaryDirectory() as state:
            rx = [(link.netns, link.ifname, link.mac) for link in lab.subscribers]
            with DelayProbe((lab.publisher.netns, lab.publisher.ifname), rx, scan=1400) as probe:
                for fanout in fanouts:
                    for datapath in DATAPATHS:
                        c = run_case(lab, probe, datapath, fanout, seconds, state)
                        cases.append(c)
                        print(f"  {c.datapath:9} fanout {c.fanout:3}  {c.objects_per_s:7.0f} obj/s"
                              f"  {c.packets_per_s:7.0f} pkt/s  delay p50 {c.delay_p50_us} us p99 {c.delay_p99_us} us"
                              f"  cpu {c.cpu_us_per_packet and round(c.cpu_us_per_packet, 1)} us/pkt  lost {c.lost}"
                              f"  kernel share {c.kernel_packet_share}", file=sys.stderr)
    finally:
        os.close(stats_fd)
    if args.write:
        replace_section(Path(args.write), "moq-datapath", _report(cases, seconds))
    if args.json:
        print(json.dumps({"cases": [asdict(c) for c in cases]}))
    return 0


def _report(cases: list[Case], seconds: float) -> str:
    rows = [[c.datapath, c.fanout, f"{c.rate:g}", f"{c.objects_per_s:.0f}", f"{c.packets_per_s:.0f}",
             _f(c.delay_p50_us, 1), _f(c.delay_p99_us, 1), _f(c.cpu_us_per_packet, 1), c.lost,
             f"{c.kernel_packet_share:.2f}"] for c in cases]
    return "\n".join([
        "## MoQT relay: kernel vs userspace data path",
        "",
        f"Measured {datetime.date.today()} on {platform.node()} ({os.cpu_count()} CPUs), one lab, one run: "
        f"synthetic {SIZE}-byte objects (groups of {GOP}), plaintext QUIC on both paths, the offered rate "
        f"scaled so that {TOTAL_RATE} objects/s are delivered in all, {seconds:g} s measured per case:",
        "",
        "    " + "fastrelay bench moq-datapath " + " ".join(sys.argv[3:]),
        "",
        table(["data path", "fan-out", "objects/s offered", "objects/s delivered", "media packets/s delivered",
               "delay p50 us", "delay p99 us", "relay CPU us/packet", "lost", "kernel share"], rows),
        "",
        *[f"- {line}" for line in ratios(cases)],
        "- delay: BPF timestamps at the publisher's egress and each subscriber's ingress; relay CPU: the relay"
        " namespace's processes (schedstat) plus the relay's BPF programs' run time (bpf_stats); kernel share:"
        " media packets the kernel sent / all media packets delivered.",
    ])


def ratios(cases: list[Case]) -> list[str]:
    """Kernel/userspace ratios per fan-out, with the targets."""
    by = {(c.datapath, c.fanout): c for c in cases}
    out = []
    for fanout in sorted({c.fanout for c in cases}):
        k, u = by.get(("kernel", fanout)), by.get(("userspace", fanout))
        if not (k and u):
            continue
        parts = []
        for label, a, b, target in (("delay p50", k.delay_p50_us, u.delay_p50_us, 0.1),
                                    ("delay p99", k.delay_p99_us, u.delay_p99_us, 0.1),
                                    ("relay CPU per packet", k.cpu_us_per_packet, u.cpu_us_per_packet, 0.125)):
            if a and b:
                parts.append(f"{label} kernel/userspace {a / b:.2f} (target <= {target:g})")
        out.append(f"fan-out {fanout}: " + "; ".join(parts))
    return out


def _f(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"
