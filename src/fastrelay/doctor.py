"""`fastrelay doctor`: what this machine can run, and how to fix what it cannot."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass

from . import netns as nsutil
from .kernel.features import kernel_version


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    disables: str = ""
    fix: str = ""

    def as_dict(self) -> dict[str, object]:
        return self.__dict__.copy()


def _btf_has(kind_name: list[tuple[str, int]]) -> dict[str, bool]:
    from .kernel.btf import Btf

    btf = Btf.vmlinux()
    try:
        out = {}
        for name, kind in kind_name:
            try:
                btf.find(name, kind)
                out[name] = True
            except Exception:
                out[name] = False
        return out
    finally:
        btf.close()


def _enum_has(enum: str, member: str) -> bool:
    from .kernel.btf import Btf

    btf = Btf.vmlinux()
    try:
        return member in btf.enum(enum)
    except Exception:
        return False
    finally:
        btf.close()


def _scratch_netns_checks() -> tuple[Check, Check]:
    """Attach a real program with tcx, and try netem, inside a throw-away namespace."""
    from .kernel.attach import TcLink
    from .kernel.objects import BpfObject

    name = f"fr-doctor-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(nsutil.exec_argv(name, ["ip", "link", "set", "lo", "up"]), check=True)
        with BpfObject.load("lab_dropper") as obj, nsutil.entered(name):
            prog = obj.program("fr_lab_drop")
            link = TcLink(prog.fd, prog.name, 1, "ingress", mode="tcx")
            link.detach()
        tcx = Check("tcx attach", True, "bpf_link on TC ingress works")
    except Exception as exc:
        tcx = Check("tcx attach", False, str(exc).splitlines()[0],
                    "crash-safe attachment (falls back to clsact, removed on exit/next start)", "Linux >= 6.6")
    try:
        res = subprocess.run(nsutil.exec_argv(name, ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay",
                                                     "1ms"]), capture_output=True, text=True)
        netem = Check("netem", res.returncode == 0, "available" if res.returncode == 0 else res.stderr.strip(),
                      "" if res.returncode == 0 else "lab delay emulation (loss uses a BPF dropper instead)",
                      "" if res.returncode == 0 else "a kernel with CONFIG_NET_SCH_NETEM")
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return tcx, netem


def run_checks() -> list[Check]:
    """Every check, in order; kernel checks are skipped (reported failed) without privileges."""
    from .kernel import privileges

    checks = []
    ver = kernel_version()
    checks.append(Check("kernel", ver >= (5, 15), platform.release(), "everything in the kernel", "Linux >= 5.15"))
    lacking = privileges.missing()
    checks.append(Check("privileges", not lacking, "root" if os.geteuid() == 0 else f"missing {lacking}",
                        "kernel data paths and the lab", "run as root (or grant CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON)"))
    btf = os.path.exists("/sys/kernel/btf/vmlinux")
    checks.append(Check("BTF", btf, "/sys/kernel/btf/vmlinux" if btf else "missing",
                        "layout checks against the kernel, run-time stats", "a kernel with CONFIG_DEBUG_INFO_BTF"))
    try:
        from .kernel.build import find_clang

        path, version = find_clang()
        checks.append(Check("clang", True, f"{path}: {version}"))
    except Exception as exc:
        checks.append(Check("clang", False, str(exc), "building every BPF program", "make demo (or scripts/setup)"))
    try:
        from .kernel.libbpf import lib

        major, minor = (int(x) for x in lib.version.split("."))
        checks.append(Check("libbpf", (major, minor) >= (1, 0), lib.version, "loading", "libbpf1 >= 1.0"))
    except ImportError as exc:
        checks.append(Check("libbpf", False, str(exc), "loading any BPF program", "apt-get install libbpf1"))
        return checks
    if btf:
        for name, helper, disables, fix in (
            ("bpf_loop", "loop", "kernel fan-out loops", "Linux >= 5.17"),
            ("ring buffer", "ringbuf_output", "per-copy records to userspace", "Linux >= 5.8"),
        ):
            ok = _enum_has("bpf_func_id", f"BPF_FUNC_{helper}")
            checks.append(Check(name, ok, "present" if ok else "missing", disables, fix))
        ok = _btf_has([("bpf_crypto_ctx_create", 12)])["bpf_crypto_ctx_create"]
        checks.append(Check("bpf_crypto kfuncs", ok, "present" if ok else "missing",
                            "in-kernel QUIC re-encryption (later feature)", "Linux >= 6.10 with BPF crypto"))
    if not lacking and shutil.which("ip"):
        checks.extend(_scratch_netns_checks())
    return checks


def render(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"{'ok ' if c.ok else 'MISSING'} {c.name:18} {c.detail}")
        if not c.ok:
            if c.disables:
                lines.append(f"{'':27}disables: {c.disables}")
            if c.fix:
                lines.append(f"{'':27}fix: {c.fix}")
    return "\n".join(lines)
