"""The in-kernel loss recovery (fr_moq_recover, bpf/moq/recovery.h) against aioquic's.

Both are driven with the same events (packets sent, ACKs with reordering, gaps and ACK delays,
loss bursts, blackouts that fire PTOs and end in persistent congestion, loss timers) and must
agree after every one: the same packets acknowledged, the same declared lost (or expired by a
PTO), the same bytes in flight and outstanding packets, a smoothed RTT within 1 % and a
window within 5 %. Times are whole nanoseconds with odd offsets, so that no loss or HyStart
decision sits within the few nanoseconds where the kernel's integer arithmetic and aioquic's
floats round differently.
"""

from __future__ import annotations

import heapq
import random

import pytest
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicSentPacket
from aioquic.quic.rangeset import RangeSet
from aioquic.quic.recovery import QuicPacketRecovery, QuicPacketSpace
from aioquic.tls import Epoch

from fastrelay.datapath.kernel.recovery import KernelRecovery, PacketFlags, RecoveryError, ResultFlags, Status
from fastrelay.kernel import abi
from fastrelay.kernel.objects import BpfObject

pytestmark = pytest.mark.usefixtures("root")

MDS = 1200
MS = 1_000_000
EAF = PacketFlags.ACK_ELICITING | PacketFlags.IN_FLIGHT


@pytest.fixture(scope="module")
def kr():
    obj = BpfObject.load("moq_fastpath")
    rec = None
    try:
        rec = KernelRecovery(obj)
        yield rec
    finally:
        if rec is not None:
            rec.close()
        obj.close()


