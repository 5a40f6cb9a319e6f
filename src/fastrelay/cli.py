"""`fastrelay` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .kernel.errors import KernelError


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import render, run_checks

    checks = run_checks()
    print(json.dumps([c.as_dict() for c in checks], indent=2) if args.json else render(checks))
    return 0 if all(c.ok or c.name == "netem" for c in checks) else 1


def _build(args: argparse.Namespace) -> int:
    from .kernel.build import build_all

    for name, path in build_all().items():
        print(f"{name}: {path}")
    return 0


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


def _bench(args: argparse.Namespace) -> int:
    from .bench import udp_fanout

    return udp_fanout.main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrelay", description="Media relay with an eBPF data plane.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("doctor", help="check what this machine supports")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=_doctor)

    b = sub.add_parser("build", help="compile every BPF program (cached)")
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

    be = sub.add_parser("bench", help="benchmarks (kernel vs userspace, one run)")
    be.add_argument("what", choices=("udp-fanout",))
    be.add_argument("--quick", action="store_true", help="short run (< 60 s)")
    be.add_argument("--json", action="store_true", help="print one JSON object")
    be.add_argument("--fanouts", default=None, help="comma-separated fan-outs (default 1,4,16,64)")
    be.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    be.add_argument("--write", metavar="FILE", help="append result rows to this markdown file (BENCHMARKS.md)")
    be.add_argument("--plots", metavar="DIR", help="write PNG plots here")
    be.set_defaults(fn=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return args.fn(args)
    except (KernelError, ValueError, OSError) as exc:
        first = str(exc).strip()
        print(f"fastrelay: error: {first}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
