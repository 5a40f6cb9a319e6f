"""Interoperability with moq-dev's MoQT stack: PyPI moq-rs 0.5.1 (imported as `moq`) on its native
moq-ffi 0.4.18 (Rust, moq-net 0.3.16), run through tests/interop/moq_dev_peer.py.

Real processes on loopback, raw QUIC (moqt://), draft-16 (ALPN moqt-16):

* A: moq-dev relay   <- fastrelay publish    -> fastrelay subscribe --raw
* B: fastrelay relay <- moq-dev publisher    -> moq-dev subscriber
* C: fastrelay relay <- moq-dev publisher    -> fastrelay subscribe --raw
* D: fastrelay relay <- fastrelay publish    -> moq-dev subscriber

In each the publisher runs first, then two subscribers join: one as soon as the relay knows the
namespace, one LATE_S later, mid-group, while the relay already carries the track (it gets a
SUBSCRIBE_OK with a Largest Location, so fastrelay's subscriber sends a joining FETCH). Both
publishers send 30 objects/s in groups of 30 with fastrelay's synthetic payloads, which both
subscribers verify.

What moq-dev does not do, so what the tests expect instead (its behaviour and logs, checked
against the draft text in /work/shared/ref):

* More than one subgroup per group. moq-dev receives a group on one stream and refuses another
  stream for it with STOP_SENDING (its logs: "subgroup ID is not supported, dropping stream",
  "uni stream error err=duplicate"). Draft-16 section 2.2: "A Group is delivered using at least
  as many streams as there are Subgroups". fastrelay publish sends a group's object 0 (the
  keyframe) in subgroup 0 and its other objects in subgroup 1, so through moq-dev (A: its relay,
  D: its subscriber) exactly object 0 of each group arrives.
* A subgroup stream that does not start at the group's first object, unless it can append it to
  the group's head that it fetched itself (a joining FETCH, which it does not always send). It
  drops such a stream ("object IDs must start at the group's start and increment by 1", "no fill
  to stitch a mid-group stream onto"); draft-16 section 10.4.2 allows it ("The Object ID is the
  Object ID Delta if it's the first Object in the Subgroup stream"), and it is what a relay sends
  a subscriber that joins mid-group (Largest Object filter: from Largest Object + 1). So the group
  a moq-dev subscriber joins in through fastrelay's relay is whole or missing (B, D).
* Draft 14. Right after SETUP moq-dev sends SUBSCRIBE_NAMESPACE for its whole origin, a prefix of
  0 fields, as a client and as a server; draft-14 section 9.28 (SUBSCRIBE_NAMESPACE): "If an
  endpoint receives a Track Namespace Prefix tuple with an N of 0 or more than 32, it MUST close
  the session with a Protocol Violation", which fastrelay does (draft-16 allows 0 fields there).
  No draft-14 session with moq-dev gets further (test_draft14_*).

moq-dev is a third-party peer: `.venv/bin/pip install moq-rs==0.5.1 moq-ffi==0.4.18`.
"""

from __future__ import annotations

import importlib.metadata
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fastrelay.quic.tls import self_signed

from .procs import Proc, Run, free_port

PEER_VERSIONS = {"moq-rs": "0.5.1", "moq-ffi": "0.4.18"}
NAMESPACE = "interop"
GOP = 30  # objects per group, both publishers (30 objects/s: one group a second)
SUB_SECONDS = 4.0  # how long the late subscriber listens (the first one LATE_S more)
LATE_S = 1.5
MIN_OBJECTS = 60  # a subscriber getting whole groups: at least two of them
MIN_GROUPS = 3  # a subscriber getting object 0 of each group: at least three groups
PY = sys.executable
PEER = str(Path(__file__).with_name("moq_dev_peer.py"))


@pytest.fixture(scope="module", autouse=True)
def moq_dev_installed() -> None:
    """The peer must be there: a missing peer is a failure, not a skip."""
    pins = " ".join(f"{name}=={version}" for name, version in PEER_VERSIONS.items())
    for name, version in PEER_VERSIONS.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is not installed: {PY} -m pip install {pins}")
        if installed != version:
            pytest.fail(f"{name} {installed} installed, these tests target {version} ({pins})")


# ---- the programs -------------------------------------------------------------------

def start_fastrelay_relay(run: Run, draft: str) -> tuple[Proc, str]:
    url = f"moqt://127.0.0.1:{free_port()}"
    relay = run.start("fastrelay-relay", [PY, "-m", "fastrelay", "relay", url, "--drafts", draft,
                                          "--state-dir", str(run.tmp_path / "state")])
    relay.wait_for(r"MoQT relay on", run.logs)
    return relay, url


