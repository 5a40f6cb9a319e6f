"""`fastrelay` command line."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Coroutine

from .kernel.errors import KernelError


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import render, run_checks

    checks = run_checks(args.source)
    print(json.dumps([c.as_dict() for c in checks], indent=2) if args.json else render(checks))
    return 0 if all(c.ok or c.name == "netem" for c in checks) else 1


def _build(args: argparse.Namespace) -> int:
    from .kernel.build import build_all, variants

    if not args.verifier:
        for name, path in build_all().items():
            print(f"{name}: {path}")
        return 0
    from .kernel.verifier import BOUND, measure_all

    costs = [c for v in variants() for c in measure_all(v)]
    if args.json:
        print(json.dumps([c.as_dict() for c in costs], indent=2))
    else:
        print(f"{'program':16} {'variant':22} processed insns (bound {BOUND:,})")
        for c in sorted(costs, key=lambda c: (c.source, c.program)):
            count = f"{c.insns:,}" if c.insns is not None else "?"
            print(f"{c.program:16} {c.variant:22} {count}{'' if c.ok else '  ' + c.error}")
    return 0 if all(c.ok and c.insns is not None and c.insns <= BOUND for c in costs) else 1


def _cleanup(args: argparse.Namespace) -> int:
    import os
    import shutil

    from .kernel.attach import sweep
    from .kernel.stats import PIN_ROOT
    from .netns import NETNS_RUN_DIR, entered

    removed = sweep()
    for ns in sorted(os.listdir(NETNS_RUN_DIR)) if os.path.isdir(NETNS_RUN_DIR) else []:
        with entered(ns):
            removed += sweep()
    if os.path.isdir(PIN_ROOT):
        shutil.rmtree(PIN_ROOT)
        print(f"removed pinned objects under {PIN_ROOT}")
    print(f"removed {removed} stale clsact filter(s)")
    return 0


def _udp_fanout(args: argparse.Namespace) -> int:
    from .fanout.endpoints import parse_endpoint
    from .fanout.relay import FanoutRelay

    relay = FanoutRelay(parse_endpoint(args.listen), args.datapath, control=args.control,
                        interfaces=args.interface, source=args.source, neighbour_refresh=args.neighbour_refresh)
    try:
        for addr in args.sub or []:
            relay.add(addr)
        logging.getLogger("fastrelay").info("udp-fanout on %s, data path %s, %d subscribers", relay.listen,
                                            args.datapath, len(relay.datapath.subs))
        relay.run()
        if args.stats:
            print(json.dumps(relay.stats()))
    finally:
        relay.close()
    return 0


def _fanout_ctl(args: argparse.Namespace) -> int:
    from .fanout.control import request

    req: dict[str, object] = {"op": args.op}
    if args.op in ("add", "remove"):
        if not args.addr:
            raise ValueError(f"{args.op} needs ADDR:PORT")
        req["addr"] = args.addr
    reply = request(args.control, req)
    print(json.dumps(reply, indent=None if args.op in ("add", "remove") else 2))
    return 0 if reply.get("ok") else 1


def _lab(args: argparse.Namespace) -> int:
    from .lab import topology

    if args.action == "up":
        lab = topology.Lab(args.name, args.subscribers).up()
        print(f"lab {args.name}: relay namespace {lab.relay_ns}, publisher {lab.publisher.netns} "
              f"({lab.publisher.ipv4} -> {lab.publisher.relay_ipv4}), {len(lab.subscribers)} subscribers "
              f"({', '.join(s.ipv4 for s in lab.subscribers[:4])}{' ...' if len(lab.subscribers) > 4 else ''})")
    elif args.action == "impair":
        _impair(args)
    elif args.action == "down":
        removed = topology.destroy(args.name)
        print(f"removed {len(removed)} namespaces" if removed else f"no lab named {args.name}")
    else:
        labs = topology.list_labs()
        for name, spaces in labs.items():
            print(f"{name}: {len(spaces)} namespaces ({', '.join(spaces[:5])}{' ...' if len(spaces) > 5 else ''})")
        if not labs:
            print("no labs")
    return 0


def _impair(args: argparse.Namespace) -> None:
    """Apply impairments to one lab link; they outlive this command until --clear or `lab down`."""
    from .lab import impair, topology

    if args.sub is None:
        raise ValueError("lab impair needs --sub I (a subscriber link) or --sub pub (the publisher link)")
    labs = topology.list_labs()
    if args.name not in labs:
        raise ValueError(f"no lab named {args.name} (fastrelay lab up --name {args.name})")
    n_subs = sum(1 for ns in labs[args.name] if ns.startswith(f"fr-{args.name}-s"))
    lab = topology.Lab(args.name, n_subs)
    if args.sub == "pub":
        link, shaped = lab.publisher, (lab.publisher.netns, lab.publisher.ifname)  # publisher -> relay
    elif args.sub.isdigit() and int(args.sub) < n_subs:
        link = lab.subscribers[int(args.sub)]
        shaped = (lab.relay_ns, link.relay_ifname)  # relay -> subscriber
    else:
        raise ValueError(f"--sub must be pub or 0..{n_subs - 1}")
    # loss acts where packets arrive: the relay for the publisher link, the subscriber otherwise
    lossy = (lab.relay_ns, link.relay_ifname) if args.sub == "pub" else (link.netns, link.ifname)
    pin = f"{topology.pin_dir(args.name)}/loss-{args.sub}"
    if args.clear:
        impair.clear_loss(*lossy, pin)
        impair.clear(*shaped)
        print(f"link {args.sub}: impairments cleared")
        return
    if args.loss is not None:
        impair.clear_loss(*lossy, pin)
        impair.RandomLoss(*lossy, args.loss).persist(pin)
    if args.rate and args.delay:
        raise ValueError("--rate and --delay are separate root qdiscs here: pick one")
    if args.rate:
        impair.rate_limit(*shaped, args.rate)
    if args.delay:
        impair.delay(*shaped, args.delay)
    print(f"link {args.sub}: loss {args.loss or 0:.1%}, rate {args.rate or '-'}, delay {args.delay or '-'} ms")


def _namespace(text: str) -> tuple[bytes, ...]:
    fields = tuple(f.encode() for f in text.split("/"))
    if not all(fields) or len(fields) > 32:
        raise ValueError(f"namespace {text!r}: 1..32 non-empty fields separated by '/'")
    return fields


def _draft(text: str):
    from .moq.params import Version

    return {"16": Version.DRAFT_16, "14": Version.DRAFT_14}[text]


def _relay(args: argparse.Namespace) -> int:
    import asyncio
    import signal
    from pathlib import Path

    from .endpoints.endpoint import MoqtUrl, serve_relay
    from .moq.relay import Relay
    from .quic.tls import certificate_files

    url = MoqtUrl.parse(args.url)
    cert, key = certificate_files(args.cert, args.key, [url.host if url.host != "0.0.0.0" else "127.0.0.1"],
                                  Path(args.state_dir))

    if args.datapath == "kernel" and not args.insecure_plaintext:
        raise ValueError("--datapath kernel needs --insecure-plaintext: the kernel reads QUIC headers and frames")
    if args.insecure_plaintext:
        logging.getLogger("fastrelay").warning(
            "INSECURE: --insecure-plaintext offers QUIC without packet protection to peers that offer it too")

    # netlink (pyroute2) must not run inside the event loop: the kernel path is set up and
    # torn down around it
    kernel = _kernel_datapath(args, url) if args.datapath == "kernel" else None

    async def main() -> None:
        relay = Relay(cache_groups=args.cache_groups, cache_bytes=args.cache_bytes, max_backlog=args.max_backlog,
                      datapath=kernel)
        server = await serve_relay(relay, url.host, url.port, str(cert), str(key),
                                   tuple(_draft(d) for d in args.drafts.split(",")),
                                   plaintext=args.insecure_plaintext, kernel=kernel)
        if kernel is not None:
            kernel.start(asyncio.get_running_loop())
        await serve(relay, server, kernel)

    async def serve(relay, server, kernel) -> None:
        if args.metrics:
            from prometheus_client import REGISTRY, start_http_server

            from .endpoints.metrics import RelayCollector

            host, _, port = args.metrics.rpartition(":")
            REGISTRY.register(RelayCollector(relay, kernel))
            start_http_server(int(port), addr=host or "0.0.0.0")
        logging.getLogger("fastrelay").info("MoQT relay on %s (drafts %s, %s data path)", args.url, args.drafts,
                                            args.datapath)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        if relay.goaway():  # let sessions see GOAWAY and leave before the sockets go
            await asyncio.sleep(args.goaway_grace)
        server.close()
        stats = dict(relay.stats.__dict__)
        if kernel is not None:
            stats["kernel"] = kernel.counters()
        print(json.dumps(stats))

    try:
        asyncio.run(main())
    finally:
        if kernel is not None:
            kernel.close()
    return 0


def _kernel_datapath(args: argparse.Namespace, url):
    """The kernel data path on the relay's interfaces (all but loopback unless --interface)."""
    import socket

    from .datapath.kernel.path import KernelDatapath
    from .kernel import privileges

    privileges.require()
    names = args.interface or [name for _, name in socket.if_nameindex() if name != "lo"]
    return KernelDatapath(url.port, [socket.if_nametoindex(n) for n in names],
                          protect_priority=args.protect_priority, absorb_acks=not args.pass_acks,
                          kernel_recovery=args.recovery == "kernel")


