"""Check that this process may load BPF programs and change network configuration."""

from __future__ import annotations

from .errors import PermissionDenied

CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF = 12, 38, 39


def effective_caps() -> int:
    """Effective capability bitmask of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing() -> list[str]:
    """Names of the capabilities fastrelay needs and lacks (root normally has them all)."""
    caps = effective_caps()
    need = {"CAP_BPF": CAP_BPF, "CAP_NET_ADMIN": CAP_NET_ADMIN, "CAP_PERFMON": CAP_PERFMON}
    return [name for name, bit in need.items() if not caps >> bit & 1]


def require() -> None:
    """Raise PermissionDenied with one clear line when privileges are missing."""
    lacking = missing()
    if lacking:
        raise PermissionDenied(
            f"fastrelay's kernel data path needs root (or {', '.join(lacking)}); "
            "run it with sudo or use --datapath userspace"
        )
