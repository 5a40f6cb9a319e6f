"""Python side of bpf/moq_fastpath.bpf.c: its maps, attachments, counters and records.

The relay's control plane decides; this class only writes those decisions into the maps
(publisher connections, track aliases, subscriber connections and subscriptions), runs the
atomic counter changes through the fr_moq_take syscall program and hands back the ring-
buffer records (one per packet the kernel sent or renumbered, one per stream handed to
userspace, one per subscriber ACK it read). It knows no QUIC and no MoQT beyond the map layouts.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Self

from ...kernel import abi
from ...kernel.attach import TcLink
from ...kernel.errors import KernelError
from ...kernel.features import l4_csum_ipv6_flag
from ...kernel.libbpf import BPF_NOEXIST, BpfTestRunOpts, check, lib
from ...kernel.objects import BpfObject

log = logging.getLogger("fastrelay.fastpath")

u32 = ctypes.c_uint32


class Take(enum.IntEnum):
    """fr_moq_take operations (values checked against BTF at start)."""

    PN = 0
    STREAM = 1
    BUDGET = 2
    CREDIT = 3
    SET_PN = 4


class RecordKind(enum.IntEnum):
    """Ring-buffer record types (fr_moq_record_kind): abi.MoqSent, MoqRenumbered, MoqHandover, MoqAck,
    MoqLost, MoqTimer."""

    SENT = 1
    RENUMBERED = 2
    HANDOVER = 3
    ACK = 4
    LOST = 5
    TIMER = 6


class HandoverReason(enum.IntEnum):
    """Why the kernel handed a stream to userspace (fr_moq_handover_reason)."""

    FLOW = 1
    SIZE = 2
    CONGESTION = 3


class UpstreamKind(enum.IntEnum):
    """What the kernel learnt about an upstream stream (fr_moq_ustream_kind)."""

    SUBGROUP = 1
    OTHER = 2
    ENDED = 3


class StreamState(enum.IntEnum):
    FORWARD = 1
    SKIPPED = 2
    USER = 3
    ABANDONED = 4
    NOT_JOINED = 5


@dataclass(frozen=True)
class ConnSpec:
    """A subscriber connection as the egress program needs it (after its handshake)."""

    ifindex: int
    src_mac: str
    dst_mac: str
    src: tuple[str, int]          # the relay's address and port on this connection
    dst: tuple[str, int]          # the subscriber's validated address
    dcid: bytes                   # the subscriber's connection id (our packets' destination id)
    max_stream: int               # first server-unidirectional stream id the peer does not allow yet
    stream_window: int            # peer's initial MAX_STREAM_DATA for unidirectional streams
    max_payload: int = 1200
    protect_priority: int = 0     # under congestion, subgroups with a larger priority value are dropped
    skip_below: int = 1           # congestion: the budget under which the kernel stops sending
    absorb_acks: bool = False     # the peer's ACK-only packets are read by the kernel (to its host_cid)
    recovery: bool = False        # loss recovery and congestion control in the kernel (recovery slot = slot)


def _ip_bytes(ip: str) -> bytes:
    raw = ipaddress.ip_address(ip).packed
    return raw.ljust(16, b"\0")


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _keys(m) -> list:
    """A snapshot of a hash map's keys (safe to delete while walking it)."""
    return list(m.keys())