def start_moq_dev_relay(run: Run) -> tuple[Proc, str]:
    # its own directory: moq-dev watches the certificate's directory and reloads on every change there
    tls = run.tmp_path / "tls"
    tls.mkdir()
    cert, key = self_signed(["127.0.0.1"])
    (tls / "cert.pem").write_bytes(cert)
    (tls / "key.pem").write_bytes(key)
    port = free_port()
    relay = run.start("moq-dev-relay", [PY, PEER, "relay", f"127.0.0.1:{port}", "--cert", str(tls / "cert.pem"),
                                        "--key", str(tls / "key.pem")])
    relay.wait_for(r'"listening"', run.logs)
    return relay, f"moqt://127.0.0.1:{port}"


def announced(relay: Proc) -> str:
    """What relay's output says once it has taken the publisher's namespace."""
    return r'"announced": "interop", "active": true' if relay.name == "moq-dev-relay" \
        else r"publishes namespace interop"


def start_fastrelay_pub(run: Run, url: str, track: str, draft: str, relay: Proc) -> Proc:
    pub = run.start("fastrelay-pub", [PY, "-m", "fastrelay", "-v", "publish", url, "-N", NAMESPACE, "-T", track,
                                      "--draft", draft, "--source", "synthetic", "--gop", str(GOP),
                                      "--object-size", "1000", "--duration", "60"])
    relay.wait_for(announced(relay), run.logs)
    return pub


def start_moq_dev_pub(run: Run, url: str, track: str, relay: Proc) -> Proc:
    pub = run.start("moq-dev-pub", [PY, PEER, "publish", url, "-N", NAMESPACE, "-T", track, "--gop", str(GOP),
                                    "--seconds", "60"])
    relay.wait_for(announced(relay), run.logs)
    return pub


def fastrelay_sub(run: Run, name: str, url: str, track: str, draft: str, seconds: float) -> Proc:
    return run.start(name, [PY, "-m", "fastrelay", "-v", "subscribe", url, "-N", NAMESPACE, "-T", track,
                            "--draft", draft, "--raw", "--duration", str(seconds)])


def moq_dev_sub(run: Run, name: str, url: str, track: str, seconds: float) -> Proc:
    return run.start(name, [PY, PEER, "subscribe", url, "-N", NAMESPACE, "-T", track, "--seconds", str(seconds)])


def first_and_late(start: Callable[[str, float], Proc]) -> list[tuple[Proc, dict]]:
    """A subscriber now and one LATE_S later (mid-group); each with its summary."""
    first = start("first-sub", SUB_SECONDS + LATE_S)
    time.sleep(LATE_S)
    late = start("late-sub", SUB_SECONDS)
    return [(p, p.last_json(SUB_SECONDS + LATE_S + 20)) for p in (first, late)]


def fastrelay_negotiated(relay: Proc, draft: str) -> int:
    return relay.output().count(f"ready (DRAFT_{draft})")


ALPN_16 = "ALPN negotiated protocol moqt-16"  # a fastrelay client's log (-v)


def moq_dev_received(proc: Proc, result: dict) -> list[list]:
    """A moq-dev subscriber's groups [sequence, objects, state], once its session and subscription
    are seen to have lasted and every payload it got to be the publisher's."""
    assert (result["closed"], result["track_error"]) == (None, None), f"{proc.name}: {result}"
    assert (result["verified"], result["bad"]) == (result["objects"], 0), f"{proc.name}: {result}"
    return result["groups"]


# ---- A: moq-dev relay between fastrelay's publisher and subscribers --------------------

def test_a_fastrelay_pub_moq_dev_relay_fastrelay_sub(run: Run) -> None:
    relay, url = start_moq_dev_relay(run)
    pub = start_fastrelay_pub(run, url, "a", "16", relay)
    subs = first_and_late(lambda name, s: fastrelay_sub(run, name, url, "a", "16", s))
    for proc, summary in subs:
        assert ALPN_16 in proc.output(), run.logs()
        # moq-dev forwards a group's first subgroup only: object 0 of every group
        groups = summary["last_group"] - summary["first_group"] + 1 if summary["objects"] else 0
        assert summary["objects"] == groups >= MIN_GROUPS, f"{proc.name}: {summary}\n" + run.logs()
        assert (summary["verified"], summary["bad"], summary["duplicates"]) == (summary["objects"], 0, 0), summary
    assert ALPN_16 in pub.output() and pub.proc.poll() is None, run.logs()
    assert "session_error" not in relay.output(), run.logs()


# ---- B: fastrelay relay between moq-dev's publisher and subscribers --------------------

