"""bpf/moq_fastpath.bpf.c in a real lab, driven with hand-built plaintext QUIC packets.

A publisher namespace sends 1-RTT packets (identity protection: frames in clear, 16-byte
zero tag) to the relay's port; the ingress program must clone the media frames to every
kernel-path subscriber of the track, the egress program must turn each clone into a packet
of that subscriber's connection (addresses, connection id, packet number from the shared
counter, stream id, offsets, track alias), with valid checksums, and report it; the
original must reach the relay's socket unchanged. Packets the relay's own socket sends on
a subscriber connection must be renumbered from the same counter.
"""

from __future__ import annotations

import socket
import time

import pytest

from fastrelay.datapath.kernel.maps import ConnSpec, HandoverReason, KernelMaps, RecordKind, StreamState, Take
from fastrelay.datapath.kernel.recovery import KernelRecovery, PacketFlags
from fastrelay.lab.capture import capture, udp_frames
from fastrelay.lab.topology import Lab
from fastrelay.moq.wire import Writer
from fastrelay.netns import entered

pytestmark = pytest.mark.usefixtures("root")

PORT = 4443
PUB_PORT = 5555
SUB_PORT = 6000
UP_CID = bytes.fromhex("1111111111111111")
TAG = bytes(16)
ALIAS = 5
TRACK = 7


def varint(v: int) -> bytes:
    return bytes(Writer().varint(v).buf)


def short_packet(cid: bytes, pn: int, frames: bytes) -> bytes:
    return bytes([0x41]) + cid + pn.to_bytes(2, "big") + frames + TAG


def stream_frame(sid: int, offset: int, data: bytes, fin: bool = False, explicit_len: bool = True) -> bytes:
    t = 0x08 | (0x04 if offset else 0) | (0x02 if explicit_len else 0) | (0x01 if fin else 0)
    out = bytes([t]) + varint(sid)
    if offset:
        out += varint(offset)
    if explicit_len:
        out += varint(len(data))
    return out + data


def parse_frames(payload: bytes) -> tuple[int, bytes, list[tuple]]:
    """(packet number, dcid, [(kind, stream, offset, data, fin)]) of a packet the egress built."""
    assert payload[0] == 0x41 and payload[-16:] == TAG
    dcid, pn = payload[1:9], int.from_bytes(payload[9:11], "big")
    body, pos, frames = payload[11:-16], 0, []

    def rv() -> int:
        nonlocal pos
        n = 1 << (body[pos] >> 6)
        v = int.from_bytes(body[pos:pos + n], "big") & ((1 << (8 * n - 2)) - 1)
        pos += n
        return v

    while pos < len(body):
        t = rv()
        if 0x08 <= t <= 0x0F:
            sid = rv()
            off = rv() if t & 4 else 0
            n = rv() if t & 2 else len(body) - pos
            frames.append(("stream", sid, off, body[pos:pos + n], bool(t & 1)))
            pos += n
        elif t == 0x31:
            n = rv()
            frames.append(("datagram", None, 0, body[pos:pos + n], False))
            pos += n
        else:
            raise AssertionError(f"unexpected frame type {t:#x}")
    return pn, dcid, frames


@pytest.fixture(scope="module")
def lab(root):
    with Lab("tk", 3) as lab:
        yield lab


