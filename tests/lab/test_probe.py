"""BPF one-way delay probes: every tagged packet counted, delays plausible, sink mode."""

import itertools
import socket

import pytest

from fastrelay.lab.probe import DelayProbe, Delays, bucket_low
from fastrelay.lab.topology import Lab
from fastrelay.lab.traffic import UdpSink, UdpSource
from fastrelay.netns import entered


def test_bucket_bounds_are_increasing_and_exact_below_16():
    lows = [bucket_low(i) for i in range(512)]
    assert lows[:17] == list(range(17))
    assert all(a < b for a, b in itertools.pairwise(lows))
    # each power of two is split into 16 buckets of at most 1/16 of its start
    assert all((b - a) / a <= 1 / 16 for a, b in itertools.pairwise(lows[16:]))


def test_percentiles_from_a_histogram():
    buckets = [0] * 512
    buckets[100] = 90
    buckets[200] = 10
    d = Delays(packets=100, bytes=0, matched=100, max_ns=10**9, buckets=buckets)
    assert bucket_low(100) <= d.percentile(0.5) < bucket_low(101)
    assert bucket_low(200) <= d.percentile(0.99) < bucket_low(201)
    xs, ys = d.cdf()
    assert ys[-1] == 1.0 and len(xs) == 2


@pytest.mark.usefixtures("root")
def test_probe_counts_and_times_every_tagged_packet():
    with Lab("tp", 1) as lab:
        rx = [(lab.relay_ns, lab.publisher.relay_ifname, lab.publisher.relay_mac)]
        with DelayProbe((lab.publisher.netns, lab.publisher.ifname), rx) as probe:
            with entered(lab.relay_ns):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((lab.publisher.relay_ipv4, 5000))
            with entered(lab.publisher.netns):
                src = UdpSource((lab.publisher.relay_ipv4, 5000), rate=20000, count=3000, size=500)
            with UdpSink([sock]) as sink, src:
                assert src.run()["sent"] == 3000
                got = sink.collect(expected=3000, timeout=3)[0]
            assert len(got.seqs) == 3000  # probe mode passes packets on
            d = probe.read()[0]
            assert d.packets == 3000 and d.matched == 3000
            assert d.bytes == 3000 * (500 + 28)
            assert 0 < d.percentile(0.5) <= d.percentile(0.99) <= d.max_ns < 50e6

            probe.reset()
            probe.set_sink(True)
            with entered(lab.publisher.netns):
                src = UdpSource((lab.publisher.relay_ipv4, 5000), rate=20000, count=500, size=500)
            with UdpSink([sock]) as sink, src:
                src.run()
                got = sink.collect(expected=1, timeout=0.5)[0]
            assert got.received == 0 and probe.read()[0].packets == 500  # sink: counted, then dropped
            sock.close()


@pytest.mark.usefixtures("root")
def test_scanning_probe_finds_tags_wherever_they_sit():
    """Tags inside QUIC frames move around: a scanning probe finds the first one in the payload."""
    from fastrelay.lab.traffic import payload

    with Lab("tp", 1) as lab:
        rx = [(lab.relay_ns, lab.publisher.relay_ifname, lab.publisher.relay_mac)]
        with DelayProbe((lab.publisher.netns, lab.publisher.ifname), rx, scan=1400) as probe:
            with entered(lab.relay_ns):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((lab.publisher.relay_ipv4, 5000))
            with entered(lab.publisher.netns):
                tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sent = 0
            for seq, where in enumerate([0, 1, 37, 500, 1199, 1384]):
                tx.sendto(b"\x01" * where + payload(0, seq, 64), (lab.publisher.relay_ipv4, 5000))
                sent += 1
            tx.sendto(b"\x01" * 1390 + payload(0, 99, 64), (lab.publisher.relay_ipv4, 5000))  # beyond the scan
            tx.sendto(b"\x02" * 300, (lab.publisher.relay_ipv4, 5000))  # no tag at all
            sock.settimeout(2)
            for _ in range(sent + 2):
                sock.recv(4096)
            d = probe.read()[0]
            assert d.packets == sent and d.matched == sent
            tx.close()
            sock.close()
