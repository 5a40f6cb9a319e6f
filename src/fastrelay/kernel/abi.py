"""ctypes mirrors of bpf/include/fastrelay.h.

Every mirror is checked against the loaded object's BTF (BpfObject.map / .struct), so
these classes cannot silently drift from the header. Constants that BTF does not carry
(#defines) are checked against map sizes at load time by their users.
"""

from __future__ import annotations

import ctypes

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

FR_MAX_SUBSCRIBERS = 1024
FR_PROBE_SLOTS = 256
FR_PROBE_TS_SLOTS = 65536
FR_HIST_BUCKETS = 512
FR_TAG_MAGIC = 0x46524C42


class FanoutConfig(ctypes.Structure):
    _fields_ = [
        ("port", u16),  # network order
        ("family", u8),
        ("src_filter", u8),
        ("max_len", u32),
        ("src_addr", u8 * 16),
        ("dst_addr", u8 * 16),
        ("dst_any", u8),
        ("pad", u8 * 3),
        ("csum_v6_flags", u32),
    ]


class Addr(ctypes.Structure):
    _fields_ = [("bytes", u8 * 16)]


class FanoutSub(ctypes.Structure):
    _fields_ = [
        ("id", u32),
        ("ifindex", u32),
        ("dst_mac", u8 * 6),
        ("src_mac", u8 * 6),
        ("dst_port", u16),  # network order
        ("src_port", u16),  # network order
        ("dst_ip", u8 * 16),
        ("src_ip", u8 * 16),
    ]


class FanoutSet(ctypes.Structure):
    _fields_ = [("count", u32), ("pad", u32), ("subs", FanoutSub * FR_MAX_SUBSCRIBERS)]


class FanoutEvent(ctypes.Structure):
    _fields_ = [("sub_id", u32), ("bytes", u32)]


class ProbeConfig(ctypes.Structure):
    _fields_ = [("tag_offset", u16), ("sink", u8), ("pad", u8), ("scan", u16), ("pad2", u16)]


FR_PROBE_SCAN_MAX = 1536


class ProbeTs(ctypes.Structure):
    _fields_ = [("seq", u64), ("ts_ns", u64)]


class ProbeMac(ctypes.Structure):
    _fields_ = [("addr", u8 * 6), ("pad", u16)]


class ProbeHist(ctypes.Structure):
    _fields_ = [
        ("packets", u64),
        ("bytes", u64),
        ("matched", u64),
        ("max_ns", u64),
        ("buckets", u64 * FR_HIST_BUCKETS),
    ]


class DropConfig(ctypes.Structure):
    _fields_ = [("threshold", u32), ("pad", u32)]


# ---------------------------------------------------------------- MoQT kernel fast path
# the sizes the mirrors need; checked against enum fr_moq_limits in the object's BTF at load
FR_MOQ_LIMITS = "fr_moq_limits"
FR_MOQ_CID_LEN = 8
FR_MOQ_MAX_FRAMES = 16
FR_MOQ_MAX_ACK_RANGES = 16
FR_MOQ_MAX_SUBS = 256
FR_MOQ_MAX_CONNS = 4096
FR_MOQ_MAX_TRACK_IDS = 4096
FR_MOQ_MAX_RECOVERY_CONNS = 256
FR_MOQ_SENT_SLOTS = 1024
FR_MOQ_RTT_SAMPLES = 5
FR_MOQ_LR_MAX_RANGES = 16
FR_MOQ_PKT_FRAMES = 2
FR_MOQ_USER_ACK_EVERY = 64
s64 = ctypes.c_int64


class MoqCid(ctypes.Structure):
    _fields_ = [("b", u8 * FR_MOQ_CID_LEN)]


class MoqConfig(ctypes.Structure):
    _fields_ = [("port", u16), ("enabled", u8), ("pad", u8), ("csum_v6_flags", u32)]  # port in network order


class MoqUpconn(ctypes.Structure):
    _fields_ = [("id", u32), ("family", u8), ("pad", u8), ("peer_port", u16), ("peer_ip", u8 * 16)]


class MoqAliasKey(ctypes.Structure):
    _fields_ = [("up", u32), ("pad", u32), ("alias", u64)]


