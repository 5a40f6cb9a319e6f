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
    """Parse HOST:PORT with a literal IPv4/IPv6 address; ValueError with a clear message otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or (":" in host and not host.startswith("[")):
        if default_port is None or ":" in text and not text.startswith("["):
            raise ValueError(f"{text!r}: expected ADDRESS:PORT (IPv6 as [ADDR]:PORT)")
        host, port = text, str(default_port)
    host = host.strip("[]")
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: port must be 1..65535")
    return Endpoint(ip, int(port))
