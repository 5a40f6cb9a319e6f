"""Parse and describe UDP endpoints ("10.0.0.2:5000", "[fd00::2]:5000")."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ipaddress.ip_address(self.ip).version == 6 else socket.AF_INET

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.ip, self.port)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def parse_endpoint(text: str, default_port: int | None = None) -> Endpoint:
    """Parse ADDR:PORT or [IPV6]:PORT (bare ADDR too when `default_port` is given).

    ValueError with a message naming the input otherwise."""
    usage = f"{text!r}: expected ADDRESS:PORT (IPv6 as [ADDR]:PORT)"
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError(usage)
        port = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, None  # bare IPv4, or bare IPv6 (ambiguous with a port: needs brackets)
    if port is None:
        if default_port is None:
            raise ValueError(usage)
        port = str(default_port)
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: port must be 1..65535")
    return Endpoint(ip, int(port))