class Rig:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        with entered(lab.relay_ns):
            idx = {link.relay_ifname: socket.if_nametoindex(link.relay_ifname) for link in lab.links}
            subs = [idx[s.relay_ifname] for s in lab.subscribers]
            self.fp = KernelMaps(PORT, ingress=[idx["pub0"], *subs], egress=subs)
            self.relay_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.relay_sock.bind(("0.0.0.0", PORT))
        self.relay_sock.settimeout(2)
        with entered(lab.publisher.netns):
            self.pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.pub.bind((lab.publisher.ipv4, PUB_PORT))
        self.up = self.fp.add_upstream(UP_CID, (lab.publisher.ipv4, PUB_PORT))
        self.fp.set_alias(self.up, ALIAS, TRACK, default_priority=100)
        self.caps = [capture(s) for s in lab.subscribers]
        self.slots: list[int] = []
        self.idx = idx

    def add_sub(self, i: int, alias: int, *, next_stream: int, budget: int = 1 << 20, credit: int = 1 << 20,
                max_stream: int = 4 * 100 + 3, window: int = 1 << 20, protect: int = 0,
                absorb_acks: bool = False, recovery: bool = False) -> int:
        link = self.lab.subscribers[i]
        spec = ConnSpec(ifindex=self.idx[link.relay_ifname], src_mac=link.relay_mac, dst_mac=link.mac,
                        src=(link.relay_ipv4, PORT), dst=(link.ipv4, SUB_PORT), dcid=bytes([0xA0 + i]) * 8,
                        max_stream=max_stream, stream_window=window, protect_priority=protect,
                        absorb_acks=absorb_acks, recovery=recovery)
        slot = self.fp.add_conn(spec, next_pn=1000 * (i + 1), next_stream=next_stream, budget=budget, credit=credit)
        self.fp.subscribe(slot, TRACK, alias)
        self.slots.append(slot)
        return slot

    def send(self, payload: bytes) -> bytes:
        self.pub.sendto(payload, (self.lab.publisher.relay_ipv4, PORT))
        got, _ = self.relay_sock.recvfrom(4096)
        return got

    def received(self, i: int, expect: int, timeout: float = 2.0) -> list[dict]:
        frames: list[dict] = []
        deadline = time.monotonic() + timeout
        while len(frames) < expect and time.monotonic() < deadline:
            frames += udp_frames(self.caps[i], SUB_PORT)
            time.sleep(0.01)
        time.sleep(0.05)
        return frames + udp_frames(self.caps[i], SUB_PORT)

    def close(self) -> None:
        for c in self.caps:
            c.close()
        self.pub.close()
        self.relay_sock.close()
        self.fp.close()


@pytest.fixture
def rig(lab):
    r = Rig(lab)
    yield r
    r.close()


def subgroup_header(alias: int, group: int, priority: int | None) -> bytes:
    if priority is None:
        return bytes([0x30]) + varint(alias) + varint(group)  # DEFAULT_PRIORITY
    return bytes([0x10]) + varint(alias) + varint(group) + bytes([priority])


def test_media_frames_fan_out_rewritten_per_subscriber(rig):
    s0 = rig.add_sub(0, alias=9, next_stream=3)
    s1 = rig.add_sub(1, alias=1000, next_stream=11)   # 2-byte alias: offsets shift by one
    head = subgroup_header(ALIAS, 3, 0x20)
    obj1, obj2 = b"\x00\x05hello", b"\x01\x05world"
    ack = bytes([0x02]) + varint(5) + varint(0) + varint(1) + varint(2) + varint(0) + varint(0)
    first = head + obj1
    p1 = short_packet(UP_CID, 7, ack + b"\0\0\0" + stream_frame(2, 0, first) + stream_frame(0, 40, b"control"))
    assert rig.send(p1) == p1                         # the original goes up unchanged
    p2 = short_packet(UP_CID, 8, stream_frame(2, len(first), obj2, fin=True, explicit_len=False))
    assert rig.send(p2) == p2

    for i, (alias_bytes, sid, pn0) in enumerate([(varint(9), 3, 1000), (varint(1000), 11, 2000)]):
        got = rig.received(i, 2)
        assert len(got) == 2, got
        assert all(f["ip_ok"] and f["udp_ok"] for f in got)
        link = rig.lab.subscribers[i]
        assert {(f["src"], f["sport"], f["dst"], f["dst_mac"], f["src_mac"]) for f in got} == {
            (link.relay_ipv4, PORT, link.ipv4, link.mac, link.relay_mac)}
        new_head = bytes([0x10]) + alias_bytes + varint(3) + bytes([0x20])
        pn, dcid, frames = parse_frames(got[0]["payload"])
        assert (pn, dcid) == (pn0, bytes([0xA0 + i]) * 8)
        assert frames == [("stream", sid, 0, new_head + obj1, False)]   # no ACK, no control-stream data
        pn, _, frames = parse_frames(got[1]["payload"])
        assert pn == pn0 + 1
        assert frames == [("stream", sid, len(new_head + obj1), obj2, True)]

    sent = [r for r in rig.fp.drain() if r.kind == RecordKind.SENT]
    assert len(sent) == 4 and {r.slot for r in sent} == {s0, s1}
    for rec in sent:
        fr = rec.frames[0]
        assert rec.nframes == 1 and rec.up == rig.up and fr.up_stream == 2 and not fr.datagram
        if rec.slot == s1:
            assert fr.stream == 11 and (fr.offset == 0 or fr.offset == fr.up_offset + 1)
    counters = rig.fp.counters()
    assert counters["fanned"] == 2 and counters["clones"] == 4 and counters["sent"] == 4
    assert rig.fp.state(s0).next_pn == 1002 and rig.fp.state(s0).next_stream == 7
    assert rig.fp.dstream(s1, rig.up, 2).state == StreamState.FORWARD