def _family(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


class KernelMaps:
    """Load, attach and steer the kernel data path's BPF object for a relay listening on UDP `port`.

    `ingress` are the interfaces publishers reach the relay on, `egress` those subscribers
    are reached on (the same interface may be in both). Everything is detached and every
    map freed by close(); tcx links die with the process as well.
    """

    RING_BUDGET = 1 << 15

    def __init__(self, port: int, ingress: list[int], egress: list[int]) -> None:
        self.obj = BpfObject.load("moq_fastpath")
        self.links: list[TcLink] = []
        try:
            o = self.obj
            self._cfg = o.map("fr_moq_cfg")
            self._up = o.map("fr_moq_up")
            self._alias = o.map("fr_moq_alias")
            self._ustream = o.map("fr_moq_ustream")
            self._tracks = o.map("fr_moq_tracks")
            self._dsub = o.map("fr_moq_dsub")
            self._conns = o.map("fr_moq_conns")
            self._state = o.map("fr_moq_state")
            self._states = self._state.view()
            self._dcid = o.map("fr_moq_dcid")
            self._hcid = o.map("fr_moq_hcid")
            self._dstream = o.map("fr_moq_dstream")
            self._stats = o.map("fr_moq_stats")
            self._events = o.records("fr_moq_events")
            o.struct("fr_moq_take_args", abi.MoqTakeArgs)
            self._check_enums()
            self._take_fd = o.program("fr_moq_take").fd
            self._counter_names = {v: k.removeprefix("FR_MQ_").lower()
                                   for k, v in o.enum("fr_moq_counter").items() if k != "FR_MQ_MAX"}
            self._cfg.update(0, abi.MoqConfig(port=socket.htons(port), enabled=1,
                                              csum_v6_flags=l4_csum_ipv6_flag()))
            for ifindex in dict.fromkeys(ingress):
                self.links.append(TcLink(o.program("fr_moq_ingress").fd, "fr_moq_ingress", ifindex, "ingress"))
            for ifindex in dict.fromkeys(egress):
                self.links.append(TcLink(o.program("fr_moq_egress").fd, "fr_moq_egress", ifindex, "egress"))
        except BaseException:
            self.close()
            raise
        self._next_up = 1
        self._free_slots = list(range(abi.FR_MOQ_MAX_CONNS - 1, -1, -1))
        self._gen = 0
        self.conns: dict[int, ConnSpec] = {}
        self._slot_gen: dict[int, int] = {}
        self._peer_cids: dict[int, set[bytes]] = {}  # slot -> the peer's connection ids in fr_moq_dcid
        self._host_cid: dict[int, bytes] = {}  # slot -> the relay's connection id in fr_moq_hcid
        self.track_sets: dict[int, list[int]] = {}
        self._subs: dict[int, set[int]] = {}  # slot -> tracks
        self._ups: dict[int, bytes] = {}  # up id -> cid
        self._aliases: dict[int, set[int]] = {}  # up id -> aliases
        self._ended: deque[tuple[float, int, int]] = deque()  # (when, up, stream) of ended upstream streams

    def _check_enums(self) -> None:
        for enum_type, name, prefix in ((Take, "fr_moq_take_op", "FR_MOQ_"),
                                        (RecordKind, "fr_moq_record_kind", "FR_MOQ_REC_"),
                                        (HandoverReason, "fr_moq_handover_reason", "FR_MOQ_HO_"),
                                        (StreamState, "fr_moq_dstream_state", "FR_MOQ_DS_"),
                                        (UpstreamKind, "fr_moq_ustream_kind", "FR_MOQ_US_")):
            kernel = self.obj.enum(name)
            for member in enum_type:
                names = [k for k, v in kernel.items() if v == member.value and k.startswith(prefix)]
                if not names or not any(n.endswith(member.name) for n in names):
                    raise KernelError(f"{name}: {enum_type.__name__}.{member.name} = {member.value} does not match")

    # ---- publishers
    def add_upstream(self, cid: bytes, peer: tuple[str, int]) -> int:
        """A publisher connection whose handshake completed: its 1-RTT packets to the relay
        (destination connection id `cid`, from `peer` only) are fanned out."""
        up = self._next_up
        self._next_up += 1
        self._up.update(self._cid(cid), abi.MoqUpconn(id=up, family=_family(peer[0]), peer_port=socket.htons(peer[1]),
                                                      peer_ip=(ctypes.c_uint8 * 16)(*_ip_bytes(peer[0]))))
        self._ups[up] = {cid}
        return up

    def upstream_cids(self, up: int, cids: set[bytes]) -> None:
        """The relay's connection ids on publisher connection `up` are now `cids`
        (NEW_CONNECTION_ID / RETIRE_CONNECTION_ID)."""
        old = self._ups.get(up)
        if not old or not cids:
            return
        value = self._up.lookup(self._cid(next(iter(old))))
        for cid in old - cids:
            self._up.delete(self._cid(cid))
        for cid in cids - old:
            self._up.update(self._cid(cid), value)
        self._ups[up] = set(cids)

    def remove_upstream(self, up: int) -> None:
        """Forget a publisher connection: its ids, aliases and learnt streams."""
        for cid in self._ups.pop(up, set()):
            self._up.delete(self._cid(cid))
        for alias in self._aliases.pop(up, set()):
            self._alias.delete(abi.MoqAliasKey(up=up, alias=alias))
        for key in _keys(self._ustream):
            if key.conn == up:
                self._ustream.delete(key)
        self._ended = deque(e for e in self._ended if e[1] != up)
        for key in _keys(self._dstream):
            if key.up == up:
                self._dstream.delete(key)

    def set_alias(self, up: int, alias: int, track: int, default_priority: int = 128) -> None:
        """Subgroups that publisher `up` sends with `alias` belong to `track`."""
        if not 0 <= track < abi.FR_MOQ_MAX_TRACK_IDS:
            raise ValueError(f"track id {track} out of range")
        self._alias.update(abi.MoqAliasKey(up=up, alias=alias), abi.MoqAliasVal(track=track,
                                                                                 default_priority=default_priority))
        self._aliases.setdefault(up, set()).add(alias)

    def remove_alias(self, up: int, alias: int) -> None:
        self._alias.delete(abi.MoqAliasKey(up=up, alias=alias))
        self._aliases.get(up, set()).discard(alias)

    def stream_ended(self, up: int, stream: int) -> None:
        """An upstream stream finished or was reset: the kernel forgets its per-subscriber state and
        fans out nothing more of it (a late copy of its start would otherwise open it again);
        `forget_ended` drops the entry itself later."""
        try:
            self._ustream.update(abi.MoqStreamKey(conn=up, stream=stream), abi.MoqUstream(kind=UpstreamKind.ENDED))
            self._ended.append((time.monotonic(), up, stream))
        except OSError as exc:  # full: the stream stays unknown, i.e. userspace's if it comes back
            log.warning("upstream stream %d of publisher %d not marked ended: %s", stream, up, exc)
        for slot in self.conns:
            self._dstream.delete(abi.MoqStreamKey(conn=slot, up=up, stream=stream))

    def forget_ended(self, before: float) -> None:
        """Drop the entries of upstream streams that ended before `before` (time.monotonic())."""
        while self._ended and self._ended[0][0] < before:
            _, up, stream = self._ended.popleft()
            self._ustream.delete(abi.MoqStreamKey(conn=up, stream=stream))

    # ---- subscribers
    def add_conn(self, spec: ConnSpec, *, next_pn: int, next_stream: int, budget: int, credit: int) -> int:
        """A subscriber connection (handshake completed, address validated); returns its slot."""
        if len(spec.dcid) != abi.FR_MOQ_CID_LEN:
            raise ValueError(f"connection id of {len(spec.dcid)} bytes; the kernel path needs {abi.FR_MOQ_CID_LEN}")
        if not self._free_slots:
            raise KernelError("no free subscriber slot in the kernel path")
        slot = self._free_slots.pop()
        self._gen = self._gen % 0xFFFFFFFF + 1
        self._state.update(slot, abi.MoqState(next_pn=next_pn, next_stream=next_stream, budget=budget, credit=credit))
        self._conns.update(slot, self._conn_value(spec, self._gen))
        self._dcid.update(self._cid(spec.dcid), abi.MoqSlot(slot=slot, gen=self._gen))
        self._peer_cids[slot] = {spec.dcid}
        self.conns[slot] = spec
        self._slot_gen[slot] = self._gen
        self._subs[slot] = set()
        return slot

    def generation(self, slot: int) -> int:
        """The generation of the connection in `slot` (its kernel recovery state must carry it)."""
        return self._slot_gen[slot]

    def update_conn(self, slot: int, spec: ConnSpec) -> None:
        """New limits, next hop or current peer connection id for a connection (same slot)."""
        if spec.dcid not in self._peer_cids[slot]:
            self.peer_cids(slot, self._peer_cids[slot] | {spec.dcid})
        self._conns.update(slot, self._conn_value(spec, self._slot_gen[slot]))
        self.conns[slot] = spec

    def peer_cids(self, slot: int, cids: set[bytes]) -> None:
        """The peer's connection ids the relay may address packets to on connection `slot` (its
        packets to any of them are renumbered); NEW_CONNECTION_ID / RETIRE_CONNECTION_ID."""
        old = self._peer_cids[slot]
        for cid in old - cids:
            self._dcid.delete(self._cid(cid))
        for cid in cids - old:
            self._dcid.update(self._cid(cid), abi.MoqSlot(slot=slot, gen=self._slot_gen[slot]))
        self._peer_cids[slot] = set(cids)

    def host_cid(self, slot: int, cid: bytes | None) -> None:
        """The relay's connection id the peer currently addresses on connection `slot` (None: none);
        only ACK-only packets to it are absorbed (a switch to another id goes up to aioquic)."""
        old = self._host_cid.pop(slot, None)
        if old is not None and old != cid:
            self._hcid.delete(self._cid(old))
        if cid is not None:
            self._hcid.update(self._cid(cid), abi.MoqSlot(slot=slot, gen=self._slot_gen[slot]))
            self._host_cid[slot] = cid

    def _conn_value(self, spec: ConnSpec, gen: int) -> abi.MoqConn:
        u8x16 = ctypes.c_uint8 * 16
        return abi.MoqConn(gen=gen, ifindex=spec.ifindex, dst_mac=(ctypes.c_uint8 * 6)(*_mac(spec.dst_mac)),
                           src_mac=(ctypes.c_uint8 * 6)(*_mac(spec.src_mac)), dst_port=socket.htons(spec.dst[1]),
                           src_port=socket.htons(spec.src[1]), family=_family(spec.dst[0]),
                           protect_priority=spec.protect_priority, max_payload=spec.max_payload,
                           dst_ip=u8x16(*_ip_bytes(spec.dst[0])), src_ip=u8x16(*_ip_bytes(spec.src[0])),
                           dcid=(ctypes.c_uint8 * abi.FR_MOQ_CID_LEN)(*spec.dcid), max_stream=spec.max_stream,
                           stream_window=spec.stream_window, skip_below=spec.skip_below,
                           absorb_acks=int(spec.absorb_acks), recovery=int(spec.recovery))

    def remove_conn(self, slot: int) -> None:
        """Take a connection out of the kernel path and free every entry it had."""
        spec = self.conns.pop(slot, None)
        if spec is None:
            return
        for track in list(self._subs.pop(slot, set())):
            self.unsubscribe(slot, track)
        self._conns.update(slot, abi.MoqConn())  # gen 0: clones in flight are dropped
        for cid in self._peer_cids.pop(slot, ()):
            self._dcid.delete(self._cid(cid))
        self.host_cid(slot, None)
        for key in _keys(self._dstream):
            if key.conn == slot:
                self._dstream.delete(key)
        self._state.update(slot, abi.MoqState())
        self._slot_gen.pop(slot, None)
        self._free_slots.append(slot)

    def subscribe(self, slot: int, track: int, alias: int) -> None:
        """From now on, new subgroups of `track` go to connection `slot` as `alias`."""
        self._dsub.update(abi.MoqDsubKey(conn=slot, track=track), abi.MoqDsub(alias=alias))
        members = self.track_sets.setdefault(track, [])
        if slot not in members:
            if len(members) >= abi.FR_MOQ_MAX_SUBS:
                raise KernelError(f"track {track} has {abi.FR_MOQ_MAX_SUBS} kernel-path subscribers already")
            members.append(slot)
            self._write_track(track)
        self._subs.setdefault(slot, set()).add(track)

    def unsubscribe(self, slot: int, track: int) -> None:
        members = self.track_sets.get(track, [])
        if slot in members:
            members.remove(slot)
            self._write_track(track)
        if not members:
            self.track_sets.pop(track, None)
        self._dsub.delete(abi.MoqDsubKey(conn=slot, track=track))
        self._subs.get(slot, set()).discard(track)

    def _write_track(self, track: int) -> None:
        members = self.track_sets.get(track, [])
        value = abi.MoqTrack(count=len(members))
        for i, slot in enumerate(members):
            value.conns[i] = slot
        self._tracks.update(track, value)

    # ---- shared counters and per-stream state
    def take(self, slot: int, op: Take, value: int) -> int:
        """Apply one atomic change to connection `slot`'s counters; the previous value."""
        args = abi.MoqTakeArgs(slot=slot, op=int(op), value=value)
        # a syscall program's context is copied back into ctx_in (ctx_out is refused)
        opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts), ctx_in=ctypes.addressof(args),
                              ctx_size_in=ctypes.sizeof(args))
        check(lib.bpf_prog_test_run_opts(self._take_fd, ctypes.byref(opts)), "fr_moq_take")
        if ctypes.c_int32(opts.retval).value != 0:
            raise KernelError(f"fr_moq_take({slot}, {op.name}) failed")
        return args.result

    def state(self, slot: int) -> abi.MoqState:
        """The connection's counters as they are now (read from the mapped map: no syscall)."""
        return abi.MoqState.from_buffer_copy(self._states[slot])

    def dstream(self, slot: int, up: int, stream: int) -> abi.MoqDstream | None:
        """What the egress decided for upstream stream `stream` of `up` towards `slot`."""
        return self._dstream.lookup(abi.MoqStreamKey(conn=slot, up=up, stream=stream))

    def claim_for_userspace(self, slot: int, up: int, stream: int) -> abi.MoqDstream:
        """The kernel's decision for this stream and subscriber, or, if it made none (the stream
        began before the subscriber joined, or never reached the kernel), a NOT_JOINED entry so
        it never takes the stream later (e.g. on a retransmitted start)."""
        key = abi.MoqStreamKey(conn=slot, up=up, stream=stream)
        st = self._dstream.lookup(key)
        if st is None:
            mine = abi.MoqDstream(state=StreamState.NOT_JOINED)
            try:
                self._dstream.update(key, mine, BPF_NOEXIST)
                return mine
            except FileExistsError:
                st = self._dstream.lookup(key)
        return st

    def stop_stream(self, slot: int, up: int, stream: int) -> None:
        """The kernel sends no more of this stream to `slot` (userspace is about to reset it)."""
        key = abi.MoqStreamKey(conn=slot, up=up, stream=stream)
        ds = self._dstream.lookup(key)
        if ds is not None and ds.state == StreamState.FORWARD:
            ds.state = StreamState.ABANDONED
            self._dstream.update(key, ds)

    def map_entries(self) -> dict[str, int]:
        """How many entries each per-connection/per-stream map holds (leak checks)."""
        maps = {"up": self._up, "alias": self._alias, "ustream": self._ustream, "dsub": self._dsub,
                "dcid": self._dcid, "hcid": self._hcid, "dstream": self._dstream}
        counts = {name: len(_keys(m)) for name, m in maps.items()}
        counts["conns"] = sum(1 for slot in range(abi.FR_MOQ_MAX_CONNS) if self._conns.lookup(slot).gen)
        # read from the map (what the ingress program fans out to), not from track_sets: a set the
        # Python side forgot but never wrote back would still be cloned to
        counts["tracks"] = sum(1 for track in range(abi.FR_MOQ_MAX_TRACK_IDS) if self._tracks.lookup(track).count)
        return counts

    # ---- records and counters
    def fileno(self) -> int:
        """Readable when the programs woke readers (an absorbed ACK, a filling ring)."""
        return self._events.fileno()

    def drain(self, budget: int = RING_BUDGET) -> list[abi.MoqSent | abi.MoqRenumbered | abi.MoqHandover | abi.MoqAck
                                                         | abi.MoqLost | abi.MoqTimer]:
        """Records the kernel wrote since the last call, in order (RecordKind says which type)."""
        return self._events.consume(budget)

    def counters(self) -> dict[str, int]:
        sums = self._stats.sum_counters()
        return {name: sums[i] for i, name in self._counter_names.items()}

    @staticmethod
    def _cid(cid: bytes) -> abi.MoqCid:
        if len(cid) != abi.FR_MOQ_CID_LEN:
            raise ValueError(f"connection id of {len(cid)} bytes; the kernel path needs {abi.FR_MOQ_CID_LEN}")
        return abi.MoqCid(b=(ctypes.c_uint8 * abi.FR_MOQ_CID_LEN)(*cid))

    def close(self) -> None:
        for link in self.links:
            link.detach()
        self.links.clear()
        if getattr(self, "_events", None) is not None:
            self._events.close()
            self._events = None
        if getattr(self, "_state", None) is not None:
            self._states = None
            self._state.close()
        self.obj.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
