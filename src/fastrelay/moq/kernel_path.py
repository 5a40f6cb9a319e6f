"""The MoQT relay's kernel data path: bpf/moq_fastpath.bpf.c forwards subgroup streams from
publishers to subscribers; this module keeps every QUIC connection right afterwards.

What the relay core tells it (the `FastPath` hooks of moq/relay.py): which upstream alias
is which track, which subscription is established or gone, which upstream stream ended. What
it does with that:

- A publisher connection in plaintext mode becomes an upstream entry (its connection ids,
  validated address) with its track aliases; a subscriber connection in plaintext mode whose
  next hop resolves becomes a subscriber slot (addresses, connection id, counters) and joins
  its tracks' kernel sets. A connection that does not qualify stays on the userspace path.
- Before any datagram reaches aioquic, the ring buffer is drained: each packet the kernel
  sent is registered into the subscriber connection's loss recovery (quic/registration.py)
  with the stream bytes it carried, taken from the upstream stream (whose bytes reach
  userspace right after the clones left), each packet aioquic sent is re-keyed under the
  number the egress program gave it, and each stream the kernel handed over is continued
  (flow control or size) or reset (abandoned under congestion) from userspace.
- After input, each connection's congestion budget and flow-control credit are published
  to the kernel.
- Which path sends a subgroup to a subscriber is decided once per (subscriber, upstream
  stream) by the kernel at the stream's first packet; `owns()` tells the relay core, and a
  stream the kernel did not take is claimed for userspace so the kernel never starts it later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..kernel import abi
from ..nexthop import NextHopError, Resolver
from ..quic import internals
from ..quic.link import QuicLink
from ..quic.registration import ExternalSender, SentStreamFrame
from .fastpath import ConnSpec, EventKind, MoqFastPath, StreamState, Take
from .wire import Writer

log = logging.getLogger("fastrelay.kernel_path")

ABANDONED_RESET_CODE = 0x1  # draft-16 stream reset: INTERNAL_ERROR-class "delivery timeout"-like give-up
DATAGRAM_STREAM = (1 << 64) - 1


def _varint_len(first_byte: int) -> int:
    return 1 << (first_byte >> 6)


def rewrite_alias(head: bytes, alias: int) -> bytes:
    """A subgroup stream's first bytes with the track alias (its second varint) replaced."""
    t = _varint_len(head[0])
    a = _varint_len(head[t])
    return head[:t] + bytes(Writer().varint(alias).buf) + head[t + a:]


@dataclass
class _Mirror:
    """The bytes of one upstream stream so far (kernel-sent ranges are registered from it)."""

    data: bytearray = field(default_factory=bytearray)
    ended: bool = False
    users: int = 0  # pending registrations and continuations that still need it


@dataclass
class _Pending:
    down: _Down
    pn: int
    sent_time: float
    size: int
    frames: list[tuple[int, int, int, int, int, bool]]  # (down stream, down offset, len, up stream, up offset, fin)
    up: int
    track: int


@dataclass
class _Continuation:
    """A stream the kernel handed to userspace: upstream bytes from `next_up` on go by aioquic."""

    down_stream: int
    delta: int
    next_up: int
    fin: bool = False


@dataclass(eq=False)
class _Down:
    link: QuicLink
    ext: ExternalSender
    slot: int
    spec: ConnSpec
    tracks: dict[int, object] = field(default_factory=dict)  # kernel track id -> relay Downstream
    aliases: dict[int, int] = field(default_factory=dict)  # kernel track id -> alias
    continuations: dict[tuple[int, int], _Continuation] = field(default_factory=dict)  # (up, up stream)
    claimed: dict[tuple[int, int], bool] = field(default_factory=dict)  # (up, up stream) -> kernel owns it
    published: tuple[int, int] = (-1, -1)
    kernel_packets: int = 0
    kernel_bytes: int = 0


