"""`fastrelay relay` as a process: certificates, cache bounds, Prometheus endpoint, GOAWAY and exit."""

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from moqtools import LARGEST, free_port, relay_process

from fastrelay.demo import dropped_objects
from fastrelay.endpoints.endpoint import ConnectFailed, ConnectFailure, MoqtClient
from fastrelay.endpoints.publisher import publish
from fastrelay.endpoints.subscriber import subscribe
from fastrelay.media.h264 import SyntheticSource
from fastrelay.moq import messages as m
from fastrelay.moq.data import FetchHeader
from fastrelay.moq.params import Version
from fastrelay.moq.session import ObjectReceived, StreamEnded
from fastrelay.moq.wire import Location
from fastrelay.quic.tls import self_signed

NS, TRACK = (b"late", b"join"), b"video"


def test_relay_process_serves_metrics_and_stops_cleanly(tmp_path):
    quic, http = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    relay = subprocess.Popen([sys.executable, "-m", "fastrelay", "relay", f"moqt://127.0.0.1:{quic}",
                              "--state-dir", str(tmp_path), "--metrics", f"127.0.0.1:{http}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        text = ""
        for _ in range(100):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=1).read().decode()
                break
            except OSError:
                time.sleep(0.05)
        assert "fastrelay_moq_sessions 0.0" in text and "fastrelay_moq_objects_out_total" in text
        sub = subprocess.run([sys.executable, "-m", "fastrelay", "subscribe", f"moqt://127.0.0.1:{quic}",
                              "-N", "x", "-T", "y", "--raw", "--duration", "1"], capture_output=True, text=True)
        assert sub.returncode == 1 and "SUBSCRIBE refused" in sub.stderr  # nobody publishes x: one clear line
        relay.send_signal(signal.SIGTERM)
        out, err = relay.communicate(timeout=10)
    finally:
        if relay.poll() is None:
            relay.kill()
    assert relay.returncode == 0
    assert json.loads(out.strip().splitlines()[-1])["sessions"] == 1
    assert "self-signed certificate" in err  # it says so
    assert (tmp_path / "selfsigned.crt").exists()


def test_bad_relay_arguments_get_one_clear_line(tmp_path):
    for args, message in ((["relay", "http://127.0.0.1:1"], "expected moqt://"),
                          (["relay", "moqt://127.0.0.1:4443", "--cert", "/nonexistent.pem", "--key", "/x"],
                           "no such file"),
                          (["publish", "moqt://127.0.0.1:4443", "-N", "a//b", "-T", "t"], "non-empty fields")):
        res = subprocess.run([sys.executable, "-m", "fastrelay", *args, "--state-dir", str(tmp_path)]
                             if args[0] == "relay" else [sys.executable, "-m", "fastrelay", *args],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 1 and message in res.stderr, (args, res.stderr)


async def _version_with_ca(url: str, cafile: str) -> Version:
    """Connect verifying the relay's certificate against `cafile`; the session's MoQT version."""
    async with MoqtClient(url, cafile=cafile) as client:
        return client.session.version


def test_given_certificate_is_served_and_verifies(tmp_path):
    cert, key = self_signed(["127.0.0.1"])
    (tmp_path / "relay.crt").write_bytes(cert)
    (tmp_path / "relay.key").write_bytes(key)
    (tmp_path / "other.crt").write_bytes(self_signed(["127.0.0.1"])[0])
    with relay_process(tmp_path, "--cert", str(tmp_path / "relay.crt"), "--key", str(tmp_path / "relay.key")) as (
            relay, url):
        assert asyncio.run(_version_with_ca(url, str(tmp_path / "relay.crt"))) == Version.DRAFT_16
        with pytest.raises(ConnectFailed) as refused:  # a client trusting another certificate refuses this relay
            asyncio.run(_version_with_ca(url, str(tmp_path / "other.crt")))
        assert refused.value.failure == ConnectFailure.CERTIFICATE_REFUSED
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=10)
    log = next(tmp_path.glob("relay-*.log")).read_text()
    assert relay.returncode == 0 and "using a self-signed certificate" not in log
    assert not (tmp_path / "state" / "selfsigned.crt").exists()


class _HeldSource(SyntheticSource):
    """Synthetic groups, then nothing more (the track stays up) until the task is cancelled."""

    async def _events_async(self):
        async for ev in super()._events_async():
            yield ev
        await asyncio.Event().wait()


async def _late_join_fetches(url: str, joining_starts: tuple[int, ...]) -> list:
    """Publish 10 groups of 10 objects of 1000 bytes through the relay (a live subscriber keeps the
    track up), then join late: for each joining start, the relay's reply to a relative joining
    FETCH and the objects it sent."""
    source = _HeldSource(object_size=1000, fps=500, gop=10, count=100, realtime=True)
    pub = asyncio.create_task(publish(url, NS, TRACK, source, wait_subscriber=10))
    live = asyncio.create_task(_subscribe_once_announced(url, codec="raw", duration=10))
    await asyncio.sleep(1.0)
    answers = []
    async with MoqtClient(url) as late:
        ok = await late.request(lambda rid: m.Subscribe(rid, NS, TRACK, LARGEST))  # joinable
        assert isinstance(ok, m.SubscribeOk) and ok.params.largest_object == Location(9, 9)
        for start in joining_starts:
            reply = await late.request(lambda rid, start=start: m.Fetch(
                rid, m.FetchType.RELATIVE_JOINING, joining_request_id=ok.request_id, joining_start=start))
            objects = []
            while isinstance(reply, m.FetchOk):
                ev = await asyncio.wait_for(late.events.get(), 5)
                if isinstance(getattr(ev, "header", None), FetchHeader):
                    if isinstance(ev, StreamEnded):
                        break
                    if isinstance(ev, ObjectReceived):
                        objects.append(ev.object)
            answers.append((reply, objects))
    pub.cancel()
    live.cancel()
    await asyncio.gather(pub, live, return_exceptions=True)
    return answers


async def _subscribe_once_announced(url: str, **kwargs):
    """subscribe(), retried while the relay does not know the track's publisher yet."""
    for _ in range(100):
        try:
            return await subscribe(url, NS, TRACK, **kwargs)
        except ConnectionError as exc:
            if "SUBSCRIBE refused" not in str(exc):
                raise
            await asyncio.sleep(0.05)
    raise AssertionError("the publisher never reached the relay")


@pytest.mark.parametrize(("flags", "groups"), [
    (["--cache-groups", "3"], 3),
    (["--cache-groups", "100", "--cache-bytes", "25000"], 2),  # a group takes about 10 x 1040 bytes
], ids=["groups", "bytes"])
def test_cache_flags_bound_what_a_late_joiner_can_fetch(tmp_path, flags, groups):
    with relay_process(tmp_path, *flags) as (_, url):
        (fits, objects), (too_far, none) = asyncio.run(_late_join_fetches(url, (groups - 1, groups)))
    assert isinstance(fits, m.FetchOk)
    assert [(o.group_id, o.object_id) for o in objects] == [(g, i) for g in range(10 - groups, 10) for i in range(10)]
    assert sum(len(o.payload) for o in objects) <= (25000 if "--cache-bytes" in flags else 1 << 20)
    # one group more than the flags allow is not cached: refused, not answered with a hole
    assert isinstance(too_far, m.RequestError) and too_far.error_code == m.RequestErrorCode.INVALID_RANGE
    assert none == []


def test_publisher_and_subscriber_processes_end_cleanly_when_the_relay_goes_away(tmp_path):
    http = free_port(socket.SOCK_STREAM)
    with relay_process(tmp_path, metrics=http) as (relay, url):
        fr = [sys.executable, "-m", "fastrelay"]
        pub = subprocess.Popen([*fr, "publish", url, "-N", "a/b", "-T", "t", "--source", "synthetic", "--fps", "100",
                                "--object-size", "500", "--gop", "10", "--duration", "30", "--wait", "10"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(50):  # until the publisher process has reached the relay
            sub = subprocess.Popen([*fr, "subscribe", url, "-N", "a/b", "-T", "t", "--raw", "--duration", "30",
                                    "--progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                sub.wait(timeout=3)
            except subprocess.TimeoutExpired:
                break
            assert "SUBSCRIBE refused" in sub.stderr.read()
            sub.stdout.close()
            sub.stderr.close()
        try:
            time.sleep(1.0)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=2).read().decode()
            relay.send_signal(signal.SIGTERM)
            pub_out, pub_err = pub.communicate(timeout=10)
            sub_out, sub_err = sub.communicate(timeout=10)
        finally:
            for p in (pub, sub):
                if p.poll() is None:
                    p.kill()
    assert dropped_objects(metrics) == 0  # the demo's reading of the relay's drop counter
    assert pub.returncode == 0 and sub.returncode == 0, (pub_err, sub_err)
    published = json.loads(pub_out.strip().splitlines()[-1])
    lines = [json.loads(line) for line in sub_out.strip().splitlines()]
    progress, summary = [x["progress"] for x in lines[:-1]], lines[-1]
    assert published["ended"] == "goaway" and summary["ended"] == "goaway"
    assert progress and all({"lost", "gaps"} <= p.keys() for p in progress)
    assert summary["lost"] == 0 and summary["gaps"] == 0 and 150 <= summary["objects"] <= published["objects"]
    assert sum("GOAWAY" in line for line in pub_err.splitlines()) == 1
    assert sum("GOAWAY" in line for line in sub_err.splitlines()) == 1