def test_userspace_packets_are_renumbered_from_the_shared_counter(rig):
    s0 = rig.add_sub(0, alias=9, next_stream=3)
    assert rig.fp.take(s0, Take.PN, 3) == 1000        # userspace reserved 1000..1002
    link = rig.lab.subscribers[0]
    own = short_packet(bytes([0xA0]) * 8, 0x1234, bytes([0x01]) + b"\0" * 20)
    rig.relay_sock.sendto(own, (link.ipv4, SUB_PORT))
    other = short_packet(bytes([0xEE]) * 8, 0x0042, bytes([0x01]) + b"\0" * 20)  # not a kernel-path connection
    rig.relay_sock.sendto(other, (link.ipv4, SUB_PORT))
    got = rig.received(0, 2)
    assert len(got) == 2 and all(f["udp_ok"] for f in got)
    by_dcid = {f["payload"][1:9]: f["payload"] for f in got}
    assert int.from_bytes(by_dcid[bytes([0xA0]) * 8][9:11], "big") == 1003
    assert by_dcid[bytes([0xEE]) * 8] == other
    ren = [r for r in rig.fp.drain() if r.kind == RecordKind.RENUMBERED]
    assert len(ren) == 1 and ren[0].pn == 1003 and ren[0].local_pn == 0x1234 and ren[0].slot == s0


def test_congested_subscriber_skips_whole_low_priority_subgroups(rig):
    """Past its congestion budget the kernel sends no more low-priority data to a subscriber:
    a new low-priority subgroup is skipped whole and a started one is abandoned (userspace
    resets it) - never a hole in a stream; protected subgroups (keyframes) still go."""
    calm = rig.add_sub(0, alias=9, next_stream=3)
    busy = rig.add_sub(1, alias=9, next_stream=3, protect=0x20)
    rig.send(short_packet(UP_CID, 1, stream_frame(10, 0, subgroup_header(ALIAS, 0, 0x80) + b"\x00\x03old")))
    rig.fp.take(busy, Take.BUDGET, -(2 << 20))  # far behind its window from now on
    rig.send(short_packet(UP_CID, 2, stream_frame(2, 0, subgroup_header(ALIAS, 1, 0x10) + b"\x00\x03key")))
    rig.send(short_packet(UP_CID, 3, stream_frame(6, 0, subgroup_header(ALIAS, 1, 0x80) + b"\x00\x03dep")))
    rig.send(short_packet(UP_CID, 4, stream_frame(10, 8, b"\x00\x03more", fin=True)))
    assert len(rig.received(0, 4)) == 4
    busy_got = rig.received(1, 2)
    assert len(busy_got) == 2  # the start of the old subgroup, then the keyframe subgroup
    assert parse_frames(busy_got[1]["payload"])[2][0][3].endswith(b"key")
    assert rig.fp.dstream(calm, rig.up, 6).state == StreamState.FORWARD
    assert rig.fp.dstream(busy, rig.up, 6).state == StreamState.SKIPPED
    assert rig.fp.dstream(busy, rig.up, 2).state == StreamState.FORWARD
    assert rig.fp.dstream(busy, rig.up, 10).state == StreamState.ABANDONED
    hand = [r for r in rig.fp.drain() if r.kind == RecordKind.HANDOVER]
    assert len(hand) == 1 and hand[0].state == StreamState.ABANDONED and hand[0].up_offset == 8
    assert hand[0].reason == HandoverReason.CONGESTION
    c = rig.fp.counters()
    assert c["skip_congestion"] == 1 and c["abandoned"] == 1


