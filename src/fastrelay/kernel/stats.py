"""Kernel-side accounting: BPF run-time statistics and an inventory of what is loaded.

Offsets inside struct bpf_prog_info / bpf_map_info come from the running kernel's BTF,
not from a hand-written mirror.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from dataclasses import dataclass

from .btf import Btf
from .libbpf import BPF_STATS_RUN_TIME, check, lib

OUR_PREFIX = "fr_"
PIN_ROOT = "/sys/fs/bpf/fastrelay"


@functools.cache
def _layout(struct: str, *members: str) -> tuple[int, dict[str, tuple[int, int]]]:
    btf = Btf.vmlinux()
    try:
        size = btf.size(btf.find(struct, 4))
        return size, {m: btf.offsetof(struct, m) for m in members}
    finally:
        btf.close()


def _info(fd: int, struct: str, *members: str) -> dict[str, int | str]:
    size, offs = _layout(struct, *members)
    buf = ctypes.create_string_buffer(size)
    n = ctypes.c_uint32(size)
    check(lib.bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(n)), "bpf_obj_get_info_by_fd")
    out: dict[str, int | str] = {}
    for m, (off, width) in offs.items():
        raw = buf.raw[off:off + width]
        out[m] = raw.split(b"\0")[0].decode() if m == "name" else int.from_bytes(raw, "little")
    return out


@dataclass(frozen=True)
class RunStats:
    run_time_ns: int
    run_cnt: int


def prog_run_stats(prog_fd: int) -> RunStats:
    """Cumulative CPU time and runs of a program (counted while run stats are enabled)."""
    info = _info(prog_fd, "bpf_prog_info", "run_time_ns", "run_cnt")
    return RunStats(int(info["run_time_ns"]), int(info["run_cnt"]))


def prog_run_info(prog_fd: int) -> tuple[str, RunStats]:
    """A program's name and prog_run_stats."""
    info = _info(prog_fd, "bpf_prog_info", "name", "run_time_ns", "run_cnt")
    return str(info["name"]), RunStats(int(info["run_time_ns"]), int(info["run_cnt"]))


def prog_verified_insns(prog_fd: int) -> int:
    """Instructions the verifier processed to accept this program (kernel >= 5.16)."""
    return int(_info(prog_fd, "bpf_prog_info", "verified_insns")["verified_insns"])


def enable_run_stats() -> int:
    """Turn on BPF run-time accounting until the returned fd is closed."""
    return check(lib.bpf_enable_stats(BPF_STATS_RUN_TIME), "bpf_enable_stats")


def _walk(next_id: str, get_fd: str, struct: str, *members: str) -> list[dict[str, int | str]]:
    infos, cur = [], ctypes.c_uint32(0)
    while getattr(lib, next_id)(cur.value, ctypes.byref(cur)) == 0:
        fd = getattr(lib, get_fd)(cur.value)
        if fd < 0:
            continue  # freed meanwhile
        try:
            infos.append(_info(fd, struct, "name", *members))
        finally:
            os.close(fd)
    return infos


def programs_run_ns(names: set[str]) -> int:
    """Run time (while run stats are enabled) summed over every loaded program with one of
    `names`, whoever loaded it: how a benchmark sees another process's BPF work."""
    return sum(int(i["run_time_ns"]) for i in _walk("bpf_prog_get_next_id", "bpf_prog_get_fd_by_id",
                                                     "bpf_prog_info", "run_time_ns") if i["name"] in names)


def leftovers() -> dict[str, list[str]]:
    """fastrelay programs and maps still loaded anywhere, and pinned objects under /sys/fs/bpf/fastrelay."""
    return {
        "programs": [str(i["name"]) for i in _walk("bpf_prog_get_next_id", "bpf_prog_get_fd_by_id", "bpf_prog_info")
                     if str(i["name"]).startswith(OUR_PREFIX)],
        "maps": [str(i["name"]) for i in _walk("bpf_map_get_next_id", "bpf_map_get_fd_by_id", "bpf_map_info")
                 if str(i["name"]).startswith(OUR_PREFIX)],
        "pinned": sorted(glob.glob(f"{PIN_ROOT}/**", recursive=True))[1:],
    }
