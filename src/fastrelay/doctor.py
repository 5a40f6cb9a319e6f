"""`fastrelay doctor`: what this machine can run, and how to fix what it cannot.

Every check probes the real system: kernel BTF for helpers, kfuncs and attach types, a
real tcx attachment, a real netem qdisc and every BPF program built and loaded (each on its
own, then unloaded) inside a throw-away network namespace (`fr-doctor-<pid>`, always
removed), clang found on PATH, libbpf as loaded. `kernel_path_status()` answers, in the
same words, whether one program source (a relay's kernel data path) can run here.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import netns as nsutil
from .kernel.errors import KernelError, LayoutError
from .kernel.features import kernel_version

if TYPE_CHECKING:
    from .kernel.verifier import ProgramCost

KIND_FUNC = 12  # BTF_KIND_FUNC
AS_ROOT = "run `fastrelay doctor` as root"
PRIV_FIX = "run as root (or grant CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON)"
CLANG_FIX = "make demo (or scripts/setup): installs clang >= 14"
REJECTED_FIX = "report it (fastrelay doctor --json); the userspace data path still works"
DISABLE_ENV = "FASTRELAY_DISABLE_KERNEL_PATH"  # =1: kernel_path_status() says no (tests, comparisons)
# what each program source runs: a program of it that cannot load disables that
FEATURES = {
    "moq_fastpath": "the MoQT relay's kernel data path (--datapath kernel)",
    "udp_fanout": "udp-fanout --datapath kernel",
    "lab_probe": "lab delay probes (benchmarks' one-way delay)",
    "lab_dropper": "lab loss emulation (lab impair --loss)",
}
TAIL_SHOWN, TAIL_WIDTH = 4, 110  # of the verifier's last lines, what the text output shows


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


@dataclass
class BpfCheck(Check):
    """One BPF program (or, when it did not build, its source): the verifier's numbers and last lines."""

    source: str = ""
    insns: int | None = None
    share: float | None = None
    variant: str = ""
    log_tail: str = ""


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


def _source_name(source: str | Path) -> str:
    """bpf/<name>.bpf.c's name from a name or a path."""
    return Path(source).name.removesuffix(".bpf.c")


def _feature(source: str) -> str:
    return FEATURES.get(source, f"what {source}.bpf.c runs")


def _measure(sources: Sequence[str | Path]) -> list[ProgramCost]:
    """verifier.measure() of each source (a name in bpf/ or a .bpf.c path) under the default
    variant; a source that does not build or open is one entry, program "*" (as measure_all())."""
    from .kernel import verifier

    libbpf_log = logging.getLogger("fastrelay.libbpf")
    level = libbpf_log.level
    libbpf_log.setLevel(logging.ERROR)  # libbpf warns of each rejection; the checks carry the verifier's words
    try:
        costs: list[ProgramCost] = []
        for source in sources:
            try:
                costs.extend(verifier.measure(str(source)))
            except (KernelError, OSError) as exc:
                first = str(exc).splitlines()[0]
                costs.append(verifier.ProgramCost(str(source), "*", "default", None, first, str(exc)))
        return costs
    finally:
        libbpf_log.setLevel(level)