def test_stream_that_began_before_the_subscriber_stays_userspace(rig):
    rig.add_sub(0, alias=9, next_stream=3)
    rig.send(short_packet(UP_CID, 1, stream_frame(2, 0, subgroup_header(ALIAS, 1, None) + b"\x00\x02ab")))
    late = rig.add_sub(1, alias=9, next_stream=3)
    rig.send(short_packet(UP_CID, 2, stream_frame(2, 6, b"\x00\x02cd")))
    # a retransmission of the start must not open the stream for the late subscriber either
    rig.send(short_packet(UP_CID, 3, stream_frame(2, 0, subgroup_header(ALIAS, 1, None) + b"\x00\x02ab")))
    assert len(rig.received(0, 3)) == 3
    assert rig.received(1, 0, timeout=0.2) == []
    assert rig.fp.dstream(late, rig.up, 2).state == StreamState.NOT_JOINED


def test_a_resent_start_opens_nothing_for_a_subscriber_that_missed_packets(rig):
    """Joined after the stream's first packets, with none of them since: the publisher re-sending
    the start (its ACKs were late) must not make the kernel begin the stream there, as the
    bytes that went by in between would be missing from the subscriber's copy for good."""
    rig.add_sub(0, alias=9, next_stream=3)
    start = stream_frame(2, 0, subgroup_header(ALIAS, 1, None) + b"\x00\x02ab")
    rig.send(short_packet(UP_CID, 1, start))
    rig.send(short_packet(UP_CID, 2, stream_frame(2, 6, b"\x00\x02cd")))
    late = rig.add_sub(1, alias=9, next_stream=3)
    rig.send(short_packet(UP_CID, 3, start))            # the re-sent start comes first after the join
    rig.send(short_packet(UP_CID, 4, stream_frame(2, 10, b"\x00\x02ef")))
    assert len(rig.received(0, 4)) == 4
    assert rig.received(1, 0, timeout=0.2) == []
    assert rig.fp.dstream(late, rig.up, 2).state == StreamState.NOT_JOINED
    assert rig.fp.state(late).next_stream == 3             # no stream id spent on it


def test_an_ended_stream_is_not_opened_again_by_a_late_copy(rig):
    """A copy of a finished stream's start that arrives late goes up only; its entry is
    forgotten after a while."""
    s0 = rig.add_sub(0, alias=9, next_stream=3)
    start = short_packet(UP_CID, 1, stream_frame(2, 0, subgroup_header(ALIAS, 1, None) + b"\x00\x02ab", fin=True))
    rig.send(start)
    assert len(rig.received(0, 1)) == 1
    rig.fp.stream_ended(rig.up, 2)                       # the relay read the stream to its FIN
    assert rig.fp.dstream(s0, rig.up, 2) is None
    assert rig.send(start) == start
    assert rig.received(0, 0, timeout=0.2) == []
    assert rig.fp.dstream(s0, rig.up, 2) is None and rig.fp.state(s0).next_stream == 7
    rig.fp.forget_ended(time.monotonic() - 60)           # not yet
    assert rig.fp.map_entries()["ustream"] == 1
    rig.fp.forget_ended(time.monotonic() + 1)
    assert rig.fp.map_entries()["ustream"] == 0


