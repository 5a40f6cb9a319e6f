"""moq-dev's stack (PyPI moq-rs, imported as `moq`) as a command line peer for the interop tests.

    python tests/interop/moq_dev_peer.py relay 127.0.0.1:PORT --cert C.pem --key K.pem
    python tests/interop/moq_dev_peer.py publish moqt://127.0.0.1:PORT -N interop -T t1 --seconds 60
    python tests/interop/moq_dev_peer.py subscribe moqt://127.0.0.1:PORT -N interop -T t1 --seconds 4

moq-dev has no draft switch: its client offers every ALPN it speaks (moq-lite-*, moqt-15..22,
and moq-00 for draft 14) and its server accepts all of them, so the draft is the one the other
side offers (a fastrelay relay pinned with --drafts, a fastrelay client's --draft). A broadcast
path "a/b" is the MoQT namespace ("a", "b"); a track is a track name.

The publisher sends what fastrelay's synthetic source sends (media.h264.synthetic_payload, 30
objects per group by default), so either side can check payloads; the subscriber checks them.
Every line on stdout is JSON: the relay prints "listening", each namespace announced to it and
each session that ended in error; publish and subscribe print their counts last, with "closed"
set to the error if the session ended before they did.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Coroutine
from typing import Any

import moq

from fastrelay.media.h264 import synthetic_payload, verify_synthetic_payload


def _out(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _error(err: BaseException) -> str | None:
    """A session's end as "KIND (code) message"; None for a clean one (shutdown, code 0)."""
    if moq.is_shutdown(err):
        return None
    protocol = moq.protocol_error(err)
    if protocol is None:
        return f"{type(err).__name__}: {err}"
    return f"{protocol.kind.name} ({protocol.code:#x}) {protocol.message}".strip() if protocol.code else None


async def relay(args: argparse.Namespace) -> None:
    """One origin wired to both sides of every session: what is published is served to subscribers."""
    origin = moq.OriginProducer()

    async def hold(request: moq.Request) -> None:
        try:
            session = await request.accept()
            await session.closed()
        except moq.Error as err:
            if (reason := _error(err)) is not None:
                _out(session_error=reason)

    async with moq.Server(args.bind, tls_cert=[args.cert], tls_key=[args.key], publish=origin,
                          subscribe=origin) as server:
        _out(listening=server.local_addr)
        sessions: set[asyncio.Task[None]] = set()

        async def accept() -> None:
            async for request in server:
                task = asyncio.create_task(hold(request))
                sessions.add(task)
                task.add_done_callback(sessions.discard)

        acceptor = asyncio.create_task(accept())
        async for update in origin.consume().announced():
            _out(announced=update.prefix, active=update.active)
        await acceptor


def _client(args: argparse.Namespace) -> moq.Client:
    # tls_verify=False: the relays under test use self-signed certificates (so do fastrelay's
    # clients by default); reconnect=False: one session per run, an ended session ends the run
    return moq.Client(args.url, tls_verify=False, reconnect=False, websocket_enabled=False)


async def _while_open(client: moq.Client, work: Coroutine[Any, Any, None], seconds: float) -> str | None:
    """Run `work` for at most `seconds` or until the session ends; why the session ended, if it did."""
    assert client.session is not None
    job = asyncio.create_task(asyncio.wait_for(work, seconds))
    closed = asyncio.create_task(client.session.closed())
    done, _ = await asyncio.wait({job, closed}, return_when=asyncio.FIRST_COMPLETED)
    if closed in done:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        err = closed.exception()
        return "closed" if err is None else _error(err) or "closed"
    closed.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await closed
    with contextlib.suppress(TimeoutError):  # the normal end: `seconds` passed
        job.result()
    return None


