"""Compile fastrelay's BPF sources with clang, caching objects by content hash.

Objects land in $FASTRELAY_CACHE (default ~/.cache/fastrelay/bpf), never in the source
tree; the key covers the source, every shared header, the flags and the clang version.

A `Variant` names a compiler and a BPF ISA level (-mcpu). The verifier's cost of a program
moves with both, so the programs are held to their bound under every variant this machine
kind can produce (`variants()`): the clang scripts/setup installs, the fallback it allows,
each at v2 and v3, and v4 where compiler and kernel take it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
INCLUDE_DIR = BPF_DIR / "include"
CLANG_CANDIDATES = ("clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14", "clang")
PRIMARY_CLANG = "clang-19"   # what scripts/setup installs
FALLBACK_CLANG = "clang-14"  # what it falls back to (Debian's default clang); also installed, for the checks
FLAGS = ("-O2", "-g", "-target", "bpf", "-Wall", "-Werror")
DEFAULT_CPU = "v3"           # BPF ISA level of the objects the relays load (kernel >= 5.1)


@dataclass(frozen=True)
class Variant:
    """A way to compile the programs: which clang (a name on PATH or a path), which -mcpu."""

    clang: str
    cpu: str = DEFAULT_CPU

    def __str__(self) -> str:
        return f"{Path(self.clang).name} -mcpu={self.cpu}"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastrelay" / "bpf"
    return Path(os.environ.get("FASTRELAY_CACHE", default))


@functools.cache
def find_clang() -> tuple[str, str]:
    """(path, version line) of the newest usable clang; BuildError if none."""
    for name in CLANG_CANDIDATES:
        path = shutil.which(name)
        if path:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
            return path, out.splitlines()[0] if out else name
    raise BuildError("clang not found: the BPF programs need clang >= 14 (run `make demo` or scripts/setup)")


@functools.cache
def _multiarch_include() -> list[str]:
    try:
        arch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        arch = ""
    inc = Path("/usr/include") / arch if arch else None
    return [f"-I{inc}"] if inc and inc.is_dir() else []


def source_path(name: str) -> Path:
    """Path of bpf/<name>.bpf.c; BuildError if there is no such program."""
    path = BPF_DIR / f"{name}.bpf.c"
    if not path.is_file():
        raise BuildError(f"no BPF source {path}")
    return path


@functools.cache
def clang_version(clang: str) -> tuple[str, int] | None:
    """(first line of --version, major version) of a clang on PATH (or a path); None if absent."""
    path = shutil.which(clang)
    if not path:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    line = out.splitlines()[0] if out else clang
    m = re.search(r"version (\d+)\.", line)
    return line, int(m.group(1)) if m else 0


def variants(kernel: tuple[int, int] | None = None) -> list[Variant]:
    """Every variant the programs must verify under here: the primary and fallback clang (those
    installed), at -mcpu v2 and v3, and v4 where clang (>= 18) and the kernel (>= 6.6) take it."""
    if kernel is None:
        from .features import kernel_version

        kernel = kernel_version()[:2]
    out = []
    for clang in (PRIMARY_CLANG, FALLBACK_CLANG):
        found = clang_version(clang)
        if found is None:
            continue
        cpus = ["v2", "v3"] + (["v4"] if found[1] >= 18 and kernel >= (6, 6) else [])
        out.extend(Variant(clang, cpu) for cpu in cpus)
    return out


def build(source: str | Path, variant: Variant | None = None) -> Path:
    """Compile a program (a name in bpf/ or a path) and return the cached object's path; by
    default with the newest clang found and DEFAULT_CPU."""
    src = Path(source) if str(source).endswith(".c") else source_path(str(source))
    if variant is None:
        clang, version = find_clang()
        cpu = DEFAULT_CPU
    else:
        found = clang_version(variant.clang)
        if found is None:
            raise BuildError(f"{variant.clang} not found (scripts/setup installs {PRIMARY_CLANG} and {FALLBACK_CLANG})")
        clang, version, cpu = shutil.which(variant.clang) or variant.clang, found[0], variant.cpu
    argv = [clang, *FLAGS, f"-mcpu={cpu}", f"-I{INCLUDE_DIR}", f"-I{src.parent}", *_multiarch_include()]
    h = hashlib.sha256()
    for part in (version, *argv[1:], src.read_bytes()):
        h.update(part.encode() if isinstance(part, str) else part)
    for header in sorted(BPF_DIR.glob("**/*.h")):
        h.update(header.read_bytes())
    out_dir = cache_dir()
    obj = out_dir / f"fr_{src.name.removesuffix('.bpf.c')}-{h.hexdigest()[:12]}.o"
    if obj.is_file():
        return obj
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".o.tmp")
    os.close(fd)
    try:
        res = subprocess.run([*argv, "-c", str(src), "-o", tmp], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise BuildError(f"clang failed on {src.name}:\n{res.stderr.strip()}")
        os.replace(tmp, obj)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return obj


def sources() -> list[str]:
    """Names of every program source in bpf/ (bpf/<name>.bpf.c)."""
    return [p.name.removesuffix(".bpf.c") for p in sorted(BPF_DIR.glob("*.bpf.c"))]


def build_all(variant: Variant | None = None) -> dict[str, Path]:
    """Compile every bpf/*.bpf.c; {program name: object path}."""
    return {name: build(name, variant) for name in sources()}
