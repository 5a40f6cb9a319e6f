"""Interoperability with aiomoqt 0.13.3, an independent MoQT stack (picoquic via aiopquic).

Every test runs the real programs as subprocesses on loopback, raw QUIC (moqt://), and
checks from the subscriber's own record which objects were delivered:

* A: fastrelay relay   <- aiomoqt pub_example  -> aiomoqt sub_example
* B: aiomoqt relay     <- fastrelay publish    -> fastrelay subscribe --raw
* C: fastrelay relay   <- aiomoqt pub_example  -> fastrelay subscriber
* D: fastrelay relay   <- fastrelay publish    -> aiomoqt sub_example
* E: C and A with objects as datagrams
* F: fastrelay relay   <- fastrelay publish --announce publish -> aiomoqt sub_example knowing only the namespace
* G: F without --announce publish, with a fastrelay subscriber subscribing to the track by name
* H: fastrelay relay   <- aiomoqt pub_example  -> aiomoqt sub_example knowing only the namespace

each with draft-16 (ALPN moqt-16) and draft-14 (ALPN moq-00, version in CLIENT_SETUP).
Relays are pinned to the draft under test, and the relay's log must show that draft
negotiated. aiomoqt is a third-party peer: `.venv/bin/pip install aiomoqt==0.13.3`.

Nothing may be lost: a subscriber gets every object the publisher sent from the first one it
received on (both publishers number GROUP_SIZE objects per group, groups one after another, so
what was sent in that window is known from the ids), and where our publisher sends synthetic
payloads every one is verified. aiomoqt's sub_example runs unchanged with the objects its track
delivers recorded (AIOMOQT_SUB); in C and E our subscriber is the library call `fastrelay
subscribe` makes, recording ids the same way (labtools.RECEIVED); B runs the command itself,
against a publisher that sends a known number of objects.

aiomoqt's pub_example publishes with PUBLISH (Forward State 0) and sends objects only
once PUBLISH_OK sets Forward State 1; fastrelay's publisher uses PUBLISH_NAMESPACE and
answers the relay's SUBSCRIBE.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Callable

import pytest
from labtools import received_argv

from fastrelay.quic.tls import self_signed

from .procs import Proc, Run, free_port

AIOMOQT_VERSION = "0.13.3"
DRAFTS = ["16", "14"]
NAMESPACE = "interop"
SUB_SECONDS = 3  # how long each subscriber listens to a publisher that does not stop
RATE = 30  # objects/s, both publishers (their defaults)
GROUP_SIZE = 30  # objects per group, both publishers (aiomoqt's pub_example.GROUP_SIZE, our --gop default)
# a subscriber's window: it listens SUB_SECONDS, of which connecting and subscribing take well under one
MIN_WINDOW = (SUB_SECONDS - 1) * RATE
PUB_SECONDS = 3  # how long our publisher sends where the test counts what it sent


@pytest.fixture(scope="module", autouse=True)
def aiomoqt_installed() -> None:
    """The peer must be there: a missing peer is a failure, not a skip."""
    try:
        version = importlib.metadata.version("aiomoqt")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"aiomoqt is not installed: {sys.executable} -m pip install aiomoqt=={AIOMOQT_VERSION}")
    if version != AIOMOQT_VERSION:
        pytest.fail(f"aiomoqt {version} installed, these tests target {AIOMOQT_VERSION}")










PY = sys.executable

# aiomoqt's sub_example, run unchanged, with every object its track hands to the example's
# statistics recorded; at exit one JSON line {"received": [[group, object, ok], ...]} in arrival
# order, ok: the payload is the synthetic source's (argv[1] "--synthetic"; null with "--any")
AIOMOQT_SUB = """
import atexit, json, runpy, sys
import aiomoqt.track
from fastrelay.media.h264 import verify_synthetic_payload
synthetic = sys.argv[1] == "--synthetic"
received = []
track_init = aiomoqt.track.SubscribedTrack.__init__
def recording_init(self, *args, on_object=None, **kwargs):
    def record(msg, *more, **kw):  # (msg, size_bytes, recv_time_us, group_id, subgroup_id)
        group = more[2] if len(more) > 2 else kw.get("group_id")
        group = msg.group_id if group is None else group
        ok = verify_synthetic_payload(group, msg.object_id, bytes(msg.payload)) if synthetic else None
        received.append((group, msg.object_id, ok))
        if on_object is not None:
            on_object(msg, *more, **kw)
    track_init(self, *args, on_object=record, **kwargs)
