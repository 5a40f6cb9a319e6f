"""Helpers every lab test shares (tests in any folder import them as `labtools`: pytest puts
tests/ on sys.path, tests/ having no __init__.py).

Waiting on observable state instead of sleeping (wait_until), per-process lab names, fastrelay
commands and their JSON summaries, and a subscriber that lists every object it received.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

# ---- waiting on observable state ------------------------------------------------------------

def wait_until[V](read: Callable[[], V], timeout: float, what: str | Callable[[], str], *,
                  ok: Callable[[V], object] = bool, interval: float = 0.05) -> V:
    """Call `read()` until `ok` of its value holds (by default: the value is truthy) and return
    that value; after `timeout` seconds an AssertionError saying what was awaited (`what`, or
    what it returns, built at that moment: a log tail, say) and the last value read. `read`
    may itself fail fast (e.g. assert that the process it waits on is still alive)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ok(value):
            return value
        if time.monotonic() >= deadline:
            last = "" if isinstance(value, bool) else f"; last value: {value!r}"
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}"
                                 f"{last}")
        time.sleep(interval)


def wait_no_leftovers(timeout: float = 5.0) -> None:
    """Wait until no fastrelay BPF program, map or pin is left anywhere (the kernel frees them
    after their last holder, asynchronously). Global: a relay another test process runs at the
    same time counts as a leftover too (RelayMaps and bpf_held look at one process only)."""
    from fastrelay.kernel.stats import leftovers

    wait_until(leftovers, timeout, "no fastrelay BPF programs, maps or pins left anywhere",
               ok=lambda left: not any(left.values()))


def lab_name(prefix: str) -> str:
    """A lab name unique to this test process: Lab() replaces a lab of the same name, so two
    runs of one test file at the same time (two engineers, CI and a developer) would tear down
    each other's namespaces."""
    room = 8 - len(prefix)  # lab names are at most 8 characters
    return f"{prefix}{os.getpid() % 10 ** room}"


def fr(*args: str) -> list[str]:
    """argv of a fastrelay command run with this interpreter."""
    return [sys.executable, "-m", "fastrelay", *args]


def last_json(proc: subprocess.Popen, timeout: float = 60) -> Any:
    """The JSON document on the last line a child printed (its summary)."""
    out = proc.communicate(timeout=timeout)[0]
    return json.loads(out.strip().splitlines()[-1])


# ---- what a subscriber received -------------------------------------------------------------

# One `fastrelay subscribe` session (the library call the command makes) whose summary also
# lists every (group, object) it received, in arrival order; see received_argv().
RECEIVED = """
import argparse, asyncio, json
from fastrelay.media.h264 import verify_synthetic_payload
from fastrelay.moq.params import Version
from fastrelay.moq.subscriber import subscribe
p = argparse.ArgumentParser()
p.add_argument("url")
p.add_argument("namespace")
p.add_argument("track")
p.add_argument("seconds", type=float)
p.add_argument("--plaintext", action="store_true")
p.add_argument("--draft", default="16")
p.add_argument("--any-payload", action="store_true")
a = p.parse_args()
received = []
def check(group, obj, payload):
    received.append((group, obj))
    return a.any_payload or verify_synthetic_payload(group, obj, payload)
result = asyncio.run(subscribe(a.url, tuple(f.encode() for f in a.namespace.split("/")), a.track.encode(),
                               version=Version.DRAFT_14 if a.draft == "14" else Version.DRAFT_16,
                               duration=a.seconds, codec="raw", verify=check, plaintext=a.plaintext))
print(json.dumps({**result.summary(), "received": received}))
"""


def received_argv(url: str, namespace: str, track: str, seconds: float, *, plaintext: bool = False,
                  draft: str = "16", synthetic: bool = True) -> list[str]:
    """argv of a RECEIVED subscriber: `synthetic` payloads are verified (a bad one counts in
    "bad"), otherwise any payload passes."""
    return [sys.executable, "-c", RECEIVED, url, namespace, track, str(seconds), "--draft", draft,
            *(["--plaintext"] if plaintext else []), *([] if synthetic else ["--any-payload"])]


def received_objects(summary: dict) -> set[tuple[int, int]]:
    """The (group, object) pairs a RECEIVED subscriber listed (taken out of its summary)."""
    return {(g, o) for g, o in summary.pop("received")}
