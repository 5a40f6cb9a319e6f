"""Kernel capabilities that change how programs are configured."""

from __future__ import annotations

import functools
import platform

BPF_F_IPV6 = 1 << 7  # bpf_l4_csum_replace: IPv6 pseudo-header change (Linux >= 6.16)


@functools.cache
def kernel_version() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def l4_csum_ipv6_flag() -> int:
    """BPF_F_IPV6 where the kernel accepts it (keeps skb->csum right for CHECKSUM_COMPLETE
    packets whose IPv6 addresses change), else 0."""
    return BPF_F_IPV6 if kernel_version() >= (6, 16) else 0
