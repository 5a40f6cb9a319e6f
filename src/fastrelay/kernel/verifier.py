"""What each BPF program costs the verifier: processed instructions per program and build variant.

The verifier gives up at 1M processed instructions, and the count moves with the kernel build
and with clang's code generation. Every program is held far below that (BOUND, 20 % of the
limit) under every variant `build.variants()` lists, so a machine of another build still
loads them. Each program is loaded on its own (the others of its object not loaded), so one
rejection does not hide the others' counts.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import asdict, dataclass

from . import build, privileges
from .errors import KernelError
from .libbpf import check_ptr, lib
from .stats import prog_verified_insns

LIMIT = 1_000_000
BOUND = LIMIT // 5
LOG_SIZE = 16 << 20
TAIL_LINES = 12
_PROCESSED = re.compile(r"processed (\d+) insns")


@dataclass(frozen=True)
class ProgramCost:
    """One program under one variant: accepted with `insns` processed, or rejected (`error`,
    the verifier's last lines in `log_tail`, `insns` from its log where it says)."""

    source: str
    program: str
    variant: str
    insns: int | None
    error: str = ""
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def share(self) -> float | None:
        """Processed instructions as a share of the verifier's limit."""
        return None if self.insns is None else self.insns / LIMIT

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {"ok": self.ok, "share": self.share}


def _program_names(path: str) -> list[str]:
    obj = check_ptr(lib.bpf_object__open_file(path.encode(), None), f"open {path}")
    try:
        names, prog = [], None
        while prog := lib.bpf_object__next_program(obj, prog):
            names.append(lib.bpf_program__name(prog).decode())
        return names
    finally:
        lib.bpf_object__close(obj)


def _load(path: str, name: str, level: int) -> tuple[int | None, int, str]:
    """Load program `name` of the object alone: (verified_insns or None, libbpf's return, log)."""
    obj = check_ptr(lib.bpf_object__open_file(path.encode(), None), f"open {path}")
    try:
        target, prog = None, None
        while prog := lib.bpf_object__next_program(obj, prog):
            if lib.bpf_program__name(prog).decode() == name:
                target = prog
            else:
                lib.bpf_program__set_autoload(prog, False)
        log = ctypes.create_string_buffer(LOG_SIZE)
        lib.bpf_program__set_log_level(target, level)
        lib.bpf_program__set_log_buf(target, log, len(log))
        ret = lib.bpf_object__load(obj)
        insns = prog_verified_insns(lib.bpf_program__fd(target)) if ret == 0 else None
        return insns, ret, log.value.decode(errors="replace")
    finally:
        lib.bpf_object__close(obj)


def _load_one(path: str, source: str, name: str, variant: str) -> ProgramCost:
    # log level 4 (statistics only) first; a rejection is loaded again with the full log for its last lines
    insns, ret, text = _load(path, name, 4)
    if ret == 0:
        return ProgramCost(source, name, variant, insns)
    _, _, full = _load(path, name, 1)
    found = _PROCESSED.findall(text + full)
    tail = "\n".join((full or text).rstrip().splitlines()[-TAIL_LINES:])
    return ProgramCost(source, name, variant, int(found[-1]) if found else None, f"rejected (error {-ret})", tail)


def measure(source: str, variant: build.Variant | None = None) -> list[ProgramCost]:
    """Build bpf/<source>.bpf.c under `variant` (default: the relays' build) and load each of its
    programs on its own; one ProgramCost per program. BuildError if it does not compile."""
    privileges.require()
    path = str(build.build(source, variant))
    label = str(variant) if variant else str(build.Variant(build.find_clang()[0]))
    return [_load_one(path, source, name, label) for name in _program_names(path)]


def measure_all(variant: build.Variant | None = None) -> list[ProgramCost]:
    """measure() for every program source in bpf/."""
    out: list[ProgramCost] = []
    for source in build.sources():
        try:
            out.extend(measure(source, variant))
        except (KernelError, OSError) as exc:  # does not compile, or libbpf cannot open it
            first = str(exc).splitlines()[0]
            out.append(ProgramCost(source, "*", str(variant or "default"), None, first, str(exc)))
    return out
