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
    _fields_ = [("tag_offset", u16), ("sink", u8), ("pad", u8), ("pad2", u32)]


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