class Pair:
    """One connection's recovery twice: the kernel's (slot) and aioquic's, fed the same events."""

    def __init__(self, kr: KernelRecovery, slot: int = 0, *, max_ack_delay_ns: int = 25 * MS,
                 initial_rtt_ns: int = 100 * MS) -> None:
        self.kr, self.slot = kr, slot
        kr.init(slot, max_datagram_size=MDS, max_ack_delay_ns=max_ack_delay_ns, initial_rtt_ns=initial_rtt_ns)
        self.rec = QuicPacketRecovery(congestion_control_algorithm="reno", initial_rtt=initial_rtt_ns / 1e9,
                                      max_datagram_size=MDS, peer_completed_address_validation=True,
                                      send_probe=lambda: None)
        self.rec.handshake_confirmed = True
        self.rec.max_ack_delay = max_ack_delay_ns / 1e9
        self.space = QuicPacketSpace(is_application_data=True)
        self.rec.spaces = [self.space]
        self.kernel_out: set[int] = set()  # what the kernel's results say is outstanding
        self.events: list[tuple[QuicDeliveryState, int]] = []
        self.steps = self.persistent = self.congestion = self.expired = self.lost = self.acked = self.samples = 0
        self.hystart = 0
        self.next_pn = 0

    # ---- events
    def send(self, t_ns: int, size: int = MDS, flags: PacketFlags = EAF, pn: int | None = None) -> int:
        pn = self.next_pn if pn is None else pn
        self.next_pn = max(self.next_pn, pn + 1)
        packet = QuicSentPacket(epoch=Epoch.ONE_RTT, in_flight=bool(flags & PacketFlags.IN_FLIGHT),
                                is_ack_eliciting=bool(flags & PacketFlags.ACK_ELICITING), is_crypto_packet=False,
                                packet_number=pn, packet_type=QuicPacketType.ONE_RTT, sent_time=t_ns / 1e9,
                                sent_bytes=size)
        packet.delivery_handlers.append((lambda state, n: self.events.append((state, n)), (pn,)))
        self.rec.on_packet_sent(packet=packet, space=self.space)
        res = self.kr.sent(self.slot, pn, t_ns, size, flags)
        self.kernel_out.add(pn)
        self._compare(res, set(), set(), expired=False)
        return pn

    def ack(self, ranges: list[tuple[int, int]], now_ns: int, ack_delay_ns: int = 0):
        """`ranges` inclusive, highest first."""
        self.events.clear()
        self.rec.on_ack_received(ack_rangeset=RangeSet(range(lo, hi + 1) for lo, hi in reversed(ranges)),
                                 ack_delay=ack_delay_ns / 1e9, now=now_ns / 1e9, space=self.space)
        res = self.kr.ack(self.slot, ranges, ack_delay_ns, now_ns)
        return self._events_compare(res, expired=False)

    def timeout(self, now_ns: int):
        self.events.clear()
        pto = self.space.loss_time is None
        self.rec.on_loss_detection_timeout(now=now_ns / 1e9)
        res = self.kr.timeout(self.slot, now_ns)
        return self._events_compare(res, expired=pto)

    def timer_ns(self) -> int | None:
        t = self.rec.get_loss_detection_time(amplification_limited=False)
        return None if t is None else round(t * 1e9)

    # ---- comparison
    def _events_compare(self, res, expired: bool):
        acked = {pn for state, pn in self.events if state == QuicDeliveryState.ACKED}
        lost = {pn for state, pn in self.events if state == QuicDeliveryState.LOST}
        self._compare(res, acked, lost, expired)
        return res

    def _compare(self, res, acked: set[int], lost: set[int], expired: bool) -> None:
        self.steps += 1
        k_acked = {pn for pn in self.kernel_out if any(lo <= pn <= hi for lo, hi in res.acked_ranges)}
        k_lost = {pn for pn in self.kernel_out - k_acked if any(lo <= pn <= hi for lo, hi in res.lost_ranges)}
        where = f"step {self.steps}"
        assert k_acked == acked, where
        assert res.acked == len(acked), where
        assert k_lost == lost, where
        assert (res.expired, res.lost) == ((len(lost), 0) if expired else (0, len(lost))), where
        assert not res.flags & ResultFlags.TRUNCATED
        self.kernel_out -= acked | lost
        assert self.kernel_out == set(self.space.sent_packets), where
        assert all(pn >= res.base for pn in self.kernel_out), where
        assert res.bytes_in_flight == self.rec.bytes_in_flight, where
        assert res.cwnd == pytest.approx(self.rec.congestion_window, rel=0.05), where
        if self.rec._rtt_initialized:
            assert res.srtt_ns == pytest.approx(self.rec._rtt_smoothed * 1e9, rel=0.01), where
        timer = self.timer_ns()
        assert (res.timer_ns is None) == (timer is None), where
        if timer is not None:
            assert res.timer_ns == pytest.approx(timer, abs=2_000), where
        st = self.kr.state(self.slot)
        assert st.pto_count == self.rec._pto_count, where
        assert (st.ssthresh or None) == self.rec._cc.ssthresh, where
        self.acked += len(acked)
        if expired:
            self.expired += len(lost)
        else:
            self.lost += len(lost)
        self.persistent += bool(res.flags & ResultFlags.PERSISTENT)
        self.congestion += bool(res.flags & ResultFlags.CONGESTION)
        self.samples += bool(res.flags & ResultFlags.RTT_SAMPLE)

    def check_table(self) -> None:
        """The kernel's own table holds exactly aioquic's outstanding packets."""
        table = self.kr.outstanding(self.slot)
        assert set(table) == set(self.space.sent_packets)
        for pn, p in table.items():
            q = self.space.sent_packets[pn]
            assert (p.bytes, p.sent_time) == (q.sent_bytes, round(q.sent_time * 1e9))


# ---------------------------------------------------------------- hand-written cases
def test_slow_start_acks_grow_the_window_and_the_first_sample_sets_the_rtt(kr):
    p = Pair(kr)
    for i in range(10):
        p.send(1 * MS + i * 1001)
    res = p.ack([(0, 9)], 51 * MS + 7)
    assert res.acked == 10 and res.acked_ranges == ((0, 9),) and res.flags & ResultFlags.RTT_SAMPLE
    assert res.cwnd == 20 * MDS and res.bytes_in_flight == 0 and res.timer_ns is None
    assert res.srtt_ns == 51 * MS + 7 - (1 * MS + 9 * 1001)
    p.check_table()


