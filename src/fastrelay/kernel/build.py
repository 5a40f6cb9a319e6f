"""Compile fastrelay's BPF sources with clang, caching objects by content hash.

Objects land in $FASTRELAY_CACHE (default ~/.cache/fastrelay/bpf), never in the source
tree; the key covers the source, every shared header, the flags and the clang version.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import BuildError

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
INCLUDE_DIR = BPF_DIR / "include"
CLANG_CANDIDATES = ("clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14", "clang")
FLAGS = ("-O2", "-g", "-target", "bpf", "-Wall", "-Werror")


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


def build(source: str | Path) -> Path:
    """Compile a program (a name in bpf/ or a path) and return the cached object's path."""
    src = Path(source) if str(source).endswith(".c") else source_path(str(source))
    clang, version = find_clang()
    argv = [clang, *FLAGS, f"-I{INCLUDE_DIR}", f"-I{src.parent}", *_multiarch_include()]
    h = hashlib.sha256()
    for part in (version, *argv[1:], src.read_bytes()):
        h.update(part.encode() if isinstance(part, str) else part)
    for header in sorted(INCLUDE_DIR.glob("*.h")):
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


def build_all() -> dict[str, Path]:
    """Compile every bpf/*.bpf.c; {program name: object path}."""
    return {p.name.removesuffix(".bpf.c"): build(p) for p in sorted(BPF_DIR.glob("*.bpf.c"))}