def program_check(cost: ProgramCost) -> BpfCheck:
    """Doctor's item for one program: ok with its verified instructions, or what is wrong and what
    that disables. Accepted but over verifier.BOUND is not ok: other kernel builds may reject it."""
    from .kernel import verifier

    source = _source_name(cost.source)
    numbers = {"source": source, "insns": cost.insns, "share": cost.share, "variant": cost.variant,
               "log_tail": cost.log_tail}
    if cost.program == "*":  # no object to load, so no program names either
        return BpfCheck(f"bpf {source}", False, f"not built ({cost.error.rstrip(':')})", _feature(source), CLANG_FIX,
                        **numbers)
    name = f"bpf {cost.program}"
    insns = "" if cost.insns is None else f"{cost.insns:,} insns"
    share = "" if cost.share is None else f" ({cost.share:.1%} of the {verifier.LIMIT / 1e6:g}M limit)"
    if not cost.ok:
        at = f" at {insns}{share}" if insns else ""
        return BpfCheck(name, False, f"{cost.error} by the verifier{at}", _feature(source), REJECTED_FIX, **numbers)
    if cost.insns is not None and cost.insns > verifier.BOUND:
        bound = f"{verifier.BOUND / verifier.LIMIT:.0%} safety bound"
        return BpfCheck(name, False, f"accepted at {insns}{share}, over the {bound}: may be rejected on other kernel"
                        " builds", f"nothing here yet; where rejected, {_feature(source)}",
                        f"report it (fastrelay doctor --json): programs are held under {verifier.BOUND:,} insns",
                        **numbers)
    return BpfCheck(name, True, f"{insns} verified{share}", _feature(source), REJECTED_FIX, **numbers)


def _program_checks(ns: str, sources: Sequence[str | Path]) -> list[Check]:
    """Build and load every program of `sources` from inside the scratch namespace."""
    with nsutil.entered(ns):
        return [program_check(cost) for cost in _measure(sources)]


def _unchecked_programs(sources: Sequence[str | Path], why: str, fix: str) -> list[Check]:
    names = [_source_name(s) for s in sources]
    return [BpfCheck(f"bpf {n}", False, f"not checked {why}", _feature(n), fix, source=n) for n in names]


def _scratch_checks(privileged: bool, clang: bool, tcx_in_btf: bool | None,
                    sources: Sequence[str | Path]) -> list[Check]:
    """tcx, netem and every BPF program, tried for real in a scratch namespace where possible
    (tcx from BTF otherwise, the programs not checked)."""
    netem_name, netem_disables, _ = NETEM
    why = "without root" if not privileged else "" if shutil.which("ip") else "without ip (iproute2)"
    if not why:
        try:
            with scratch_netns() as ns:
                if clang:
                    return [_tcx_attach(ns), _netem(ns), *_program_checks(ns, sources)]
                return [_tcx_from_btf(tcx_in_btf, "without clang"), _netem(ns),
                        *_unchecked_programs(sources, "without clang", CLANG_FIX)]
        except OSError as exc:
            why = f"({exc})"
    fix = AS_ROOT if not privileged else "iproute2 with `ip netns` (scripts/setup)"
    return [_tcx_from_btf(tcx_in_btf, why), Check(netem_name, False, f"not checked {why}", netem_disables, fix),
            *_unchecked_programs(sources, why, fix)]


def _privileges_check() -> Check:
    from .kernel import privileges

    lacking = privileges.missing()
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    return Check("privileges", not lacking, f"{who}, lacks {', '.join(lacking)}" if lacking else who,
                 "kernel data paths and the lab", PRIV_FIX)


def _clang_check() -> Check:
    from .kernel.build import find_clang

    disables = "building every BPF program (the kernel data path, lab probes)"
    try:
        path, version = find_clang()
    except (KernelError, OSError) as exc:
        return Check("clang", False, str(exc), disables, CLANG_FIX)
    return Check("clang", True, f"{path}: {version}", disables, CLANG_FIX)


def _libbpf_check() -> tuple[Check, bool]:
    """The libbpf item, and whether libbpf loads at all (nothing further can be checked without it)."""
    try:
        from .kernel.libbpf import lib
    except ImportError as exc:
        return Check("libbpf", False, str(exc), "loading any BPF program", "apt-get install libbpf1"), False
    major, minor = (int(x) for x in lib.version.split("."))
    return Check("libbpf", (major, minor) >= (1, 0), lib.version, "loading any BPF program", "libbpf1 >= 1.0"), True