aiomoqt.track.SubscribedTrack.__init__ = recording_init
atexit.register(lambda: print(json.dumps({"received": received}), flush=True))
sys.argv = ["sub_example", *sys.argv[2:]]
runpy.run_module("aiomoqt.examples.sub_example", run_name="__main__", alter_sys=True)
"""


# ---- the programs -------------------------------------------------------------------

def start_fastrelay_relay(run: Run, draft: str) -> tuple[Proc, str]:
    port = free_port()
    url = f"moqt://127.0.0.1:{port}"
    relay = run.start("fastrelay-relay", [PY, "-m", "fastrelay", "relay", url, "--drafts", draft,
                                          "--state-dir", str(run.tmp_path / "state")])
    relay.wait_for(r"MoQT relay on", run.logs)
    return relay, url


def start_aiomoqt_relay(run: Run, draft: str) -> tuple[Proc, str]:
    cert, key = self_signed(["127.0.0.1"])
    (run.tmp_path / "cert.pem").write_bytes(cert)
    (run.tmp_path / "key.pem").write_bytes(key)
    port = free_port()
    relay = run.start("aiomoqt-relay", [PY, "-m", "aiomoqt.tools.moq_interop_relay", "--bind", "127.0.0.1",
                                        "--port", str(port), "--cert", str(run.tmp_path / "cert.pem"),
                                        "--key", str(run.tmp_path / "key.pem"), "--quic", "--draft", draft])
    relay.wait_for(r"Listening on .*UDP port", run.logs)
    return relay, f"moqt://127.0.0.1:{port}"


def start_aiomoqt_pub(run: Run, url: str, track: str, draft: str, *extra: str) -> Proc:
    pub = run.start("aiomoqt-pub", [PY, "-m", "aiomoqt.examples.pub_example", url, "-N", NAMESPACE, "-T", track,
                                    "-k", "--draft", draft, "-t", "60", *extra])
    pub.wait_for(r"MOQT app: published", run.logs)
    return pub


def start_fastrelay_pub(run: Run, url: str, track: str, draft: str, relay: Proc, announced: str, *extra: str) -> Proc:
    """Our synthetic publisher, PUB_SECONDS of objects once the relay subscribes (--wait): the
    first subscriber gets them all, and its summary says how many it sent."""
    pub = run.start("fastrelay-pub", [PY, "-m", "fastrelay", "publish", url, "-N", NAMESPACE, "-T", track,
                                      "--draft", draft, "--source", "synthetic", "--fps", str(RATE),
                                      "--gop", str(GROUP_SIZE), "--duration", str(PUB_SECONDS), "--wait", "10", *extra])
    relay.wait_for(announced, run.logs)  # the relay accepted the PUBLISH_NAMESPACE
    return pub


def run_aiomoqt_sub(run: Run, url: str, track: str, draft: str, *, synthetic: bool,
                    seconds: int = SUB_SECONDS) -> list[tuple[int, int, bool | None]]:
    """(group, object, payload verified) of each object aiomoqt's sub_example received, in order."""
    sub = run.start("aiomoqt-sub", [PY, "-c", AIOMOQT_SUB, "--synthetic" if synthetic else "--any", url,
                                    "-N", NAMESPACE, "-T", track, "-k", "--draft", draft, "-t", str(seconds)])
    received = [tuple(r) for r in sub.last_json(seconds + 15)["received"]]
    # the example's own count agrees: the record saw every object it did
    total = re.search(r"Total: ([\d,]+) objects", sub.output())
    assert (int(total[1].replace(",", "")) if total else 0) == len(received), run.logs()
    return received


def run_fastrelay_sub(run: Run, url: str, track: str, draft: str, seconds: float) -> dict:
    """The JSON summary `fastrelay subscribe` prints last."""
    sub = run.start("fastrelay-sub", [PY, "-m", "fastrelay", "subscribe", url, "-N", NAMESPACE, "-T", track,
                                      "--draft", draft, "--raw", "--duration", str(seconds)])
    return sub.last_json(seconds + 15)


