"""`fastrelay bench udp-fanout`: kernel vs userspace UDP fan-out in one run, one lab.

Per fan-out:
1. saturation: the sender offers as much as it can; delivered copies/s is the capacity;
2. equal load: both paths get the same input rate (half the userspace capacity) and
   their delays are compared;
3. half capacity: the kernel path at 50% of its own capacity (must lose nothing).
The userspace relay is restarted after saturation (its socket still holds a backlog that
would otherwise be delivered, and counted, in the next case); the kernel path keeps no
backlog, so one kernel relay (slow to start: a grace period per subscriber added) runs its three cases.
Delivered copies and one-way delays come from BPF probes at the subscribers' ingress
(sink mode: the probe drops after measuring, so no receiving process competes for CPU).
Relay CPU = CPU time of every process in the relay's namespace (observed from outside,
schedstat) plus the run time of the relay's BPF program (kernel.bpf_stats), so the kernel
path's softirq work is not hidden.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..fanout.control import request
from ..kernel.stats import enable_run_stats
from ..lab.cpu import host_busy_s, netns_cpu_s
from ..lab.probe import DelayProbe, Delays
from ..lab.topology import Lab
from ..netns import exec_argv
from .report import delay_cdf_plot, replace_section, table

PORT = 5000
SUB_PORT = 6000
SIZE = 1200
LAB = "bench"
DRAIN_MAX_S, DRAIN_POLL_S = 0.3, 0.03
QUICK_SECONDS = 0.5  # per measurement with --quick: all four fan-outs, both paths, in well under 60 s


@dataclass
class Case:
    datapath: str
    fanout: int
    load: str  # saturation | equal | half_capacity
    offered_pps: float | None
    input_pps: float
    copies_per_s: float
    loss: float
    cpu_us_per_copy: float
    host_cpu_us_per_copy: float
    delay_p50_us: float
    delay_p99_us: float
    delay_max_us: float


@contextmanager
def relay(lab: Lab, datapath: str, fanout: int) -> Iterator[str]:
    """Run `fastrelay udp-fanout` in the relay namespace; yields its control socket path."""
    ctl = f"/run/fastrelay-bench-{os.getpid()}.sock"
    subs = [a for s in lab.subscribers[:fanout] for a in ("--sub", f"{s.ipv4}:{SUB_PORT}")]
    argv = [sys.executable, "-m", "fastrelay", "udp-fanout", "--listen", f"{lab.publisher.relay_ipv4}:{PORT}",
            "--datapath", datapath, "--control", ctl, "--interface", lab.publisher.relay_ifname, *subs]
    proc = subprocess.Popen(exec_argv(lab.relay_ns, argv), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if len(request(ctl, {"op": "list"})["subscribers"]) == fanout:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"relay did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.05)
        yield ctl
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _send(lab: Lab, rate: float | None, seconds: float) -> dict[str, Any]:
    argv = [sys.executable, "-m", "fastrelay.lab.traffic", "send", "--to", f"{lab.publisher.relay_ipv4}:{PORT}",
            "--size", str(SIZE), "--duration", str(seconds)]
    if rate:
        argv += ["--rate", str(int(rate))]
    out = subprocess.run(exec_argv(lab.publisher.netns, argv), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _relay_cpu(lab: Lab, ctl: str) -> float:
    bpf_ns = request(ctl, {"op": "stats"})["kernel"].get("bpf_run_ns", 0)
    return netns_cpu_s(lab.relay_ns) + bpf_ns / 1e9


def _settle(probe: DelayProbe, fanout: int) -> None:
    """Let copies still queued in the relay arrive (they belong to this case): wait until the
    subscribers' count stops growing, for at most DRAIN_MAX_S."""
    deadline, last = time.monotonic() + DRAIN_MAX_S, -1
    while time.monotonic() < deadline:
        delivered = sum(d.packets for d in probe.read()[:fanout])
        if delivered == last:
            return
        last = delivered
        time.sleep(DRAIN_POLL_S)


