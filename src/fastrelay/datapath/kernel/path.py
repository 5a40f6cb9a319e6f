"""The MoQT relay's kernel data path: bpf/moq_fastpath.bpf.c forwards subgroup streams from
publishers to subscribers; this module keeps every QUIC connection right afterwards.

What the relay core tells it (the `Datapath` hooks of datapath/interface.py): which upstream alias
is which track, which subscription is established or gone, which upstream stream ended. What
it does with that:

- A publisher connection in plaintext mode becomes an upstream entry (its connection ids,
  validated address) with its track aliases; a subscriber connection in plaintext mode whose
  next hop resolves becomes a subscriber slot (addresses, connection id, counters) and joins
  its tracks' kernel sets. A connection that does not qualify stays on the userspace path.
- Kernel recovery (the default; `kernel_recovery`): the connection's 1-RTT loss recovery and
  congestion control run in the kernel (bpf/moq/recovery.h, slot = the connection's slot). The
  egress tracks every packet it builds and the ingress applies the peer's ACK-only packets
  there; what reaches userspace is a SENT record where a kernel stream starts (aioquic opens
  the stream: flow control, STOP_SENDING and resets work on it; the kernel's bytes are
  placeholders in it; where the kernel's part ends is read from its entry when the upstream
  stream ends), a LOST record per lost kernel packet (its bytes are queued in aioquic
  again from the upstream stream's bytes), a TIMER record when the kernel's loss timer fires
  (the timeout then runs in the kernel), and ACK records only while packets aioquic built are
  outstanding. aioquic's own packets are counted in the kernel's window (registered from their
  RENUMBERED records) and aioquic sends within what the kernel's window leaves. Once the
  kernel is done with a stream, its bytes are acknowledged in aioquic, which finishes it.
- Without (`--recovery aioquic`, and always beyond the kernel's recovery slots): each packet
  the kernel sent is registered into aioquic's loss recovery (quic/registration.py) with the
  stream bytes it carried, taken from the upstream stream (whose bytes reach userspace right
  after the clones left), and aioquic's window is published to the kernel as a budget.
- Either way, before any datagram reaches aioquic the ring buffer is drained: each packet
  aioquic sent is re-keyed under the number the egress program gave it, and each stream the
  kernel handed over is continued (flow control or size) or reset (abandoned under
  congestion) from userspace; after input, flow-control credit is published to the kernel.
- Which path sends a subgroup to a subscriber is decided once per (subscriber, upstream
  stream) by the kernel at the stream's first packet; `owns()` tells the relay core, and a
  stream the kernel did not take is claimed for userspace so the kernel never starts it later.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from aioquic.quic.rangeset import RangeSet

from ...kernel import abi
from ...moq.wire import Writer, varint_size
from ...nexthop import NextHopError, Resolver
from ...quic import internals
from ...quic.link import Limits, QuicLink
from ...quic.registration import ExternalSender, SentStreamFrame
from ..interface import Owner
from .maps import ConnSpec, KernelMaps, RecordKind, StreamState, Take
from .recovery import KernelRecovery, PacketFlags, RecoveryError

log = logging.getLogger("fastrelay.kernel_path")

ABANDONED_RESET_CODE = 0x1  # draft-16 data stream reset CANCELLED: the relay gave the subgroup up
MIRROR_GRACE_S = 5.0  # an ended upstream stream's bytes are kept this long for late records
# the kernel keeps an ended upstream stream known as ended this long: a late copy of its start cannot
# come later than the connection's idle timeout (it would have closed without the relay's ACKs)
ENDED_STREAM_GRACE_S = Limits().idle_timeout
SKIP_MARGIN = 64 << 10  # bytes beyond the congestion window before new subgroups are skipped
# with the window in the kernel (exact, no control plane lag), a smaller overshoot: it has no queue,
# so up to this much beyond the window (at least a window) stands in for one
KERNEL_SKIP_MARGIN = 16 << 10


def _skip_below(cwnd: int) -> int:
    """The budget under which the kernel skips new low-priority subgroups: it has sent two
    congestion windows (at least SKIP_MARGIN) beyond the window. A control plane that is late
    reading acknowledgements for a moment does not look like a congested subscriber."""
    return -max(2 * cwnd, SKIP_MARGIN)


def _varint_len(first_byte: int) -> int:
    return 1 << (first_byte >> 6)


def rewrite_alias(head: bytes, alias: int) -> bytes:
    """A subgroup stream's first bytes with the track alias (its second varint) replaced."""
    t = _varint_len(head[0])
    a = _varint_len(head[t])
    return head[:t] + bytes(Writer().varint(alias).buf) + head[t + a:]


@dataclass
class _Mirror:
    """The bytes of one upstream unidirectional stream so far, from its start (kernel-sent
    ranges are registered from it, handed-over streams continued from it)."""

    data: bytearray = field(default_factory=bytearray)
    ended: float | None = None  # when it finished or was reset (monotonic)
    users: int = 0  # pending registrations and continuations that still need it
    reset: bool = False  # the publisher reset it: handed-over copies are reset too

    def end(self) -> None:
        if self.ended is None:
            self.ended = time.monotonic()


@dataclass
class _Pending:
    down: _Down
    pn: int
    sent_time: float
    size: int
    frames: list[tuple[int, int, int, int, int, bool]]  # (down stream, down offset, len, up stream, up offset, fin)
    up: int
    track: int
    missing: tuple[int, int] | None = None  # the upstream stream whose bytes it waits for
    need: int = 0  # how many of that stream's bytes it needs
    counted: bool = False  # in its connection's pending totals


@dataclass
class _Continuation:
    """A stream the kernel handed to userspace: upstream bytes from `next_up` on go by aioquic."""

    down_stream: int
    delta: int
    next_up: int
    fin: bool = False


@dataclass
class _KStream:
    """A stream the kernel started on a connection whose recovery runs in the kernel. aioquic holds
    it (flow control, resets, ranges it re-sends) but not the kernel's bytes: those are placeholders
    until the kernel is done with them (every packet that carried them acknowledged or reported)."""

    up: int
    up_stream: int
    track: int
    delta: int  # downstream offset - upstream offset (the alias re-encoded)
    final: int | None = None  # the stream's size, once the kernel sent its FIN
    last_pn: int = -1  # once >= 0: the kernel sends nothing more on it, its packets are below this + 1
    resent: RangeSet = field(default_factory=RangeSet)  # ranges given to aioquic to send again
    fin_resent: bool = False
    kernel_end: int | None = None  # handed over: the kernel's bytes end here, aioquic's follow