def test_flow_control_hands_the_stream_to_userspace(rig):
    slot = rig.add_sub(0, alias=9, next_stream=3, window=12)
    head = subgroup_header(ALIAS, 1, 0x10)
    rig.send(short_packet(UP_CID, 1, stream_frame(2, 0, head + b"\x00\x03abc")))   # 9 bytes fit
    rig.send(short_packet(UP_CID, 2, stream_frame(2, 9, b"\x00\x03def")))           # would pass 12
    got = rig.received(0, 1)
    assert len(got) == 1
    ds = rig.fp.dstream(slot, rig.up, 2)
    assert ds.state == StreamState.USER and ds.handover == 9
    hand = [r for r in rig.fp.drain() if r.kind == RecordKind.HANDOVER]
    assert len(hand) == 1 and hand[0].up_offset == 9 and hand[0].stream == 3
    assert hand[0].reason == HandoverReason.FLOW and hand[0].state == StreamState.USER


def test_malformed_and_foreign_packets_only_go_up(rig):
    rig.add_sub(0, alias=9, next_stream=3)
    bad_len = short_packet(UP_CID, 1, bytes([0x0A]) + varint(2) + varint(500) + b"short")
    unknown_frame = short_packet(UP_CID, 2, bytes([0x21]) + b"xx")
    bad_tag = bytes([0x41]) + UP_CID + b"\0\1" + stream_frame(2, 0, b"\x10\x05\x01\x00") + b"\1" * 16
    other_cid = short_packet(b"\x22" * 8, 3, stream_frame(2, 0, subgroup_header(ALIAS, 1, 0) + b"\x00\x01x"))
    for p in (bad_len, unknown_frame, bad_tag, other_cid):
        assert rig.send(p) == p
    with entered(rig.lab.publisher.netns):   # a spoofed source with the right connection id
        spoof = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    spoof.sendto(short_packet(UP_CID, 4, stream_frame(2, 0, subgroup_header(ALIAS, 1, 0) + b"\x00\x01x")),
                 (rig.lab.publisher.relay_ipv4, PORT))
    rig.relay_sock.recvfrom(4096)
    spoof.close()
    assert rig.received(0, 0, timeout=0.2) == []
    c = rig.fp.counters()
    assert c["pass_unparsed"] == 2 and c["pass_bad_tag"] == 1 and c["pass_spoofed"] == 1 and c["clones"] == 0


def test_removing_a_connection_frees_its_entries(rig):
    slot = rig.add_sub(0, alias=9, next_stream=3)
    rig.send(short_packet(UP_CID, 1, stream_frame(2, 0, subgroup_header(ALIAS, 1, 0) + b"\x00\x01x")))
    assert rig.fp.map_entries()["dstream"] == 1
    rig.fp.remove_conn(slot)
    rig.fp.stream_ended(rig.up, 2)
    rig.fp.remove_upstream(rig.up)
    assert rig.fp.map_entries() == {"up": 0, "alias": 0, "ustream": 0, "dsub": 0, "dcid": 0, "hcid": 0,
                                    "dstream": 0, "conns": 0, "tracks": 0}


