"""CPU accounting per process and per namespace."""

import subprocess
import sys
import time

import pytest

from fastrelay.lab.cpu import host_busy_s, netns_cpu_s, netns_pids, process_cpu_s
from fastrelay.lab.topology import Lab
from fastrelay.netns import exec_argv

BURN = """import time
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
print('done', flush=True)
time.sleep(30)"""


@pytest.mark.usefixtures("root")
def test_namespace_cpu_counts_its_processes_only():
    with Lab("tc", 0) as lab:
        before_host = host_busy_s()
        proc = subprocess.Popen(exec_argv(lab.publisher.netns, [sys.executable, "-c", BURN]), stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout.readline().strip() == "done"
            pids = netns_pids(lab.publisher.netns)
            assert pids, "the burner lives in the publisher namespace"
            assert 0.3 <= netns_cpu_s(lab.publisher.netns) < 2.0
            assert netns_cpu_s(lab.relay_ns) < 0.05  # nobody runs there
            assert host_busy_s() - before_host >= 0.25
        finally:
            proc.kill()
            proc.wait()


def test_process_cpu_of_self_grows_and_of_a_gone_pid_is_zero():
    import os

    a = process_cpu_s(os.getpid())
    t = time.process_time()
    while time.process_time() - t < 0.05:
        pass
    assert process_cpu_s(os.getpid()) - a >= 0.04
    assert process_cpu_s(2**22 + 1) == 0.0
