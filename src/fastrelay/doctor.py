"""`fastrelay doctor`: what this machine can run, and how to fix what it cannot.

Every check probes the real system: kernel BTF for helpers, kfuncs and attach types, a
real tcx attachment and a real netem qdisc inside a throw-away network namespace
(`fr-doctor-<pid>`, always removed), clang found on PATH, libbpf as loaded.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from . import netns as nsutil
from .kernel.errors import KernelError, LayoutError
from .kernel.features import kernel_version

KIND_FUNC = 12  # BTF_KIND_FUNC
AS_ROOT = "run `fastrelay doctor` as root"


@dataclass
class Check:
    """One item: whether it is there, what was found, what its absence disables, how to fix it."""

    name: str
    ok: bool
    detail: str
    disables: str = ""
    fix: str = ""

    def as_dict(self) -> dict[str, object]:
        return self.__dict__.copy()


# name, how kernel BTF shows it (enum member or kfunc), what it disables when missing, fix
_BTF_FEATURES = (
    ("bpf_loop", ("bpf_func_id", "BPF_FUNC_loop"), "the kernel data path (its fan-out loop)", "Linux >= 5.17"),
    ("ring buffer", ("bpf_func_id", "BPF_FUNC_ringbuf_output"), "the kernel data path (per-copy records)",
     "Linux >= 5.8"),
    ("bpf_crypto kfuncs", (None, "bpf_crypto_ctx_create"), "in-kernel QUIC re-encryption (later feature)",
     "Linux >= 6.10 with CONFIG_BPF_SYSCALL and CONFIG_CRYPTO_SKCIPHER"),
)
TCX = ("tcx attach", "crash-safe attachment (falls back to clsact filters, removed on exit / next start)",
       "Linux >= 6.6")
NETEM = ("netem", "lab delay emulation (loss uses a BPF dropper instead)", "a kernel with CONFIG_NET_SCH_NETEM")


def _kernel_btf(wanted: list[tuple[str | None, str]]) -> dict[str, bool]:
    """For each (enum, member) - or (None, kfunc) - whether the running kernel's BTF has it."""
    from .kernel.btf import Btf

    btf = Btf.vmlinux()
    try:
        out: dict[str, bool] = {}
        enums: dict[str, set[str]] = {}
        for enum, name in wanted:
            try:
                if enum is None:
                    btf.find(name, KIND_FUNC)
                    out[name] = True
                else:
                    if enum not in enums:
                        enums[enum] = set(btf.enum(enum))
                    out[name] = name in enums[enum]
            except LayoutError:
                out[name] = False
        return out
    finally:
        btf.close()


@contextmanager
def scratch_netns() -> Iterator[str]:
    """A throw-away network namespace, removed on exit (also on errors)."""
    name = f"fr-doctor-{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if res.returncode:
        raise OSError(f"ip netns add {name}: {res.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _tcx_attach(ns: str) -> Check:
    """Attach a real program to lo's TC ingress with a bpf_link."""
    from .kernel.attach import TcLink
    from .kernel.objects import BpfObject

    name, disables, fix = TCX
    try:
        with BpfObject.load("lab_dropper") as obj, nsutil.entered(ns):
            prog = obj.program("fr_lab_drop")
            TcLink(prog.fd, prog.name, 1, "ingress", mode="tcx").detach()
    except Exception as exc:
        return Check(name, False, str(exc).splitlines()[0], disables, fix)
    return Check(name, True, "bpf_link on TC ingress works", disables, fix)


def _netem(ns: str) -> Check:
    name, disables, fix = NETEM
    if not shutil.which("tc"):
        return Check(name, False, "not checked: tc not found", disables, "install iproute2 (scripts/setup)")
    res = subprocess.run(nsutil.exec_argv(ns, ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]),
                         capture_output=True, text=True)
    return Check(name, res.returncode == 0, "available" if res.returncode == 0 else res.stderr.strip(), disables, fix)


