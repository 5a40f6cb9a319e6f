"""Attach TC programs: tcx links where the kernel has them (they vanish with the process),
clsact filters otherwise (which outlive it, so they are removed on detach and any stale
one of ours is removed before attaching)."""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import fcntl
import logging
import os
import socket
import zlib
from pathlib import Path
from typing import Self

from pyroute2 import IPRoute

from .errors import AttachError
from .libbpf import (
    BPF_TC_EGRESS,
    BPF_TC_INGRESS,
    BPF_TCX_EGRESS,
    BPF_TCX_INGRESS,
    BpfTcHook,
    BpfTcOpts,
    lib,
)

log = logging.getLogger("fastrelay.attach")

CLSACT_PRIORITY = 0xFA57
LOCK_DIR = "/run/fastrelay/locks"
_BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"


class Direction(enum.StrEnum):
    INGRESS = "ingress"
    EGRESS = "egress"


BPFFS_MAGIC = 0xCAFE4A11


def ensure_bpffs(path: str) -> None:
    """Make sure `path` lies on a BPF filesystem: if the bpffs mount point above it (by
    convention /sys/fs/bpf) has none, mount one there (some machines boot without it)."""
    mount_point = "/sys/fs/bpf"
    if not path.startswith(mount_point + "/") and path != mount_point:
        return
    if _fs_magic(mount_point) == BPFFS_MAGIC:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", mount_point.encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise AttachError(f"no BPF filesystem at {mount_point} and mounting one failed: {os.strerror(err)}")
    log.info("mounted a BPF filesystem at %s", mount_point)


def _fs_magic(path: str) -> int:
    """f_type of the filesystem holding `path` (statfs; os.statvfs does not expose it)."""
    buf = ctypes.create_string_buffer(120)  # struct statfs on 64-bit Linux is 120 bytes; f_type first
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(path.encode(), buf) != 0:
        return 0
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def clsact_handle(program: str) -> int:
    """Deterministic clsact filter handle for one of our programs, so stale ones can be found."""
    return 0xFA570000 | (zlib.crc32(program.encode()) & 0xFFFF)


def our_program_names() -> list[str]:
    """Names of every SEC("tc") program in bpf/ (what a stale filter of ours may run)."""
    names = []
    for src in _BPF_DIR.glob("*.bpf.c"):
        lines = src.read_text().splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.startswith('SEC("tc")'):
                names.append(lines[i + 1].split("(")[0].split()[-1])
    return names


def _hook(ifindex: int, direction: Direction | str) -> BpfTcHook:
    point = BPF_TC_INGRESS if Direction(direction) is Direction.INGRESS else BPF_TC_EGRESS
    return BpfTcHook(sz=ctypes.sizeof(BpfTcHook), ifindex=ifindex, attach_point=point)


def _opts(**kw: int) -> BpfTcOpts:
    return BpfTcOpts(sz=ctypes.sizeof(BpfTcOpts), **kw)


def _has_clsact(ifindex: int) -> bool:
    with IPRoute() as ip:
        return any(q.get("TCA_KIND") == "clsact" for q in ip.get_qdiscs(index=ifindex))


def _lock_path(ifindex: int, direction: Direction | str, program: str) -> str:
    ns = os.stat("/proc/thread-self/ns/net").st_ino
    return f"{LOCK_DIR}/clsact-{ns}-{ifindex}-{Direction(direction)}-{program}.lock"


def _try_lock(path: str) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if a live process holds it."""
    os.makedirs(LOCK_DIR, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _tc_opts(program: str) -> BpfTcOpts:  # fresh each call: query fills in prog_id, detach wants 0
    return _opts(handle=clsact_handle(program), priority=CLSACT_PRIORITY)


def remove_stale(ifindex: int, direction: Direction | str, programs: list[str] | None = None) -> int:
    """Remove clsact filters of ours on this hook that no live process owns (a crashed or
    killed run's); returns how many. Filters held by a running process are left alone."""
    if not _has_clsact(ifindex):
        return 0
    hook = _hook(ifindex, direction)
    removed = 0
    for name in programs or our_program_names():
        if lib.bpf_tc_query(hook, _tc_opts(name)) != 0:
            continue
        path = _lock_path(ifindex, direction, name)
        fd = _try_lock(path)
        if fd is None:
            continue  # its owner is alive
        try:
            if lib.bpf_tc_detach(hook, _tc_opts(name)) == 0:
                removed += 1
                log.warning("removed stale clsact filter %s (ifindex %d %s)", name, ifindex, Direction(direction))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)
    return removed