def measure(lab: Lab, probe: DelayProbe, ctl: str, datapath: str, fanout: int, load: str,
            rate: float | None, seconds: float) -> tuple[Case, Delays]:
    probe.reset()
    cpu0, host0 = _relay_cpu(lab, ctl), host_busy_s()
    sent = _send(lab, rate, seconds)
    _settle(probe, fanout)
    cpu1, host1 = _relay_cpu(lab, ctl), host_busy_s()
    results = probe.read()[:fanout]
    merged = results[0]
    for r in results[1:]:
        merged = merged + r
    delivered = merged.packets
    per_copy = 1e6 / delivered if delivered else float("nan")
    return Case(
        datapath=datapath, fanout=fanout, load=load, offered_pps=rate,
        input_pps=sent["sent"] / sent["seconds"],
        copies_per_s=delivered / sent["seconds"],
        loss=1 - delivered / (sent["sent"] * fanout) if sent["sent"] else float("nan"),
        cpu_us_per_copy=(cpu1 - cpu0) * per_copy,
        host_cpu_us_per_copy=(host1 - host0) * per_copy,
        delay_p50_us=merged.percentile(0.5) / 1e3,
        delay_p99_us=merged.percentile(0.99) / 1e3,
        delay_max_us=merged.max_ns / 1e3,
    ), merged


def run(fanouts: list[int], seconds: float) -> tuple[list[Case], dict[tuple[str, int], Delays]]:
    cases: list[Case] = []
    cdfs: dict[tuple[str, int], Delays] = {}
    stats_fd = enable_run_stats()
    try:
        with Lab(LAB, max(fanouts)) as lab:
            rx = [(s.netns, s.ifname, s.mac) for s in lab.subscribers]
            with DelayProbe((lab.publisher.netns, lab.publisher.ifname), rx, sink=True) as probe:
                for fanout in fanouts:
                    def case(dp: str, load: str, rate: float | None, ctl: str, fanout: int = fanout) -> Case:
                        c, delays = measure(lab, probe, ctl, dp, fanout, load, rate, seconds)
                        cases.append(c)
                        if load == "equal":
                            cdfs[(dp, fanout)] = delays
                        print(f"  {dp:9} fanout {fanout:3} {load:13} in {c.input_pps:9.0f} pps  copies/s "
                              f"{c.copies_per_s:9.0f}  loss {c.loss:6.1%}  cpu/copy {c.cpu_us_per_copy:6.2f} us  "
                              f"p50 {c.delay_p50_us:8.1f} us  p99 {c.delay_p99_us:8.1f} us", file=sys.stderr)
                        return c

                    with relay(lab, "userspace", fanout) as ctl:
                        u_sat = case("userspace", "saturation", None, ctl)
                    # input the userspace path can carry: half of what it delivered at saturation
                    equal = max(0.5 * u_sat.copies_per_s / fanout, 100.0)
                    with relay(lab, "userspace", fanout) as ctl:
                        case("userspace", "equal", equal, ctl)
                    with relay(lab, "kernel", fanout) as ctl:
                        k_sat = case("kernel", "saturation", None, ctl)
                        case("kernel", "equal", equal, ctl)
                        case("kernel", "half_capacity", max(0.5 * k_sat.copies_per_s / fanout, 100.0), ctl)
    finally:
        os.close(stats_fd)
    return cases, cdfs


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def summarize(cases: list[Case]) -> list[str]:
    """One line per fan-out with the ratios the targets are stated in."""
    by = {(c.datapath, c.fanout, c.load): c for c in cases}
    lines = []
    for fanout in sorted({c.fanout for c in cases}):
        ks, us = by[("kernel", fanout, "saturation")], by[("userspace", fanout, "saturation")]
        ke, ue = by[("kernel", fanout, "equal")], by[("userspace", fanout, "equal")]
        kh = by[("kernel", fanout, "half_capacity")]
        lines.append(
            f"fan-out {fanout}: capacity kernel/userspace {_ratio(ks.copies_per_s, us.copies_per_s)}x; "
            f"relay CPU per copy kernel/userspace {_ratio(ks.cpu_us_per_copy, us.cpu_us_per_copy)} at saturation, "
            f"{_ratio(ke.cpu_us_per_copy, ue.cpu_us_per_copy)} at equal load (target <= 0.17); "
            f"delay p99 kernel/userspace at equal load {_ratio(ke.delay_p99_us, ue.delay_p99_us)} (target <= 0.2); "
            f"kernel loss at half its capacity {kh.loss:.3%} (target 0)")
    return lines