@dataclass(eq=False)
class _Down:
    link: QuicLink
    ext: ExternalSender
    slot: int
    spec: ConnSpec
    tracks: dict[int, object] = field(default_factory=dict)  # kernel track id -> relay Downstream
    aliases: dict[int, int] = field(default_factory=dict)  # kernel track id -> alias
    continuations: dict[tuple[int, int], _Continuation] = field(default_factory=dict)  # (up, up stream)
    claimed: dict[tuple[int, int], Owner] = field(default_factory=dict)  # (up, up stream) -> owns()
    open_streams: dict[int, dict[int, int]] = field(default_factory=dict)  # track -> {down stream: next offset}
    registered: dict[int, RangeSet] = field(default_factory=dict)  # down stream -> byte ranges registered
    upstream_of: dict[int, tuple[int, int]] = field(default_factory=dict)  # down stream -> (up, up stream)
    fins: set[int] = field(default_factory=set)  # down streams whose FIN is registered
    expendable: set[int] = field(default_factory=set)  # kernel streams of low-priority subgroups
    cids: set[bytes] = field(default_factory=set)  # the peer's connection ids known to the kernel
    host_cid: bytes = b""  # the relay's id the kernel absorbs this peer's ACK-only packets on
    published: tuple[int, int] = (-1, -1)
    pending: int = 0  # kernel packets waiting for their upstream bytes before registration
    pending_bytes: int = 0
    pending_stream_bytes: int = 0
    kernel_packets: int = 0
    kernel_bytes: int = 0
    user_packets: int = 0  # packets aioquic sent on the connection (renumbered by the egress)
    user_bytes: int = 0
    acks_absorbed: int = 0  # the peer's ACK-only packets read from kernel records
    kernel_recovery: bool = False  # its 1-RTT loss recovery and congestion control run in the kernel
    kstreams: dict[int, _KStream] = field(default_factory=dict)  # down stream -> (kernel recovery)
    recorded: dict[int, list[tuple[int, int, int, bool]]] = field(default_factory=dict)  # pn -> frames
    resends: list[tuple[int, int, int, bool]] = field(default_factory=list)  # lost ranges waiting for bytes
    credit_given: int = 0  # connection flow-control bytes given to the kernel in all
    credit_charged: int = 0  # of those the kernel used, charged to aioquic's flow control
    hold: int = 0  # the budget adjustment published (negative: low-priority subgroups held back)
    base_seen: int = 0  # the kernel's recovery base at the last look


@dataclass
class _AckBatch:
    """The ACK-only packets of one connection read in one drain, applied as one acknowledgement
    (as if the peer had sent only the one with the largest number)."""

    ranges: RangeSet
    largest: int = -1
    delay: int = 0  # that packet's ACK Delay field
    at: float = 0.0  # and its arrival time


@dataclass
class KernelStats:
    packets: int = 0               # packets the kernel sent to subscribers (its counters)
    bytes: int = 0
    renumbered: int = 0            # aioquic packets renumbered on kernel-path connections
    handovers: int = 0
    abandoned: int = 0
    unmatched: int = 0             # records for a connection no longer known
    register_errors: int = 0       # kernel packets whose stream bytes could not be registered
    shed: int = 0                  # finished low-priority kernel streams reset for a congested subscriber
    connections: int = 0           # subscriber connections on the kernel path now
    refused: int = 0               # connections that stayed on the userspace path
    acks_absorbed: int = 0         # subscribers' ACK-only packets applied from kernel records
    repair_holds: int = 0          # budgets published low so a protected subgroup's repair gets the window
    records: int = 0               # ring-buffer records drained
    lost: int = 0                  # kernel packets reported lost (kernel recovery)
    resent_bytes: int = 0          # their stream bytes queued in aioquic again
    timers: int = 0                # kernel loss-detection timers handled