@dataclass
class KernelStats:
    packets: int = 0               # packets the kernel sent to subscribers
    bytes: int = 0
    renumbered: int = 0            # aioquic packets renumbered on kernel-path connections
    handovers: int = 0
    abandoned: int = 0
    unmatched: int = 0             # records for a connection no longer known
    connections: int = 0           # subscriber connections on the kernel path now
    refused: int = 0               # connections that stayed on the userspace path


class KernelPath:
    """Runs the kernel data path of one relay listening on UDP `port` on `interfaces` (ifindexes)."""

    TICK_S = 0.005

    def __init__(self, port: int, interfaces: list[int], *, protect_priority: int = 0,
                 abandon_below: int = -(4 << 20)) -> None:
        self.fp = MoqFastPath(port, ingress=interfaces, egress=interfaces)
        self.port = port
        self.protect_priority = protect_priority
        self.abandon_below = abandon_below
        self.resolver = Resolver()
        self.stats = KernelStats()
        self._downs: dict[QuicLink, _Down] = {}
        self._slots: dict[int, _Down] = {}
        self._ups: dict[QuicLink, int] = {}
        self._up_links: dict[int, QuicLink] = {}
        self._track_ids: dict[int, int] = {}  # id(relay Track) -> kernel id
        self._track_up: dict[int, int] = {}  # kernel track id -> up
        self._next_track = 0
        self._mirrors: dict[tuple[int, int], _Mirror] = {}
        self._pending: list[_Pending] = []
        self._timer = None
        self.transmit: Callable[[QuicLink], None] = lambda link: link.transmit()

    # ---- wiring
    def attach_link(self, link: QuicLink) -> None:
        """Every relay connection drains the kernel's records before its input is processed."""
        link.before_input = self.drain
        link.after_input = self._after_input

    def start(self, loop) -> None:
        """Drain and publish on a timer too (records of idle connections, timers of aioquic)."""
        def tick() -> None:
            self.drain()
            self._publish_all()
            self._timer = loop.call_later(self.TICK_S, tick)
        self._timer = loop.call_later(self.TICK_S, tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for link in list(self._downs):
            self._remove_down(link)
        for up in list(self._up_links):
            self.fp.remove_upstream(up)
        self.resolver.close()
        self.fp.close()

    # ---- relay core hooks (moq/relay.py FastPath)
    def upstream_track(self, peer, alias: int, track, default_priority: int = 128) -> None:
        link = peer.session.transport
        if not getattr(link, "plaintext", False):
            return
        up = self._ups.get(link)
        if up is None:
            cids = internals.host_cids(link.quic)
            peer_addr = link.peer_address
            if not peer_addr or any(len(c) != abi.FR_MOQ_CID_LEN for c in cids):
                return
            up = self.fp.add_upstream(next(iter(cids)), peer_addr)
            self.fp.upstream_cids(up, cids)
            self._ups[link] = up
            self._up_links[up] = link
        tid = self._track_id(track)
        self._track_up[tid] = up
        self.fp.set_alias(up, alias, tid, default_priority)

    def downstream_ready(self, ds) -> None:
        """A subscription was established: new subgroups of its track go by the kernel."""
        tid = self._track_ids.get(id(ds.track))
        link = ds.peer.session.transport
        if tid is None or not getattr(link, "plaintext", False) or tid not in self._track_up:
            return
        down = self._downs.get(link) or self._add_down(link)
        if down is None:
            return
        down.tracks[tid] = ds
        down.aliases[tid] = ds.alias
        self.fp.subscribe(down.slot, tid, ds.alias)

    def downstream_gone(self, ds) -> None:
        down = self._downs.get(ds.peer.session.transport)
        tid = self._track_ids.get(id(ds.track))
        if down is None or tid is None or down.tracks.get(tid) is not ds:
            return
        self.fp.unsubscribe(down.slot, tid)
        del down.tracks[tid]

    def peer_gone(self, peer) -> None:
        link = peer.session.transport
        if link in self._downs:
            self._remove_down(link)
        up = self._ups.pop(link, None)
        if up is not None:
            self._up_links.pop(up, None)
            self.fp.remove_upstream(up)
            for key in [k for k in self._mirrors if k[0] == up]:
                self._mirrors[key].ended = True
            self._gc_mirrors()

    def stream_ended(self, peer, stream_id: int) -> None:
        up = self._ups.get(peer.session.transport)
        if up is None:
            return
        self.fp.stream_ended(up, stream_id)
        for down in self._downs.values():
            down.claimed.pop((up, stream_id), None)
        mirror = self._mirrors.get((up, stream_id))
        if mirror is not None:
            mirror.ended = True
            self._gc_mirrors()

    def owns(self, ds, peer, stream_id: int) -> bool:
        """Whether the kernel delivers upstream stream `stream_id` of `peer` to subscription `ds`
        (then the relay core must not); decided by the kernel at the stream's first packet."""
        down = self._downs.get(ds.peer.session.transport)
        up = self._ups.get(peer.session.transport)
        if down is None or up is None:
            return False
        key = (up, stream_id)
        known = down.claimed.get(key)
        if known is not None:
            return known
        st = self.fp.claim_for_userspace(down.slot, up, stream_id)
        owned = st is not None and (st.state in (StreamState.FORWARD, StreamState.SKIPPED, StreamState.ABANDONED)
                                    or (st.state == StreamState.USER and key in down.continuations))
        down.claimed[key] = owned
        return owned

    def owns_datagrams(self, ds) -> bool:
        down = self._downs.get(ds.peer.session.transport)
        tid = self._track_ids.get(id(ds.track))
        return down is not None and tid in down.tracks

    def upstream_data(self, link: QuicLink, stream_id: int, data: bytes, fin: bool) -> None:
        """Raw bytes of an upstream stream, in order, as aioquic delivered them. Only streams the
        kernel forwards are kept: their first record is drained before their first bytes arrive."""
        up = self._ups.get(link)
        mirror = self._mirrors.get((up, stream_id)) if up is not None else None
        if mirror is not None:
            mirror.data += data
            mirror.ended = mirror.ended or fin

    # ---- connections
    def _track_id(self, track) -> int:
        tid = self._track_ids.get(id(track))
        if tid is None:
            tid = self._next_track
            self._next_track = (self._next_track + 1) % abi.FR_MOQ_MAX_TRACK_IDS
            self._track_ids[id(track)] = tid
        return tid

    def _add_down(self, link: QuicLink) -> _Down | None:
        quic = link.quic
        peer = link.peer_address
        dcid = internals.peer_cid(quic)
        if peer is None or len(dcid) != abi.FR_MOQ_CID_LEN:
            self.stats.refused += 1
            return None
        try:
            hop = self.resolver.resolve(peer[0])
        except NextHopError as exc:
            log.warning("subscriber %s stays on the userspace path: %s", peer, exc)
            self.stats.refused += 1
            return None
        ext = ExternalSender(quic)
        credit, max_uni = ext.flow_credit()
        spec = ConnSpec(ifindex=hop.ifindex, src_mac=hop.src_mac, dst_mac=hop.dst_mac, src=(hop.src_ip, self.port),
                        dst=peer, dcid=dcid, max_stream=4 * max_uni + 3,
                        stream_window=internals.peer_max_stream_data_uni(quic),
                        max_payload=min(internals.max_datagram_size(quic), hop.mtu - 48),
                        protect_priority=self.protect_priority, abandon_below=self.abandon_below)
        slot = self.fp.add_conn(spec, next_pn=ext.first_packet_number,
                                next_stream=quic.get_next_available_stream_id(is_unidirectional=True),
                                budget=ext.budget(), credit=credit)
        down = _Down(link, ext, slot, spec)
        self._downs[link] = down
        self._slots[slot] = down
        link.stream_allocator = lambda: self._take_stream(down)
        self.stats.connections += 1
        log.info("subscriber %s on the kernel path (slot %d)", peer, slot)
        return down

    def _take_stream(self, down: _Down) -> int:
        """A unidirectional stream id for userspace on a kernel-path connection (shared counter)."""
        sid = self.fp.take(down.slot, Take.STREAM, 1)
        down.ext.open_stream(sid)
        return sid

    def _remove_down(self, link: QuicLink) -> None:
        down = self._downs.pop(link)
        self._slots.pop(down.slot, None)
        self.fp.remove_conn(down.slot)
        link.stream_allocator = None
        self._pending = [p for p in self._pending if p.down is not down]
        self.stats.connections -= 1

    # ---- records
    def drain(self) -> None:
        """Apply every record the kernel wrote (called before any datagram is processed)."""
        while True:
            events = self.fp.drain()
            for ev in events:
                kind = int(ev["kind"])
                down = self._slots.get(int(ev["slot"]))
                if down is None or down.spec is None:
                    self.stats.unmatched += 1
                    continue
                if kind == EventKind.SENT:
                    self._sent(down, ev)
                elif kind == EventKind.RENUMBERED:
                    local = down.ext.awaiting(int(ev["local_pn"]))
                    if local is None:
                        self.stats.unmatched += 1
                        continue
                    down.ext.renumber(local, int(ev["pn"]))
                    self.stats.renumbered += 1
                elif kind == EventKind.HANDOVER:
                    self._handover(down, ev)
            if len(events) < MoqFastPath.RING_BUDGET:
                break
        for down in self._downs.values():
            down.ext.allocated_below(self.fp.state(down.slot).next_pn)
        self._resolve_pending()

    def _sent(self, down: _Down, ev) -> None:
        n = int(ev["nframes"])
        if n == 0:
            return  # a number the kernel spent without sending: nothing to register
        up = int(ev["up"])
        frames = []
        for fr in ev["frames"][:n]:
            sid, off, up_stream = int(fr["stream"]), int(fr["offset"]), int(fr["up_stream"])
            if sid == DATAGRAM_STREAM:
                continue
            if off == 0:
                down.ext.open_stream(sid)
                ds = down.tracks.get(int(ev["track"]))
                if ds is not None:
                    ds.streams += 1
            mirror = self._mirrors.setdefault((up, up_stream), _Mirror())
            mirror.users += 1
            frames.append((sid, off, int(fr["len"]), up_stream, int(fr["up_offset"]), bool(fr["fin"])))
        down.kernel_packets += 1
        down.kernel_bytes += int(ev["bytes"])
        self.stats.packets += 1
        self.stats.bytes += int(ev["bytes"])
        self._pending.append(_Pending(down, int(ev["pn"]), int(ev["time_ns"]) / 1e9, int(ev["bytes"]), frames, up,
                                      int(ev["track"])))

    def _handover(self, down: _Down, ev) -> None:
        fr = ev["frames"][0]
        up, up_stream = int(ev["up"]), int(fr["up_stream"])
        state = int(ev["state"])
        self.stats.handovers += 1
        if state == StreamState.ABANDONED:
            self.stats.abandoned += 1
            ds = down.tracks.get(int(ev["track"]))
            if ds is not None:
                ds.dropped += 1
            down.continuations[(up, up_stream)] = _Continuation(int(fr["stream"]), 0, -1)
        else:
            ds_entry = self.fp.dstream(down.slot, up, up_stream)
            delta = ds_entry.delta if ds_entry is not None else 0
            down.continuations[(up, up_stream)] = _Continuation(int(fr["stream"]), delta, int(fr["up_offset"]))
        self._mirrors.setdefault((up, up_stream), _Mirror()).users += 1

    def _resolve_pending(self) -> None:
        """Register the kernel's packets whose stream bytes have reached userspace; continue
        handed-over streams."""
        still: list[_Pending] = []
        touched: set[_Down] = set()
        for p in self._pending:
            frames = self._frames_of(p)
            if frames is None:
                still.append(p)
                continue
            p.down.ext.register(p.pn, p.sent_time, p.size, frames)
            for _, _, _, up_stream, _, _ in p.frames:
                self._mirrors[(p.up, up_stream)].users -= 1
            touched.add(p.down)
        self._pending = still
        for down in list(self._downs.values()):
            if down.continuations and self._continue(down):
                touched.add(down)
        self._gc_mirrors()
        for down in touched:
            self.transmit(down.link)

    def _frames_of(self, p: _Pending) -> list[SentStreamFrame] | None:
        out = []
        for sid, off, length, up_stream, up_off, fin in p.frames:
            mirror = self._mirrors.get((p.up, up_stream))
            if mirror is None:
                return None
            if up_off == 0:
                # the header frame: the subscriber's alias, so the length differs by the alias change
                if len(mirror.data) < 2 or len(mirror.data) < _varint_len(mirror.data[0]) + 1:
                    return None
                t = _varint_len(mirror.data[0])
                alias = p.down.aliases.get(p.track, 0)
                delta = len(Writer().varint(alias).buf) - _varint_len(mirror.data[t])
                if len(mirror.data) < length - delta:
                    return None
                data = rewrite_alias(bytes(mirror.data[:length - delta]), alias)
            else:
                if len(mirror.data) < up_off + length:
                    return None
                data = bytes(mirror.data[up_off:up_off + length])
            out.append(SentStreamFrame(sid, off, data, fin))
        return out

    def _continue(self, down: _Down) -> bool:
        """Send what upstream has of handed-over streams; True if anything was written."""
        wrote = False
        for key, c in list(down.continuations.items()):
            if any(p.down is down and p.up == key[0] for p in self._pending):
                continue  # the kernel's earlier bytes are not registered yet
            mirror = self._mirrors.get(key)
            if c.next_up < 0:  # abandoned: reset once the kernel's bytes are registered
                down.link.reset(c.down_stream, ABANDONED_RESET_CODE)
                del down.continuations[key]
                if mirror is not None:
                    mirror.users -= 1
                wrote = True
                continue
            if mirror is None:
                continue
            if len(mirror.data) > c.next_up:
                down.link.send(c.down_stream, bytes(mirror.data[c.next_up:]), fin=mirror.ended)
                c.next_up = len(mirror.data)
                wrote = True
            elif mirror.ended and not c.fin:
                down.link.send(c.down_stream, b"", fin=True)
                wrote = True
            if mirror.ended:
                c.fin = True
                del down.continuations[key]
                mirror.users -= 1
        return wrote

    def _gc_mirrors(self) -> None:
        for key in [k for k, m in self._mirrors.items() if m.ended and m.users <= 0]:
            del self._mirrors[key]

    # ---- budgets
    def _after_input(self, link: QuicLink) -> None:
        self._resolve_pending()
        down = self._downs.get(link)
        if down is not None:
            self._publish(down)

    def _publish_all(self) -> None:
        for down in list(self._downs.values()):
            self._publish(down)

    def _publish(self, down: _Down) -> None:
        """Tell the kernel how much this connection's congestion window and the peer's flow
        control leave (minus what the kernel sent that is not registered yet)."""
        if down.link.closed.done():
            return
        pending = sum(p.size for p in self._pending if p.down is down)
        budget = down.ext.budget() - pending
        credit, max_uni = down.ext.flow_credit()
        credit -= sum(f[2] for p in self._pending if p.down is down for f in p.frames)
        if (budget, credit) != down.published:
            st = self.fp.state(down.slot)
            if budget != st.budget:
                self.fp.take(down.slot, Take.BUDGET, budget - st.budget)
            if credit != st.credit:
                self.fp.take(down.slot, Take.CREDIT, credit - st.credit)
            down.published = (budget, credit)
        if 4 * max_uni + 3 != down.spec.max_stream:
            down.spec = replace(down.spec, max_stream=4 * max_uni + 3)
            self.fp.update_conn(down.slot, down.spec)

    def counters(self) -> dict[str, int]:
        """Kernel counters and this path's own, for metrics."""
        return {**{f"kernel_{k}": v for k, v in self.fp.counters().items()},
                **{f"path_{k}": v for k, v in vars(self.stats).items()}}

    def per_subscriber(self) -> dict[str, tuple[int, int]]:
        """{subscriber address: (kernel packets, kernel bytes)}."""
        return {str(d.spec.dst): (d.kernel_packets, d.kernel_bytes) for d in self._downs.values()}


