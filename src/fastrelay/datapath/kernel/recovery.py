"""Python side of the in-kernel loss recovery (bpf/moq/recovery.h, program fr_moq_recover).

One call per event of a connection's 1-RTT packet number space: a packet sent, an ACK, the loss
detection timer. Each comes back with counts, the acked and lost packet numbers as ranges, the
next timer and the window. On a kernel-recovery connection the egress program registers the
packets it builds and the ingress program applies the ACK-only packets it reads in the same
state, without these calls; a call finding the slot busy with one of them is retried.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from ...kernel import abi
from ...kernel.errors import KernelError
from ...kernel.libbpf import BpfTestRunOpts, check, lib
from ...kernel.objects import BpfObject


class Op(enum.IntEnum):
    """enum fr_moq_lr_op (checked against BTF)."""

    INIT = 0
    SENT = 1
    ACK = 2
    TIMEOUT = 3
    EXPIRE = 4


class Status(enum.IntEnum):
    """enum fr_moq_lr_status (checked against BTF)."""

    OK = 0
    E_SLOT = 1
    E_ARGS = 2
    E_FULL = 3
    E_PN = 4
    E_BUSY = 5
    ACKED_EARLY = 6


class PacketFlags(enum.IntFlag):
    """enum fr_moq_pkt_flags (checked against BTF)."""

    ACK_ELICITING = 1
    IN_FLIGHT = 2
    KERNEL = 4
    RECORDED = 8


class ResultFlags(enum.IntFlag):
    """enum fr_moq_lr_flags (checked against BTF)."""

    RTT_SAMPLE = 1
    CONGESTION = 2
    PERSISTENT = 4
    TRUNCATED = 8


class RecoveryError(KernelError):
    """fr_moq_recover refused the call (its status says why); the state did not change."""

    def __init__(self, status: Status, what: str) -> None:
        super().__init__(f"fr_moq_recover {what}: {status.name}")
        self.status = status


@dataclass(frozen=True)
class Result:
    """What one call did. Ranges are inclusive (smallest, largest), ascending: every packet that was
    outstanding before the call inside an acked range is now acked; of those still outstanding then,
    every one inside a lost range is lost (or, on a PTO, expired: given up for the probe without a
    congestion signal)."""

    acked: int
    lost: int
    expired: int
    acked_ranges: tuple[tuple[int, int], ...]
    lost_ranges: tuple[tuple[int, int], ...]
    flags: ResultFlags
    timer_ns: int | None  # the loss detection timer afterwards
    base: int  # no packet below is outstanding
    cwnd: int
    bytes_in_flight: int
    srtt_ns: int


class KernelRecovery:
    """Runs fr_moq_recover of a loaded moq_fastpath object for recovery slots < FR_MOQ_MAX_RECOVERY_CONNS."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        obj.struct("fr_moq_recover_args", abi.MoqRecoverArgs)
        for enum_type, name, prefix in ((Op, "fr_moq_lr_op", "FR_MOQ_LR_"), (Status, "fr_moq_lr_status", "FR_MOQ_LR_"),
                                        (PacketFlags, "fr_moq_pkt_flags", "FR_MOQ_PKT_"),
                                        (ResultFlags, "fr_moq_lr_flags", "FR_MOQ_LR_")):
            kernel = obj.enum(name)
            for member in enum_type:
                if kernel.get(prefix + member.name) != member.value:
                    raise KernelError(f"{name}: {enum_type.__name__}.{member.name} = {member.value} does not match")
        self._outstanding = obj.enum("fr_moq_pkt_state")["FR_MOQ_PKT_OUTSTANDING"]
        self._fd = obj.program("fr_moq_recover").fd
        self._state = obj.map("fr_moq_rec")
        self._states = self._state.view()
        self._sent = obj.map("fr_moq_rec_sent")
        self._gen: dict[int, int] = {}
        self._next_gen = 1

    BUSY_TRIES = 1000  # the data path holds a slot for microseconds

    def _run(self, args: abi.MoqRecoverArgs, what: str) -> abi.MoqRecoverArgs:
        # a syscall program's context is copied back into ctx_in
        opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts), ctx_in=ctypes.addressof(args),
                              ctx_size_in=ctypes.sizeof(args))
        for _ in range(self.BUSY_TRIES):
            check(lib.bpf_prog_test_run_opts(self._fd, ctypes.byref(opts)), "fr_moq_recover")
            if args.status != Status.E_BUSY:
                break
        if args.status and args.status != Status.ACKED_EARLY:
            raise RecoveryError(Status(args.status), what)
        return args

    def _args(self, slot: int, op: Op) -> abi.MoqRecoverArgs:
        if not 0 <= slot < abi.FR_MOQ_MAX_RECOVERY_CONNS:
            raise ValueError(f"recovery slot {slot} out of range")
        return abi.MoqRecoverArgs(slot=slot, gen=self._gen.get(slot, 0), op=int(op))

    def init(self, slot: int, *, first_pn: int = 0, max_datagram_size: int = 1200, max_ack_delay_ns: int = 25_000_000,
             initial_rtt_ns: int = 100_000_000, gen: int | None = None, ack_delay_exponent: int = 3) -> None:
        """Give `slot` to a new connection (a new generation: what the old one left is ignored). A
        kernel-path connection passes its own generation (the programs check that they match)."""
        if gen is None:
            gen = self._next_gen
            self._next_gen = self._next_gen % 0xFFFFFFFF + 1
        args = self._args(slot, Op.INIT)
        args.gen, args.pn, args.bytes, args.flags = gen, first_pn, max_datagram_size, ack_delay_exponent
        args.ack_delay_ns, args.initial_rtt_ns = max_ack_delay_ns, initial_rtt_ns
        self._run(args, f"INIT {slot}")
        self._gen[slot] = gen

    def sent(self, slot: int, pn: int, time_ns: int, size: int, flags: PacketFlags) -> Result:
        args = self._args(slot, Op.SENT)
        args.pn, args.time_ns, args.bytes, args.flags = pn, time_ns, size, int(flags)
        return self._result(self._run(args, f"SENT {pn}"))

    def ack(self, slot: int, ranges: Sequence[tuple[int, int]], ack_delay_ns: int, now_ns: int) -> Result:
        """`ranges`: inclusive (smallest, largest), highest first and disjoint, as in an ACK frame."""
        if not 1 <= len(ranges) <= abi.FR_MOQ_MAX_ACK_RANGES:
            raise ValueError(f"{len(ranges)} ACK ranges (1 to {abi.FR_MOQ_MAX_ACK_RANGES})")
        args = self._args(slot, Op.ACK)
        args.nranges, args.ack_delay_ns, args.time_ns = len(ranges), ack_delay_ns, now_ns
        for i, (lo, hi) in enumerate(ranges):
            args.ranges[i].smallest, args.ranges[i].largest = lo, hi
        return self._result(self._run(args, "ACK"))

    def timeout(self, slot: int, now_ns: int) -> Result:
        args = self._args(slot, Op.TIMEOUT)
        args.time_ns = now_ns
        return self._result(self._run(args, "TIMEOUT"))

    def expire(self, slot: int, now_ns: int) -> Result:
        """The slot's bpf_timer fired: the timeout runs if the loss detection time has come."""
        args = self._args(slot, Op.EXPIRE)
        args.time_ns = now_ns
        return self._result(self._run(args, "EXPIRE"))

    def forget(self, slot: int) -> None:
        """The slot's connection is gone: its state is cleared (its timer, if armed, finds nothing)."""
        self._gen.pop(slot, None)
        self._state.update(slot, abi.MoqRecovery())  # (a syscall: the programs see it whole)

    def state(self, slot: int) -> abi.MoqRecovery:
        """The slot's state as it is now (read from the mapped map: no syscall)."""
        return abi.MoqRecovery.from_buffer_copy(self._states[slot])

    def close(self) -> None:
        """Unmap the state (before the object closes, so its maps can go)."""
        self._states = None
        self._state.close()

    def outstanding(self, slot: int) -> dict[int, abi.MoqSentPkt]:
        """The packets the kernel still tracks (reads the whole table: for tests and diagnostics)."""
        gen, table = self._gen.get(slot), self._sent.lookup(slot)
        return {p.pn: p for p in table.pkts if p.gen == gen and p.state == self._outstanding}

    @staticmethod
    def _result(a: abi.MoqRecoverArgs) -> Result:
        return Result(
            acked=a.acked, lost=a.lost, expired=a.expired,
            acked_ranges=tuple((r.smallest, r.largest) for r in a.acked_ranges[:a.nacked_ranges]),
            lost_ranges=tuple((r.smallest, r.largest) for r in a.lost_ranges[:a.nlost_ranges]),
            flags=ResultFlags(a.out_flags), timer_ns=a.timer_ns or None, base=a.base, cwnd=a.cwnd,
            bytes_in_flight=a.bytes_in_flight, srtt_ns=a.srtt)