def sweep() -> int:
    """Remove every ownerless clsact filter of ours in the current network namespace."""
    return sum(remove_stale(idx, d) for idx, _ in socket.if_nameindex() for d in Direction)


class TcLink:
    """One program attached to one TC hook. detach() (or process exit, for tcx) removes it."""

    def __init__(self, prog_fd: int, prog_name: str, ifindex: int, direction: Direction | str,
                 mode: str | None = None) -> None:
        self.ifindex = ifindex
        self.direction = Direction(direction)
        self.prog_name = prog_name
        self._link_fd = -1
        mode = mode or os.environ.get("FASTRELAY_TC_MODE", "auto")
        if mode not in ("auto", "tcx", "clsact"):
            raise AttachError(f"unknown TC attach mode {mode!r} (auto, tcx or clsact)")
        self.attached = False
        self._lock_fd: int | None = None
        remove_stale(ifindex, self.direction, [prog_name])  # a killed clsact run's filter would still run
        if mode in ("auto", "tcx"):
            kind = BPF_TCX_INGRESS if self.direction is Direction.INGRESS else BPF_TCX_EGRESS
            fd = lib.bpf_link_create(prog_fd, ifindex, kind, None)
            if fd >= 0:
                self._link_fd, self.mode, self.attached = fd, "tcx", True
                return
            if mode == "tcx" or -fd not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise AttachError(f"tcx attach of {prog_name} to ifindex {ifindex}: {os.strerror(-fd)}")
            log.info("tcx unavailable (%s), falling back to clsact", os.strerror(-fd))
        self.mode = "clsact"
        # clsact filters outlive processes: a lock held for our lifetime says this one is in use
        self._lock_path = _lock_path(ifindex, self.direction, prog_name)
        self._lock_fd = _try_lock(self._lock_path)
        if self._lock_fd is None:
            raise AttachError(f"{prog_name} is already attached to ifindex {ifindex} ({self.direction}) "
                              "by a running process")
        hook = _hook(ifindex, self.direction)
        ret = lib.bpf_tc_hook_create(hook)
        if ret < 0 and ret != -errno.EEXIST:
            raise AttachError(f"creating clsact qdisc on ifindex {ifindex}: {os.strerror(-ret)}")
        ret = lib.bpf_tc_attach(hook, _opts(prog_fd=prog_fd, handle=clsact_handle(prog_name),
                                            priority=CLSACT_PRIORITY))
        if ret < 0:
            self._release_lock()
            raise AttachError(f"clsact attach of {prog_name} to ifindex {ifindex}: {os.strerror(-ret)}")
        self.attached = True

    def persist(self, pin_path: str) -> None:
        """Keep the attachment after this process exits: pin a tcx link at `pin_path` (a clsact
        filter persists by itself). Removing the pin (or the interface) detaches it later."""
        if self.mode == "tcx":
            ensure_bpffs(os.path.dirname(pin_path))
            os.makedirs(os.path.dirname(pin_path), exist_ok=True)
            ret = lib.bpf_obj_pin(self._link_fd, pin_path.encode())
            if ret < 0:
                raise AttachError(f"pinning {self.prog_name} at {pin_path}: {os.strerror(-ret)}")
            os.close(self._link_fd)
            self._link_fd = -1
        self._release_lock()  # a persisted clsact filter has no owner: `fastrelay cleanup` may remove it
        self.attached = False  # no longer ours to detach

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lock_path)  # still holding it: nobody else can own this path now
            os.close(self._lock_fd)
            self._lock_fd = None

    def detach(self) -> None:
        """Remove the attachment (idempotent; a vanished interface counts as detached)."""
        if not self.attached:
            return
        self.attached = False
        if self.mode == "tcx":
            os.close(self._link_fd)
            self._link_fd = -1
            return
        ret = lib.bpf_tc_detach(_hook(self.ifindex, self.direction), _tc_opts(self.prog_name))
        self._release_lock()
        if ret < 0 and ret not in (-errno.ENOENT, -errno.ENODEV, -errno.EINVAL):
            log.warning("detaching %s from ifindex %d: %s", self.prog_name, self.ifindex, os.strerror(-ret))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
