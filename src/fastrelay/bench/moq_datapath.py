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
- lost: objects a subscriber should have received (from the group it joined on) but did not;
- ring records per delivered packet (kernel path: the relay's count of records drained, read
  from its --metrics endpoint), relay wake-ups/s (voluntary context switches of the relay
  process's threads), BPF run time per delivered packet, relay CPU per upstream packet (packets
  the relay namespace's publisher-facing interface received).

Peers (`--datapaths ...,aiomoqt,moq-dev`): aiomoqt's and moq-dev's relays (bench/peers.py) in the
same relay namespace at the same load, with the same publisher and subscribers on standard QUIC
crypto (the peers do not speak the plaintext mode): the probes cannot see the tag in encrypted
payloads, so their delay is n/a and their delivered packets are the relay's packets out of its
subscriber-facing interfaces (interface counters).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ..kernel.libbpf import lib
from ..kernel.stats import RunStats, enable_run_stats, prog_run_info
from ..lab.cpu import netns_cpu_s
from ..lab.probe import DelayProbe, Delays
from ..lab.topology import Lab
from ..lab.traffic import MAGIC, TAG, PayloadShape, UdpSource
from ..netns import entered, exec_argv
from . import peers, udp_fanout
from .report import delay_cdf_plot, replace_section, table

LAB, PORT, NS, TRACK = "bmq", 4443, "bench", "moq"
SIZE, GOP = 1000, 30
TOTAL_RATE = 1600  # objects/s delivered in all: the subscriber processes share the same two cores
FANOUTS, QUICK_FANOUTS = (1, 8, 32, 128), (1, 8)
NAMESPACES = 4  # subscriber namespaces the sessions are spread over
DATAPATHS = ("kernel", "userspace")
# relay arguments per data path label; kernel-aioquic-recovery: the kernel path with loss recovery
# and congestion control left to aioquic (every kernel packet registered there: the first design);
# kernel-pass-acks: that, with the subscribers' ACK-only packets climbing to the socket too
RELAY_ARGS = {"kernel": ["--datapath", "kernel"], "userspace": ["--datapath", "userspace"],
              "kernel-aioquic-recovery": ["--datapath", "kernel", "--recovery", "aioquic"],
              "kernel-pass-acks": ["--datapath", "kernel", "--pass-acks"]}
CAPACITY_FANOUT = 4
METRICS_PORT = 9464  # fastrelay relays serve their metrics here, on the relay namespace's loopback


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
    records_per_packet: float | None  # ring-buffer records the kernel path drained per delivered packet
    wakeups_per_s: float  # voluntary context switches of the relay process's threads per second
    nonvoluntary_switches_per_s: float  # ... and involuntary ones (preempted), separately
    bpf_ns_per_packet: float | None  # run time of the relay's BPF programs per delivered packet
    cpu_us_per_upstream_packet: float | None  # relay CPU per packet its publisher-facing interface received
    upstream_packets_per_s: float  # packets the relay's publisher-facing interface received per second


def _fr(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastrelay", *args]


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"relay did not start:\n{path.read_text()[-2000:]}")
        time.sleep(0.05)


def _switches(pid: int) -> tuple[int, int]:
    """(voluntary, nonvoluntary) context switches of every thread of `pid` so far."""
    vol = invol = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        invol += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return vol, invol


def _net_dev(pid: int) -> dict[str, tuple[int, int]]:
    """{interface: (rx_packets, tx_packets)} of the network namespace `pid` lives in."""
    out = {}
    with open(f"/proc/{pid}/net/dev") as f:
        for line in f.readlines()[2:]:
            name, _, rest = line.partition(":")
            fields = rest.split()
            out[name.strip()] = (int(fields[1]), int(fields[9]))
    return out


def _programs_run(pid: int) -> dict[str, RunStats]:
    """Run time and runs (bpf_stats) of the BPF programs process `pid` holds, by name: the relay's
    own programs, not another lab's of the same names (empty for a relay without any)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                ids |= {int(line.split()[1]) for line in f if line.startswith("prog_id:")}
        except (FileNotFoundError, ProcessLookupError):
            continue
    out: dict[str, RunStats] = {}
    for prog_id in ids:
        fd = lib.bpf_prog_get_fd_by_id(prog_id)
        if fd < 0:
            continue  # freed meanwhile
        try:
            name, st = prog_run_info(fd)
        finally:
            os.close(fd)
        old = out.get(name, RunStats(0, 0))
        out[name] = RunStats(old.run_time_ns + st.run_time_ns, old.run_cnt + st.run_cnt)
    return out


def _bpf_ns(before: dict[str, RunStats], after: dict[str, RunStats], clones: float) -> int:
    """BPF run time over a window without counting a clone's egress twice: the egress program runs
    inside the ingress program's bpf_clone_redirect, so the ingress's run time holds the clones'
    egress runs; of the egress's own run time only the share of runs that were not clones counts
    (an upper bound still: those runs, renumbering and passing packets, are the cheaper ones)."""
    def delta(name: str) -> RunStats:
        a, b = after.get(name, RunStats(0, 0)), before.get(name, RunStats(0, 0))
        return RunStats(a.run_time_ns - b.run_time_ns, a.run_cnt - b.run_cnt)
    total = sum(delta(n).run_time_ns for n in after if n != "fr_moq_egress")
    egress = delta("fr_moq_egress")
    if egress.run_cnt > 0:
        total += egress.run_time_ns * max(0.0, egress.run_cnt - clones) / egress.run_cnt
    return int(total)


_SCRAPED = {"records": 'fastrelay_moq_kernel_path_events_total{event="records"}',
            "clones": 'fastrelay_moq_kernel_packets_total{counter="clones"}'}


def _scrape(lab: Lab) -> dict[str, float]:
    """The kernel path's ring records drained and clones made so far, from the relay's metrics."""
    with entered(lab.relay_ns):
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        for key, name in _SCRAPED.items():
            if line.startswith(name + " "):
                out[key] = float(line.split()[-1])
    return out


def _start_relay(lab: Lab, datapath: str, state: str, log: Path) -> subprocess.Popen:
    """The relay of one case in the relay namespace, listening (stdout: fastrelay's final stats)."""
    with open(log, "w") as out:
        if datapath in peers.PEERS:
            argv = peers.relay_command(datapath, "0.0.0.0", PORT, state, names=[link.relay_ipv4 for link in lab.links])
            relay = subprocess.Popen(exec_argv(lab.relay_ns, argv), stdout=out, stderr=subprocess.STDOUT,
                                     env=peers.relay_env(), text=True)
            ready = peers.READY[datapath]
        else:
            relay = subprocess.Popen(exec_argv(lab.relay_ns, _fr(
                "relay", f"moqt://0.0.0.0:{PORT}", *RELAY_ARGS[datapath], "--insecure-plaintext", "--drafts", "16",
                "--state-dir", state, "--goaway-grace", "0.2", "--metrics", f"127.0.0.1:{METRICS_PORT}")),
                stdout=subprocess.PIPE, stderr=out, text=True)
            ready = "MoQT relay on"
    try:
        _wait_for(log, ready, relay)
    except BaseException:
        relay.kill()
        relay.wait()
        raise
    return relay


def run_case(lab: Lab, probe: DelayProbe, datapath: str, fanout: int, seconds: float, state: str,
             delays: dict[tuple[str, int], Delays] | None = None) -> Case:
    """One data path (or peer relay) at one fan-out; its merged delay histogram goes to `delays` if given."""
    rate = min(200, TOTAL_RATE // fanout)
    peer = datapath in peers.PEERS
    kernel = not peer and "--datapath" in RELAY_ARGS[datapath] and "kernel" in RELAY_ARGS[datapath]
    crypto = [] if peer else ["--insecure-plaintext"]  # the peers speak standard QUIC only
    relay = _start_relay(lab, datapath, state, Path(state, f"relay-{datapath}-{fanout}.log"))
    procs: list[subprocess.Popen] = [relay]
    try:
        # sessions up and past the group they joined on (served from the cache by userspace, the
        # kernel takes over at the next group): the window measures the steady state
        warmup = max(2.0, 1.5 * GOP / rate)
        pub = subprocess.Popen(exec_argv(lab.publisher.netns, _fr(
            "publish", f"moqt://{lab.publisher.relay_ipv4}:{PORT}", "-N", NS, "-T", TRACK, "--source", "synthetic",
            "--tag", "--fps", str(rate), "--object-size", str(SIZE), "--gop", str(GOP), "--duration",
            str(seconds + warmup + 1), "--wait", "20", *crypto)), stdout=subprocess.PIPE,
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
                    "-T", TRACK, "--subscribers", str(n), *crypto,
                    "--duration", str(seconds + warmup + 15)]), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    text=True))
        procs += loads
        time.sleep(warmup)
        probe.reset()
        # the metrics scrapes lie outside the CPU window: before its start, after its end
        scraped0 = _scrape(lab) if kernel else {}
        sw0, dev0 = _switches(relay.pid), _net_dev(relay.pid)
        cpu0, bpf0, t0 = netns_cpu_s(lab.relay_ns), _programs_run(relay.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, bpf1, t1 = netns_cpu_s(lab.relay_ns), _programs_run(relay.pid), time.monotonic()
        sw1, dev1 = _switches(relay.pid), _net_dev(relay.pid)
        scraped1 = _scrape(lab) if kernel else {}
        measured = probe.read()
        sent = json.loads(pub.communicate(timeout=seconds + 60)[0].strip().splitlines()[-1])
        summaries = [s for p in loads for s in json.loads(p.communicate(timeout=seconds + 60)[0].strip()
                                                           .splitlines()[-1])]
        relay.send_signal(signal.SIGTERM)
        out = relay.communicate(timeout=30)[0]
        stats = {} if peer else json.loads(out.strip().splitlines()[-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    window = t1 - t0
    total = sum(measured[1:], measured[0])
    if delays is not None:
        delays[(datapath, fanout)] = total
    upstream = dev1[lab.publisher.relay_ifname][0] - dev0[lab.publisher.relay_ifname][0]
    if peer:  # encrypted: no tag to see; every packet the relay sent to the subscribers counts
        packets = sum(dev1[link.relay_ifname][1] - dev0[link.relay_ifname][1] for link in lab.subscribers)
    else:
        packets = total.packets
    bpf_ns = _bpf_ns(bpf0, bpf1, scraped1.get("clones", 0) - scraped0.get("clones", 0))
    rec0, rec1 = scraped0.get("records"), scraped1.get("records")
    cpu_s = (cpu1 - cpu0) + bpf_ns / 1e9
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
                cpu_s * 1e6 / packets if packets else None, lost, rate, round(share, 3),
                records_per_packet=round((rec1 - rec0) / packets, 3) if rec0 is not None and rec1 is not None
                and packets else None,
                wakeups_per_s=round((sw1[0] - sw0[0]) / window, 1),
                nonvoluntary_switches_per_s=round((sw1[1] - sw0[1]) / window, 1),
                bpf_ns_per_packet=round(bpf_ns / packets, 1) if kernel and packets else None,
                cpu_us_per_upstream_packet=cpu_s * 1e6 / upstream if upstream else None,
                upstream_packets_per_s=round(upstream / window, 1))


class QuicShape(PayloadShape):
    """Plaintext 1-RTT packets of one publisher connection carrying one subgroup stream: header,
    destination id, 2-byte packet number, one STREAM frame (offset and length always present,
    8- and 2-byte varints so every packet has the same layout), the zero tag. Datagram 0 opens
    the stream with a SUBGROUP_HEADER; every data chunk starts with the probes' tag."""

    CID = bytes.fromhex("6d6f71626c617374")
    ALIAS, STREAM_ID, CHUNK = 5, 2, 1000

    def __init__(self) -> None:
        self.size = 1 + 8 + 2 + 1 + 1 + 8 + 2 + self.CHUNK + 16

    def fill(self, buf: bytearray, offset: int, seq: int) -> None:
        o = offset
        buf[o] = 0x41
        buf[o + 1:o + 9] = self.CID
        buf[o + 9:o + 11] = (seq & 0xFFFF).to_bytes(2, "big")
        buf[o + 11] = 0x0E  # STREAM, offset and length present
        buf[o + 12] = self.STREAM_ID
        buf[o + 13:o + 21] = ((0xC0 << 56) | seq * self.CHUNK).to_bytes(8, "big")
        buf[o + 21:o + 23] = (0x4000 | self.CHUNK).to_bytes(2, "big")
        data = o + 23
        if seq == 0:  # SUBGROUP_HEADER: type 0x10, alias, group 0, publisher priority 0
            buf[data:data + 4] = bytes([0x10, self.ALIAS, 0, 0])
            data += 4
        TAG.pack_into(buf, data, MAGIC, 0, seq)
        buf[o + self.size - 16:o + self.size] = bytes(16)


def capacity(lab: Lab, probe: DelayProbe, fanout: int, seconds: float) -> dict[str, float]:
    """Copies/s the kernel delivers when the sender offers all it can, the same QUIC-shaped
    packets through (a) the MoQT fast path's programs and (b) the UDP fan-out program. Data
    plane only: the MoQT records are drained without registering them in QUIC connections."""
    from ..datapath.kernel.maps import ConnSpec, KernelMaps

    shape = QuicShape()
    src_port, port = 40000, udp_fanout.PORT
    out = {}
    probe.set_sink(True)
    try:
        with entered(lab.relay_ns):
            idx = {link.relay_ifname: socket.if_nametoindex(link.relay_ifname) for link in lab.links}
            fp = KernelMaps(port, ingress=[idx["pub0"]], egress=[idx[s.relay_ifname] for s in lab.subscribers])
        try:
            up = fp.add_upstream(shape.CID, (lab.publisher.ipv4, src_port))
            fp.set_alias(up, shape.ALIAS, 1)
            for i in range(fanout):
                link = lab.subscribers[i % len(lab.subscribers)]
                spec = ConnSpec(ifindex=idx[link.relay_ifname], src_mac=link.relay_mac, dst_mac=link.mac,
                                src=(link.relay_ipv4, port), dst=(link.ipv4, 7000 + i), dcid=bytes([i + 1]) * 8,
                                max_stream=1 << 40, stream_window=1 << 61, max_payload=1472)
                fp.subscribe(fp.add_conn(spec, next_pn=0, next_stream=3, budget=1 << 60, credit=1 << 60), 1, 9)
            out["moq_kernel"] = _blast(lab, probe, fp, shape, src_port, port, seconds)
            out["moq_ringbuf_full"] = fp.counters()["ringbuf_full"]
        finally:
            fp.close()
        with udp_fanout.relay(lab, "kernel", fanout):
            out["udp_fanout_kernel"] = _blast(lab, probe, None, shape, src_port, port, seconds)
    finally:
        probe.set_sink(False)
    return out


def _blast(lab: Lab, probe: DelayProbe, fp, shape: QuicShape, src_port: int, port: int, seconds: float) -> float:
    """Send as fast as possible for `seconds`; copies/s the subscribers' probes counted. With a
    fast path, its records are drained meanwhile (as a relay would, minus the registration) by
    a forked child, so the drain does not take the sender's interpreter lock."""
    child = None
    if fp is not None:
        child = os.fork()
        if child == 0:  # the drainer: the ring is shared (mmap), its consumer position is ours now
            try:
                while True:
                    if not len(fp.drain()):
                        time.sleep(0.0005)
            finally:
                os._exit(0)
    try:
        probe.reset()
        with entered(lab.publisher.netns):
            src = UdpSource((lab.publisher.relay_ipv4, port), shape=shape, duration=seconds,
                            bind=(lab.publisher.ipv4, src_port))
        with src:
            sent = src.run()
        time.sleep(0.2)
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    return sum(d.packets for d in probe.read()) / sent["seconds"]


def _us(d: Delays, q: float) -> float | None:
    return round(d.percentile(q) / 1e3, 1) if d.matched else None


def main(args: argparse.Namespace) -> int:
    fanouts = [int(x) for x in args.fanouts.split(",")] if args.fanouts else list(
        QUICK_FANOUTS if args.quick else FANOUTS)
    seconds = args.seconds or (3.0 if args.quick else 6.0)
    datapaths = args.datapaths.split(",") if args.datapaths else list(DATAPATHS)
    labels = [*RELAY_ARGS, *peers.PEERS]
    unknown = [d for d in datapaths if d not in labels]
    if unknown:
        print(f"fastrelay: error: unknown data path {', '.join(unknown)} (choose from {', '.join(labels)})",
              file=sys.stderr)
        return 2
    missing = [d for d in datapaths if d in peers.PEERS and not peers.installed(d)]
    if missing:
        print(f"fastrelay: error: {', '.join(missing)}: not installed (the dev extras install the peers' relays)",
              file=sys.stderr)
        return 2
    cases: list[Case] = []
    failed: list[dict[str, object]] = []  # a peer that breaks a case must not cost the other rows
    cdfs: dict[tuple[str, int], Delays] = {}
    stats_fd = enable_run_stats()
    try:
        with Lab(LAB, NAMESPACES) as lab, tempfile.TemporaryDirectory() as state:
            rx = [(link.netns, link.ifname, link.mac) for link in lab.subscribers]
            with DelayProbe((lab.publisher.netns, lab.publisher.ifname), rx, scan=1400) as probe:
                cap = capacity(lab, probe, CAPACITY_FANOUT, min(seconds, 3.0))
                print(f"  capacity at fan-out {CAPACITY_FANOUT}: MoQT kernel data plane"
                      f" {cap['moq_kernel']:.0f} copies/s, UDP fan-out {cap['udp_fanout_kernel']:.0f} copies/s",
                      file=sys.stderr)
                for fanout in fanouts:
                    for datapath in datapaths:
                        try:
                            c = run_case(lab, probe, datapath, fanout, seconds, state, cdfs)
                        except (RuntimeError, ValueError, IndexError, subprocess.TimeoutExpired) as exc:
                            if datapath not in peers.PEERS:
                                raise
                            last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                            failed.append({"datapath": datapath, "fanout": fanout, "error": last})
                            print(f"  {datapath:9} fanout {fanout:3}  failed: {last}", file=sys.stderr)
                            continue
                        cases.append(c)
                        print(f"  {c.datapath:9} fanout {c.fanout:3}  {c.objects_per_s:7.0f} obj/s"
                              f"  {c.packets_per_s:7.0f} pkt/s  delay p50 {c.delay_p50_us} us p99 {c.delay_p99_us} us"
                              f"  cpu {_f(c.cpu_us_per_packet, 1)} us/pkt {_f(c.cpu_us_per_upstream_packet, 1)}"
                              f" us/upstream pkt  lost {c.lost}  kernel share {c.kernel_packet_share}"
                              f"  records/pkt {c.records_per_packet}  wakeups/s {c.wakeups_per_s:.0f}"
                              f" (+{c.nonvoluntary_switches_per_s:.0f} involuntary)"
                              f"  bpf {c.bpf_ns_per_packet} ns/pkt", file=sys.stderr)
    finally:
        os.close(stats_fd)
    for line in notes(cases, failed):
        print(f"  - {line}", file=sys.stderr)
    plots = plot(cases, cdfs, Path(args.plots)) if args.plots else []
    if args.write:
        replace_section(Path(args.write), "moq-datapath", _report(cases, failed, seconds, cap, plots))
    if args.json:
        print(json.dumps({"cases": [asdict(c) for c in cases], "capacity": cap, "failed": failed}))
    return 1 if failed else 0


def plot(cases: list[Case], cdfs: dict[tuple[str, int], Delays], out: Path) -> list[Path]:
    """Delay CDFs per data path and fan-out, relay CPU per packet as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cdf_path = delay_cdf_plot({k: v for k, v in cdfs.items() if k[0] in DATAPATHS},
                              "MoQT relay: kernel (solid) vs userspace (dashed) data path",
                              "one-way packet delay publisher -> subscriber (us, log)",
                              out / "moq_datapath_delay_cdf.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    fanouts = sorted({c.fanout for c in cases})
    by = {(c.datapath, c.fanout): c.cpu_us_per_packet or 0 for c in cases}
    datapaths = list(dict.fromkeys(c.datapath for c in cases))
    width = 0.8 / len(datapaths)
    for k, dp in enumerate(datapaths):
        ax.bar([i + (k - (len(datapaths) - 1) / 2) * width for i in range(len(fanouts))],
               [by.get((dp, f), 0) for f in fanouts], width, label=dp)
    ax.set_xticks(range(len(fanouts)), [str(f) for f in fanouts])
    ax.set_xlabel("fan-out (subscribers)")
    ax.set_ylabel("relay CPU per delivered packet (us)")
    ax.set_title("MoQT relay CPU per packet (processes + BPF run time)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    cpu_path = out / "moq_datapath_cpu.png"
    fig.tight_layout()
    fig.savefig(cpu_path, dpi=110)
    plt.close(fig)
    return [cdf_path, cpu_path]


def _report(cases: list[Case], failed: list[dict[str, object]], seconds: float, cap: dict[str, float],
            plots: list[Path]) -> str:
    rows = [[c.datapath, c.fanout, f"{c.rate:g}", f"{c.objects_per_s:.0f}", f"{c.packets_per_s:.0f}",
             _f(c.delay_p50_us, 1), _f(c.delay_p99_us, 1), _f(c.cpu_us_per_packet, 1),
             _f(c.cpu_us_per_upstream_packet, 1), _f(c.records_per_packet, 3), f"{c.wakeups_per_s:.0f}",
             _f(c.bpf_ns_per_packet, 0), c.lost, f"{c.kernel_packet_share:.2f}"] for c in cases]
    peer_rows = any(c.datapath in peers.PEERS for c in cases)
    return "\n".join([
        "## MoQT relay: kernel vs userspace data path" + (" (and aiomoqt's and moq-dev's relays)" if peer_rows else ""),
        "",
        f"Measured {datetime.date.today()} on {platform.node()} ({os.cpu_count()} CPUs), one lab, one run: "
        f"synthetic {SIZE}-byte objects (groups of {GOP}), plaintext QUIC on our data paths, the offered rate "
        f"scaled so that {TOTAL_RATE} objects/s are delivered in all, {seconds:g} s measured per case after a"
        " warm-up of at least one and a half groups (every subscriber past the group it joined on):",
        "",
        "    " + "fastrelay bench moq-datapath " + " ".join(sys.argv[3:]),
        "",
        table(["data path", "fan-out", "objects/s offered", "objects/s delivered", "media packets/s delivered",
               "delay p50 us", "delay p99 us", "relay CPU us/packet", "relay CPU us/upstream packet",
               "ring records/packet", "relay wake-ups/s", "BPF ns/packet", "lost", "kernel share"], rows),
        "",
        *[f"- {line}" for line in notes(cases, failed)],
        f"- capacity at fan-out {CAPACITY_FANOUT} (sender as fast as it can, sink probes): the MoQT fast path's"
        f" programs delivered {cap['moq_kernel']:.0f} copies/s, the bare UDP fan-out program"
        f" {cap['udp_fanout_kernel']:.0f}: ratio {cap['moq_kernel'] / cap['udp_fanout_kernel']:.2f} (target >= 0.6)."
        " Data plane only: the records were drained, not registered in QUIC connections (the relay's"
        " Python registration, in the rows above, is far slower than either program).",
        *[f"![{p}]({p})" for p in plots],
    ])


def notes(cases: list[Case], failed: list[dict[str, object]]) -> list[str]:
    """The ratio lines with their targets, what each column is, what the peers did not take."""
    out = ratios(cases)
    offered = {(c.datapath, c.fanout): c.rate * c.fanout for c in cases}
    for c in cases:
        if c.datapath in peers.PEERS and c.objects_per_s < 0.9 * offered[(c.datapath, c.fanout)]:
            why = PEER_SHORTFALL.get(c.datapath, "not investigated here")
            out.append(f"{c.datapath} fan-out {c.fanout}: delivered {c.objects_per_s:.0f} of"
                       f" {offered[(c.datapath, c.fanout)]:.0f} objects/s offered, lost {c.lost}: {why}")
    out += [f"{f['datapath']} fan-out {f['fanout']}: failed ({f['error']})" for f in failed]
    out.append(
        "delay: BPF timestamps at the publisher's egress and each subscriber's ingress; relay CPU: the relay"
        " namespace's processes (schedstat) plus the run time (bpf_stats) of the BPF programs the relay process"
        " holds, per delivered media packet and per upstream packet (packets the relay namespace's"
        " publisher-facing interface received, rx_packets in /proc/PID/net/dev); kernel share: media packets the"
        " kernel sent / all media packets delivered; ring records/packet: ring-buffer records the relay's kernel"
        " path drained (SENT, RENUMBERED, HANDOVER and ACK records: its `records` counter, scraped from its"
        " --metrics endpoint at the window's ends) per delivered media packet, n/a without a kernel path; relay"
        " wake-ups/s: voluntary context switches (/proc/PID/task/*/status voluntary_ctxt_switches) of all"
        " threads of the relay process per second, each a thread that blocked (the event loop's epoll_wait,"
        " mostly) and was woken; involuntary switches (preemptions) are in --json as"
        " nonvoluntary_switches_per_s; fastrelay's metrics thread adds about 2/s; a saturated relay rarely"
        " blocks, so few wake-ups with many involuntary switches mean saturation, not thrift; BPF ns/packet: that"
        " BPF run time per delivered media packet, kernel paths only: the ingress program's run time (which holds"
        " the egress runs of the clones it made, inside its bpf_clone_redirect, and the kernel's work"
        " transmitting them) plus the egress program's run time in the share of its runs that were not clones;"
        " an upper bound.")
    if any(c.datapath in peers.PEERS for c in cases):
        out.append(
            "aiomoqt and moq-dev rows: their relays (bench/peers.py) in the same relay namespace at the same offered"
            " load, with the same fastrelay publisher and subscribers on standard QUIC crypto (the peers do not"
            " speak the plaintext mode). Their payloads are encrypted, so the probes cannot see the tag: delay"
            " n/a, and their media packets/s delivered counts every packet the relay sent out of its"
            " subscriber-facing interfaces (interface tx_packets: media plus the relay's ACK and control packets,"
            " the excess over objects/s delivered; their CPU per packet reads low by that share).")
    return out


# why a peer relay delivers less than it is offered here
PEER_SHORTFALL = {
    "moq-dev": "moq-dev's relay takes one stream per group and fastrelay publish sends a group as two subgroups"
               " (object 0, the keyframe, then the rest), so it forwards object 0 of each group only (BENCHMARKS.md's"
               " moq section, tests/interop/test_moq_dev.py); its CPU per packet is for that lighter load",
}


def ratios(cases: list[Case]) -> list[str]:
    """Per fan-out: kernel/userspace ratios, the kernel path's own costs and kernel vs the peers, with the targets."""
    by = {(c.datapath, c.fanout): c for c in cases}
    out = []
    for fanout in sorted({c.fanout for c in cases}):
        k, u = by.get(("kernel", fanout)), by.get(("userspace", fanout))
        parts = []
        if k and u:
            pairs = [("delay p50", k.delay_p50_us, u.delay_p50_us, 0.1),
                     ("delay p99", k.delay_p99_us, u.delay_p99_us, 0.1),
                     ("relay CPU per packet", k.cpu_us_per_packet, u.cpu_us_per_packet, 0.125)]
            if fanout == 1:
                pairs.append(("relay CPU per upstream packet", k.cpu_us_per_upstream_packet,
                              u.cpu_us_per_upstream_packet, 0.5))
            for label, a, b, target in pairs:
                if a and b:
                    parts.append(f"{label} kernel/userspace {a / b:.2f} (target <= {target:g})")
        if k and k.records_per_packet is not None:
            parts.append(f"ring records per delivered packet (kernel) {k.records_per_packet:.2f}"
                         f" (target <= 0.05 at 0% loss; lost {k.lost})")
        if k and k.bpf_ns_per_packet is not None:
            parts.append(f"BPF run time per copy (kernel) {k.bpf_ns_per_packet / 1e3:.2f} us (target <= 2)")
        for peer, target in (("aiomoqt", ">= 3"), ("moq-dev", "> 1")):
            a = by.get((peer, fanout))
            if k and a and k.cpu_us_per_packet and a.cpu_us_per_packet:
                parts.append(f"relay CPU per packet {peer}/kernel {a.cpu_us_per_packet / k.cpu_us_per_packet:.2f}"
                             f" (target {target})")
        p = by.get(("kernel-pass-acks", fanout))
        if k and p and p.cpu_us_per_packet and k.cpu_us_per_packet:
            parts.append(f"relay CPU per packet kernel/kernel-pass-acks {k.cpu_us_per_packet / p.cpu_us_per_packet:.2f}"
                         " (the subscribers' ACK-only packets read by the kernel vs by the socket)")
        if parts:
            out.append(f"fan-out {fanout}: " + "; ".join(parts))
    return out


def _f(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"