def test_reordered_acks_gaps_and_the_packet_threshold(kr):
    p = Pair(kr)
    for i in range(12):
        p.send(1 * MS + i * 997)
    res = p.ack([(8, 9), (5, 6)], 60 * MS + 3, ack_delay_ns=2 * MS)
    assert res.acked_ranges == ((5, 6), (8, 9))
    assert res.lost_ranges == ((0, 4),) and res.lost == 5  # <= 9 - 3; 7 is kept
    assert res.flags & ResultFlags.CONGESTION and res.cwnd == (10 * MDS + 4 * MDS) // 2
    res = p.ack([(7, 7)], 61 * MS + 11)        # the late one: this ACK's largest, so a sample (as aioquic)
    assert res.acked == 1 and res.flags & ResultFlags.RTT_SAMPLE
    res = p.ack([(8, 9), (5, 7)], 61 * MS + 13)  # nothing new: nothing happens
    assert res.acked == 0 and not res.flags and res.timer_ns
    res = p.ack([(10, 11), (5, 9)], 62 * MS + 13)
    assert res.acked == 2 and res.acked_ranges == ((10, 11),) and res.bytes_in_flight == 0
    p.check_table()


def test_time_threshold_sets_the_loss_timer_and_its_timeout_declares_the_loss(kr):
    p = Pair(kr)
    for i in range(3):
        p.send(1 * MS + i * 1013)
    res = p.ack([(2, 2)], 41 * MS + 17)
    assert res.lost == 0 and res.timer_ns and p.kr.state(0).loss_time == res.timer_ns
    res = p.timeout(res.timer_ns + 5_003)
    assert res.lost == 2 and res.lost_ranges == ((0, 1),) and res.expired == 0
    assert res.flags & ResultFlags.CONGESTION and res.timer_ns is None
    p.check_table()


def test_pto_expires_the_oldest_ack_eliciting_packet_without_a_congestion_event(kr):
    p = Pair(kr)
    p.send(1 * MS + 1, 300, PacketFlags.IN_FLIGHT)          # padding only: not ack-eliciting
    for i in range(3):
        p.send(2 * MS + i * 1009)
    t = p.timer_ns()
    assert t == 2 * MS + 2 * 1009 + 200 * MS           # 2 x initial RTT before any sample
    res = p.timeout(t + 1_001)
    assert res.expired == 1 and res.lost_ranges == ((1, 1),) and res.cwnd == 10 * MDS
    assert p.kr.state(0).pto_count == 1 and res.timer_ns == 2 * MS + 2 * 1009 + 400 * MS
    res = p.timeout(res.timer_ns + 1_001)
    assert res.lost_ranges == ((2, 2),) and p.kr.state(0).pto_count == 2
    res = p.ack([(3, 3)], 700 * MS + 31)
    assert p.kr.state(0).pto_count == 0 and res.lost_ranges == ((0, 0),)  # padding packet: time threshold
    p.check_table()


def test_a_long_run_of_lost_packets_is_persistent_congestion(kr):
    p = Pair(kr)
    p.send(1 * MS + 3)
    p.ack([(0, 0)], 51 * MS + 5)                        # srtt 50 ms: PTO 175 ms, 3 PTO 525 ms
    for i in range(10):
        p.send(60 * MS + i * 100 * MS + 7)              # lost, spanning 900 ms
    p.send(1100 * MS + 9)
    res = p.ack([(11, 11)], 1150 * MS + 11)
    assert res.lost == 10 and res.lost_ranges == ((1, 10),)
    assert res.flags & ResultFlags.PERSISTENT and res.cwnd == 2 * MDS
    p.check_table()


def test_a_short_run_is_only_a_congestion_event(kr):
    p = Pair(kr)
    p.send(1 * MS + 3)
    p.ack([(0, 0)], 51 * MS + 5)
    for i in range(5):
        p.send(60 * MS + i * 10 * MS + 7)
    p.send(200 * MS + 9)
    res = p.ack([(6, 6)], 250 * MS + 11)
    assert res.lost == 5 and not res.flags & ResultFlags.PERSISTENT and res.cwnd == 12 * MDS // 2  # 0 and 6 acked first


def test_ack_delay_is_capped_at_max_ack_delay_and_ack_only_packets_give_no_sample(kr):
    p = Pair(kr, max_ack_delay_ns=10 * MS)
    p.send(1 * MS + 1)
    p.ack([(0, 0)], 31 * MS + 3)
    p.send(40 * MS + 5)
    res = p.ack([(1, 1)], 140 * MS + 7, ack_delay_ns=60 * MS)  # 100 ms, minus at most 10
    assert p.kr.state(0).latest_rtt == 100 * MS + 2 - 10 * MS
    p.send(150 * MS + 9, 50, PacketFlags(0))          # ACK only
    res = p.ack([(2, 2)], 180 * MS + 11)
    assert res.acked == 1 and not res.flags & ResultFlags.RTT_SAMPLE