def test_connection_id_changes_follow_both_sides(rig):
    """NEW_CONNECTION_ID / RETIRE_CONNECTION_ID: the publisher may address the relay by a new
    id, and the relay may address a subscriber by another of its ids; old ones stop counting."""
    slot = rig.add_sub(0, alias=9, next_stream=3)
    new_up = bytes.fromhex("3333333333333333")
    rig.fp.upstream_cids(rig.up, {UP_CID, new_up})
    rig.send(short_packet(new_up, 1, stream_frame(2, 0, subgroup_header(ALIAS, 1, 0) + b"\x00\x01x")))
    assert len(rig.received(0, 1)) == 1
    rig.fp.upstream_cids(rig.up, {new_up})
    rig.send(short_packet(UP_CID, 2, stream_frame(6, 0, subgroup_header(ALIAS, 1, 0) + b"\x00\x01y")))
    assert rig.received(0, 0, timeout=0.2) == []  # a retired id is no publisher of ours any more

    link = rig.lab.subscribers[0]
    other = bytes([0xB0]) * 8
    rig.fp.peer_cids(slot, {bytes([0xA0]) * 8, other})
    rig.relay_sock.sendto(short_packet(other, 0x0007, bytes([0x01]) + b"\0" * 20), (link.ipv4, SUB_PORT))
    (got,) = rig.received(0, 1)
    assert got["udp_ok"] and int.from_bytes(got["payload"][9:11], "big") == rig.fp.state(slot).next_pn - 1
    rig.fp.remove_conn(slot)
    assert rig.fp.map_entries()["dcid"] == 0


def test_a_stopped_stream_gets_nothing_more_from_the_kernel(rig):
    """Userspace resets a kernel stream (subscription gone, paused): it first stops it in the
    map, so a clone already on its way adds no byte past the final size."""
    slot = rig.add_sub(0, alias=9, next_stream=3)
    rig.send(short_packet(UP_CID, 1, stream_frame(2, 0, subgroup_header(ALIAS, 1, 0) + b"\x00\x01a")))
    assert len(rig.received(0, 1)) == 1
    rig.fp.stop_stream(slot, rig.up, 2)
    rig.send(short_packet(UP_CID, 2, stream_frame(2, 6, b"\x00\x01b")))
    assert rig.received(0, 0, timeout=0.2) == []
    assert rig.fp.dstream(slot, rig.up, 2).state == StreamState.ABANDONED


def ack_frame(largest: int, delay: int, ranges: list[tuple[int, int]], ecn: bool = False) -> bytes:
    """ACK frame: `ranges` as (gap, length) pairs after a first range of 2 below `largest`."""
    out = bytes([0x03 if ecn else 0x02]) + varint(largest) + varint(delay) + varint(len(ranges)) + varint(2)
    for gap, length in ranges:
        out += varint(gap) + varint(length)
    return out + (varint(0) * 3 if ecn else b"")