def run_recording_sub(run: Run, url: str, track: str, draft: str) -> list[tuple[int, int]]:
    """(group, object) of each object our subscriber received from aiomoqt's publisher, in order."""
    sub = run.start("fastrelay-sub", received_argv(url, NAMESPACE, track, SUB_SECONDS, draft=draft, synthetic=False))
    summary = sub.last_json(SUB_SECONDS + 15)
    assert "error" not in summary and summary["duplicates"] == 0, summary
    return [tuple(r) for r in summary["received"]]


def fastrelay_negotiated(relay: Proc, draft: str) -> int:
    return relay.output().count(f"ready (DRAFT_{draft})")


def aiomoqt_negotiated(relay: Proc, draft: str) -> int:
    return relay.output().count(f"setup complete: draft-{draft}")


def missing_in_window(received: list[tuple[int, ...]], last_sent: tuple[int, int] | None = None) -> list:
    """(group, object) of what the publisher sent from the first object received on (up to
    `last_sent`, or the last one received) that never arrived."""
    got = {g * GROUP_SIZE + o for g, o, *_ in received}
    end = last_sent[0] * GROUP_SIZE + last_sent[1] if last_sent else max(got)
    return [divmod(i, GROUP_SIZE) for i in range(min(got), end + 1) if i not in got]


def assert_window_complete(received: list[tuple[int, ...]], logs: Callable[[], str]) -> None:
    """A subscriber of a publisher that did not stop got every object of its window, once, and
    the window is about as long as it listened."""
    ids = [(g, o) for g, o, *_ in received]
    assert len(ids) >= MIN_WINDOW, f"{len(ids)} objects, fewer than {MIN_WINDOW}\n" + logs()
    assert len(set(ids)) == len(ids), f"duplicates: {sorted(i for i in set(ids) if ids.count(i) > 1)}"
    missing = missing_in_window(received)
    assert not missing, f"lost from {ids[0]} to {max(ids)}: {missing}\n" + logs()


# ---- A: fastrelay relay between aiomoqt's publisher and subscriber --------------------

@pytest.mark.parametrize("draft", DRAFTS)
def test_a_aiomoqt_pub_fastrelay_relay_aiomoqt_sub(run: Run, draft: str) -> None:
    relay, url = start_fastrelay_relay(run, draft)
    track = f"a-{draft}"
    start_aiomoqt_pub(run, url, track, draft)
    received = run_aiomoqt_sub(run, url, track, draft, synthetic=False)
    assert fastrelay_negotiated(relay, draft) == 2, run.logs()
    assert_window_complete(received, run.logs)


# ---- B: aiomoqt relay between fastrelay's publisher and subscriber --------------------

@pytest.mark.parametrize("draft", DRAFTS)
def test_b_fastrelay_pub_aiomoqt_relay_fastrelay_sub(run: Run, draft: str) -> None:
    relay, url = start_aiomoqt_relay(run, draft)
    track = f"b-{draft}"
    pub = start_fastrelay_pub(run, url, track, draft, relay, r"relay: announce ns=\(b'interop',\)")
    summary = run_fastrelay_sub(run, url, track, draft, PUB_SECONDS + 5)
    sent = pub.last_json(15)["objects"]
    assert aiomoqt_negotiated(relay, draft) == 2, run.logs()
    # everything sent from the group it joined on (the publisher began at its subscription), once ...
    assert summary["duplicates"] == 0 and summary["last_group"] == (sent - 1) // GROUP_SIZE, summary
    assert summary["objects"] == sent - summary["first_group"] * GROUP_SIZE, (sent, summary)
    # ... every payload verified by the subscriber itself
    assert summary["verified"] == summary["objects"] and summary["bad"] == 0, summary


# ---- C: aiomoqt publisher -> fastrelay relay -> fastrelay subscriber ------------------

@pytest.mark.parametrize("draft", DRAFTS)
def test_c_aiomoqt_pub_fastrelay_relay_fastrelay_sub(run: Run, draft: str) -> None:
    relay, url = start_fastrelay_relay(run, draft)
    track = f"c-{draft}"
    start_aiomoqt_pub(run, url, track, draft)
    received = run_recording_sub(run, url, track, draft)
    assert fastrelay_negotiated(relay, draft) == 2, run.logs()
    assert_window_complete(received, run.logs)
    assert received[0][1] == 0, "the joining FETCH brings the current group from its start"


