"""`fastrelay bench moq`: the MoQT relay under load, side by side with another relay.

Per fan-out, one run: a relay process, a publisher process sending synthetic objects at a
fixed rate, and one process holding N subscriber sessions. Reported per case: delivered
objects/s, end-to-end latency p50/p99 (subscriber clock minus the publisher's send-time
extension, same host), relay CPU per delivered object (schedstat of the relay process) and
objects lost. Relays: fastrelay on the chosen data path (`--datapath`) and, where installed,
aiomoqt's and moq-dev's (userspace, launched by bench/peers.py; moq-dev's is its `moq` package's
Server with one origin for publishing and subscribing, as moq-relay does).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..lab.cpu import process_cpu_s
from . import peers
from .peers import PEERS
from .report import replace_section, table

NS, TRACK = "bench/moq", "synthetic"
# `fastrelay relay` arguments per data path the benchmark can run it on
DATAPATHS: dict[str, tuple[str, ...]] = {"userspace": ()}


@dataclass
class MoqCase:
    relay: str
    datapath: str
    fanout: int
    objects_per_s: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    cpu_ms_per_object: float | None
    lost: int


class CaseFailed(RuntimeError):
    """A process of the case ended without its result (the message: which, and its last words)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relay_command(name: str, port: int, state: str, datapath: str = "userspace") -> list[str]:
    """The command running relay `name` on 127.0.0.1:port (draft-16, raw QUIC); `datapath` is
    fastrelay's (the other relays are userspace only)."""
    if name == "fastrelay":
        if datapath not in DATAPATHS:
            raise ValueError(f"data path {datapath!r}: choose from {', '.join(DATAPATHS)}")
        return [sys.executable, "-m", "fastrelay", "relay", f"moqt://127.0.0.1:{port}", "--state-dir", state,
                "--drafts", "16", *DATAPATHS[datapath]]
    return peers.relay_command(name, "127.0.0.1", port, state)


def available_relays() -> list[str]:
    """fastrelay, plus each other relay whose distribution is installed."""
    return ["fastrelay"] + [name for name in PEERS if peers.installed(name)]


