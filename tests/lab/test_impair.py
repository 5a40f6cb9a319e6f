"""Lab impairments: BPF random loss, TBF rate limit, netem delay (where the kernel has it)."""

import socket
import subprocess

import pytest
from labtools import lab_name, wait_no_leftovers

from fastrelay.lab import impair
from fastrelay.lab.topology import Lab
from fastrelay.lab.traffic import UdpSink, UdpSource
from fastrelay.netns import entered, exec_argv

pytestmark = pytest.mark.usefixtures("root")


@pytest.fixture
def lab():
    with Lab(lab_name("ti"), 1) as lab:
        yield lab


def send(lab: Lab, count: int, rate: float | None, size: int = 1000) -> int:
    """Send `count` datagrams publisher -> relay; how many arrived."""
    with entered(lab.relay_ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((lab.publisher.relay_ipv4, 5001))
    with entered(lab.publisher.netns):
        src = UdpSource((lab.publisher.relay_ipv4, 5001), rate=rate, count=count, size=size)
    with UdpSink([sock]) as sink, src:
        src.run()
        stats = sink.collect(expected=count, timeout=1.5)[0]
    sock.close()
    assert stats.bad == 0 and stats.duplicates == 0
    return len(stats.seqs)


def test_random_loss_drops_about_the_configured_share(lab):
    loss = impair.RandomLoss(lab.relay_ns, lab.publisher.relay_ifname, 0.2)
    try:
        got = send(lab, 5000, rate=50000)
        c = loss.counters()
    finally:
        loss.close()
    # our datagrams (plus the odd IPv6 multicast report); every lost datagram was dropped here
    assert 5000 <= c["seen"] <= 5020 and 5000 - got <= c["dropped"] <= 5000 - got + 20
    assert 0.15 < 1 - got / 5000 < 0.25  # binomial sd is 0.6%: this cannot flake
    assert send(lab, 500, rate=50000) == 500  # closed: no loss


def test_neighbour_discovery_is_never_dropped(lab):
    loss = impair.RandomLoss(lab.relay_ns, lab.publisher.relay_ifname, 1.0)
    try:
        subprocess.run(exec_argv(lab.publisher.netns, ["ip", "neigh", "flush", "all"]), check=True)
        assert send(lab, 50, rate=1000) == 0  # every data packet dropped...
        neigh = subprocess.run(exec_argv(lab.publisher.netns, ["ip", "neigh", "show", lab.publisher.relay_ipv4]),
                               capture_output=True, text=True, check=True).stdout
        assert lab.publisher.relay_mac in neigh  # ...but ARP got through
    finally:
        loss.close()


def test_loss_probability_is_validated(lab):
    with pytest.raises(ValueError):
        impair.RandomLoss(lab.relay_ns, "pub0", 1.5)


def test_tbf_rate_limit_caps_throughput(lab):
    impair.rate_limit(lab.publisher.netns, lab.publisher.ifname, "2mbit", burst="10kb", latency="20ms")
    qd = subprocess.run(exec_argv(lab.publisher.netns, ["tc", "qdisc", "show", "dev", "eth0"]),
                        capture_output=True, text=True).stdout
    assert "tbf" in qd
    # 2000 x 1028 B offered at once is 16 Mbit: the queue keeps 20 ms worth, the rest is dropped
    assert send(lab, 2000, rate=None) < 400
    impair.clear(lab.publisher.netns, lab.publisher.ifname)
    assert send(lab, 2000, rate=50000) == 2000


def test_netem_delay_or_a_clear_error(lab):
    try:
        impair.delay(lab.publisher.netns, lab.publisher.ifname, 5)
    except impair.ImpairmentUnavailable as exc:
        assert "netem" in str(exc)
    else:
        impair.clear(lab.publisher.netns, lab.publisher.ifname)


def test_cli_impairments_outlive_the_command_until_cleared():
    import os
    import sys

    from fastrelay.lab.topology import pin_dir

    name = lab_name("tl")

    def cli(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "fastrelay", "lab", *args, "--name", name],
                             capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def relay_to_sub(lab: Lab) -> int:
        sub = lab.subscribers[0]
        with entered(sub.netns):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind((sub.ipv4, 7001))
        with entered(lab.relay_ns):
            src = UdpSource((sub.ipv4, 7001), rate=5000, count=200, size=200)
        with UdpSink([rx]) as sink, src:
            src.run()
            got = len(sink.collect(expected=200, timeout=0.5)[0].seqs)
        rx.close()
        return got

    cli("up", "--subscribers", "1")
    try:
        lab = Lab(name, 1)
        assert relay_to_sub(lab) == 200
        cli("impair", "--sub", "0", "--loss", "1.0")
        assert os.path.exists(f"{pin_dir(name)}/loss-0")
        assert relay_to_sub(lab) == 0
        cli("impair", "--sub", "0", "--clear")
        assert relay_to_sub(lab) == 200
        cli("impair", "--sub", "0", "--loss", "0.5")
    finally:
        cli("down")
    assert not os.path.exists(pin_dir(name))
    wait_no_leftovers()
