"""CPU accounting: per process, per network namespace, and host-wide.

Process time comes from /proc/PID/task/*/schedstat (nanoseconds on CPU, every thread),
which is far finer than the clock ticks of /proc/PID/stat; namespace time sums the
processes whose network namespace is that one.
"""

from __future__ import annotations

import os

from ..netns import NETNS_RUN_DIR

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """CPU seconds the threads of `pid` have run (0.0 if it is gone)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue
    except FileNotFoundError:
        return 0.0
    return total / 1e9


def netns_pids(name: str) -> list[int]:
    """Processes living in network namespace `name`."""
    target = os.stat(os.path.join(NETNS_RUN_DIR, name)).st_ino
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                    pids.append(int(entry))
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                continue
    return pids


def netns_cpu_s(name: str) -> float:
    """CPU seconds of the processes now in namespace `name` (their whole lives)."""
    return sum(process_cpu_s(pid) for pid in netns_pids(name))


def host_busy_s() -> float:
    """CPU seconds all CPUs spent not idle (user, system, irq and softirq included)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)  # idle + iowait
    busy = sum(parts[:8]) - idle  # guest time is already inside user
    return busy / _TICK