class MoqAliasVal(ctypes.Structure):
    _fields_ = [("track", u32), ("default_priority", u8), ("pad", u8 * 3)]


class MoqStreamKey(ctypes.Structure):
    _fields_ = [("conn", u32), ("up", u32), ("stream", u64)]


class MoqUstream(ctypes.Structure):
    _fields_ = [("track", u32), ("kind", u8), ("priority", u8), ("pad", u8 * 2), ("group", u64)]


class MoqTrack(ctypes.Structure):
    _fields_ = [("count", u32), ("pad", u32), ("conns", u32 * FR_MOQ_MAX_SUBS)]


class MoqDsubKey(ctypes.Structure):
    _fields_ = [("conn", u32), ("track", u32)]


class MoqDsub(ctypes.Structure):
    _fields_ = [("alias", u64)]


class MoqConn(ctypes.Structure):
    _fields_ = [
        ("gen", u32),
        ("ifindex", u32),
        ("dst_mac", u8 * 6),
        ("src_mac", u8 * 6),
        ("dst_port", u16),  # network order
        ("src_port", u16),  # network order
        ("family", u8),
        ("protect_priority", u8),
        ("max_payload", u16),
        ("dst_ip", u8 * 16),
        ("src_ip", u8 * 16),
        ("dcid", u8 * FR_MOQ_CID_LEN),
        ("max_stream", u64),
        ("stream_window", u64),
        ("skip_below", s64),
        ("absorb_acks", u8),
        ("recovery", u8),
        ("pad2", u8 * 6),
    ]


class MoqState(ctypes.Structure):
    _fields_ = [
        ("next_pn", u64),
        ("next_stream", u64),
        ("budget", s64),
        ("credit", s64),
        ("packets", u64),
        ("bytes", u64),
        ("renumbered", u64),
    ]


class MoqSlot(ctypes.Structure):
    _fields_ = [("slot", u32), ("gen", u32)]


class MoqDstream(ctypes.Structure):
    _fields_ = [
        ("stream", u64),
        ("limit", u64),
        ("handover", u64),
        ("delta", ctypes.c_int32),
        ("state", u8),
        ("priority", u8),
        ("fin", u8),
        ("pad", u8),
        ("sent_end", u64),
    ]


class MoqTakeArgs(ctypes.Structure):
    _fields_ = [("slot", u32), ("op", u32), ("value", s64), ("result", s64)]


class MoqSentFrame(ctypes.Structure):
    _fields_ = [
        ("stream", u64),
        ("offset", u64),
        ("up_stream", u64),
        ("up_offset", u64),
        ("len", u16),
        ("fin", u8),
        ("datagram", u8),
        ("pad", u8 * 4),
    ]


class MoqSent(ctypes.Structure):
    _fields_ = [
        ("kind", u8),
        ("nframes", u8),
        ("bytes", u16),
        ("slot", u32),
        ("gen", u32),
        ("track", u32),
        ("up", u32),
        ("pad", u32),
        ("pn", u64),
        ("time_ns", u64),
        ("frames", MoqSentFrame * FR_MOQ_MAX_FRAMES),
    ]


class MoqRenumbered(ctypes.Structure):
    _fields_ = [
        ("kind", u8),
        ("pad", u8),
        ("local_pn", u16),
        ("slot", u32),
        ("gen", u32),
        ("bytes", u32),
        ("pn", u64),
        ("time_ns", u64),
    ]


class MoqHandover(ctypes.Structure):
    _fields_ = [
        ("kind", u8),
        ("state", u8),
        ("reason", u8),
        ("priority", u8),
        ("slot", u32),
        ("gen", u32),
        ("track", u32),
        ("up", u32),
        ("pad", u32),
        ("stream", u64),
        ("offset", u64),
        ("up_stream", u64),
        ("up_offset", u64),
        ("group", u64),
        ("time_ns", u64),
    ]


class MoqAckRange(ctypes.Structure):
    _fields_ = [("smallest", u64), ("largest", u64)]


