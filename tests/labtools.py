"""Helpers every lab test shares (tests in any folder import them as `labtools`: pytest puts
tests/ on sys.path, tests/ having no __init__.py).

Waiting on observable state instead of sleeping (wait_until), per-process lab names, fastrelay
commands and their JSON summaries, a subscriber that lists every object it received, the
whole-subgroup loss check, and a relay process in the lab (relay(): its log, its metrics).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastrelay.netns import exec_argv

if TYPE_CHECKING:
    from fastrelay.lab.topology import Lab

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
from fastrelay.endpoints.subscriber import subscribe
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


def broken_subgroups(received: set[tuple[int, int]], gop: int) -> dict[int, list[int]]:
    """Groups whose dependent frames (objects 1.., subgroup 1 of the synthetic publisher) did not
    arrive as one unbroken run from the group's start: {group: the dependent objects received}.

    A relay that drops a subgroup whole, or gives one up part way (its stream reset), leaves
    1..k; an object missing with later ones of its subgroup delivered means something dropped
    single objects inside a subgroup."""
    broken = {}
    for group in {g for g, _ in received}:
        deps = sorted(o for g, o in received if g == group and 1 <= o < gop)
        if deps != list(range(1, len(deps) + 1)):
            broken[group] = deps
    return broken


# ---- a relay process in a lab's relay namespace ---------------------------------------------------

PORT, METRICS = 4443, 9464  # its MoQT (UDP) and Prometheus (TCP) ports


@dataclass(frozen=True)
class LeftKernelPath:
    """A subscriber connection's line when it left the kernel path: what each side sent it."""

    ip: str
    port: int
    kernel_packets: int
    user_packets: int  # control, the joining group, handed-over streams and every repair
    acks_read: int  # its ACK-only packets the kernel read (absorbed)


LEFT = re.compile(r"subscriber ([\d.a-f:]+):(\d+) left the kernel path: (\d+) packets \(\d+ bytes\) sent by the "
                  r"kernel, (\d+) by userspace \(\d+ bytes\); (\d+) of its ACK-only packets read by the kernel")


class Relay:
    def __init__(self, proc: subprocess.Popen, log_path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def _running(self) -> bool:
        assert self.proc.poll() is None, f"the relay exited: {self.log[-3000:]}"
        return True

    def wait_log(self, text: str, timeout: float = 20) -> None:
        """Wait until the relay has logged `text` (and fail at once if it exited)."""
        wait_until(lambda: self._running() and text in self.log, timeout,
                   lambda: f"{text!r} in the relay's log: {self.log[-3000:]}")

    def published(self, timeout: float = 20) -> None:
        """Wait until a publisher's namespace is known to the relay (subscribing earlier is refused)."""
        self.wait_log("publishes namespace", timeout)

    def joined(self) -> list[tuple[str, int]]:
        """(address, slot) of each subscriber connection put on the kernel path, in order."""
        return [(ip, int(slot)) for ip, slot in
                re.findall(r"subscriber \('([\d.a-f:]+)', \d+\) on the kernel path \(slot (\d+)\)", self.log)]

    def wait_joined(self, n: int, timeout: float = 20) -> list[tuple[str, int]]:
        """Wait until `n` subscriber connections are on the kernel path; their (address, slot)."""
        return wait_until(lambda: self._running() and self.joined(), timeout,
                          f"{n} subscribers on the kernel path", ok=lambda j: len(j) >= n)

    def left(self) -> list[LeftKernelPath]:
        """Each subscriber connection that left the kernel path, in order."""
        return [LeftKernelPath(ip, int(port), int(k), int(u), int(a)) for ip, port, k, u, a in LEFT.findall(self.log)]

    def kernel_lines(self) -> list[tuple[int, int]]:
        """(packets by the kernel, packets by userspace) of each subscriber that left the kernel path."""
        return [(s.kernel_packets, s.user_packets) for s in self.left()]

    def acks_read(self) -> list[int]:
        """How many ACK-only packets the kernel read for each subscriber that left the kernel path."""
        return [s.acks_read for s in self.left()]


@contextmanager
def relay(lab: Lab, tmp_path, *extra: str, listen: str = "0.0.0.0", datapath: str = "kernel",
          tc_mode: str | None = None, log_name: str = "relay.log") -> Iterator[Relay]:
    """A relay in the lab's relay namespace, stopped by SIGTERM on exit: by default on the kernel
    data path (which needs plaintext QUIC); `tc_mode` forces its TC attach mode (FASTRELAY_TC_MODE:
    tcx or clsact; default: tcx where the kernel has it)."""
    log_path = tmp_path / log_name
    env = {**os.environ, "FASTRELAY_TC_MODE": tc_mode} if tc_mode else None
    plaintext = ["--insecure-plaintext"] if datapath == "kernel" else []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(exec_argv(lab.relay_ns, fr(
            "relay", f"moqt://{listen}:{PORT}", "--datapath", datapath, *plaintext, "--state-dir", str(tmp_path),
            "--metrics", f"127.0.0.1:{METRICS}", "--goaway-grace", "0.2", *extra)),
            stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
    r = Relay(proc, log_path)
    try:
        r.wait_log("MoQT relay on")
        yield r
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def metrics(lab: Lab) -> dict[str, float]:
    """The relay's Prometheus samples, fetched from inside its namespace (where it listens)."""
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{METRICS}/metrics').read().decode())"
    text = subprocess.run(exec_argv(lab.relay_ns, [sys.executable, "-c", code]), capture_output=True, text=True,
                          check=True).stdout
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def assert_complete(summary: dict, published: int, gop: int) -> None:
    """Everything from the group it joined on, byte-exact, once: the distinct objects received
    number exactly those published from that group's start. (Not the summary's "lost": an
    estimate from timestamps the publisher stamps from the wall clock, which counts a frame or
    two lost when a loaded machine made the publisher late, while every object arrived.)"""
    assert "error" not in summary, summary
    assert summary["bad"] == 0 and summary["duplicates"] == 0, summary
    assert summary["last_group"] == (published - 1) // gop, summary
    assert summary["objects"] == published - summary["first_group"] * gop, summary
