"""`make demo`: fastrelay in a namespace lab (publisher, relay, 4 subscriber namespaces).

1. MoQT: ffmpeg's H.264 test pattern is published through `fastrelay relay --datapath kernel`
   to 4 subscribers: two offer plaintext QUIC and are served by the kernel fast path, two use
   standard crypto and are served by userspace, at the same time (live per-subscriber table:
   data path, objects/s, latency, objects lost, and the objects the relay dropped for slow
   subscribers, from its Prometheus endpoint); the received videos are checked with ffprobe.
   Then the relay's kernel and userspace data paths are measured side by side (fan-out 8,
   one-way delay from BPF probes, relay CPU per packet).
2. UDP fan-out: each data path relays a real stream to 4 subscriber sockets, every byte
   verified, then both paths are measured side by side (the benchmark's method, shorter).
3. Plots and videos go to demo-output/.

Each section first asks doctor whether its kernel data path can run here
(`doctor.kernel_path_status`); when it cannot, one line says why and the section runs the
userspace path only. A section that fails prints one line and the demo goes on; the exit
status is 1 if anything that should have worked did not. FASTRELAY_DISABLE_KERNEL_PATH=1
runs the whole demo on the userspace path.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .bench import udp_fanout as bench
from .doctor import kernel_path_status
from .lab.probe import DelayProbe
from .lab.topology import Lab
from .lab.traffic import UdpSink, UdpSource
from .netns import entered, exec_argv

DATAGRAMS = 5000
UDP_FANOUTS, UDP_SECONDS = [4, 16], 2.0  # section 3
USERSPACE_LAB = "demo3"  # section 3's lab when only the userspace path runs (bench.run names its own)

# one load per program source per run: a rejection costs the verifier's whole budget, seconds
_status = functools.cache(kernel_path_status)


def kernel_available(source: str) -> bool:
    """Whether the kernel data path of `source` (a program in bpf/) can run here; if not, one
    line with doctor's reason."""
    ok, why = _status(source)
    if not ok:
        print(f"kernel data path unavailable: {why}; running the userspace path only")
    return ok


def _datapaths(kernel: bool) -> list[str]:
    return ["kernel", "userspace"] if kernel else ["userspace"]


def _one_line(exc: BaseException) -> str:
    """An error in one line: its first line and, for a multi-line one (a relay's log), its last."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def section(title: str, run: Callable[[], bool]) -> bool:
    """Print the title and run one section; a failure is one line and the demo goes on.
    True if the section did what it should."""
    print(f"\n== {title}", flush=True)
    try:
        return run()
    except Exception as exc:  # any failure: the next sections still run
        print(f"section failed: {_one_line(exc)}")
        return False


def verify(lab: Lab, datapath: str) -> str:
    """Relay DATAGRAMS datagrams to every subscriber socket and check each byte; one summary line."""
    socks = []
    for link in lab.subscribers:
        with entered(link.netns):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((link.ipv4, bench.SUB_PORT))
        socks.append(s)
    with bench.relay(lab, datapath, len(socks)), UdpSink(socks) as sink:
        with entered(lab.publisher.netns):
            src = UdpSource((lab.publisher.relay_ipv4, bench.PORT), rate=20000, count=DATAGRAMS, size=1200)
        sender = threading.Thread(target=src.run)
        sender.start()
        stats = sink.collect(expected=DATAGRAMS, timeout=5)
        sender.join()
        src.close()
    for s in socks:
        s.close()
    exact = all(len(s.seqs) == DATAGRAMS and not s.bad and not s.duplicates for s in stats)
    got = ", ".join(str(len(s.seqs)) for s in stats)
    verdict = "yes" if exact else "NO"
    return f"{datapath:9}: {len(socks)} subscribers received [{got}] of {DATAGRAMS}, byte-exact: {verdict}"


MOQ_PORT = 4443
MOQ_SECONDS = 6
METRICS = "127.0.0.1:9464"  # the relay's Prometheus endpoint, inside the relay namespace


def dropped_objects(metrics: str) -> int:
    """The relay's count of objects not sent to slow subscribers, from its /metrics text."""
    for family in text_string_to_metric_families(metrics):
        if family.name == "fastrelay_moq_dropped_objects":
            return int(sum(sample.value for sample in family.samples if sample.name.endswith("_total")))
    raise ValueError("the relay's metrics have no fastrelay_moq_dropped_objects")


