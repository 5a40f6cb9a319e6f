"""The fan-out program on crafted packets (BPF_PROG_TEST_RUN): rewrite, checksums, filters.

BPF_PROG_TEST_RUN runs the real program in the kernel on our bytes; clones and redirects are
not carried out, so each case uses one subscriber and inspects the rewritten packet.
"""

from __future__ import annotations

import ctypes
import socket
import struct

import pytest

from fastrelay.kernel import abi
from fastrelay.kernel.objects import BpfObject

pytestmark = pytest.mark.usefixtures("root")

TC_ACT_UNSPEC, TC_ACT_SHOT, TC_ACT_REDIRECT = -1, 2, 7
RELAY_PORT, SUB_PORT = 5000, 6000
V4 = {"pub": "10.200.0.2", "relay": "10.200.0.1", "src": "10.200.1.1", "dst": "10.200.1.2"}
V6 = {"pub": "fd00:fa57::2", "relay": "fd00:fa57::1", "src": "fd00:fa57:0:1::1", "dst": "fd00:fa57:0:1::2"}
SUB_MAC, RELAY_MAC = bytes.fromhex("02fa57000102"), bytes.fromhex("02fa57000101")


def fold(x: int) -> int:
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return x


def sum16(b: bytes) -> int:
    b += b"\0" * (len(b) % 2)
    return sum(struct.unpack(f"!{len(b) // 2}H", b))


def udp_checksum(fam: int, src: str, dst: str, udp: bytes) -> int:
    s, d = socket.inet_pton(fam, src), socket.inet_pton(fam, dst)
    pseudo = s + d + (struct.pack("!IxxxB", len(udp), 17) if fam == socket.AF_INET6 else
                      struct.pack("!BBH", 0, 17, len(udp)))
    return (~fold(sum16(pseudo + udp))) & 0xFFFF or 0xFFFF


def frame(fam: int, src: str, dst: str, payload: bytes, *, csum: bool = True, ttl: int = 3,
          ihl: int = 5, dst_mac: bytes = b"\0" * 6) -> bytes:
    """Ethernet + IP + UDP publisher -> relay. dst MAC 0 = the test device's own: PACKET_HOST."""
    udp = struct.pack("!HHHH", 40000, RELAY_PORT, 8 + len(payload), 0) + payload
    if csum:
        udp = udp[:6] + struct.pack("!H", udp_checksum(fam, src, dst, udp)) + udp[8:]
    s, d = socket.inet_pton(fam, src), socket.inet_pton(fam, dst)
    if fam == socket.AF_INET6:
        ip, ethertype = struct.pack("!IHBB", 0x60000000, len(udp), 17, ttl) + s + d, 0x86DD
    else:
        opts = b"\x01" * 4 * (ihl - 5)  # NOP options
        ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(udp), 1, 0, ttl, 17, 0, s, d) + opts
        ip = ip[:10] + struct.pack("!H", (~fold(sum16(ip))) & 0xFFFF) + ip[12:]
        ethertype = 0x0800
    return dst_mac + b"\x04" * 6 + struct.pack("!H", ethertype) + ip + udp


def payload_with_result_ffff(fam: int, a: dict) -> bytes:
    """A payload whose checksum after the rewrite must be written as 0xffff (sum is 0)."""
    s, d = socket.inet_pton(fam, a["src"]), socket.inet_pton(fam, a["dst"])
    for x in range(65536):
        payload = b"FRLB" + b"\0" * 10 + struct.pack("!H", x)
        udp = struct.pack("!HHHH", RELAY_PORT, SUB_PORT, 8 + len(payload), 0) + payload
        pseudo = s + d + (struct.pack("!IxxxB", len(udp), 17) if fam == socket.AF_INET6 else
                          struct.pack("!BBH", 0, 17, len(udp)))
        if fold(sum16(pseudo + udp)) == 0xFFFF:
            return payload
    raise AssertionError("no such payload")


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def program(request):
    """The loaded program with one subscriber; yields (program, family, addresses, object)."""
    fam = request.param
    a = V4 if fam == socket.AF_INET else V6
    with BpfObject.load("udp_fanout") as obj:
        cfg = abi.FanoutConfig(port=socket.htons(RELAY_PORT), family=fam, max_len=1500)
        raw = socket.inet_pton(fam, a["relay"])
        ctypes.memmove(cfg.dst_addr, raw, len(raw))
        obj.map("fr_fanout_cfg", ctypes.c_uint32, abi.FanoutConfig).update(0, cfg)
        fs = abi.FanoutSet(count=1)
        e = fs.subs[0]
        e.id, e.ifindex = 1, 1
        e.dst_mac[:], e.src_mac[:] = SUB_MAC, RELAY_MAC
        e.dst_port, e.src_port = socket.htons(SUB_PORT), socket.htons(RELAY_PORT)
        for field, key in ((e.dst_ip, "dst"), (e.src_ip, "relay")):
            raw = socket.inet_pton(fam, a[key])
            ctypes.memmove(field, raw, len(raw))
        obj.map("fr_fanout_sets", ctypes.c_uint32, abi.FanoutSet).update(0, fs)
        yield obj.program("fr_udp_fanout"), fam, a, obj