def run_case(relay: str, fanout: int, rate: float, size: int, seconds: float, datapath: str = "userspace") -> MoqCase:
    """One relay process, one publisher, `fanout` subscribers for `seconds`; the measured case."""
    port = _free_port()
    url = f"moqt://127.0.0.1:{port}"
    datapath = datapath if relay == "fastrelay" else "userspace"
    with tempfile.TemporaryDirectory() as state:
        rproc = subprocess.Popen(relay_command(relay, port, state, datapath), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=peers.relay_env() if relay in PEERS else None)
        procs = [rproc]
        try:
            time.sleep(1.5)
            pub = subprocess.Popen([sys.executable, "-m", "fastrelay", "publish", url, "-N", NS, "-T", TRACK,
                                    "--source", "synthetic", "--fps", str(rate), "--object-size", str(size),
                                    "--gop", "30", "--duration", str(seconds), "--wait", "15"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(pub)
            time.sleep(0.5)
            subs = subprocess.Popen([sys.executable, "-m", "fastrelay.bench.moq", "subscribers", str(fanout),
                                     "--url", url, "--seconds", str(seconds + 10)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(subs)
            cpu0 = process_cpu_s(rproc.pid)
            sent = _result(pub, "publisher", seconds + 60)
            cpu1 = process_cpu_s(rproc.pid)
            results = _result(subs, "subscribers", seconds + 60)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    delivered = sum(r["objects"] for r in results)
    lat = sorted(x for r in results for x in r["latencies"])
    return MoqCase(relay, datapath, fanout, delivered / seconds,
                   lat[len(lat) // 2] if lat else None, lat[int(0.99 * (len(lat) - 1))] if lat else None,
                   (cpu1 - cpu0) * 1e3 / delivered if delivered else None,
                   sent["objects"] * fanout - delivered)


def _result(proc: subprocess.Popen[str], name: str, timeout: float) -> Any:
    """The JSON result `proc` prints last; CaseFailed if it printed none or failed."""
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    if proc.returncode or not lines:
        last = err.strip().splitlines()[-1:] or ["no output"]
        raise CaseFailed(f"{name} exited {proc.returncode}: {last[0]}")
    return json.loads(lines[-1])


async def _subscribers(url: str, n: int, seconds: float) -> list[dict]:
    from ..endpoints.subscriber import subscribe

    async def one() -> dict:
        r = await subscribe(url, tuple(f.encode() for f in NS.split("/")), TRACK.encode(), codec="raw",
                            duration=seconds)
        return {"objects": r.objects, "latencies": r.latencies_ms}

    return list(await asyncio.gather(*(one() for _ in range(n))))


def main(args: argparse.Namespace) -> int:
    fanouts = [int(x) for x in (args.fanouts or ("1,4" if args.quick else "1,4,16")).split(",")]
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    relays = available_relays()
    cases: list[MoqCase] = []
    failed: list[dict[str, object]] = []  # a peer that breaks a case must not cost the other rows
    for relay in relays:
        for fanout in fanouts:
            try:
                c = run_case(relay, fanout, rate=args.rate, size=args.size, seconds=seconds, datapath=args.datapath)
            except CaseFailed as exc:
                failed.append({"relay": relay, "fanout": fanout, "error": str(exc)})
                print(f"  {relay:10} fanout {fanout:3}  failed: {exc}", file=sys.stderr)
                continue
            cases.append(c)
            print(f"  {c.relay:10} {c.datapath:9} fanout {c.fanout:3}  objects/s {c.objects_per_s:8.0f}"
                  f"  p50 {c.latency_p50_ms} ms  p99 {c.latency_p99_ms} ms  cpu {c.cpu_ms_per_object} ms/object"
                  f"  lost {c.lost}",
                  file=sys.stderr)
    if args.write:
        peers = [r for r in relays if r != "fastrelay"]
        vs = f" vs {' and '.join(f"{p}'s" for p in peers)} relay{'s' if len(peers) > 1 else ''}" if peers else ""
        rows = [[c.relay, c.datapath, c.fanout, f"{c.objects_per_s:.0f}", _f(c.latency_p50_ms), _f(c.latency_p99_ms),
                 _f(c.cpu_ms_per_object, 4), c.lost] for c in cases]
        body = "\n".join([
            f"## MoQT relay ({args.datapath} data path){vs}",
            "",
            f"Measured {datetime.date.today()} on {platform.node()} ({os.cpu_count()} CPUs), synthetic objects of "
            f"{args.size} bytes at {args.rate:g}/s, {seconds:g} s per case, publisher, relay and subscribers on "
            "one host (loopback), one run; the same fastrelay publisher and subscribers for every relay:",
            "",
            "    " + "fastrelay bench moq " + " ".join(sys.argv[3:]),
            "",
            table(["relay", "data path", "fan-out", "objects/s delivered", "latency p50 ms", "latency p99 ms",
                   "relay CPU ms/object", "lost"], rows),
            "",
            *[f"- {line}" for line in _ratios(cases)],
            *[f"- {f['relay']} fan-out {f['fanout']}: failed ({f['error']})" for f in failed],
            "- lost = objects published x fan-out - objects delivered; a relay that cannot keep up makes its"
            " subscribers fall behind, and fastrelay's then skip to newer groups (its bounded-backlog rule).",
            *([MOQ_DEV_NOTE] if "moq-dev" in peers else []),
        ])
        replace_section(Path(args.write), "moq", body)
    if args.json:
        print(json.dumps({"cases": [asdict(c) for c in cases], "failed": failed}))
    return 1 if failed else 0


MOQ_DEV_NOTE = (
    "- moq-dev's relay takes one stream per group, and fastrelay publish sends a group as two subgroups"
    " (object 0, the keyframe, then the rest): it forwards object 0 of each group only, lost counts the"
    " rest (tests/interop/test_moq_dev.py). It also replaces the objects' extension headers with its own"
    " timestamp, so the publisher's send time does not arrive: latency n/a.")


def _ratios(cases: list[MoqCase]) -> list[str]:
    by = {(c.relay, c.fanout): c for c in cases}
    out = []
    for fanout in sorted({c.fanout for c in cases}):
        f = by.get(("fastrelay", fanout))
        for peer in PEERS:
            a = by.get((peer, fanout))
            # per delivered object, CPU compares only relays that delivered (about) the same load
            if f and a and f.cpu_ms_per_object and a.cpu_ms_per_object and a.objects_per_s >= 0.9 * f.objects_per_s:
                ratio = f.cpu_ms_per_object / a.cpu_ms_per_object
                out.append(f"fan-out {fanout}: relay CPU per object fastrelay/{peer} {ratio:.1f}x,"
                           f" delivered {f.objects_per_s:.0f} vs {a.objects_per_s:.0f} objects/s")
    return out


def _f(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


if __name__ == "__main__":  # the other process of a case: its subscribers (moq-dev's relay: bench/peers.py)
    p = argparse.ArgumentParser()
    role = p.add_subparsers(dest="role", required=True)
    sp = role.add_parser("subscribers")
    sp.add_argument("n", type=int)
    sp.add_argument("--url", required=True)
    sp.add_argument("--seconds", type=float, required=True)
    a = p.parse_args()
    print(json.dumps(asyncio.run(_subscribers(a.url, a.n, a.seconds))))