def _relay_dropped(lab: Lab) -> int | None:
    """Scrape the relay's drop counter (None while its endpoint does not answer)."""
    try:
        with entered(lab.relay_ns):
            text = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=1).read().decode()
    except OSError:
        return None
    return dropped_objects(text)


def moq(lab: Lab, out: Path) -> bool:
    """Publisher -> MoQT relay -> 4 subscribers in the lab; True if every video decodes. With the
    kernel path, subscribers 0 and 1 offer plaintext QUIC (the kernel serves them); without, all
    four are served by userspace."""
    kernel = kernel_available("moq_fastpath")
    kernel_subs = KERNEL_SUBSCRIBERS if kernel else 0
    print(f"{kernel_subs} subscribers on the kernel path, {len(lab.subscribers) - kernel_subs} on the userspace path")
    plaintext = ["--insecure-plaintext"] if kernel else []
    fr = [sys.executable, "-m", "fastrelay"]
    log = open(out / "relay.log", "w")  # noqa: SIM115 (closed below, after the relay)
    relay = subprocess.Popen(exec_argv(lab.relay_ns, [*fr, "relay", f"moqt://0.0.0.0:{MOQ_PORT}",
                                                     "--state-dir", str(out), "--metrics", METRICS,
                                                     "--datapath", _datapaths(kernel)[0], *plaintext]),
                             stdout=subprocess.DEVNULL, stderr=log)
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        time.sleep(1.5)
        publisher = subprocess.Popen(exec_argv(lab.publisher.netns, [
            *fr, "publish", f"moqt://{lab.publisher.relay_ipv4}:{MOQ_PORT}", "-N", "demo/cam", "-T", "video",
            "--source", "testsrc", "--duration", str(MOQ_SECONDS), "--wait", "10", *plaintext]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(publisher)
        time.sleep(0.5)
        subs = []
        for i, link in enumerate(lab.subscribers):
            logs.append(open(out / f"moq_sub{i}.log", "w"))  # noqa: SIM115 (closed below)
            p = subprocess.Popen(exec_argv(link.netns, [
                *fr, "subscribe", f"moqt://{link.relay_ipv4}:{MOQ_PORT}", "-N", "demo/cam", "-T", "video",
                "--out", str(out / f"moq_sub{i}.h264"), "--duration", str(MOQ_SECONDS + 5), "--progress",
                *(["--insecure-plaintext"] if i < kernel_subs else [])]),
                stdout=subprocess.PIPE, stderr=logs[-1], text=True)
            subs.append(p)
            procs.append(p)
        last: list[dict] = [{} for _ in subs]
        print(f"{'sub':>4} {'path':>9} {'objects':>8} {'obj/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'lost':>5} {'gaps':>5}")
        readers = [threading.Thread(target=_follow, args=(p, last, i), daemon=True) for i, p in enumerate(subs)]
        for t in readers:
            t.start()
        dropped = None
        while any(p.poll() is None for p in subs):
            time.sleep(1.0)
            for i, snap in enumerate(last):
                if snap:
                    print(f"{i:>4} {_path(i, kernel_subs):>9} {snap['objects']:>8} "
                          f"{_dash(snap.get('objects_per_s')):>6} {_dash(snap['latency_p50_ms']):>7} "
                          f"{_dash(snap['latency_p99_ms']):>7} "
                          f"{snap['lost']:>5} {snap['gaps']:>5}")
            dropped = _relay_dropped(lab) if relay.poll() is None else dropped
            print(f"relay: {_dash(dropped)} objects dropped for slow subscribers")
        for t in readers:
            t.join()
        publisher.wait()
        if relay.poll() is not None:
            raise RuntimeError(f"the relay exited (status {relay.returncode}), see {out / 'relay.log'}:\n"
                               f"{(out / 'relay.log').read_text()}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        relay.terminate()
        relay.wait()
        for f in (log, *logs):
            f.close()
    for line in (out / "relay.log").read_text().splitlines():
        if "left the kernel path" in line:
            print("relay:", line.split(" INFO ", 1)[-1])
    ok = True
    for i, snap in enumerate(last):
        video = out / f"moq_sub{i}.h264"
        if not snap:
            ok = False
            print(f"subscriber {i}: received nothing, see {out / f'moq_sub{i}.log'}")
            continue
        probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                                "stream=nb_read_frames", "-of", "csv=p=0", str(video)], capture_output=True, text=True)
        decoded = probe.stdout.strip()
        good = probe.returncode == 0 and not probe.stderr.strip() and decoded == str(snap["frames_written"])
        # a subscriber that failed part-way leaves a shorter file that may still decode
        failed = f", exited with status {subs[i].returncode} (see {out / f'moq_sub{i}.log'})" if subs[i].returncode \
            else ""
        ok &= good and not failed
        print(f"subscriber {i} ({_path(i, kernel_subs)}): {snap['objects']} objects, {snap['lost']} lost, "
              f"{snap['gaps']} gaps, ended {snap['ended'] or '-'}{failed}, video decodes: "
              f"{'yes' if good else 'NO'} ({decoded or 0} frames, {video})")
    return ok


KERNEL_SUBSCRIBERS = 2  # with the kernel path, subscribers 0 and 1 offer plaintext QUIC: the kernel serves them


def _path(i: int, kernel_subs: int) -> str:
    return "kernel" if i < kernel_subs else "userspace"


def _dash(value: object) -> str:
    """A value for a table cell; '-' for one not known (yet)."""
    return "-" if value is None else str(value)


def moq_datapaths(lab: Lab) -> bool:
    """The relay's data paths side by side, same lab, same load (bench moq-datapath, shorter);
    the userspace path alone when the kernel path cannot run."""
    from .bench import moq_datapath
    from .kernel.stats import enable_run_stats

    datapaths = _datapaths(kernel_available("moq_fastpath"))
    stats_fd = enable_run_stats()
    try:
        rx = [(link.netns, link.ifname, link.mac) for link in lab.subscribers]
        with tempfile.TemporaryDirectory() as state, \
                DelayProbe((lab.publisher.netns, lab.publisher.ifname), rx, scan=1400) as probe:
            cases = [moq_datapath.run_case(lab, probe, dp, 8, 3.0, state) for dp in datapaths]
    finally:
        os.close(stats_fd)
    print(f"{'data path':>10} {'fan-out':>7} {'packets/s':>9} {'delay p50 us':>12} {'delay p99 us':>12} "
          f"{'relay CPU us/pkt':>16} {'lost':>5}")
    for c in cases:
        cpu = "-" if c.cpu_us_per_packet is None else f"{c.cpu_us_per_packet:.1f}"
        print(f"{c.datapath:>10} {c.fanout:>7} {c.packets_per_s:>9.0f} {_dash(c.delay_p50_us):>12} "
              f"{_dash(c.delay_p99_us):>12} {cpu:>16} {c.lost:>5}")
    for line in moq_datapath.ratios(cases):
        print(line)
    return True


def _follow(proc: subprocess.Popen, last: list[dict], i: int) -> None:
    """Keep subscriber i's latest progress (or final summary) line in last[i]."""
    for line in proc.stdout:
        try:
            data = json.loads(line)
        except json.JSONDecodeError:  # not a report; raising would end this reader with a traceback
            continue
        last[i] = data.get("progress", data)


def udp_delivery(lab: Lab) -> bool:
    """Section 2: each data path that can run relays a verified stream; True if every byte arrived."""
    lines = [verify(lab, dp) for dp in _datapaths(kernel_available("udp_fanout"))]
    print("\n".join(lines))
    return all(line.endswith("byte-exact: yes") for line in lines)


def udp_compare(out: Path) -> bool:
    """Section 3: bench udp-fanout, shorter, both data paths; the userspace path at saturation alone
    when the kernel path cannot run."""
    if not kernel_available("udp_fanout"):
        cases = _udp_userspace(UDP_FANOUTS, UDP_SECONDS)
        print(f"\n{'fan-out':>7} {'user copies/s':>13} {'cpu us/copy':>11} {'p99 us':>9}"
              "   (userspace data path only, at saturation)")
        for c in cases:
            print(f"{c.fanout:>7} {c.copies_per_s:>13.0f} {c.cpu_us_per_copy:>11.2f} {c.delay_p99_us:>9.1f}")
        return True
    cases, cdfs = bench.run(UDP_FANOUTS, UDP_SECONDS)
    print(f"\n{'fan-out':>7} {'load':>13} | {'kernel copies/s':>15} {'cpu us/copy':>11} {'p99 us':>9} | "
          f"{'user copies/s':>13} {'cpu us/copy':>11} {'p99 us':>9}")
    by = {(c.datapath, c.fanout, c.load): c for c in cases}
    for fanout in UDP_FANOUTS:
        for load in ("saturation", "equal"):
            k, u = by[("kernel", fanout, load)], by[("userspace", fanout, load)]
            print(f"{fanout:>7} {load:>13} | {k.copies_per_s:>15.0f} {k.cpu_us_per_copy:>11.2f} "
                  f"{k.delay_p99_us:>9.1f} | {u.copies_per_s:>13.0f} {u.cpu_us_per_copy:>11.2f} {u.delay_p99_us:>9.1f}")
    print()
    for line in bench.summarize(cases):
        print(line)
    plots = bench.plot(cases, cdfs, out)
    print(f"\nplots: {', '.join(str(p) for p in plots)}")
    return True


def _udp_userspace(fanouts: list[int], seconds: float) -> list[bench.Case]:
    """The userspace relay at saturation per fan-out, measured as bench.run does (BPF delay probes
    in sink mode at the subscribers)."""
    cases = []
    with Lab(USERSPACE_LAB, max(fanouts)) as lab:
        rx = [(s.netns, s.ifname, s.mac) for s in lab.subscribers]
        with DelayProbe((lab.publisher.netns, lab.publisher.ifname), rx, sink=True) as probe:
            for fanout in fanouts:
                with bench.relay(lab, "userspace", fanout) as ctl:
                    cases.append(bench.measure(lab, probe, ctl, "userspace", fanout, "saturation", None, seconds)[0])
    return cases


def main() -> int:
    out = Path("demo-output")
    out.mkdir(exist_ok=True)
    results = []
    try:
        with Lab("demo", 4) as lab:
            results += [
                section("1. MoQT: ffmpeg H.264 -> relay -> 4 subscribers", lambda: moq(lab, out)),
                section("1b. MoQT relay, kernel vs userspace data path, fan-out 8 (synthetic objects, BPF delay"
                        " probes)", lambda: moq_datapaths(lab)),
                section("2. UDP fan-out delivery check (publisher -> relay -> 4 subscribers, every byte verified)",
                        lambda: udp_delivery(lab)),
            ]
    except Exception as exc:  # the lab itself (namespaces, veths): sections 1 and 2 cannot run
        print(f"lab: cannot build the namespace lab sections 1 and 2 run in: {_one_line(exc)}")
        results.append(False)
    results.append(section("3. UDP fan-out, kernel vs userspace, same lab, same traffic (about a minute)",
                           lambda: udp_compare(out)))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
