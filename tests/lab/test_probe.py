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
