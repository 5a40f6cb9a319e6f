"""Wire captures for lab tests and benchmarks: every frame a namespace's interface receives,
with IP and UDP checksums verified in Python (so a broken rewrite cannot hide behind
checksum offload)."""

from __future__ import annotations

import socket
import struct

from ..netns import entered
from .topology import Link
from .traffic import SO_RCVBUFFORCE


def capture(link: Link) -> socket.socket:
    """A packet socket on a subscriber's eth0 that sees every frame it receives."""
    with entered(link.netns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        s.bind((link.ifname, 0))
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    s.setblocking(False)
    return s


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def udp_frames(sock: socket.socket, dport: int) -> list[dict]:
    """Drain a capture socket: every UDP frame to `dport`, with its checksums verified in Python."""
    out = []
    while True:
        try:
            frame = sock.recv(65536)
        except BlockingIOError:
            return out
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == 0x0800:
            ihl = (frame[14] & 0xF) * 4
            ip = frame[14:14 + ihl]
            if ip[9] != 17:
                continue
            tot = struct.unpack_from("!H", ip, 2)[0]
            udp = frame[14 + ihl:14 + tot]
            src, dst = ip[12:16], ip[16:20]
            pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
            ip_ok = _fold(_sum16(ip)) == 0xFFFF
            family = 4
        elif ethertype == 0x86DD:
            if frame[20] != 17:
                continue
            plen = struct.unpack_from("!H", frame, 18)[0]
            udp = frame[54:54 + plen]
            src, dst = frame[22:38], frame[38:54]
            pseudo = src + dst + struct.pack("!IxxxB", len(udp), 17)
            ip_ok = True
            family = 6
        else:
            continue
        sport, dp, ulen, csum = struct.unpack_from("!HHHH", udp)
        if dp != dport:
            continue
        udp_ok = (csum == 0 and family == 4) or _fold(_sum16(pseudo + udp)) == 0xFFFF
        out.append({"src": socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, src),
                    "sport": sport, "ip_ok": ip_ok, "udp_ok": udp_ok and ulen == len(udp) and csum != 0,
                    "dst_mac": frame[:6].hex(":"), "src_mac": frame[6:12].hex(":"),
                    "dst": socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, dst),
                    "dport": dp, "payload": bytes(udp[8:])})