def _tcx_from_btf(in_btf: bool | None, why: str) -> Check:
    name, disables, fix = TCX
    if in_btf is None:
        return Check(name, False, f"not checked {why}, no kernel BTF", disables, fix)
    where = "in" if in_btf else "not in"
    return Check(name, in_btf, f"BPF_TCX_INGRESS {where} kernel BTF (attach not tried {why})", disables, fix)


def _attach_checks(privileged: bool, clang: bool, tcx_in_btf: bool | None) -> list[Check]:
    """tcx and netem, tried for real in a scratch namespace where possible (tcx from BTF otherwise)."""
    netem_name, netem_disables, _ = NETEM
    why = "without root" if not privileged else "" if shutil.which("ip") else "without ip (iproute2)"
    if not why:
        try:
            with scratch_netns() as ns:
                return [_tcx_attach(ns) if clang else _tcx_from_btf(tcx_in_btf, "without clang"), _netem(ns)]
        except OSError as exc:
            why = f"({exc})"
    fix = AS_ROOT if not privileged else "iproute2 with `ip netns` (scripts/setup)"
    return [_tcx_from_btf(tcx_in_btf, why), Check(netem_name, False, f"not checked {why}", netem_disables, fix)]


def run_checks() -> list[Check]:
    """Every check, in order; what needs root or clang is checked from kernel BTF without them."""
    from .kernel import privileges

    checks = []
    ver = kernel_version()
    checks.append(Check("kernel", ver >= (5, 15), platform.release(), "everything in the kernel", "Linux >= 5.15"))
    lacking = privileges.missing()
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    checks.append(Check("privileges", not lacking, f"{who}, lacks {', '.join(lacking)}" if lacking else who,
                        "kernel data paths and the lab", "run as root (or grant CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON)"))
    btf = os.path.exists("/sys/kernel/btf/vmlinux")
    checks.append(Check("BTF", btf, "/sys/kernel/btf/vmlinux" if btf else "missing",
                        "layout checks against the kernel, run-time stats", "a kernel with CONFIG_DEBUG_INFO_BTF"))
    clang_disables, clang_fix = "building every BPF program (the kernel data path, lab probes)", \
        "make demo (or scripts/setup): installs clang >= 14"
    try:
        from .kernel.build import find_clang

        path, version = find_clang()
        checks.append(Check("clang", True, f"{path}: {version}", clang_disables, clang_fix))
        clang = True
    except Exception as exc:
        checks.append(Check("clang", False, str(exc), clang_disables, clang_fix))
        clang = False
    try:
        from .kernel.libbpf import lib
    except ImportError as exc:
        checks.append(Check("libbpf", False, str(exc), "loading any BPF program", "apt-get install libbpf1"))
        return checks
    major, minor = (int(x) for x in lib.version.split("."))
    checks.append(Check("libbpf", (major, minor) >= (1, 0), lib.version, "loading any BPF program", "libbpf1 >= 1.0"))
    found: dict[str, bool] | None = None
    if btf:
        try:
            found = _kernel_btf([f[1] for f in _BTF_FEATURES] + [("bpf_attach_type", "BPF_TCX_INGRESS")])
        except KernelError:
            found = None
    for name, (_, member), disables, fix in _BTF_FEATURES:
        ok = bool(found and found[member])
        checks.append(Check(name, ok, "not checked: no kernel BTF" if found is None else
                            "present" if ok else "missing", disables, fix))
    checks.extend(_attach_checks(not lacking, clang, None if found is None else found["BPF_TCX_INGRESS"]))
    return checks


def render(checks: list[Check]) -> str:
    """One line per check; under each missing one, what it disables and how to fix it."""
    lines = []
    for c in checks:
        lines.append(f"{'ok ' if c.ok else 'MISSING'} {c.name:18} {c.detail}")
        if not c.ok:
            lines.append(f"{'':27}disables: {c.disables}")
            lines.append(f"{'':27}fix: {c.fix}")
    return "\n".join(lines)