def write_markdown(path: Path, cases: list[Case], command: str, plots: list[str]) -> None:
    rows = [[c.datapath, c.fanout, c.load, f"{c.input_pps:.0f}", f"{c.copies_per_s:.0f}", f"{c.loss:.2%}",
             f"{c.cpu_us_per_copy:.2f}", f"{c.host_cpu_us_per_copy:.2f}", f"{c.delay_p50_us:.1f}",
             f"{c.delay_p99_us:.1f}", f"{c.delay_max_us:.0f}"] for c in cases]
    body = "\n".join([
        "## UDP fan-out: kernel vs userspace data path",
        "",
        f"Measured {datetime.date.today()} on {platform.node()} ({os.cpu_count()} CPUs, Linux {platform.release()}),"
        f" {SIZE}-byte datagrams, one run:",
        "",
        f"    {command}",
        "",
        table(["datapath", "fan-out", "load", "input pps", "copies/s", "loss", "relay CPU us/copy",
               "host CPU us/copy", "delay p50 us", "delay p99 us", "delay max us"], rows),
        "",
        *[f"- {line}" for line in summarize(cases)],
        "",
        "Relay CPU = CPU time of the processes in the relay namespace (schedstat) + the relay's BPF program run",
        "time (bpf_stats); host CPU = all",
        "non-idle time on the machine (sender, relay, softirq, probes) per delivered copy.",
        "Delay = BPF timestamp at publisher egress to BPF timestamp at subscriber ingress (same clock).",
        *[f"![{p}]({p})" for p in plots],
    ])
    replace_section(path, "udp-fanout", body)


def plot(cases: list[Case], cdfs: dict[tuple[str, int], Delays], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cdf_path = delay_cdf_plot(cdfs, "UDP fan-out delay at equal offered load",
                              "one-way delay publisher -> subscriber (us, log)", out / "udp_fanout_delay_cdf.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dp in ("kernel", "userspace"):
        sat = sorted((c.fanout, c.copies_per_s) for c in cases if c.datapath == dp and c.load == "saturation")
        ax.plot([f for f, _ in sat], [v / 1e3 for _, v in sat], marker="o", label=dp)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("fan-out (subscribers)")
    ax.set_ylabel("delivered copies/s (thousands)")
    ax.set_title("UDP fan-out capacity")
    ax.grid(True, alpha=0.3)
    ax.legend()
    tp_path = out / "udp_fanout_throughput.png"
    fig.tight_layout()
    fig.savefig(tp_path, dpi=110)
    plt.close(fig)
    return [cdf_path, tp_path]


def main(args: argparse.Namespace) -> int:
    fanouts = [int(x) for x in (args.fanouts or "1,4,16,64").split(",")]
    if any(f < 1 or f > 250 for f in fanouts):
        raise ValueError("fan-outs must be within 1..250")
    seconds = args.seconds or (QUICK_SECONDS if args.quick else 3.0)
    command = "fastrelay bench udp-fanout " + " ".join(a for a in sys.argv[3:])
    cases, cdfs = run(fanouts, seconds)
    plots = plot(cases, cdfs, Path(args.plots)) if args.plots else []
    if args.write:
        md = Path(args.write)
        write_markdown(md, cases, command.strip(),
                       [os.path.relpath(p, md.resolve().parent) for p in (q.resolve() for q in plots)])
    for line in summarize(cases):
        print(line, file=sys.stderr)
    if args.json:
        print(json.dumps({"cases": [asdict(c) for c in cases]}))
    return 0
