"""The mmap ring-buffer reader on records the real fan-out program writes (BPF_PROG_TEST_RUN).

The subscriber is addressed like the relay itself, so the rewritten packet is again a
datagram for the relay: every run of a repeated test run emits exactly one record.
"""

from __future__ import annotations

import ctypes
import select
import socket
import struct
import threading
import time

import numpy as np
import pytest

from fastrelay.kernel import abi
from fastrelay.kernel.objects import BpfObject
from fastrelay.kernel.ringbuf import HDR_SIZE, RingBuffer

pytestmark = pytest.mark.usefixtures("root")

RELAY, PUB = "10.200.0.1", "10.200.0.2"
PORT = 5000
WAKEUP_BYTES = 256 * 1024  # FR_WAKEUP_BYTES in udp_fanout.bpf.c


def datagram(payload_len: int) -> bytes:
    """Ethernet + IPv4 + UDP (no UDP checksum), publisher -> relay; dst MAC 0 = PACKET_HOST in a test run."""
    udp = struct.pack("!HHHH", PORT, PORT, 8 + payload_len, 0) + b"x" * payload_len
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(PUB), socket.inet_aton(RELAY))
    total = sum(struct.unpack("!10H", ip))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    ip = ip[:10] + struct.pack("!H", ~total & 0xFFFF) + ip[12:]
    return b"\0" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp


