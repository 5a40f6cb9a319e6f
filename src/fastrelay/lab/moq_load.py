"""Many MoQT subscribers in one process (one namespace), for lab tests and benchmarks.

    python -m fastrelay.lab.moq_load moqt://RELAY:4443 -N live -T v --subscribers 16 --verify

Each subscriber is a full `fastrelay subscribe` session (own QUIC connection, joining FETCH,
loss and latency accounting); with --verify every payload must be the synthetic source's.
Prints one JSON list of the subscribers' summaries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from ..endpoints.subscriber import subscribe
from ..media.h264 import verify_synthetic_payload
from ..moq.params import Version


async def run(url: str, namespace: tuple[bytes, ...], track: bytes, count: int, *, verify: bool,
              plaintext: bool, duration: float | None, version: Version, stagger: float) -> list[dict]:
    async def one(i: int) -> dict:
        await asyncio.sleep(i * stagger)
        try:
            result = await subscribe(url, namespace, track, version=version, duration=duration, codec="raw",
                                     verify=verify_synthetic_payload if verify else None, plaintext=plaintext)
            return result.summary()
        except (ConnectionError, TimeoutError) as exc:
            return {"error": str(exc) or type(exc).__name__}

    return await asyncio.gather(*(one(i) for i in range(count)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastrelay.lab.moq_load", description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("-N", "--namespace", required=True)
    p.add_argument("-T", "--track", required=True)
    p.add_argument("--subscribers", type=int, default=1)
    p.add_argument("--verify", action="store_true", help="payloads must be the synthetic source's")
    p.add_argument("--insecure-plaintext", action="store_true")
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--draft", choices=("16", "14"), default="16")
    p.add_argument("--stagger", type=float, default=0.0, help="seconds between subscriber starts")
    a = p.parse_args(argv)
    if a.subscribers < 1:
        p.error("--subscribers must be >= 1")
    ns = tuple(part.encode() for part in a.namespace.split("/"))
    version = Version.DRAFT_16 if a.draft == "16" else Version.DRAFT_14
    out = asyncio.run(run(a.url, ns, a.track.encode(), a.subscribers, verify=a.verify, plaintext=a.insecure_plaintext,
                          duration=a.duration, version=version, stagger=a.stagger))
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