def test_b_moq_dev_pub_fastrelay_relay_moq_dev_sub(run: Run) -> None:
    relay, url = start_fastrelay_relay(run, "16")
    pub = start_moq_dev_pub(run, url, "b", relay)
    for proc, result in first_and_late(lambda name, s: moq_dev_sub(run, name, url, "b", s)):
        groups = moq_dev_received(proc, result)
        assert result["objects"] >= MIN_OBJECTS, f"{proc.name}: {result}\n" + run.logs()
        # every group whole but the one it joined in (whole or given up) and the last (cut short)
        assert all(n == GOP for _, n, state in groups[1:] if state != "open"), result
        assert all(state != "aborted" for _, _, state in groups[1:]), result
    assert fastrelay_negotiated(relay, "16") == 3 and pub.proc.poll() is None, run.logs()


# ---- C: moq-dev publisher -> fastrelay relay -> fastrelay subscribers ------------------

def test_c_moq_dev_pub_fastrelay_relay_fastrelay_sub(run: Run) -> None:
    relay, url = start_fastrelay_relay(run, "16")
    pub = start_moq_dev_pub(run, url, "c", relay)
    for proc, summary in first_and_late(lambda name, s: fastrelay_sub(run, name, url, "c", "16", s)):
        assert summary["objects"] >= MIN_OBJECTS, f"{proc.name}: {summary}\n" + run.logs()
        assert (summary["verified"], summary["bad"]) == (summary["objects"], 0), summary
        assert (summary["lost"], summary["duplicates"]) == (0, 0), summary
    assert fastrelay_negotiated(relay, "16") == 3 and pub.proc.poll() is None, run.logs()


# ---- D: fastrelay publisher -> fastrelay relay -> moq-dev subscribers ------------------

def test_d_fastrelay_pub_fastrelay_relay_moq_dev_sub(run: Run) -> None:
    relay, url = start_fastrelay_relay(run, "16")
    pub = start_fastrelay_pub(run, url, "d", "16", relay)
    for proc, result in first_and_late(lambda name, s: moq_dev_sub(run, name, url, "d", s)):
        groups = moq_dev_received(proc, result)
        # moq-dev takes subgroup 0 of each group (object 0) and refuses subgroup 1 with STOP_SENDING;
        # the group it joined in may be whole (its joining FETCH brought both subgroups' objects)
        assert len(groups) >= MIN_GROUPS, f"{proc.name}: {result}\n" + run.logs()
        assert groups[0][1] in (0, 1, GOP) and all(n == 1 for _, n, _ in groups[1:]), result
    # the subscribers' STOP_SENDING cost the publisher nothing
    assert fastrelay_negotiated(relay, "16") == 3 and pub.proc.poll() is None, run.logs()


# ---- draft 14: moq-dev's SUBSCRIBE_NAMESPACE with an empty prefix ends every session --------

EMPTY_PREFIX_CLOSE = "closing MoQT session: namespace has 0 fields (1..32) (PROTOCOL_VIOLATION)"
MOQ_DEV_CLOSED = "PROTOCOL_VIOLATION (0x3) protocol violation"  # moq-dev's report of that close


def test_draft14_moq_dev_relay_is_refused_by_fastrelay_clients(run: Run) -> None:
    relay, url = start_moq_dev_relay(run)
    clients = [run.start("fastrelay-pub", [PY, "-m", "fastrelay", "-v", "publish", url, "-N", NAMESPACE, "-T", "e",
                                           "--draft", "14", "--source", "synthetic", "--duration", "5"]),
               fastrelay_sub(run, "fastrelay-sub", url, "e", "14", 5)]
    for client in clients:
        assert client.wait(20) == 1, run.logs()
        assert "ALPN negotiated protocol moq-00" in client.output(), run.logs()
        assert EMPTY_PREFIX_CLOSE in client.output(), run.logs()
    assert relay.output().count(f'"session_error": "{MOQ_DEV_CLOSED}"') == 2, run.logs()


@pytest.mark.parametrize("role", ["publish", "subscribe"])
def test_draft14_moq_dev_clients_are_refused_by_the_fastrelay_relay(run: Run, role: str) -> None:
    relay, url = start_fastrelay_relay(run, "14")
    result = run.start(f"moq-dev-{role}", [PY, PEER, role, url, "-N", NAMESPACE, "-T", "e",
                                          "--seconds", "5"]).last_json(20)
    assert fastrelay_negotiated(relay, "14") == 1, run.logs()
    assert EMPTY_PREFIX_CLOSE in relay.output(), run.logs()
    assert result["closed"] == MOQ_DEV_CLOSED, f"{result}\n" + run.logs()
