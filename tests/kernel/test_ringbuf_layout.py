"""Ring-buffer record dtype derived from the ctypes mirror (pure logic)."""

import ctypes

from fastrelay.kernel import abi
from fastrelay.kernel.ringbuf import HDR_SIZE, _dtype_of


def test_dtype_matches_ctypes_offsets_after_the_header():
    dt = _dtype_of(abi.FanoutEvent)
    assert dt.itemsize == (HDR_SIZE + ctypes.sizeof(abi.FanoutEvent) + 7) & ~7
    assert dt.fields["sub_id"][1] == HDR_SIZE + abi.FanoutEvent.sub_id.offset
    assert dt.fields["bytes"][1] == HDR_SIZE + abi.FanoutEvent.bytes.offset


def test_records_are_padded_to_eight_bytes():
    class Odd(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint8)]

    assert _dtype_of(Odd).itemsize == 16