class MoqAck(ctypes.Structure):
    _fields_ = [
        ("kind", u8),
        ("nranges", u8),
        ("pn", u16),
        ("slot", u32),
        ("gen", u32),
        ("bytes", u32),
        ("largest", u64),
        ("ack_delay", u64),
        ("time_ns", u64),
        ("ranges", MoqAckRange * FR_MOQ_MAX_ACK_RANGES),
    ]


# ---------------------------------------------------------------- kernel loss recovery
class MoqRecovery(ctypes.Structure):
    _fields_ = [
        ("gen", u32),
        ("pto_count", u32),
        ("base", u64),
        ("sent_end", u64),
        ("largest_acked", u64),
        ("loss_time", u64),
        ("time_of_last_ack_eliciting", u64),
        ("ack_eliciting_in_flight", u64),
        ("bytes_in_flight", u64),
        ("srtt", u64),
        ("rttvar", u64),
        ("min_rtt", u64),
        ("latest_rtt", u64),
        ("first_sample_time", u64),
        ("rtt_initialized", u64),
        ("cwnd", u64),
        ("ssthresh", u64),
        ("recovery_start", u64),
        ("stash", u64),
        ("max_datagram_size", u64),
        ("max_ack_delay", u64),
        ("initial_rtt", u64),
        ("mon_samples", u64 * 8),
        ("mon_sample_time", u64),
        ("mon_sample_min", u64),
        ("mon_sample_max", u64),
        ("mon_filtered_min", u64),
        ("mon_idx", u32),
        ("mon_increases", u32),
        ("mon_ready", u32),
        ("pad", u32),
        ("acked_total", u64),
        ("lost_total", u64),
        ("expired_total", u64),
        ("user_outstanding", u64),
        ("absorbed", u64),
        ("timer_at", u64),
        ("busy", u64),
        ("ack_delay_exponent", u32),
        ("pad2", u32),
    ]


class MoqPktFrame(ctypes.Structure):
    _fields_ = [("stream", u64), ("offset", u64), ("len", u16), ("fin", u8), ("pad", u8 * 5)]


class MoqLost(ctypes.Structure):
    _fields_ = [
        ("kind", u8),
        ("flags", u8),
        ("nframes", u8),
        ("pad", u8),
        ("slot", u32),
        ("gen", u32),
        ("bytes", u32),
        ("pn", u64),
        ("frames", MoqPktFrame * FR_MOQ_PKT_FRAMES),
    ]


class MoqTimer(ctypes.Structure):
    _fields_ = [("kind", u8), ("pad", u8 * 3), ("slot", u32), ("gen", u32), ("pad2", u32), ("time_ns", u64)]


class MoqSentPkt(ctypes.Structure):
    _fields_ = [
        ("pn", u64),
        ("sent_time", u64),
        ("gen", u32),
        ("bytes", u16),
        ("flags", u8),
        ("state", u8),
        ("nframes", u8),
        ("pad", u8 * 7),
        ("frames", MoqPktFrame * FR_MOQ_PKT_FRAMES),
    ]


class MoqSentTable(ctypes.Structure):
    _fields_ = [("pkts", MoqSentPkt * FR_MOQ_SENT_SLOTS)]


class MoqRecoverArgs(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("gen", u32),
        ("op", u32),
        ("flags", u32),
        ("pn", u64),
        ("time_ns", u64),
        ("bytes", u32),
        ("nranges", u32),
        ("ack_delay_ns", u64),
        ("initial_rtt_ns", u64),
        ("ranges", MoqAckRange * FR_MOQ_MAX_ACK_RANGES),
        ("status", ctypes.c_int32),
        ("out_flags", u32),
        ("acked", u32),
        ("lost", u32),
        ("expired", u32),
        ("nacked_ranges", u32),
        ("nlost_ranges", u32),
        ("pad", u32),
        ("timer_ns", u64),
        ("base", u64),
        ("cwnd", u64),
        ("bytes_in_flight", u64),
        ("srtt", u64),
        ("acked_ranges", MoqAckRange * FR_MOQ_LR_MAX_RANGES),
        ("lost_ranges", MoqAckRange * FR_MOQ_LR_MAX_RANGES),
    ]