def test_a_subscribers_ack_only_packets_become_records_and_everything_else_goes_up(rig):
    slot = rig.add_sub(1, alias=9, next_stream=3, absorb_acks=True)
    host = bytes.fromhex("c1c1c1c1c1c1c1c1")
    rig.fp.host_cid(slot, host)
    rig.fp.drain()
    link = rig.lab.subscribers[1]
    with entered(link.netns):
        sub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sub.bind((link.ipv4, SUB_PORT))
        other_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other_port.bind((link.ipv4, SUB_PORT + 1))
    try:
        # largest 1000, ranges 998..1000, 990..995 (gap 2 below 998: 996, 997 missing), 980..985
        absorbed = short_packet(host, 0x1234, ack_frame(1000, 77, [(1, 5), (3, 5)]) + bytes(20))
        sub.sendto(absorbed, (link.relay_ipv4, PORT))
        goes_up = [
            short_packet(host, 2, ack_frame(1000, 1, []) + b"\x01"),             # + PING: ack-eliciting
            short_packet(host, 3, ack_frame(1000, 1, [], ecn=True)),             # ECN counts
            short_packet(host, 4, ack_frame(5, 1, [(9, 1)])),                    # a range below zero
            short_packet(bytes(8), 5, ack_frame(1000, 1, [])),                   # another connection id
            bytes([0x45]) + host + (6).to_bytes(2, "big") + ack_frame(1000, 1, []) + TAG,  # key phase 1
            short_packet(host, 7, ack_frame(1000, 1, []))[:-1] + b"\x01",        # not identity protection
            short_packet(host, 8, ack_frame(1000, 1, [(0, 0)] * 16)),            # more ranges than a record holds
        ]
        for p in goes_up:
            sub.sendto(p, (link.relay_ipv4, PORT))
            assert rig.relay_sock.recvfrom(4096)[0] == p
        other_port.sendto(absorbed, (link.relay_ipv4, PORT))                     # not the validated address
        assert rig.relay_sock.recvfrom(4096)[0] == absorbed
        rig.relay_sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            rig.relay_sock.recvfrom(4096)                                        # the absorbed one never came up
        rig.relay_sock.settimeout(2)
        records = [r for r in rig.fp.drain() if r.kind == RecordKind.ACK]
        assert len(records) == 1
        r = records[0]
        assert (r.slot, r.largest, r.ack_delay, r.pn, r.nranges) == (slot, 1000, 77, 0x1234, 3)
        assert [(x.smallest, x.largest) for x in r.ranges[:3]] == [(998, 1000), (990, 995), (980, 985)]
        assert rig.fp.counters()["acks_absorbed"] == 1
        rig.fp.host_cid(slot, None)                                              # no current id: nothing absorbed
        sub.sendto(absorbed, (link.relay_ipv4, PORT))
        assert rig.relay_sock.recvfrom(4096)[0] == absorbed
    finally:
        sub.close()
        other_port.close()
        rig.fp.remove_conn(slot)
        rig.slots.remove(slot)


def table_end(got: list[dict]) -> int:
    """The end offset of the stream the captured kernel packets carried."""
    return max(off + len(data) for f in got for _, _, off, data, _ in parse_frames(f["payload"])[2])