async def publish(args: argparse.Namespace) -> dict[str, object]:
    """`--fps` objects per second, `--gop` per group; moq-dev sends each group on one stream."""
    objects = groups = 0

    async def send(track: moq.TrackProducer) -> None:
        nonlocal objects, groups
        start, group = time.monotonic(), None
        try:
            while True:
                if group is None or objects % args.gop == 0:
                    if group is not None:
                        group.finish()
                    group = track.append_group()
                    groups += 1
                group.write_frame(synthetic_payload(group.sequence, objects % args.gop, args.size),
                                  timestamp_us=time.time_ns() // 1000)
                objects += 1
                await asyncio.sleep(max(0.0, start + objects / args.fps - time.monotonic()))
        finally:
            if group is not None:
                group.finish()

    try:
        async with _client(args) as client:
            broadcast = client.create_broadcast(args.namespace)
            track = broadcast.publish_track(args.track)
            broadcast.announce()
            _out(announced=args.namespace)
            closed = await _while_open(client, send(track), args.seconds)
            track.finish()
            broadcast.close()
    except moq.Error as err:  # the session ended while it was coming up
        closed = _error(err) or "closed"
    return {"objects": objects, "groups": groups, "closed": closed}


async def subscribe(args: argparse.Namespace) -> dict[str, object]:
    """Every group as it arrives, every object in it; payloads checked against the synthetic source
    (the n-th object of a group is object n: moq-dev takes a group only from its first object on).
    Each group ends "ok" (its stream's end), "aborted" (moq-dev gave it up) or "open" (the run ended)."""
    groups: dict[int, list] = {}  # sequence -> [objects, state]
    verified = bad = 0
    track_error: str | None = None

    async def read_group(group: moq.GroupConsumer) -> None:
        nonlocal verified, bad
        seen = groups[group.sequence] = [0, "open"]
        try:
            async for frame in group:
                if verify_synthetic_payload(group.sequence, seen[0], frame.payload):
                    verified += 1
                else:
                    bad += 1
                seen[0] += 1
            seen[1] = "ok"
        except moq.Error:
            seen[1] = "aborted"

    readers: set[asyncio.Task[None]] = set()

    async def receive(client: moq.Client) -> None:
        nonlocal track_error
        broadcast = await client.announced_broadcast(args.namespace)
        _out(announced=args.namespace)
        try:
            async with await broadcast.subscribe_track(args.track) as track:
                async for group in track.groups_as_arrived():
                    task = asyncio.create_task(read_group(group))
                    readers.add(task)
                    task.add_done_callback(readers.discard)
        except moq.Error as err:  # the subscription ended with an error (the session may go on)
            track_error = _error(err) or "closed"

    try:
        async with _client(args) as client:
            closed = await _while_open(client, receive(client), args.seconds)
            for task in readers:  # ended here, not by the event loop's shutdown after the session is gone
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    except moq.Error as err:  # the session ended while it was coming up
        closed = _error(err) or "closed"
    return {"objects": sum(n for n, _ in groups.values()), "verified": verified, "bad": bad,
            "groups": [[g, *groups[g]] for g in sorted(groups)], "track_error": track_error, "closed": closed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", default="warn", help="moq-dev's log level on stderr: error, warn, info, debug, trace")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay")
    r.add_argument("bind", help="HOST:PORT")
    r.add_argument("--cert", required=True)
    r.add_argument("--key", required=True)
    for name in ("publish", "subscribe"):
        c = sub.add_parser(name)
        c.add_argument("url", help="moqt://HOST:PORT")
        c.add_argument("-N", "--namespace", required=True, help="namespace fields joined by '/' (the broadcast path)")
        c.add_argument("-T", "--track", required=True)
        c.add_argument("--seconds", type=float, required=True)
    pub = sub.choices["publish"]
    pub.add_argument("--fps", type=float, default=30.0)
    pub.add_argument("--gop", type=int, default=30, help="objects per group")
    pub.add_argument("--size", type=int, default=1000, help="bytes per object")
    args = p.parse_args()
    moq.log_level(args.log)
    result = asyncio.run({"relay": relay, "publish": publish, "subscribe": subscribe}[args.cmd](args))
    if result is not None:
        _out(**result)


if __name__ == "__main__":
    main()