def parse(fam: int, pkt: bytes) -> dict:
    l3 = pkt[14:]
    if fam == socket.AF_INET6:
        src, dst, ttl, udp = l3[8:24], l3[24:40], l3[7], l3[40:]
        ip_ok = True
    else:
        ihl = (l3[0] & 15) * 4
        src, dst, ttl, udp = l3[12:16], l3[16:20], l3[8], l3[ihl:]
        ip_ok = fold(sum16(l3[:ihl])) == 0xFFFF
    sport, dport, _, csum = struct.unpack_from("!HHHH", udp)
    return {"dst_mac": pkt[:6], "src_mac": pkt[6:12], "src": socket.inet_ntop(fam, src),
            "dst": socket.inet_ntop(fam, dst), "ttl": ttl, "sport": sport, "dport": dport, "csum": csum,
            "ip_ok": ip_ok, "udp": udp}


def test_rewrite_for_the_subscriber_with_valid_checksums(program):
    prog, fam, a, _ = program
    rc, out = prog.test_run(frame(fam, a["pub"], a["relay"], b"hello fastrelay" * 10))
    p = parse(fam, out)
    assert rc == TC_ACT_REDIRECT
    assert (p["dst_mac"], p["src_mac"]) == (SUB_MAC, RELAY_MAC)
    assert (p["src"], p["dst"], p["sport"], p["dport"]) == (a["relay"], a["dst"], RELAY_PORT, SUB_PORT)
    assert p["ttl"] == 64 and p["ip_ok"]  # a fresh TTL, as the relay's own packets have
    udp = p["udp"][:6] + b"\0\0" + p["udp"][8:]
    assert p["csum"] == udp_checksum(fam, a["relay"], a["dst"], udp)


def test_a_zero_checksum_result_is_written_as_ffff(program):
    prog, fam, a, _ = program
    payload = payload_with_result_ffff(fam, {"src": a["relay"], "dst": a["dst"]})
    rc, out = prog.test_run(frame(fam, a["pub"], a["relay"], payload))
    assert rc == TC_ACT_REDIRECT and parse(fam, out)["csum"] == 0xFFFF


def test_ipv4_without_udp_checksum_stays_without(program):
    prog, fam, a, _ = program
    if fam != socket.AF_INET:
        rc, _ = prog.test_run(frame(fam, a["pub"], a["relay"], b"x" * 40, csum=False))
        assert rc == TC_ACT_SHOT  # zero checksum is invalid over IPv6: dropped as malformed
        return
    rc, out = prog.test_run(frame(fam, a["pub"], a["relay"], b"x" * 40, csum=False))
    assert rc == TC_ACT_REDIRECT and parse(fam, out)["csum"] == 0


def test_what_is_not_addressed_to_the_relay_is_left_alone(program):
    prog, fam, a, _ = program
    other = "10.9.9.9" if fam == socket.AF_INET else "fd00:9::9"
    for pkt in (frame(fam, a["pub"], other, b"x" * 40),  # another destination address
                frame(fam, a["pub"], a["relay"], b"x" * 40, dst_mac=b"\xff" * 6)):  # not PACKET_HOST
        rc, out = prog.test_run(pkt)
        assert rc == TC_ACT_UNSPEC and out == pkt


def test_wildcard_listen_relays_only_to_local_addresses(program):
    prog, fam, a, obj = program
    cfgmap = obj.map("fr_fanout_cfg", ctypes.c_uint32, abi.FanoutConfig)
    cfg = cfgmap.lookup(0)
    cfg.dst_any = 1
    cfgmap.update(0, cfg)
    assert prog.test_run(frame(fam, a["pub"], a["relay"], b"x" * 40))[0] == TC_ACT_UNSPEC
    key = abi.Addr()
    raw = socket.inet_pton(fam, a["relay"])
    key.bytes[: len(raw)] = raw
    obj.map("fr_fanout_local", abi.Addr, ctypes.c_uint8).update(key, ctypes.c_uint8(1))
    assert prog.test_run(frame(fam, a["pub"], a["relay"], b"x" * 40))[0] == TC_ACT_REDIRECT


@pytest.mark.parametrize("program", [socket.AF_INET], indirect=True, ids=["ipv4"])
def test_ipv4_options_go_to_the_stack(program):
    prog, fam, a, obj = program
    pkt = frame(fam, a["pub"], a["relay"], b"x" * 40, ihl=6)
    rc, out = prog.test_run(pkt)
    counters = obj.map("fr_fanout_stats", ctypes.c_uint32, ctypes.c_uint64).sum_counters()
    assert rc == TC_ACT_UNSPEC and out == pkt
    assert counters[obj.enum("fr_fanout_counter")["FR_FC_PASS_IRREGULAR"]] == 1