# ---- D: fastrelay publisher -> fastrelay relay -> aiomoqt subscriber ------------------

@pytest.mark.parametrize("draft", DRAFTS)
def test_d_fastrelay_pub_fastrelay_relay_aiomoqt_sub(run: Run, draft: str) -> None:
    relay, url = start_fastrelay_relay(run, draft)
    track = f"d-{draft}"
    pub = start_fastrelay_pub(run, url, track, draft, relay, r"publishes namespace interop")
    received = run_aiomoqt_sub(run, url, track, draft, synthetic=True, seconds=PUB_SECONDS + 5)
    sent = pub.last_json(15)["objects"]
    assert fastrelay_negotiated(relay, draft) == 2, run.logs()
    # every object from the first it got to the publisher's last, once, and every payload right
    assert received and len(set(received)) == len(received), received
    missing = missing_in_window(received, last_sent=divmod(sent - 1, GROUP_SIZE))
    assert not missing, f"{sent} sent, first received {received[0][:2]}, lost {missing}\n" + run.logs()
    assert all(ok for *_, ok in received), [r for r in received if not r[2]]


# ---- E: objects as datagrams (aiomoqt publisher --datagram) through the fastrelay relay ---

@pytest.mark.parametrize("draft", DRAFTS)
def test_e_datagrams_through_the_fastrelay_relay(run: Run, draft: str) -> None:
    relay, url = start_fastrelay_relay(run, draft)
    track = f"e-{draft}"
    start_aiomoqt_pub(run, url, track, draft, "--datagram")
    assert_window_complete(run_aiomoqt_sub(run, url, track, draft, synthetic=False), run.logs)
    assert_window_complete(run_recording_sub(run, url, track, draft), run.logs)


# ---- F, G, H: SUBSCRIBE_NAMESPACE: aiomoqt's subscriber knows only the namespace ----------
#
# aiomoqt's sub_example without -T discovers its track (aiomoqt/track.py SubscribedTrack.subscribe:
# SUBSCRIBE_NAMESPACE for the prefix, options PUBLISH on draft-16, then PUBLISH_OK (Forward 1,
# filter Largest Object) to the first PUBLISH and the objects of its alias); it runs unchanged,
# recorded like AIOMOQT_SUB. It waits for the PUBLISH before it counts its -t seconds, and it
# ends when the relay's PUBLISH_DONE arrives.

def start_aiomoqt_namespace_sub(run: Run, url: str, draft: str, *, synthetic: bool, seconds: int) -> Proc:
    """aiomoqt's sub_example subscribed to the namespace NAMESPACE only: returns once the relay
    answered its SUBSCRIBE_NAMESPACE (the example then says it waits for a publisher)."""
    sub = run.start("aiomoqt-ns-sub", [PY, "-c", AIOMOQT_SUB, "--synthetic" if synthetic else "--any", url,
                                       "-N", NAMESPACE, "-k", "--draft", draft, "-t", str(seconds)])
    sub.wait_for(rf"Waiting for publisher on '{NAMESPACE}'", run.logs)
    return sub


def namespace_sub_received(run: Run, sub: Proc, track: str, timeout: float) -> list[tuple[int, int, bool | None]]:
    """What the namespace subscriber received, once it exited; it must have learnt `track` from
    the relay's PUBLISH (the example prints the name it discovered)."""
    received = [tuple(r) for r in sub.last_json(timeout)["received"]]
    assert f"Discovered: {NAMESPACE}/{track}" in sub.output(), run.logs()
    total = re.search(r"Total: ([\d,]+) objects", sub.output())
    assert (int(total[1].replace(",", "")) if total else 0) == len(received), run.logs()
    return received


def ended_by_publish_done(sub: Proc) -> bool:
    """aiomoqt logged the relay's PUBLISH_DONE with TRACK_ENDED (its name for it: SubscribeDone)."""
    return re.search(r"SubscribeDone\(request_id=\d+, status_code=2,", sub.output()) is not None