class KernelDatapath:
    """Runs the kernel data path of one relay listening on UDP `port` on `interfaces` (ifindexes)."""

    TICK_S = 0.05  # records are drained before every input anyway; the timer covers idle connections
    ACK_BATCH_S = 0.002  # how long absorbed ACKs may wait to be applied together
    PUBLISH_STEP = 16 << 10  # budget/credit changes smaller than this are not worth two syscalls
    HOUSEKEEPING_TICKS = 4  # every this many ticks: kernel-recovery connections, mirrors, connection ids

    def __init__(self, port: int, interfaces: list[int], *, protect_priority: int = 0,
                 absorb_acks: bool = True, kernel_recovery: bool = True) -> None:
        self.fp = KernelMaps(port, ingress=interfaces, egress=interfaces)
        # connections whose loss recovery runs in the kernel (needs the kernel to read their ACKs)
        self.recovery = KernelRecovery(self.fp.obj) if kernel_recovery and absorb_acks else None
        self._acked_in_kernel = False
        self.port = port
        self.protect_priority = protect_priority
        self.absorb_acks = absorb_acks
        # pyroute2's synchronous API refuses to run inside an event loop: netlink work goes to
        # a thread of its own (next-hop look-ups take a millisecond or two)
        self._netlink = ThreadPoolExecutor(1, thread_name_prefix="fastrelay-netlink")
        self.resolver = self._netlink.submit(Resolver).result()
        self.stats = KernelStats()
        self._downs: dict[QuicLink, _Down] = {}
        self._slots: dict[int, _Down] = {}
        self._ups: dict[QuicLink, int] = {}
        self._up_cids: dict[int, set[bytes]] = {}
        self._up_links: dict[int, QuicLink] = {}
        self._track_ids: dict[int, int] = {}  # id(relay Track) -> kernel id
        self._track_up: dict[int, int] = {}  # kernel track id -> up
        self._next_track = 0
        self._mirrors: dict[tuple[int, int], _Mirror] = {}
        # (up, up stream) -> heap of (bytes needed, seq, record) waiting for that stream's bytes
        self._waiting: dict[tuple[int, int], list[tuple[int, int, _Pending]]] = {}
        self._seq = itertools.count()
        self._touched: set[_Down] = set()  # connections to transmit on at the end of this drain/input
        self._rearm: set[_Down] = set()  # connections whose recovery changed with nothing new to send: timer only
        self._continuing: set[_Down] = set()  # connections with handed-over streams to continue
        self._timer = None
        self._loop = None
        self._ring_full = 0

    # ---- wiring
    def attach_link(self, link: QuicLink) -> None:
        """Every relay connection drains the kernel's records before its input is processed (this
        path is its LinkObserver)."""
        link.observe(self)

    def start(self, loop) -> None:
        """Drain when the kernel wakes us (an absorbed ACK, a filling ring), and drain and publish
        on a timer too (records of idle connections, timers of aioquic)."""
        ticks = itertools.count()

        def tick() -> None:
            n = next(ticks)
            self.drain()
            # connections whose recovery runs in the kernel need no budget from here: their
            # housekeeping (connection ids, streams the kernel is done with) can wait longer
            every = n % self.HOUSEKEEPING_TICKS == 0
            if every:
                self._gc_mirrors()
            self._publish_all(every)
            if n % 20 == 0:
                self._check_ring()
            self._timer = loop.call_later(self.TICK_S, tick)
        self._timer = loop.call_later(self.TICK_S, tick)
        loop.add_reader(self.fp.fileno(), self._woken)
        self._loop = loop

    def _woken(self) -> None:
        """The kernel woke us (absorbed ACKs): drain ACK_BATCH_S later, so that the ACKs of many
        subscribers arriving meanwhile share one drain, and each connection is looked at once (RTT
        samples use the kernel's arrival times, so the wait does not inflate them)."""
        loop = self._loop
        if loop is None:
            return
        loop.remove_reader(self.fp.fileno())

        def later() -> None:
            try:
                if self._loop is not None:
                    self.drain()
            finally:
                if self._loop is not None:
                    self._loop.add_reader(self.fp.fileno(), self._woken)
        loop.call_later(self.ACK_BATCH_S, later)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._loop is not None:
            self._loop.remove_reader(self.fp.fileno())
            self._loop = None
        for link in list(self._downs):
            self._remove_down(link)
        for up in list(self._up_links):
            self.fp.remove_upstream(up)
        self._netlink.submit(self.resolver.close).result()
        self._netlink.shutdown()
        if self.recovery is not None:
            self.recovery.close()
        self.fp.close()

    # ---- relay core hooks (datapath/interface.py Datapath)
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
            self._up_cids[up] = cids
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
        """A subscription ended or paused: the kernel stops, and streams it left unfinished are
        reset (once the bytes it sent on them are registered)."""
        down = self._downs.get(ds.peer.session.transport)
        tid = self._track_ids.get(id(ds.track))
        if down is None or tid is None or down.tracks.get(tid) is not ds:
            return
        self.fp.unsubscribe(down.slot, tid)
        del down.tracks[tid]
        unfinished = down.open_streams.pop(tid, {})
        for sid in unfinished:  # a clone already on its way must not add to a stream being reset
            if sid in down.upstream_of:
                self.fp.stop_stream(down.slot, *down.upstream_of[sid])
        self.drain()
        if down.kernel_recovery:
            last = self.fp.state(down.slot).next_pn - 1
            for sid in list(unfinished):
                ks = down.kstreams.get(sid)
                if ks is None:
                    continue
                entry = self.fp.dstream(down.slot, ks.up, ks.up_stream)
                if entry is not None and entry.fin:
                    del unfinished[sid]  # complete: delivered, not reset
                    continue
                ks.last_pn = last
                if entry is not None and internals.is_stream_open(down.link.quic, sid):
                    # the reset's final size must cover every byte the kernel sent
                    internals.placeholder_stream_data(down.link.quic, sid, entry.sent_end)
        if unfinished and not down.link.closed.done():
            self._register_for_reset(down, set(unfinished))
            for sid in unfinished:
                down.link.reset(sid, ABANDONED_RESET_CODE)

    def peer_gone(self, peer) -> None:
        link = peer.session.transport
        if link in self._downs:
            self._remove_down(link)
        up = self._ups.pop(link, None)
        if up is not None:
            self._up_links.pop(up, None)
            self._up_cids.pop(up, None)
            self.fp.remove_upstream(up)
            for tid in [t for t, u in self._track_up.items() if u == up]:  # its tracks are over
                del self._track_up[tid]
                for key in [k for k, t in self._track_ids.items() if t == tid]:
                    del self._track_ids[key]
            for key in [k for k in self._mirrors if k[0] == up]:
                self._mirrors[key].end()
            self._gc_mirrors()

    def stream_ended(self, peer, stream_id: int, reset: bool = False) -> None:
        up = self._ups.get(peer.session.transport)
        if up is None:
            return
        for down in self._downs.values():
            if down.kernel_recovery:
                self._kernel_stream_over(down, up, stream_id)
        self.fp.stream_ended(up, stream_id)  # (its per-subscriber entries go)
        for down in self._downs.values():
            down.claimed.pop((up, stream_id), None)
        mirror = self._mirrors.get((up, stream_id))
        if mirror is not None:
            mirror.reset = mirror.reset or reset
            mirror.end()
            self._gc_mirrors()

    def owns(self, ds, peer, stream_id: int) -> Owner:
        """Whether the kernel delivers upstream stream `stream_id` of `peer` to subscription `ds`
        (DATAPATH), dropped it whole under congestion (DROPPED), or leaves it to the relay
        (RELAY); the kernel decided at the stream's first packet."""
        down = self._downs.get(ds.peer.session.transport)
        up = self._ups.get(peer.session.transport)
        if down is None or up is None:
            return Owner.RELAY
        key = (up, stream_id)
        if key in down.claimed:
            return down.claimed[key]
        st = self.fp.claim_for_userspace(down.slot, up, stream_id)
        if st.state == StreamState.SKIPPED:
            owner = Owner.DROPPED
        elif st.state in (StreamState.FORWARD, StreamState.ABANDONED) or key in down.continuations:
            owner = Owner.DATAPATH
        else:
            owner = Owner.RELAY
        down.claimed[key] = owner
        return owner

    def owns_datagrams(self, ds) -> bool:
        down = self._downs.get(ds.peer.session.transport)
        tid = self._track_ids.get(id(ds.track))
        return down is not None and tid in down.tracks

    def upstream_data(self, link: QuicLink, stream_id: int, data: bytes, fin: bool) -> None:
        """Raw bytes of an upstream stream, in order, as aioquic delivered them. Every
        unidirectional (subgroup) stream of a kernel-path publisher is kept from its start: the
        records of the packets the kernel cloned from it may be drained later than its bytes
        arrive (a record can wait behind one the other CPU is still writing)."""
        up = self._ups.get(link)
        if up is None or not stream_id & 2:
            return
        mirror = self._mirrors.get((up, stream_id))
        if mirror is None:
            mirror = self._mirrors[(up, stream_id)] = _Mirror()
        mirror.data += data
        if fin:
            mirror.end()
        heap = self._waiting.get((up, stream_id))
        while heap and heap[0][0] <= len(mirror.data):
            self._try_register(heapq.heappop(heap)[2])
        if heap is not None and not heap:
            self._waiting.pop((up, stream_id), None)

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
            hop = self._netlink.submit(self.resolver.resolve, peer[0]).result()
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
                        protect_priority=self.protect_priority,
                        skip_below=_skip_below(internals.congestion_window(quic)), absorb_acks=self.absorb_acks)
        slot = self.fp.add_conn(spec, next_pn=ext.first_packet_number,
                                next_stream=quic.get_next_available_stream_id(is_unidirectional=True),
                                budget=ext.budget(), credit=credit)
        down = _Down(link, ext, slot, spec)
        ext.allocation_probe = lambda: self.fp.state(slot).next_pn
        if self.recovery is not None and slot < abi.FR_MOQ_MAX_RECOVERY_CONNS:
            self._start_kernel_recovery(down, credit)
        self._downs[link] = down
        self._slots[slot] = down
        self._refresh_cids(down)
        self.stats.connections += 1
        log.info("subscriber %s on the kernel path (slot %d)", peer, slot)
        return down

    def _start_kernel_recovery(self, down: _Down, credit: int) -> None:
        """Hand the connection's 1-RTT loss recovery and congestion control to the kernel: from its
        first kernel number on, the kernel tracks every packet; aioquic keeps only its own."""
        quic = down.link.quic
        srtt = internals.smoothed_rtt(quic)
        self.recovery.init(down.slot, gen=self.fp.generation(down.slot), first_pn=down.ext.first_packet_number,
                           max_datagram_size=internals.max_datagram_size(quic),
                           max_ack_delay_ns=int(internals.max_ack_delay(quic) * 1e9),
                           initial_rtt_ns=int((srtt or 0.1) * 1e9),
                           ack_delay_exponent=internals.remote_ack_delay_exponent(quic))
        st = self.fp.state(down.slot)
        self.fp.take(down.slot, Take.BUDGET, -st.budget)  # the budget is now an adjustment of the kernel's window
        down.kernel_recovery = True
        down.credit_given = credit
        down.ext.hold_unregistered = False
        down.ext.ack_listener = lambda ranges, delay, now: self._ack_to_kernel(down, ranges, delay, now)
        mds = internals.max_datagram_size(quic)
        down.spec = replace(down.spec, recovery=True, skip_below=-4 * mds)
        self.fp.update_conn(down.slot, down.spec)

    def allocate_uni_stream(self, link: QuicLink) -> int | None:
        """LinkObserver: a kernel-path subscriber connection takes its unidirectional stream ids
        from the counter it shares with the kernel; any other connection leaves them to aioquic."""
        down = self._downs.get(link)
        return None if down is None else self._take_stream(down)

    def _take_stream(self, down: _Down) -> int:
        """A unidirectional stream id for userspace on a kernel-path connection (shared counter)."""
        sid = self.fp.take(down.slot, Take.STREAM, 1)
        down.ext.open_stream(sid)
        return sid

    def _remove_down(self, link: QuicLink) -> None:
        down = self._downs.pop(link)
        log.info("subscriber %s:%d left the kernel path: %d packets (%d bytes) sent by the kernel, %d by userspace"
                 " (%d bytes); %d of its ACK-only packets read by the kernel", *down.spec.dst, down.kernel_packets,
                 down.kernel_bytes, down.user_packets, down.user_bytes, down.acks_absorbed)
        self._slots.pop(down.slot, None)
        self.fp.remove_conn(down.slot)
        if down.kernel_recovery:
            self.recovery.forget(down.slot)
            for ks in down.kstreams.values():
                self._release_mirror(ks)
            down.kstreams.clear()
        for key, waiters in list(self._waiting.items()):
            self._waiting[key] = [w for w in waiters if w[2].down is not down]
            heapq.heapify(self._waiting[key])
        self._touched.discard(down)
        self._rearm.discard(down)
        self._continuing.discard(down)
        self.stats.connections -= 1

    # ---- records
    def drain(self) -> None:
        """Apply every record the kernel wrote (called before any datagram is processed)."""
        acks: dict[_Down, _AckBatch] = {}
        again = False  # a timer handled: its LOST records follow
        while True:
            records = self.fp.drain()
            self.stats.records += len(records)
            for rec in records:
                down = self._slots.get(rec.slot)
                if down is None or down.spec is None:
                    self.stats.unmatched += 1
                    continue
                kind = rec.kind
                if kind == RecordKind.ACK:
                    self._absorbed(down, rec, acks)
                elif kind == RecordKind.SENT:
                    if down.kernel_recovery:
                        self._kernel_sent(down, rec)
                    else:
                        self._sent(down, rec)
                elif kind == RecordKind.RENUMBERED:
                    local = down.ext.awaiting(rec.local_pn)
                    if local is None:
                        self.stats.unmatched += 1
                        continue
                    packet = down.ext.renumber(local, rec.pn)
                    down.user_packets += 1
                    down.user_bytes += rec.bytes
                    self.stats.renumbered += 1
                    if down.kernel_recovery and (packet.in_flight or packet.is_ack_eliciting):
                        self._user_sent(down, rec, packet)
                elif kind == RecordKind.HANDOVER:
                    self._handover(down, rec)
                elif kind == RecordKind.LOST:
                    self._lost(down, rec)
                elif kind == RecordKind.TIMER:
                    self._timer_fired(down)
                    again = True
            if len(records) < KernelMaps.RING_BUDGET and not again:
                break
            again = False
        for down, batch in acks.items():
            lost = down.ext.packets_lost
            down.ext.acknowledge(batch.ranges, internals.ack_delay_seconds(down.link.quic, batch.delay), batch.at)
            self._after_change(down, lost)
        self._flush()
        for down in acks:
            if down.link in self._downs:
                self._publish(down)

    def _absorbed(self, down: _Down, rec: abi.MoqAck, acks: dict[_Down, _AckBatch]) -> None:
        """An ACK-only packet of the subscriber, read by the kernel: the packet counts as received,
        its ACK ranges join this drain's acknowledgement of the connection."""
        at = rec.time_ns / 1e9
        if not internals.note_received(down.link.quic, rec.pn, at):
            return  # a duplicate
        down.acks_absorbed += 1
        self.stats.acks_absorbed += 1
        batch = acks.setdefault(down, _AckBatch(RangeSet()))
        for r in rec.ranges[:rec.nranges]:
            batch.ranges.add(r.smallest, r.largest + 1)
        if rec.largest >= batch.largest:
            batch.largest, batch.delay, batch.at = rec.largest, rec.ack_delay, at

    def before_input(self, link: QuicLink) -> None:
        """LinkObserver: before a datagram reaches aioquic: every record applied (an ACK in it for a number the
        kernel handed out whose packet is not registered yet is held: the allocation probe)."""
        self.drain()

    def _sent(self, down: _Down, rec: abi.MoqSent) -> None:
        n = rec.nframes
        if n == 0:
            return  # a number the kernel spent without sending: nothing to register
        up, track = rec.up, rec.track
        frames = []
        for f in rec.frames[:n]:
            if f.datagram:
                continue
            sid, off, up_stream, up_off, length, fin = f.stream, f.offset, f.up_stream, f.up_offset, f.len, f.fin
            if sid not in down.registered:  # its first record (a retransmitted start comes again)
                try:
                    down.ext.open_stream(sid)
                except ValueError:
                    continue  # a late duplicate for a stream that is over and forgotten
                down.registered[sid] = RangeSet()
                down.upstream_of[sid] = (up, up_stream)
                entry = self.fp.dstream(down.slot, up, up_stream)
                if entry is not None and entry.priority > self.protect_priority:
                    down.expendable.add(sid)
                ds = down.tracks.get(track)
                if ds is not None:
                    ds.streams += 1
            opened = down.open_streams.setdefault(track, {})
            if fin:
                opened.pop(sid, None)
            else:
                opened[sid] = max(opened.get(sid, 0), off + length)
            mirror = self._mirrors.setdefault((up, up_stream), _Mirror())
            mirror.users += 1
            frames.append((sid, off, length, up_stream, up_off, bool(fin)))
        down.kernel_packets += 1
        down.kernel_bytes += rec.bytes
        self._try_register(_Pending(down, rec.pn, rec.time_ns / 1e9, rec.bytes, frames, up, track))

    def _handover(self, down: _Down, rec: abi.MoqHandover) -> None:
        sid, up_stream, up_off, up = rec.stream, rec.up_stream, rec.up_offset, rec.up
        self.stats.handovers += 1
        if rec.state == StreamState.ABANDONED:
            self.stats.abandoned += 1
            ds = down.tracks.get(rec.track)
            if ds is not None:
                ds.dropped += 1
            down.continuations[(up, up_stream)] = _Continuation(sid, 0, -1)
        else:
            ds_entry = self.fp.dstream(down.slot, up, up_stream)
            delta = ds_entry.delta if ds_entry is not None else 0
            down.continuations[(up, up_stream)] = _Continuation(sid, delta, up_off)
        if down.kernel_recovery and internals.is_stream_open(down.link.quic, sid):
            # aioquic goes on from there, or resets it with a final size covering what the kernel sent
            internals.placeholder_stream_data(down.link.quic, sid, rec.offset)
        ks = down.kstreams.get(sid)
        if ks is not None:
            ks.kernel_end = rec.offset
            ks.last_pn = self.fp.state(down.slot).next_pn - 1
        self._continuing.add(down)
        self._mirrors.setdefault((up, up_stream), _Mirror()).users += 1

    def _try_register(self, p: _Pending) -> None:
        """Register a kernel packet now if userspace has its stream bytes, else when they come
        (the upstream datagram it was cloned from is read right after its record, unless the
        relay is behind)."""
        frames = self._frames_of(p)
        if frames is None:
            self._wait(p)
            return
        self._unwait(p)
        lost = p.down.ext.packets_lost
        self._register(p, frames)  # (an ACK held for it is applied now)
        self._after_change(p.down, lost)

    def _after_change(self, down: _Down, lost: int) -> None:
        """A registration or an acknowledgement changed the connection's recovery state: aioquic's
        full transmit() (building packets) runs at the end of this drain only if something may have
        become sendable (losses queued bytes again, or the window or pacer held back what aioquic
        had); otherwise only its timer is moved."""
        link = down.link
        if down.ext.packets_lost != lost or link.send_limited or internals.has_unsent(link.quic):
            self._touched.add(down)
        else:
            self._rearm.add(down)

    def _wait(self, p: _Pending) -> None:
        if not p.counted:
            p.counted = True
            p.down.pending += 1
            p.down.pending_bytes += p.size
            p.down.pending_stream_bytes += sum(f[2] for f in p.frames)
        heapq.heappush(self._waiting.setdefault(p.missing, []), (p.need, next(self._seq), p))

    def _unwait(self, p: _Pending) -> None:
        if p.counted:
            p.counted = False
            p.down.pending -= 1
            p.down.pending_bytes -= p.size
            p.down.pending_stream_bytes -= sum(f[2] for f in p.frames)

    def _flush(self) -> None:
        """Continue handed-over streams, send what registrations released."""
        for down in list(self._continuing):
            if self._continue(down):
                self._touched.add(down)
            if not down.continuations or down.link not in self._downs:
                self._continuing.discard(down)
        touched, self._touched = self._touched, set()
        rearm, self._rearm = self._rearm - touched, set()
        for down in touched:
            down.link.transmit()
        for down in rearm:
            down.link.rearm_timer()

    def _register(self, p: _Pending, frames: list[SentStreamFrame]) -> None:
        """Register one kernel packet. Bytes it carried a second time (the publisher re-sent
        them upstream and the kernel forwarded them again) are registered once."""
        fresh = []
        quic = p.down.link.quic
        for f in frames:
            if not internals.is_stream_open(quic, f.stream_id):
                continue  # complete and discarded: these bytes were a late duplicate
            done = p.down.registered.setdefault(f.stream_id, RangeSet())
            end = f.offset + len(f.data)
            new = RangeSet([range(f.offset, end)]) if f.data else RangeSet()
            for r in done:
                new.subtract(r.start, r.stop)
            fin = f.fin and f.stream_id not in p.down.fins
            for r in new:
                fresh.append(SentStreamFrame(f.stream_id, r.start, f.data[r.start - f.offset:r.stop - f.offset],
                                             fin and r.stop == end))
            if fin and not (len(new) and new.bounds().stop == end):
                fresh.append(SentStreamFrame(f.stream_id, end, b"", True))
            if f.data:
                done.add(f.offset, end)
            if f.fin:
                p.down.fins.add(f.stream_id)
        try:
            p.down.ext.register(p.pn, p.sent_time, p.size, fresh)
        except ValueError as exc:
            self.stats.register_errors += 1
            log.warning("kernel packet %d to %s:%d registered without its stream bytes: %s", p.pn, *p.down.spec.dst,
                        exc)
            with contextlib.suppress(ValueError):
                p.down.ext.register(p.pn, p.sent_time, p.size, [])
        for _, _, _, up_stream, _, _ in p.frames:
            mirror = self._mirrors.get((p.up, up_stream))
            if mirror is not None:
                mirror.users -= 1

    def _register_for_reset(self, down: _Down, streams: set[int]) -> None:
        """Register the kernel's packets on streams about to be reset even if their bytes never
        reached userspace (the publisher went away): placeholders, never re-sent once reset."""
        for key, waiters in list(self._waiting.items()):
            mine = [w[2] for w in waiters if w[2].down is down and any(f[0] in streams for f in w[2].frames)]
            if not mine:
                continue
            taken = {id(p) for p in mine}
            self._waiting[key] = [w for w in waiters if id(w[2]) not in taken]
            heapq.heapify(self._waiting[key])
            for p in mine:
                self._unwait(p)
                self._register(p, self._frames_of(p) or [SentStreamFrame(sid, off, bytes(length), fin)
                                                         for sid, off, length, _, _, fin in p.frames])
        self._gc_mirrors()

    def _frames_of(self, p: _Pending) -> list[SentStreamFrame] | None:
        out = []
        for sid, off, length, up_stream, up_off, fin in p.frames:
            mirror = self._mirrors.get((p.up, up_stream))
            p.missing = (p.up, up_stream)
            have = len(mirror.data) if mirror is not None else 0
            if up_off == 0:
                # the header frame: the subscriber's alias, so the length differs by the alias change
                if have < 2 or have < _varint_len(mirror.data[0]) + 1:
                    p.need = 2 if have < 2 else _varint_len(mirror.data[0]) + 1
                    return None
                t = _varint_len(mirror.data[0])
                alias = p.down.aliases.get(p.track, 0)
                p.need = length - (varint_size(alias) - _varint_len(mirror.data[t]))
                if have < p.need:
                    return None
                data = rewrite_alias(bytes(mirror.data[:p.need]), alias)
            else:
                p.need = up_off + length
                if have < p.need:
                    return None
                data = bytes(mirror.data[up_off:p.need])
            out.append(SentStreamFrame(sid, off, data, fin))
        p.missing = None
        return out

    def _continue(self, down: _Down) -> bool:
        """Send what upstream has of handed-over streams; True if anything was written."""
        wrote = False
        for key, c in list(down.continuations.items()):
            if down.pending:
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
            if mirror.reset:
                c.next_up = -1  # reset downstream too, next round (after pending registrations)
                continue
            ended = mirror.ended is not None
            if len(mirror.data) > c.next_up:
                down.link.send(c.down_stream, bytes(mirror.data[c.next_up:]), fin=ended)
                c.next_up = len(mirror.data)
                wrote = True
            elif ended and not c.fin:
                down.link.send(c.down_stream, b"", fin=True)
                wrote = True
            if ended:
                c.fin = True
                del down.continuations[key]
                mirror.users -= 1
        return wrote

    def _gc_mirrors(self) -> None:
        """Forget streams that ended a while ago and that nothing waits for."""
        old = time.monotonic() - MIRROR_GRACE_S
        for key in [k for k, m in self._mirrors.items() if m.ended is not None and m.ended < old and m.users <= 0]:
            del self._mirrors[key]
        self.fp.forget_ended(time.monotonic() - ENDED_STREAM_GRACE_S)

    # ---- kernel recovery (the connection's loss recovery runs in the kernel)
    def _kernel_sent(self, down: _Down, rec: abi.MoqSent) -> None:
        """A kernel packet that starts or ends a stream, or carries more frames than the kernel keeps
        per packet: the streams' bookkeeping (the packet itself is the kernel's to track)."""
        up, track = rec.up, rec.track
        kept = []
        for f in rec.frames[:rec.nframes]:
            if f.datagram:
                continue
            sid, off, length, fin = f.stream, f.offset, f.len, bool(f.fin)
            kept.append((sid, off, length, fin))
            ks = down.kstreams.get(sid)
            if ks is None:
                if off != 0 or sid in down.upstream_of:
                    continue  # a stream already over for the kernel
                try:
                    down.ext.open_stream(sid)  # aioquic knows it: flow control, STOP_SENDING, resets
                except ValueError:
                    continue
                entry = self.fp.dstream(down.slot, up, f.up_stream)
                ks = down.kstreams[sid] = _KStream(up, f.up_stream, track, entry.delta if entry is not None else 0)
                down.upstream_of[sid] = (up, f.up_stream)
                if entry is not None and entry.priority > self.protect_priority:
                    down.expendable.add(sid)
                ds = down.tracks.get(track)
                if ds is not None:
                    ds.streams += 1
                self._mirrors.setdefault((up, f.up_stream), _Mirror()).users += 1
            opened = down.open_streams.setdefault(track, {})
            if fin:
                opened.pop(sid, None)
                ks.final = ks.kernel_end = off + length
                ks.last_pn = rec.pn
            else:
                opened[sid] = max(opened.get(sid, 0), off + length)
        if rec.nframes > abi.FR_MOQ_PKT_FRAMES:
            down.recorded[rec.pn] = kept

    def _kernel_stream_over(self, down: _Down, up: int, up_stream: int) -> None:
        """The upstream stream ended: the kernel sends nothing more of it to `down`. What it sent
        (and whether it sent the FIN) is read from its entry before the entry goes; every packet
        it sent on it has a number below the counter read afterwards."""
        for sid, ks in down.kstreams.items():
            if (ks.up, ks.up_stream) != (up, up_stream) or ks.last_pn >= 0:
                continue
            entry = self.fp.dstream(down.slot, up, up_stream)
            if entry is not None and entry.state == StreamState.FORWARD:
                ks.kernel_end = entry.sent_end
                if entry.fin:
                    ks.final = entry.sent_end
                    down.open_streams.get(ks.track, {}).pop(sid, None)
            ks.last_pn = self.fp.state(down.slot).next_pn - 1

    def _user_sent(self, down: _Down, rec: abi.MoqRenumbered, packet) -> None:
        """A packet aioquic built left as rec.pn: the kernel counts it in the window and in loss
        detection (aioquic keeps its frames and hears of its fate through the ACKs it gets)."""
        flags = ((PacketFlags.ACK_ELICITING if packet.is_ack_eliciting else 0)
                 | (PacketFlags.IN_FLIGHT if packet.in_flight else 0))
        try:
            self.recovery.sent(down.slot, rec.pn, rec.time_ns, rec.bytes, PacketFlags(flags))
        except RecoveryError as exc:
            log.debug("packet %d of %s:%d not counted by the kernel: %s", rec.pn, *down.spec.dst, exc)

    def _ack_to_kernel(self, down: _Down, ranges: RangeSet, ack_delay: float, now: float) -> None:
        """An ACK frame aioquic parsed (a packet of the peer that went up): the kernel applies it too."""
        if down.link not in self._downs:
            return
        highest_first = [(r.start, r.stop - 1) for r in reversed(list(ranges))][:abi.FR_MOQ_MAX_ACK_RANGES]
        try:
            self.recovery.ack(down.slot, highest_first, int(ack_delay * 1e9), int(now * 1e9))
        except RecoveryError as exc:
            log.debug("ACK of %s:%d not applied by the kernel: %s", *down.spec.dst, exc)
        self._acked_in_kernel = True

    def _timer_fired(self, down: _Down) -> None:
        """The connection's loss detection timer fired in the kernel: its losses and probes come
        back as LOST records."""
        try:
            self.recovery.expire(down.slot, time.monotonic_ns())
        except RecoveryError as exc:
            log.debug("timer of %s:%d: %s", *down.spec.dst, exc)
        self.stats.timers += 1

    def _lost(self, down: _Down, rec: abi.MoqLost) -> None:
        """A kernel packet was lost (or given up for a probe): its stream bytes go again, by aioquic."""
        if not down.kernel_recovery:
            return
        self.stats.lost += 1
        if rec.flags & 2:  # FR_MOQ_LOST_RECORDED: the frames came in its SENT record
            frames = down.recorded.pop(rec.pn, [])
        else:
            frames = [(f.stream, f.offset, f.len, bool(f.fin)) for f in rec.frames[:rec.nframes]]
        for frame in frames:
            if not self._resend(down, *frame):
                down.resends.append(frame)

    def _resend(self, down: _Down, sid: int, off: int, length: int, fin: bool) -> bool:
        """Queue a lost range of a kernel stream in aioquic from the upstream bytes; False if those
        bytes have not reached the relay yet (try again later)."""
        ks = down.kstreams.get(sid)
        quic = down.link.quic
        if ks is None or not internals.is_stream_open(quic, sid):
            return True  # reset or forgotten: nothing to repair
        mirror = self._mirrors.get((ks.up, ks.up_stream))
        if mirror is None:
            return True
        if off == 0:
            up_len = length - ks.delta
            if len(mirror.data) < max(up_len, 2):
                return False
            data = rewrite_alias(bytes(mirror.data[:up_len]), down.aliases.get(ks.track, 0))
        else:
            start = off - ks.delta
            if len(mirror.data) < start + length:
                return False
            data = bytes(mirror.data[start:start + length])
        if len(data) != length:
            log.warning("lost range %d+%d of stream %d to %s:%d does not match its upstream bytes", off, length, sid,
                        *down.spec.dst)
            return True
        if internals.resend_stream_data(quic, sid, off, data, fin):
            if length:
                ks.resent.add(off, off + length)
            ks.fin_resent = ks.fin_resent or fin
            self.stats.resent_bytes += length
            self._touched.add(down)
        return True

    def _resolve(self, down: _Down) -> None:
        """Streams the kernel is done with (it sends nothing more on them, and every packet that
        carried them was acknowledged or reported lost) become aioquic's alone: the kernel's bytes
        are acknowledged in aioquic, which finishes the stream once its own re-sent ranges are."""
        if down.resends:
            waiting, down.resends = down.resends, []
            down.resends = [r for r in waiting if not self._resend(down, *r)]
        state = self.recovery.state(down.slot)
        # the base read last time: the LOST records of every packet below it are applied by now
        base, down.base_seen = down.base_seen, state.base
        st = self.fp.state(down.slot)
        down.kernel_packets, down.kernel_bytes = st.packets, st.bytes
        for pn in [pn for pn in down.recorded if pn < base]:
            del down.recorded[pn]
        quic = down.link.quic
        for sid, ks in list(down.kstreams.items()):
            if ks.last_pn < 0:
                continue  # the kernel may still send on it (stream_ended, a handover or a reset ends that)
            if ks.last_pn >= base or any(r[0] == sid for r in down.resends):
                continue
            if internals.is_stream_open(quic, sid) and ks.kernel_end is not None:
                delivered = RangeSet([range(0, ks.kernel_end)]) if ks.kernel_end else RangeSet()
                for r in ks.resent:
                    delivered.subtract(r.start, r.stop)
                internals.acknowledge_stream_data(quic, sid, delivered, None if ks.fin_resent else ks.final)
            self._release_mirror(ks)
            del down.kstreams[sid]
            down.upstream_of.pop(sid, None)
            down.expendable.discard(sid)

    def _release_mirror(self, ks: _KStream) -> None:
        mirror = self._mirrors.get((ks.up, ks.up_stream))
        if mirror is not None:
            mirror.users -= 1

    def _publish_kernel(self, down: _Down) -> None:
        """Flow control and window on a kernel-recovery connection: the stream bytes the kernel used
        are charged to aioquic's connection flow control, the kernel gets what the peer's MAX_DATA
        leaves; aioquic's own packets keep within the window the kernel computes."""
        quic = down.link.quic
        st = self.fp.state(down.slot)
        used = down.credit_given - st.credit
        if used > down.credit_charged:
            internals.charge_connection_data(quic, used - down.credit_charged)
            down.credit_charged = used
        credit, max_uni = down.ext.flow_credit()
        if credit != st.credit and (abs(credit - st.credit) >= self.PUBLISH_STEP or credit < self.PUBLISH_STEP):
            self.fp.take(down.slot, Take.CREDIT, credit - st.credit)
            down.credit_given += credit - st.credit
        rs = self.recovery.state(down.slot)
        mds = internals.max_datagram_size(quic)
        kernel_in_flight = max(0, rs.bytes_in_flight - internals.bytes_in_flight(quic))
        internals.set_congestion_window(quic, max(rs.cwnd - kernel_in_flight, 2 * mds))
        # a protected subgroup's repair waits in aioquic while the window is full: hold back the rest
        hold = -(1 << 40) if rs.bytes_in_flight >= rs.cwnd and self._repair_waiting(down) else 0
        if hold != down.hold:
            self.fp.take(down.slot, Take.BUDGET, hold - down.hold)
            down.hold = hold
            self.stats.repair_holds += hold < 0
        skip = -max(2 * rs.cwnd, KERNEL_SKIP_MARGIN)
        if 4 * max_uni + 3 != down.spec.max_stream or abs(skip - down.spec.skip_below) > -skip // 4:
            down.spec = replace(down.spec, max_stream=4 * max_uni + 3, skip_below=skip)
            self.fp.update_conn(down.slot, down.spec)

    # ---- budgets
    def after_input(self, link: QuicLink) -> None:
        """LinkObserver: after a datagram, continue and send what it released, publish budgets."""
        if self._acked_in_kernel:
            self._acked_in_kernel = False
            self.drain()  # the losses an ACK frame it carried revealed
        self._flush()
        down = self._downs.get(link)
        if down is not None:
            if internals.is_closing(link.quic):
                self._remove_down(link)  # a closed connection gets nothing more (RFC 9000 10.2)
            else:
                self._publish(down)

    def _publish_all(self, every: bool = True) -> None:
        """Publish budgets and credit, follow connection ids, forget what is over; `every`: the
        kernel-recovery connections and the publishers too (else only the others)."""
        for link, up in self._ups.items() if every else ():
            cids = internals.host_cids(link.quic)
            if cids != self._up_cids.get(up):
                self.fp.upstream_cids(up, cids)
                self._up_cids[up] = cids
        for down in list(self._downs.values()):
            if down.kernel_recovery and not every:
                continue
            if internals.is_closing(down.link.quic):
                self._remove_down(down.link)
                continue
            self._refresh_cids(down)
            self._publish(down)
            if down.kernel_recovery:
                self._resolve(down)
            for sid in [sid for sid in down.fins if not internals.is_stream_open(down.link.quic, sid)]:
                down.fins.discard(sid)  # delivered and discarded by aioquic: forget it
                down.registered.pop(sid, None)
                down.upstream_of.pop(sid, None)
                down.expendable.discard(sid)

    def _publish(self, down: _Down) -> None:
        """Tell the kernel how much this connection's congestion window and the peer's flow
        control leave (minus what the kernel sent that is not registered yet)."""
        if down.link.closed.done():
            return
        if down.kernel_recovery:
            self._publish_kernel(down)
            return
        budget = internals.congestion_budget(down.link.quic) - down.pending_bytes  # negative: overshoot
        if budget <= 0 and self._repair_waiting(down):
            # aioquic holds lost bytes of a protected subgroup it cannot re-send while the kernel
            # fills the window: low-priority subgroups yield until the repair is out
            budget = min(budget, down.spec.skip_below - 1)
            self.stats.repair_holds += 1
        credit, max_uni = down.ext.flow_credit()
        credit -= down.pending_stream_bytes
        last_budget, last_credit = down.published
        if (abs(budget - last_budget) >= self.PUBLISH_STEP or abs(credit - last_credit) >= self.PUBLISH_STEP
                or (budget < 0) != (last_budget < 0)):
            st = self.fp.state(down.slot)
            if budget != st.budget:
                self.fp.take(down.slot, Take.BUDGET, budget - st.budget)
            if credit != st.credit:
                self.fp.take(down.slot, Take.CREDIT, credit - st.credit)
            down.published = (budget, credit)
        if budget < down.spec.skip_below:
            self._shed(down)
        skip = _skip_below(internals.congestion_window(down.link.quic))
        if 4 * max_uni + 3 != down.spec.max_stream or abs(skip - down.spec.skip_below) > -skip // 4:
            down.spec = replace(down.spec, max_stream=4 * max_uni + 3, skip_below=skip)
            self.fp.update_conn(down.slot, down.spec)

    def _repair_waiting(self, down: _Down) -> bool:
        """A protected kernel stream (not expendable) has bytes aioquic must re-send."""
        quic = down.link.quic
        return any(sid not in down.expendable and internals.stream_data_waiting(quic, sid)
                   for sid in down.registered)

    def _refresh_cids(self, down: _Down) -> None:
        """Follow the peer's connection ids: every one the relay may use is renumbered by the
        egress, and kernel-built packets carry the current one."""
        quic = down.link.quic
        cids = {c for c in internals.peer_cids(quic) if len(c) == abi.FR_MOQ_CID_LEN}
        if cids != down.cids:
            self.fp.peer_cids(down.slot, cids)
            down.cids = cids
        current = internals.peer_cid(quic)
        if current != down.spec.dcid and current in cids:
            down.spec = replace(down.spec, dcid=current)
            self.fp.update_conn(down.slot, down.spec)
        host = internals.host_cid(quic)
        if host != down.host_cid and len(host) == abi.FR_MOQ_CID_LEN:
            self.fp.host_cid(down.slot, host)
            down.host_cid = host

    def _shed(self, down: _Down) -> None:
        """A congested subscriber: reset the low-priority subgroups the kernel has finished
        sending but the subscriber has not acknowledged yet, so their retransmissions stop
        holding back what matters (the kernel itself abandons those it is still sending)."""
        quic = down.link.quic
        for sid in [sid for sid in down.expendable if sid in down.fins]:
            down.expendable.discard(sid)
            if internals.is_stream_open(quic, sid) and not internals.stream_acked(quic, sid):
                down.link.reset(sid, ABANDONED_RESET_CODE)
                self.stats.shed += 1

    def _check_ring(self) -> None:
        """One error line when the kernel could not write records (the relay fell far behind): a
        packet without its record was not sent, so its stream may stall at that hole."""
        full = self.fp.counters().get("ringbuf_full", 0)
        if full > self._ring_full:
            log.error("kernel ring buffer was full %d times: kernel packets were dropped unsent, their streams may"
                      " stall (the relay is too slow for this load)", full - self._ring_full)
            self._ring_full = full

    def counters(self) -> dict[str, int]:
        """Kernel counters and this path's own, for metrics."""
        kernel = self.fp.counters()
        self.stats.packets, self.stats.bytes = kernel.get("sent", 0), kernel.get("sent_bytes", 0)
        return {**{f"kernel_{k}": v for k, v in kernel.items()},
                **{f"path_{k}": v for k, v in vars(self.stats).items()}}

    def per_subscriber(self) -> dict[str, tuple[int, int, int, int]]:
        """{subscriber address: (packets and bytes the kernel sent, packets and bytes userspace sent)}."""
        return {f"{d.spec.dst[0]}:{d.spec.dst[1]}": (d.kernel_packets, d.kernel_bytes, d.user_packets, d.user_bytes)
                for d in self._downs.values()}