def _connect_timeout(text: str) -> float:
    """--connect-timeout: a positive, finite number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def _client_options(args: argparse.Namespace) -> dict[str, object]:
    """publish()/subscribe() keyword arguments shared by both commands."""
    return {"version": _draft(args.draft), "plaintext": args.insecure_plaintext, "verify_cert": args.verify_cert,
            "cafile": args.ca, "connect_timeout": args.connect_timeout}


def _run_client[T](args: argparse.Namespace, main: Coroutine[object, object, T]) -> T | int:
    """asyncio.run(main) for publish/subscribe: a failed connection becomes one line and its
    ConnectFailure exit code. aioquic's own log lines (a refused certificate is also its
    warning) are kept for --verbose."""
    import asyncio

    from .endpoints.endpoint import ConnectFailed, ConnectFailure

    if not args.verbose:
        logging.getLogger("quic").setLevel(logging.ERROR)
    try:
        return asyncio.run(main)
    except ConnectFailed as exc:
        hint = ""
        if exc.failure == ConnectFailure.CERTIFICATE_REFUSED:
            hint = ("; trust it with --ca FILE (the relay's --cert, or its CA), or leave out --verify-cert and"
                    " --ca to skip verification (INSECURE)")
        elif exc.failure == ConnectFailure.VERSION_REFUSED:
            hint = f"; try --draft {'14' if args.draft == '16' else '16'}"
        print(f"fastrelay: error: {exc}{hint}", file=sys.stderr)
        return exc.failure


def _publish(args: argparse.Namespace) -> int:
    from .endpoints.publisher import publish
    from .media.h264 import H264Source, SyntheticSource

    if args.source == "synthetic":
        source = SyntheticSource(object_size=args.object_size, fps=args.fps, gop=args.gop, duration=args.duration,
                                 realtime=True, tag=args.tag)
    elif args.source in ("testsrc", "testsrc2"):
        source = H264Source(pattern=args.source, fps=args.fps, gop=args.gop, duration=args.duration, realtime=True)
    else:
        source = H264Source(args.source, duration=args.duration, realtime=True)
    result = _run_client(args, publish(args.url, _namespace(args.namespace), args.track.encode(), source,
                                       wait_subscriber=args.wait, announce=args.announce, **_client_options(args)))
    if isinstance(result, int):
        return result
    print(json.dumps(result.__dict__))
    return 0


def _subscribe(args: argparse.Namespace) -> int:
    from .endpoints.subscriber import subscribe

    def report(snapshot: dict[str, object]) -> None:
        print(json.dumps({"progress": snapshot}), flush=True)

    result = _run_client(args, subscribe(args.url, _namespace(args.namespace), args.track.encode(), out=args.out,
                                         duration=args.duration, codec="raw" if args.raw else "h264",
                                         progress=report if args.progress else None, **_client_options(args)))
    if isinstance(result, int):
        return result
    print(json.dumps(result.summary()))
    return 0


def _client_epilog() -> str:
    """publish/subscribe --help: the exit codes."""
    from .endpoints.endpoint import CONNECT_FAILURE_HELP

    codes = [(0, "done"), (1, "any other error (e.g. the relay refused the request)"), (2, "bad arguments"),
             *((int(failure), text) for failure, text in CONNECT_FAILURE_HELP.items())]
    return "exit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in codes)


def _bench(args: argparse.Namespace) -> int:
    from .bench import moq, moq_datapath, udp_fanout

    return {"moq": moq, "moq-datapath": moq_datapath, "udp-fanout": udp_fanout}[args.what].main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrelay", description="Media relay with an eBPF data plane.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("doctor", help="check what this machine supports")
    d.add_argument("--json", action="store_true")
    d.add_argument("--source", action="append", metavar="NAME|PATH.bpf.c",
                   help="load only these BPF program sources (repeatable; default: every one in bpf/)")
    d.set_defaults(fn=_doctor)

    b = sub.add_parser("build", help="compile every BPF program (cached)")
    b.add_argument("--verifier", action="store_true",
                   help="also load each program under every build variant (clang 19/14, -mcpu v2/v3/v4) and"
                        " print what it cost the verifier; exit 1 if one is rejected or over the 20%% bound")
    b.add_argument("--json", action="store_true", help="with --verifier: one JSON list")
    b.set_defaults(fn=_build)

    cl = sub.add_parser("cleanup", help="remove kernel state a killed run left (clsact filters, pins)")
    cl.set_defaults(fn=_cleanup)

    f = sub.add_parser("udp-fanout", help="relay one UDP stream to many subscribers")
    f.add_argument("--listen", required=True, metavar="ADDR:PORT", help="address and port to receive on")
    f.add_argument("--datapath", choices=("kernel", "userspace"), default="kernel")
    f.add_argument("--sub", action="append", metavar="ADDR:PORT", help="subscriber (repeatable)")
    f.add_argument("--control", metavar="PATH", help="unix socket for fanout-ctl (add/remove at runtime)")
    f.add_argument("--interface", action="append", metavar="IF",
                   help="kernel path: ingress interface(s) to attach to (default: all but lo)")
    f.add_argument("--source", metavar="ADDR", help="only relay datagrams from this source address")
    f.add_argument("--neighbour-refresh", type=float, default=5.0, metavar="S",
                   help="kernel path: re-check subscribers' next hops (MACs) every S seconds")
    f.add_argument("--stats", action="store_true", help="print final statistics as JSON on exit")
    f.set_defaults(fn=_udp_fanout)

    c = sub.add_parser("fanout-ctl", help="talk to a running udp-fanout")
    c.add_argument("--control", required=True, metavar="PATH")
    c.add_argument("op", choices=("add", "remove", "list", "stats"))
    c.add_argument("addr", nargs="?", metavar="ADDR:PORT")
    c.set_defaults(fn=_fanout_ctl)

    lab = sub.add_parser("lab", help="network-namespace testbed")
    lab.add_argument("action", choices=("up", "down", "status", "impair"))
    lab.add_argument("--name", default="lab")
    lab.add_argument("--subscribers", type=int, default=4)
    lab.add_argument("--sub", metavar="I|pub", help="impair: which link (subscriber index, or pub)")
    lab.add_argument("--loss", type=float, metavar="P", help="impair: random loss probability 0..1 (BPF)")
    lab.add_argument("--rate", metavar="RATE", help="impair: TBF rate limit, e.g. 5mbit")
    lab.add_argument("--delay", type=float, metavar="MS", help="impair: netem delay (kernels with netem)")
    lab.add_argument("--clear", action="store_true", help="impair: remove this link's impairments")
    lab.set_defaults(fn=_lab)

    r = sub.add_parser("relay", help="MoQT relay (userspace or kernel data path)")
    r.add_argument("url", metavar="moqt://HOST:PORT")
    r.add_argument("--cert", help="TLS certificate (PEM); default: a generated self-signed one")
    r.add_argument("--key", help="TLS private key (PEM)")
    r.add_argument("--drafts", default="16,14", help="MoQT drafts to accept (ALPN moqt-16 / moq-00)")
    r.add_argument("--cache-groups", type=int, default=8, help="groups cached per track")
    r.add_argument("--cache-bytes", type=int, default=64 << 20, help="bytes cached per track")
    r.add_argument("--state-dir", default="/run/fastrelay", help="where a generated certificate is written")
    r.add_argument("--goaway-grace", type=float, default=1.0, metavar="S",
                   help="on SIGTERM: send GOAWAY, wait this long, then close")
    r.add_argument("--max-backlog", type=int, default=1 << 20, metavar="BYTES",
                   help="a subscriber this far behind skips to the next group (4x: its current subgroup too)")
    r.add_argument("--metrics", metavar="[ADDR:]PORT", help="serve Prometheus metrics (text format) here")
    r.add_argument("--datapath", choices=("userspace", "kernel"), default="userspace",
                   help="kernel: TC programs forward subgroups to plaintext subscribers (needs --insecure-plaintext)")
    r.add_argument("--interface", action="append", metavar="IFNAME",
                   help="kernel data path: attach here (repeatable; default every interface but lo)")
    r.add_argument("--protect-priority", type=int, default=64, metavar="P",
                   help="kernel data path: under congestion, new subgroups with a priority value above P are skipped")
    r.add_argument("--pass-acks", action="store_true",
                   help="kernel data path: subscribers' ACK-only packets go up to the socket (default: the kernel"
                        " reads them and hands their ACKs over as records)")
    r.add_argument("--recovery", choices=("kernel", "aioquic"), default="kernel",
                   help="kernel data path: where kernel-path connections' loss recovery and congestion control run"
                        " (kernel: the BPF programs track every packet and apply the ACKs; needs the ACKs read in"
                        " the kernel, so not with --pass-acks)")
    r.add_argument("--insecure-plaintext", action="store_true",
                   help="offer QUIC without packet protection (only peers offering it too use it); INSECURE")
    r.set_defaults(fn=_relay)

    from .endpoints.endpoint import CONNECT_TIMEOUT_S

    for name, fn, text in (("publish", _publish, "publish a track through a relay"),
                           ("subscribe", _subscribe, "subscribe to a track through a relay")):
        c = sub.add_parser(name, help=text, epilog=_client_epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        c.add_argument("url", metavar="moqt://HOST:PORT")
        c.add_argument("-N", "--namespace", required=True, help="track namespace, fields separated by '/'")
        c.add_argument("-T", "--track", required=True, help="track name")
        c.add_argument("--draft", choices=("16", "14"), default="16")
        c.add_argument("--duration", type=float, default=None, help="seconds (default: until the end)")
        c.add_argument("--insecure-plaintext", action="store_true",
                       help="offer QUIC without packet protection (for a kernel-path relay); INSECURE")
        c.add_argument("--connect-timeout", type=_connect_timeout, default=CONNECT_TIMEOUT_S, metavar="SECONDS",
                       help="wait this long for the relay's QUIC handshake, then for its SERVER_SETUP"
                            " (default %(default)g)")
        c.add_argument("--verify-cert", action="store_true",
                       help="verify the relay's TLS certificate (system CAs, or --ca); default: not verified")
        c.add_argument("--ca", metavar="FILE",
                       help="trust this PEM certificate or CA bundle for the relay's certificate"
                            " (implies --verify-cert)")
        c.set_defaults(fn=fn)
        if name == "publish":
            c.add_argument("--source", default="testsrc", help="testsrc | testsrc2 | synthetic | FILE")
            c.add_argument("--fps", type=float, default=30.0)
            c.add_argument("--gop", type=int, default=30, help="frames per group (keyframe interval)")
            c.add_argument("--object-size", type=int, default=1200, help="synthetic source: bytes per object")
            c.add_argument("--wait", type=float, default=None, help="wait this long for a subscriber first")
            c.add_argument("--announce", choices=("namespace", "publish"), default="namespace",
                           help="publish: PUBLISH_NAMESPACE, then PUBLISH for the track, so subscribers that know"
                                " only the namespace are offered it (falls back to the relay's SUBSCRIBE if the"
                                " relay refuses it); namespace: PUBLISH_NAMESPACE only, wait for the relay's"
                                " SUBSCRIBE (default %(default)s)")
            c.add_argument("--tag", action="store_true",
                           help="synthetic source: each object starts with the lab probes' tag (delay benchmarks)")
        else:
            c.add_argument("--out", help="write the received H.264 (Annex-B) here")
            c.add_argument("--raw", action="store_true", help="payloads are not H.264 (synthetic source)")
            c.add_argument("--progress", action="store_true", help="print a JSON progress line every second")

    from .bench.moq import DATAPATHS as MOQ_DATAPATHS

    be = sub.add_parser("bench", help="benchmarks (kernel vs userspace, one run)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="short run (< 60 s)")
    common.add_argument("--json", action="store_true", help="print one JSON object")
    common.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    common.add_argument("--write", metavar="FILE", help="append result rows to this markdown file (BENCHMARKS.md)")
    what = be.add_subparsers(dest="what", required=True)
    bu = what.add_parser("udp-fanout", parents=[common], help="UDP fan-out, kernel vs userspace data path")
    bu.add_argument("--fanouts", default=None, help="comma-separated fan-outs (default 1,4,16,64)")
    bu.add_argument("--plots", metavar="DIR", help="write PNG plots here")
    bm = what.add_parser("moq", parents=[common], help="MoQT relay vs aiomoqt's and moq-dev's relays, same load")
    bm.add_argument("--datapath", choices=tuple(MOQ_DATAPATHS), default="userspace",
                    help="fastrelay relay's data path")
    bm.add_argument("--fanouts", default=None, help="comma-separated fan-outs (default 1,4,16)")
    bm.add_argument("--rate", type=float, default=500.0, help="objects per second published")
    bm.add_argument("--size", type=int, default=1200, help="object size in bytes")
    bd = what.add_parser("moq-datapath", parents=[common],
                         help="MoQT relay, kernel vs userspace data path (lab, BPF delay probes)")
    bd.add_argument("--fanouts", default=None, help="comma-separated fan-outs (default 1,8,32,128)")
    bd.add_argument("--datapaths", default=None,
                    help="comma-separated: kernel, userspace, kernel-pass-acks, and the peers' relays aiomoqt,"
                         " moq-dev (default kernel,userspace)")
    bd.add_argument("--plots", metavar="DIR", help="write PNG plots here")
    be.set_defaults(fn=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return args.fn(args)
    except (KernelError, ValueError, OSError) as exc:
        first = str(exc).strip() or type(exc).__name__
        print(f"fastrelay: error: {first}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
