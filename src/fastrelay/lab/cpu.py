"""CPU accounting: per process (/proc/PID/stat) and host-wide busy time (/proc/stat)."""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process (and its reaped children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / _TICK


def host_busy_s() -> float:
    """CPU seconds all CPUs spent not idle (user, system, irq and softirq included)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)  # idle + iowait
    busy = sum(parts[:8]) - idle  # guest time is already inside user
    return busy / _TICK