def _records(rig, kind: RecordKind, want: int, timeout: float = 2.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += [r for r in rig.fp.drain() if r.kind == kind]
        time.sleep(0.01)
    return got


def test_kernel_recovery_tracks_sent_packets_applies_acks_and_reports_only_losses(rig):
    """A connection whose loss recovery runs in the kernel: the egress registers each packet it
    builds (a SENT record only where a stream starts), the ingress applies the peer's
    ACK-only packets there and drops them; userspace hears of lost kernel packets (with their
    frames), of ACKs only while its own packets are outstanding, and of the timer."""
    slot = rig.add_sub(0, alias=9, next_stream=3, absorb_acks=True, recovery=True)
    rec = KernelRecovery(rig.fp.obj)
    rec.init(slot, gen=rig.fp.generation(slot), first_pn=1000, max_datagram_size=1200,
             max_ack_delay_ns=25_000_000, initial_rtt_ns=100_000_000, ack_delay_exponent=3)
    host = bytes.fromhex("c0c0c0c0c0c0c0c0")
    rig.fp.host_cid(slot, host)
    link = rig.lab.subscribers[0]
    with entered(link.netns):
        sub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sub.bind((link.ipv4, SUB_PORT))
    try:
        rig.fp.drain()
        head = subgroup_header(ALIAS, 1, 0x20)
        chunks = [head + b"\x00\x40" + bytes(64)] + [bytes([i]) * 100 for i in range(1, 6)]
        off = 0
        for i, chunk in enumerate(chunks):
            rig.send(short_packet(UP_CID, 20 + i, stream_frame(2, off, chunk, fin=i == len(chunks) - 1)))
            off += len(chunk)
        got = rig.received(0, len(chunks))
        assert len(got) == len(chunks)
        sizes = {parse_frames(f["payload"])[0]: len(f["payload"]) for f in got}
        assert sorted(sizes) == list(range(1000, 1006))
        sent = [r for r in rig.fp.drain() if r.kind == RecordKind.SENT]
        assert [r.pn for r in sent] == [1000]                  # the stream's start only
        entry = rig.fp.dstream(slot, rig.up, 2)                # its end is in its entry
        assert entry.fin == 1 and entry.sent_end == table_end(got)
        st = rec.state(slot)
        assert (st.sent_end, st.ack_eliciting_in_flight, st.bytes_in_flight) == (1006, 6, sum(sizes.values()))
        table = rec.outstanding(slot)
        assert sorted(table) == list(range(1000, 1006))
        assert all(p.flags & PacketFlags.KERNEL and p.nframes == 1 and p.frames[0].stream == 3 for p in table.values())
        assert table[1005].frames[0].fin == 1 and table[1001].frames[0].offset == table[1000].frames[0].len

        # 1003..1005 acknowledged: applied in the kernel, 1000..1002 lost by the packet threshold
        sub.sendto(short_packet(host, 1, ack_frame(1005, 0, [])), (link.relay_ipv4, PORT))
        lost = _records(rig, RecordKind.LOST, 3)
        assert [r.pn for r in lost] == [1000, 1001, 1002]
        assert [(r.frames[0].stream, r.frames[0].offset, r.frames[0].len) for r in lost] == [
            (3, table[pn].frames[0].offset, table[pn].frames[0].len) for pn in (1000, 1001, 1002)]
        assert not any(r.flags for r in lost)                  # congestion losses, frames in the record
        rig.relay_sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            rig.relay_sock.recvfrom(4096)                      # the ACK never came up
        rig.relay_sock.settimeout(2)
        st = rec.state(slot)
        assert (st.acked_total, st.lost_total, st.bytes_in_flight, st.ack_eliciting_in_flight) == (3, 3, 0, 0)
        assert st.srtt > 0 and st.ssthresh == st.cwnd          # an RTT sample, and a congestion event
        assert not [r for r in rig.fp.drain() if r.kind == RecordKind.ACK]

        # a packet userspace built (registered from its record): ACKs go up while it is outstanding
        pn = rig.fp.take(slot, Take.PN, 1)
        rec.sent(slot, pn, time.monotonic_ns(), 100, PacketFlags.ACK_ELICITING | PacketFlags.IN_FLIGHT)
        assert rec.state(slot).user_outstanding == 1
        sub.sendto(short_packet(host, 2, ack_frame(pn, 0, [])), (link.relay_ipv4, PORT))
        acks = _records(rig, RecordKind.ACK, 1)
        assert [a.largest for a in acks] == [pn] and rec.state(slot).user_outstanding == 0
        # acknowledged before userspace registered it: the registration counts nothing in flight
        early = rig.fp.take(slot, Take.PN, 1)
        sub.sendto(short_packet(host, 3, ack_frame(early, 0, [])), (link.relay_ipv4, PORT))
        deadline = time.monotonic() + 2
        while rec.state(slot).absorbed < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        rec.sent(slot, early, time.monotonic_ns(), 100, PacketFlags.ACK_ELICITING | PacketFlags.IN_FLIGHT)
        assert (rec.state(slot).user_outstanding, rec.state(slot).bytes_in_flight) == (0, 0)

        # one more kernel packet, never acknowledged: the bpf_timer fires, the probe gives it up
        rig.send(short_packet(UP_CID, 40, stream_frame(6, 0, subgroup_header(ALIAS, 2, 0x20) + b"x")))
        (timer,) = _records(rig, RecordKind.TIMER, 1, timeout=5)
        assert timer.slot == slot
        result = rec.expire(slot, time.monotonic_ns())
        assert result.expired == 1
        (probe,) = _records(rig, RecordKind.LOST, 1)
        assert probe.flags == 1 and probe.frames[0].stream == 7   # FR_MOQ_LOST_EXPIRED; the next stream id
        assert rig.fp.counters()["lr_timers"] >= 1
    finally:
        sub.close()
        rec.forget(slot)
        rec.close()
        rig.fp.remove_conn(slot)
        rig.slots.remove(slot)