def assert_whole_from_first(received: list[tuple[int, int, bool | None]], sent: int, logs: Callable[[], str]) -> None:
    """A namespace subscriber offered our publisher's track as it went live: every object from
    its first (in the first group) to the publisher's last, once, each payload verified."""
    assert received and len(set(received)) == len(received), received
    assert received[0][0] == 0, f"first object {received[0][:2]}: not offered the track as it went live\n" + logs()
    missing = missing_in_window(received, last_sent=divmod(sent - 1, GROUP_SIZE))
    assert not missing, f"{sent} sent, first received {received[0][:2]}, lost {missing}\n" + logs()
    assert all(ok for *_, ok in received), [r for r in received if not r[2]]


@pytest.mark.parametrize("draft", DRAFTS)
def test_f_namespace_aiomoqt_sub_learns_a_fastrelay_pub_track(run: Run, draft: str) -> None:
    """Issue 10 as asked: aiomoqt's subscriber knows only the namespace; `fastrelay publish`
    starts after its SUBSCRIBE_NAMESPACE, and nobody subscribes by name. It must learn the track
    from a PUBLISH and receive it to the end.

    `fastrelay publish --announce publish` sends PUBLISH for its track (with PUBLISH_NAMESPACE
    alone nobody would ever name the track). G is the same without the flag and with a
    subscriber by name added."""
    relay, url = start_fastrelay_relay(run, draft)
    track = f"f-{draft}"
    sub = start_aiomoqt_namespace_sub(run, url, draft, synthetic=True, seconds=PUB_SECONDS + 5)
    pub = start_fastrelay_pub(run, url, track, draft, relay, r"publishes namespace interop",
                              "--announce", "publish")
    sub.wait_for(rf"Discovered: {NAMESPACE}/{track}", run.logs)
    received = namespace_sub_received(run, sub, track, PUB_SECONDS + 20)
    sent = pub.last_json(15)["objects"]
    assert fastrelay_negotiated(relay, draft) == 2, run.logs()
    assert_whole_from_first(received, sent, run.logs)
    assert ended_by_publish_done(sub), run.logs()


@pytest.mark.parametrize("draft", DRAFTS)
def test_g_namespace_aiomoqt_sub_learns_a_fastrelay_pub_track_once_subscribed(run: Run, draft: str) -> None:
    """As F, with our subscriber subscribing to the track by name: the track goes live at the
    relay, which sends aiomoqt's namespace subscriber a PUBLISH for it. aiomoqt learns the
    track name, gets every object from its first (first group) to the publisher's last, each
    payload verified, and ends on the relay's PUBLISH_DONE (TRACK_ENDED); our subscriber got
    every object too."""
    relay, url = start_fastrelay_relay(run, draft)
    track = f"g-{draft}"
    sub = start_aiomoqt_namespace_sub(run, url, draft, synthetic=True, seconds=PUB_SECONDS + 5)
    pub = start_fastrelay_pub(run, url, track, draft, relay, r"publishes namespace interop")
    ours = run.start("fastrelay-sub", received_argv(url, NAMESPACE, track, PUB_SECONDS + 5, draft=draft))
    received = namespace_sub_received(run, sub, track, PUB_SECONDS + 20)
    sent = pub.last_json(15)["objects"]
    summary = ours.last_json(PUB_SECONDS + 20)
    assert fastrelay_negotiated(relay, draft) == 3, run.logs()
    assert_whole_from_first(received, sent, run.logs)
    assert ended_by_publish_done(sub), run.logs()
    assert (summary["objects"], summary["verified"], summary["duplicates"]) == (sent, sent, 0), summary


@pytest.mark.parametrize("draft", DRAFTS)
def test_h_namespace_aiomoqt_sub_learns_an_aiomoqt_pub_track(run: Run, draft: str) -> None:
    """aiomoqt's publisher announces its track with PUBLISH after aiomoqt's subscriber subscribed
    to the namespace: through our relay the subscriber learns the track and receives every object
    of its window."""
    relay, url = start_fastrelay_relay(run, draft)
    track = f"h-{draft}"
    sub = start_aiomoqt_namespace_sub(run, url, draft, synthetic=False, seconds=SUB_SECONDS)
    start_aiomoqt_pub(run, url, track, draft)
    received = namespace_sub_received(run, sub, track, SUB_SECONDS + 20)
    assert fastrelay_negotiated(relay, draft) == 2, run.logs()
    assert_window_complete(received, run.logs)