def test_rising_rtt_ends_slow_start_as_hystart_does(kr):
    p = Pair(kr)
    t, rtt = 1 * MS + 1, 20 * MS
    for _ in range(20):
        pn = p.send(t)
        p.ack([(pn, pn)], t + rtt)
        t += rtt + 2 * MS + 17
        rtt += 4 * MS
    assert p.rec._cc.ssthresh is not None and p.kr.state(0).ssthresh == p.rec._cc.ssthresh


def test_congestion_avoidance_grows_one_datagram_per_window(kr):
    p = Pair(kr)
    for i in range(4):
        p.send(1 * MS + i * 1001)
    p.ack([(3, 3)], 30 * MS + 3)                       # 0 lost: ssthresh set, congestion avoidance
    t = 40 * MS + 5
    for _ in range(30):
        pns = [p.send(t + i * 101) for i in range(6)]
        t += 30 * MS + 7
        p.ack([(pns[0], pns[-1])], t)
    assert p.rec._cc.ssthresh and p.kr.state(0).cwnd == p.rec.congestion_window > p.rec._cc.ssthresh


def test_refused_calls_change_nothing(kr):
    p = Pair(kr, slot=3)
    p.send(1 * MS)
    with pytest.raises(RecoveryError) as e:
        kr.ack(3, [(5, 5)], 0, 10 * MS)                 # never sent
    assert e.value.status == Status.E_ARGS
    with pytest.raises(RecoveryError) as e:
        kr.ack(3, [(0, 0), (0, 0)], 0, 10 * MS)         # not descending
    assert e.value.status == Status.E_ARGS
    with pytest.raises(RecoveryError) as e:
        kr.sent(3, 0, 2 * MS, 100, EAF)                 # already outstanding
    assert e.value.status == Status.E_PN
    with pytest.raises(RecoveryError) as e:
        kr.sent(3, abi.FR_MOQ_SENT_SLOTS, 2 * MS, 100, EAF)  # beyond the table
    assert e.value.status == Status.E_FULL
    with pytest.raises(RecoveryError) as e:
        kr.timeout(4, 10 * MS)                          # a slot nobody owns
    assert e.value.status == Status.E_SLOT
    p.send(2 * MS + 1, pn=abi.FR_MOQ_SENT_SLOTS - 1)    # the last that fits (numbers may skip)
    p.check_table()
    p.ack([(abi.FR_MOQ_SENT_SLOTS - 1, abi.FR_MOQ_SENT_SLOTS - 1), (0, 0)], 40 * MS + 3)
    p.check_table()


def test_a_reused_slot_ignores_what_the_last_connection_left(kr):
    p = Pair(kr, slot=5)
    for i in range(8):
        p.send(1 * MS + i)
    q = Pair(kr, slot=5)                                # new generation, old entries still in the table
    q.send(2 * MS, pn=3)
    q.send(2 * MS + 1, pn=9)                            # 4 to 8 never sent by this one
    res = q.ack([(3, 9)], 30 * MS + 1)
    assert res.acked == 2 and res.acked_ranges == ((3, 9),) and res.bytes_in_flight == 0
    q.check_table()