class Producer:
    """The loaded fan-out program with one subscriber that points back at the relay."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.prog = obj.program("fr_udp_fanout")
        cfg = abi.FanoutConfig(port=socket.htons(PORT), family=socket.AF_INET, max_len=1500)
        cfg.dst_addr[:4] = socket.inet_aton(RELAY)
        obj.map("fr_fanout_cfg").update(0, cfg)
        self._sets = obj.map("fr_fanout_sets")
        self.sub_id(0)

    def sub_id(self, sub_id: int) -> None:
        fs = abi.FanoutSet(count=1)
        s = fs.subs[0]
        s.id, s.ifindex = sub_id, 1
        s.dst_port = s.src_port = socket.htons(PORT)
        s.dst_ip[:4], s.src_ip[:4] = socket.inet_aton(RELAY), socket.inet_aton(PUB)
        self._sets.update(0, fs)

    def emit(self, n: int, payload_len: int = 100) -> None:
        """n records (sub_id as set, bytes = the IP length), in one test run."""
        rc, _ = self.prog.test_run(datagram(payload_len), repeat=n)
        assert rc == 7  # TC_ACT_REDIRECT: the datagram was fanned out

    def emit_numbered(self, first: int, n: int) -> None:
        """n records whose sub_id counts up from `first`, one test run each."""
        for i in range(first, first + n):
            self.sub_id(i)
            self.emit(1)

    def counter(self, name: str) -> int:
        return self.obj.map("fr_fanout_stats").sum_counters()[self.obj.enum("fr_fanout_counter")[name]]


@pytest.fixture
def ring():
    """(producer, reader) on a freshly loaded object: an empty ring at position 0."""
    with BpfObject.load("udp_fanout") as obj:
        reader = obj.ringbuf("fr_fanout_events")
        try:
            yield Producer(obj), reader
        finally:
            reader.close()


def drain(reader: RingBuffer, budget: int = 1 << 16) -> np.ndarray:
    parts = []
    while len(batch := reader.consume(budget)):
        parts.append(batch)
    return np.concatenate(parts) if parts else np.empty(0, reader.dtype)


def readable(reader: RingBuffer, timeout: float) -> bool:
    return bool(select.select([reader], [], [], timeout)[0])


def test_records_arrive_complete_and_in_order(ring):
    prod, reader = ring
    prod.emit_numbered(0, 500)
    prod.emit(300, payload_len=40)  # sub_id stays 499
    recs = reader.consume()
    assert len(recs) == 800
    assert recs["sub_id"].tolist() == list(range(500)) + [499] * 300
    assert recs["bytes"].tolist() == [20 + 8 + 100] * 500 + [20 + 8 + 40] * 300
    assert len(reader.consume()) == 0 and reader.foreign_records == 0


def test_records_stay_whole_and_ordered_across_the_end_of_the_ring(ring):
    prod, reader = ring
    per_record = reader.dtype.itemsize
    assert per_record == HDR_SIZE + ctypes.sizeof(abi.FanoutEvent)
    filler = reader.size // per_record - 37  # the next records straddle the end of the data area
    prod.emit(filler)
    assert len(drain(reader)) == filler
    prod.emit_numbered(1000, 100)
    recs = reader.consume()
    assert recs["sub_id"].tolist() == list(range(1000, 1100))
    assert set(recs["bytes"].tolist()) == {128}


def test_a_poll_stops_at_its_budget_and_the_rest_follows(ring):
    prod, reader = ring
    prod.emit_numbered(0, 1000)
    sizes, ids = [], []
    while len(batch := reader.consume(budget=300)):
        sizes.append(len(batch))
        ids += batch["sub_id"].tolist()
    assert sizes == [300, 300, 300, 100]
    assert ids == list(range(1000))


def test_polls_return_within_budget_under_sustained_load(ring):
    """The reason for the budget: with libbpf 1.1, ring_buffer__poll never returns while a
    producer keeps up. Here each consume returns at most `budget` records, promptly, while the
    kernel keeps producing on another CPU, and nothing is lost or torn."""
    prod, reader = ring
    runs, per_run, budget = 30, 20000, 4096
    done = threading.Event()

    def produce() -> None:
        for _ in range(runs):
            prod.emit(per_run)  # ctypes releases the GIL: the kernel fills the ring meanwhile
        done.set()

    worker = threading.Thread(target=produce)
    worker.start()
    got, full_batches, slowest = 0, 0, 0.0
    try:
        while not done.is_set() or got < runs * per_run - prod.counter("FR_FC_RINGBUF_FULL"):
            t0 = time.perf_counter()
            batch = reader.consume(budget)
            slowest = max(slowest, time.perf_counter() - t0)
            assert len(batch) <= budget
            assert (batch["sub_id"] == 0).all() and (batch["bytes"] == 128).all()
            got += len(batch)
            full_batches += len(batch) == budget
            time.sleep(0.002)  # consume on a timer, as the relay does: a backlog builds up
    finally:
        worker.join()
    assert got + prod.counter("FR_FC_RINGBUF_FULL") == runs * per_run
    assert full_batches > 0  # there was more pending than one poll's budget
    assert slowest < 0.5  # one bounded batch, not "until the producer pauses"


def test_a_full_ring_counts_what_it_lost(ring):
    prod, reader = ring
    capacity = reader.size // reader.dtype.itemsize
    produced = capacity + 5000
    prod.emit(produced)
    lost = prod.counter("FR_FC_RINGBUF_FULL")
    got = drain(reader)
    assert capacity - 1 <= len(got) <= capacity  # the kernel keeps the ring short of completely full
    assert lost == produced - len(got)
    assert prod.counter("FR_FC_COPIES") == produced  # the copies went out; only their records were lost
    prod.emit_numbered(7, 3)  # drained, the ring takes records again
    assert reader.consume()["sub_id"].tolist() == [7, 8, 9]


def test_readers_are_woken_only_past_the_threshold(ring):
    prod, reader = ring
    per_record = reader.dtype.itemsize
    prod.emit(100)
    assert not readable(reader, 0.2)  # below the threshold the program asks for no wake-up
    prod.emit(WAKEUP_BYTES // per_record)
    assert readable(reader, 2)
    assert len(reader.consume(budget=10)) == 10  # takes the wake-up (edge-triggered)...
    assert not readable(reader, 0.2)  # ...so a half-consumed ring does not spin the reader
    prod.emit(1)
    assert readable(reader, 2)
