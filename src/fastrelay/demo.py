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
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .bench import udp_fanout as bench
from .lab.topology import Lab
from .lab.traffic import UdpSink, UdpSource
from .netns import entered, exec_argv

DATAGRAMS = 5000


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
    """Publisher -> MoQT relay -> 4 subscribers in the lab; True if every video decodes."""
    fr = [sys.executable, "-m", "fastrelay"]
    log = open(out / "relay.log", "w")  # noqa: SIM115 (closed below, after the relay)
    relay = subprocess.Popen(exec_argv(lab.relay_ns, [*fr, "relay", f"moqt://0.0.0.0:{MOQ_PORT}",
                                                     "--state-dir", str(out), "--metrics", METRICS,
                                                     "--datapath", "kernel", "--insecure-plaintext"]),
                             stdout=subprocess.DEVNULL, stderr=log)
    procs: list[subprocess.Popen] = []
    try:
        time.sleep(1.5)
        publisher = subprocess.Popen(exec_argv(lab.publisher.netns, [
            *fr, "publish", f"moqt://{lab.publisher.relay_ipv4}:{MOQ_PORT}", "-N", "demo/cam", "-T", "video",
            "--source", "testsrc", "--duration", str(MOQ_SECONDS), "--wait", "10", "--insecure-plaintext"]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(publisher)
        time.sleep(0.5)
        subs = []
        for i, link in enumerate(lab.subscribers):
            p = subprocess.Popen(exec_argv(link.netns, [
                *fr, "subscribe", f"moqt://{link.relay_ipv4}:{MOQ_PORT}", "-N", "demo/cam", "-T", "video",
                "--out", str(out / f"moq_sub{i}.h264"), "--duration", str(MOQ_SECONDS + 5), "--progress",
                *(["--insecure-plaintext"] if i < KERNEL_SUBSCRIBERS else [])]),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
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
                    print(f"{i:>4} {_path(i):>9} {snap['objects']:>8} {snap.get('objects_per_s', '-'):>6} "
                          f"{snap['latency_p50_ms'] or '-':>7} {snap['latency_p99_ms'] or '-':>7} "
                          f"{snap['lost']:>5} {snap['gaps']:>5}")
            dropped = _relay_dropped(lab) if relay.poll() is None else dropped
            print(f"relay: {'-' if dropped is None else dropped} objects dropped for slow subscribers")
        for t in readers:
            t.join()
        publisher.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        relay.terminate()
        relay.wait()
        log.close()
    for line in (out / "relay.log").read_text().splitlines():
        if "left the kernel path" in line:
            print("relay:", line.split(" INFO ", 1)[-1])
    ok = True
    for i, snap in enumerate(last):
        probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                                "stream=nb_read_frames", "-of", "csv=p=0", str(out / f"moq_sub{i}.h264")],
                               capture_output=True, text=True)
        decoded = probe.stdout.strip()
        good = probe.returncode == 0 and not probe.stderr.strip() and decoded == str(snap.get("frames_written"))
        ok &= good
        print(f"subscriber {i}: {snap.get('objects')} objects, {snap.get('lost')} lost, {snap.get('gaps')} gaps, "
              f"ended {snap.get('ended')}, video decodes: "
              f"{'yes' if good else 'NO'} ({decoded} frames, {out / f'moq_sub{i}.h264'})")
    return ok


KERNEL_SUBSCRIBERS = 2  # subscribers 0 and 1 offer plaintext QUIC: the kernel serves them


def _path(i: int) -> str:
    return "kernel" if i < KERNEL_SUBSCRIBERS else "userspace"


def moq_datapaths(lab: Lab) -> None:
    """The relay's two data paths side by side, same lab, same load (bench moq-datapath, shorter)."""
    import os
    import tempfile

    from .bench import moq_datapath
    from .kernel.stats import enable_run_stats
    from .lab.probe import DelayProbe

    stats_fd = enable_run_stats()
    try:
        rx = [(link.netns, link.ifname, link.mac) for link in lab.subscribers]
        with tempfile.TemporaryDirectory() as state, \
                DelayProbe((lab.publisher.netns, lab.publisher.ifname), rx, scan=1400) as probe:
            cases = [moq_datapath.run_case(lab, probe, dp, 8, 3.0, state) for dp in moq_datapath.DATAPATHS]
    finally:
        os.close(stats_fd)
    print(f"{'data path':>10} {'fan-out':>7} {'packets/s':>9} {'delay p50 us':>12} {'delay p99 us':>12} "
          f"{'relay CPU us/pkt':>16} {'lost':>5}")
    for c in cases:
        print(f"{c.datapath:>10} {c.fanout:>7} {c.packets_per_s:>9.0f} {c.delay_p50_us:>12} {c.delay_p99_us:>12} "
              f"{c.cpu_us_per_packet or 0:>16.1f} {c.lost:>5}")
    for line in moq_datapath.ratios(cases):
        print(line)


def _follow(proc: subprocess.Popen, last: list[dict], i: int) -> None:
    for line in proc.stdout:
        data = json.loads(line)
        last[i] = data.get("progress", data)


def main() -> int:
    out = Path("demo-output")
    out.mkdir(exist_ok=True)
    with Lab("demo", 4) as lab:
        print("== 1. MoQT: ffmpeg H.264 -> relay -> 4 subscribers (2 on the kernel path, 2 on the userspace path)")
        moq_ok = moq(lab, out)
        print("\n== 1b. MoQT relay, kernel vs userspace data path, fan-out 8 (synthetic objects, BPF delay probes)")
        moq_datapaths(lab)
        print("\n== 2. UDP fan-out delivery check (publisher -> relay -> 4 subscribers, every byte verified)")
        lines = [verify(lab, dp) for dp in ("kernel", "userspace")]
    print("\n".join(lines))
    print("\n== 3. UDP fan-out, kernel vs userspace, same lab, same traffic (about a minute)")
    cases, cdfs = bench.run([4, 16], 2.0)
    print(f"\n{'fan-out':>7} {'load':>13} | {'kernel copies/s':>15} {'cpu us/copy':>11} {'p99 us':>9} | "
          f"{'user copies/s':>13} {'cpu us/copy':>11} {'p99 us':>9}")
    by = {(c.datapath, c.fanout, c.load): c for c in cases}
    for fanout in (4, 16):
        for load in ("saturation", "equal"):
            k, u = by[("kernel", fanout, load)], by[("userspace", fanout, load)]
            print(f"{fanout:>7} {load:>13} | {k.copies_per_s:>15.0f} {k.cpu_us_per_copy:>11.2f} "
                  f"{k.delay_p99_us:>9.1f} | {u.copies_per_s:>13.0f} {u.cpu_us_per_copy:>11.2f} {u.delay_p99_us:>9.1f}")
    print()
    for line in bench.summarize(cases):
        print(line)
    plots = bench.plot(cases, cdfs, out)
    print(f"\nplots: {', '.join(str(p) for p in plots)}")
    return 0 if moq_ok and all("byte-exact: yes" in line for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