# ---------------------------------------------------------------- seeded random traces
class Trace:
    """A sender filling its window over a path with a varying delay, reordering, random and burst
    losses and blackouts (nothing arrives, either way), a receiver acknowledging every few ms with
    up to 16 ranges and a random ACK delay, and the loss detection timer firing when due."""

    def __init__(self, pair: Pair, seed: int) -> None:
        self.p, self.r = pair, random.Random(seed)
        self.t = 1 * MS + self.r.randrange(1000)
        self.arrivals: dict[int, int] = {}                 # pn -> arrival at the receiver
        self.acks: list[tuple[int, int, list[tuple[int, int]], int]] = []  # heap of ACK arrivals
        self.next_ack_emit = self.t + 5 * MS
        self.base_owd = self.r.choice([5, 20, 50]) * MS
        self.loss = self.r.choice([0.0, 0.01, 0.05, 0.2])
        self.blackouts = []
        for _ in range(self.r.randrange(3)):
            start = self.r.randrange(200, 3000) * MS
            self.blackouts.append((start, start + self.r.randrange(50, 2500) * MS))
        self.seq = 0
        self.ramp = seed % 4 == 0          # a queue building up without loss: HyStart's exit
        if self.ramp:
            self.loss, self.blackouts = 0.0, []

    def owd(self) -> int:
        if self.ramp:                      # no reordering either
            return self.base_owd + min(self.t // (10 * MS) * MS // 2, 10 * self.base_owd) + self.r.randrange(1000)
        else:
            drift = (self.t // (500 * MS)) % 4 * self.base_owd // 4   # the delay rises and falls
        return self.base_owd + drift + self.r.randrange(0, self.base_owd // 2 + 1) + self.r.randrange(1000)

    def dark(self, t: int) -> bool:
        return any(a <= t < b for a, b in self.blackouts)

    def step(self) -> None:
        p, r = self.p, self.r
        timer = p.timer_ns()
        ack_at = self.acks[0][0] if self.acks else None
        window_open = (p.rec.bytes_in_flight + MDS <= p.rec.congestion_window
                       and p.next_pn - min(p.space.sent_packets, default=p.next_pn) < abi.FR_MOQ_SENT_SLOTS - 1)
        # the earliest of: sending (when the window allows), an ACK arriving, the receiver's ACK, the timer
        choices = [(self.next_ack_emit, "emit")]
        if ack_at is not None:
            choices.append((ack_at, "ack"))
        if timer is not None:
            choices.append((max(timer, self.t) + r.randrange(1, 3000) * 1000 + r.randrange(1000), "timer"))
        if window_open:
            choices.append((self.t + r.randrange(0, 2 * MS), "send"))
        when, what = min(choices)
        self.t = max(self.t, when)
        if what == "send":
            kind = r.random()
            flags = EAF if kind < 0.9 else PacketFlags(0) if kind < 0.95 else PacketFlags.IN_FLIGHT
            size = MDS if kind < 0.6 else r.randrange(40, MDS + 1)
            pn = p.send(self.t, size, flags)
            if not self.dark(self.t) and r.random() >= self.loss:
                self.arrivals[pn] = self.t + self.owd()
        elif what == "ack":
            _, _, ranges, delay = heapq.heappop(self.acks)
            p.ack(ranges, self.t, delay)
        elif what == "timer":
            p.timeout(self.t)
        else:
            self.emit_ack()

    def emit_ack(self) -> None:
        r, now = self.r, self.t
        self.next_ack_emit = now + r.randrange(1, 25) * MS + r.randrange(1000)
        got = sorted(pn for pn, at in self.arrivals.items() if at <= now)
        if not got:
            return
        runs: list[list[int]] = []
        for pn in reversed(got):
            if runs and runs[-1][0] == pn + 1:
                runs[-1][0] = pn
            else:
                runs.append([pn, pn])
        ranges = [(lo, hi) for lo, hi in runs[:abi.FR_MOQ_MAX_ACK_RANGES]]
        if self.dark(now):
            return
        delay = r.choice([0, r.randrange(0, 10 * MS), r.randrange(0, 60 * MS)])
        self.seq += 1
        heapq.heappush(self.acks, (now + self.owd(), self.seq, ranges, delay))


@pytest.mark.parametrize("seed", range(64))
def test_random_traces_match_aioquic_step_by_step(kr, seed):
    initial_rtt = random.Random(seed).choice([50, 100, 333]) * MS
    p = Pair(kr, slot=seed % abi.FR_MOQ_MAX_RECOVERY_CONNS, initial_rtt_ns=initial_rtt)
    trace = Trace(p, seed)
    for i in range(3000):
        trace.step()
        if i % 250 == 0:
            p.check_table()
    p.check_table()
    assert p.acked > 20 and p.samples > 3


def test_the_random_traces_reach_every_case(kr):
    """Losses, congestion events, PTO expiries and persistent congestion all occur in the traces
    the test above compares (so that it could fail on each)."""
    total = {"lost": 0, "congestion": 0, "expired": 0, "persistent": 0, "hystart": 0}
    for seed in range(24):
        p = Pair(kr, slot=seed, initial_rtt_ns=random.Random(seed).choice([50, 100, 333]) * MS)
        trace = Trace(p, seed)
        for _ in range(1500):
            trace.step()
            if p.congestion == 0 and p.rec._cc.ssthresh is not None:
                p.hystart = 1
        for k in total:
            total[k] += getattr(p, k)
    assert all(total.values()), total