def _udp_buffers_check() -> Check:
    """What a relay's or client's UDP socket gets (the same call they make) and the sysctl ceilings."""
    import socket

    from .quic.link import SOCKET_BUFFER, size_socket_buffers, sysctl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        got = size_socket_buffers(sock)
    how = "forced past the ceilings: CAP_NET_ADMIN" if got.forced else "within the ceilings"
    ceilings = ", ".join(f"{name} {_mib(sysctl(f'net.core.{name}'))}" for name in ("rmem_max", "wmem_max"))
    return Check("UDP buffers", min(got.receive, got.send) >= SOCKET_BUFFER,
                 f"sockets get {_mib(got.receive)} receive, {_mib(got.send)} send ({how}); net.core {ceilings}",
                 "nothing, but under load the relay's socket drops datagrams (QUIC resends them, late)",
                 f"sysctl -w net.core.rmem_max={SOCKET_BUFFER} net.core.wmem_max={SOCKET_BUFFER} (or run as root)")


def _mib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / (1 << 20):g} MiB"


def run_checks(sources: Sequence[str | Path] | None = None) -> list[Check]:
    """Every check, in order; what needs root or clang is checked from kernel BTF without them.
    `sources`: the BPF programs to load (names in bpf/ or .bpf.c paths; default: every one in bpf/)."""
    from .kernel.build import sources as bpf_sources

    ver = kernel_version()
    privileged, clang, (libbpf, loads) = _privileges_check(), _clang_check(), _libbpf_check()
    btf = os.path.exists("/sys/kernel/btf/vmlinux")
    checks = [Check("kernel", ver >= (5, 15), platform.release(), "everything in the kernel", "Linux >= 5.15"),
              privileged,
              Check("BTF", btf, "/sys/kernel/btf/vmlinux" if btf else "missing",
                    "layout checks against the kernel, run-time stats", "a kernel with CONFIG_DEBUG_INFO_BTF"),
              clang, libbpf, _udp_buffers_check()]
    if not loads:
        return checks
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
    checks.extend(_scratch_checks(privileged.ok, clang.ok, None if found is None else found["BPF_TCX_INGRESS"],
                                  bpf_sources() if sources is None else sources))
    return checks


def kernel_path_status(source: str | Path = "moq_fastpath") -> tuple[bool, str]:
    """Whether the programs of `source` (a name in bpf/ or a .bpf.c path) load here, and if not why,
    in doctor's words: (True, "") or (False, reason). Each program is loaded on its own; a rejection
    takes seconds (the verifier works up to its limit). Over the safety bound still loads: True.
    FASTRELAY_DISABLE_KERNEL_PATH=1 makes it say no (to run the userspace path alone)."""
    if os.environ.get(DISABLE_ENV) == "1":
        return False, f"disabled by {DISABLE_ENV}=1"
    for check in (_privileges_check(), _clang_check(), _libbpf_check()[0]):
        if not check.ok:
            return False, f"no {check.name} ({check.detail}): {check.fix}"
    for cost in _measure([source]):
        if not cost.ok:
            check = program_check(cost)
            what = f"{check.source}.bpf.c" if cost.program == "*" else cost.program
            return False, f"{what} {check.detail}: {check.disables} is disabled"
    return True, ""


def render(checks: list[Check]) -> str:
    """One line per check; under each missing one, what it disables, how to fix it and, for a BPF
    program, the last lines of the verifier's (or clang's) log, each cut to TAIL_WIDTH characters."""
    lines = []
    for c in checks:
        lines.append(f"{'ok ' if c.ok else 'MISSING'} {c.name:18} {c.detail}")
        if not c.ok:
            lines.append(f"{'':27}disables: {c.disables}")
            lines.append(f"{'':27}fix: {c.fix}")
            tail = c.log_tail.splitlines()[-TAIL_SHOWN:] if isinstance(c, BpfCheck) else []
            lines.extend(f"{'':27}| {line[:TAIL_WIDTH]}{'...' if len(line) > TAIL_WIDTH else ''}" for line in tail)
    return "\n".join(lines)
