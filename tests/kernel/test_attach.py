"""Attaching TC programs: tcx and clsact, detach, and what a killed process leaves."""

import socket
import subprocess
import sys
import textwrap

import pytest
from labtools import lab_name, wait_no_leftovers

from fastrelay.kernel.attach import TcLink, remove_stale
from fastrelay.kernel.objects import BpfObject
from fastrelay.lab.topology import Lab
from fastrelay.netns import entered, exec_argv

pytestmark = pytest.mark.usefixtures("root")


@pytest.fixture
def lab():
    with Lab(lab_name("ta"), 1) as lab:
        yield lab


def udp_gets_through(lab: Lab, tries: int = 4) -> bool:
    """Datagrams publisher -> relay until one arrives (the first may wait for ARP); True if one did."""
    with entered(lab.relay_ns):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with entered(lab.publisher.netns):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((lab.publisher.relay_ipv4, 7000))
        rx.settimeout(0.25)
        for _ in range(tries):
            tx.sendto(b"x", (lab.publisher.relay_ipv4, 7000))
            try:
                return rx.recv(16) == b"x"
            except TimeoutError:
                continue
        return False


def tc_filters(lab: Lab) -> str:
    out = subprocess.run(exec_argv(lab.relay_ns, ["tc", "filter", "show", "dev", "pub0", "ingress"]),
                         capture_output=True, text=True)
    return out.stdout


def drop_all(obj: BpfObject) -> None:
    import ctypes

    from fastrelay.kernel import abi

    obj.map("fr_drop_cfg", ctypes.c_uint32, abi.DropConfig).update(0, abi.DropConfig(threshold=2**32 - 1))


@pytest.mark.parametrize("mode", ["tcx", "clsact"])
def test_attach_takes_effect_and_detach_removes_it(lab, mode):
    assert udp_gets_through(lab)
    with BpfObject.load("lab_dropper") as obj:
        drop_all(obj)
        prog = obj.program("fr_lab_drop")
        with entered(lab.relay_ns):
            link = TcLink(prog.fd, prog.name, socket.if_nametoindex("pub0"), "ingress", mode=mode)
        assert link.mode == mode
        assert not udp_gets_through(lab)
        assert ("fr_lab_drop" in tc_filters(lab)) == (mode == "clsact")
        with entered(lab.relay_ns):
            link.detach()
            link.detach()  # idempotent
        assert udp_gets_through(lab)
        assert "fr_lab_drop" not in tc_filters(lab)
    wait_no_leftovers()


def test_a_live_clsact_filter_is_never_taken_over(lab):
    with BpfObject.load("lab_dropper") as obj, BpfObject.load("lab_probe") as probe:
        drop, other = obj.program("fr_lab_drop"), probe.program("fr_probe_rx")
        with entered(lab.relay_ns):
            idx = socket.if_nametoindex("pub0")
            first = TcLink(drop.fd, drop.name, idx, "ingress", mode="clsact")
            with pytest.raises(Exception, match=r"already attached .* by a running process"):
                TcLink(drop.fd, drop.name, idx, "ingress", mode="clsact")
            neighbour = TcLink(other.fd, other.name, idx, "ingress", mode="clsact")  # another program: fine
            assert remove_stale(idx, "ingress") == 0  # both have a live owner
            assert "fr_lab_drop" in tc_filters(lab) and "fr_probe_rx" in tc_filters(lab)
            neighbour.detach()
            first.detach()
        assert "fr_lab_drop" not in tc_filters(lab)


def test_unknown_mode_is_an_error(lab):
    with BpfObject.load("lab_dropper") as obj, pytest.raises(Exception, match="unknown TC attach mode"):
        TcLink(obj.program("fr_lab_drop").fd, "fr_lab_drop", 1, "ingress", mode="bogus")


HOLDER = textwrap.dedent("""
    import ctypes, socket, sys, time
    from fastrelay.kernel import abi
    from fastrelay.kernel.attach import TcLink
    from fastrelay.kernel.objects import BpfObject
    obj = BpfObject.load("lab_dropper")
    obj.map("fr_drop_cfg", ctypes.c_uint32, abi.DropConfig).update(0, abi.DropConfig(threshold=2**32 - 1))
    prog = obj.program("fr_lab_drop")
    link = TcLink(prog.fd, prog.name, socket.if_nametoindex("pub0"), "ingress", mode=sys.argv[1])
    print("ready", flush=True)
    time.sleep(60)
""")


def kill9_holder(lab: Lab, mode: str) -> None:
    proc = subprocess.Popen(exec_argv(lab.relay_ns, [sys.executable, "-c", HOLDER, mode]),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert not udp_gets_through(lab)
    proc.kill()
    proc.wait()


def test_tcx_attachment_dies_with_its_process(lab):
    kill9_holder(lab, "tcx")
    wait_no_leftovers()
    assert udp_gets_through(lab)


def test_stale_clsact_filter_is_removed_on_next_attach(lab):
    kill9_holder(lab, "clsact")
    # clsact filters outlive their process: the program still runs with its old maps
    assert "fr_lab_drop" in tc_filters(lab)
    assert not udp_gets_through(lab)
    with entered(lab.relay_ns):
        assert remove_stale(socket.if_nametoindex("pub0"), "ingress") == 1
    assert udp_gets_through(lab)
    wait_no_leftovers()


def test_cleanup_command_sweeps_every_namespace(lab):
    kill9_holder(lab, "clsact")
    out = subprocess.run([sys.executable, "-m", "fastrelay", "cleanup"], capture_output=True, text=True, check=True)
    assert "removed 1 stale clsact filter" in out.stdout
    assert "fr_lab_drop" not in tc_filters(lab)
    wait_no_leftovers()


def test_pinning_mounts_a_missing_bpf_filesystem():
    """A machine that booted without bpffs at /sys/fs/bpf gets one when something is pinned
    (checked in a private mount namespace, so the host's mount is not touched)."""
    script = (
        "import subprocess\n"
        "from fastrelay.kernel.attach import BPFFS_MAGIC, _fs_magic, ensure_bpffs\n"
        "subprocess.run(['umount', '/sys/fs/bpf'], capture_output=True)\n"
        "assert _fs_magic('/sys/fs/bpf') != BPFFS_MAGIC\n"
        "ensure_bpffs('/sys/fs/bpf/fastrelay/x')\n"
        "assert _fs_magic('/sys/fs/bpf') == BPFFS_MAGIC\n"
        "print('ok')\n"
    )
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
