"""BPF ring-buffer readers working on the map's mmap'd pages directly.

`RingBuffer` reads records of one fixed type in bulk (numpy); `RecordRing` reads records of
several types told apart by their first byte, each as long as its content (a struct whose
trailing array is written only as far as its count).

libbpf 1.1 hands records to a ctypes callback one at a time (about 1 us each from
Python) and its ring_buffer__poll never returns under sustained load. This reader maps
the consumer page (read-write) and the producer page + data area (read-only; the kernel
maps the data twice in a row, so a record never wraps), decodes a run of fixed-size
records with one numpy call, and advances the consumer position itself. A budget bounds
each call. The map fd itself polls readable whenever anything is unconsumed (level
triggered), which would spin a reader under sustained load; `fileno()` is instead an
edge-triggered epoll that fires only when a producer wakes readers (our programs do that
once a threshold of bytes is pending). Consume on a timer too: producers skip wake-ups
(BPF_RB_NO_WAKEUP) below the threshold.

Ordering: on x86-64 loads are not reordered with loads nor stores with stores, so reading
the producer position before the records and writing the consumer position after them
matches the kernel's acquire/release protocol; other architectures are refused.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import select
import struct
from collections.abc import Mapping

import numpy as np

from .errors import KernelError

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
_U64 = struct.Struct("<Q")
_HDR = struct.Struct("<I")


def _dtype_of(record: type[ctypes.Structure]) -> np.dtype:
    """numpy dtype (with the 8-byte ring-buffer header) for a ctypes record of scalar fields."""
    names, formats, offsets = ["_len", "_pgoff"], [np.uint32, np.uint32], [0, 4]
    for name, ctype, *_ in record._fields_:
        names.append(name)
        formats.append(np.dtype(ctype))
        offsets.append(HDR_SIZE + getattr(record, name).offset)
    itemsize = (HDR_SIZE + ctypes.sizeof(record) + 7) & ~7
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": itemsize})


class _Ring:
    """The mmap'd pages of a BPF_MAP_TYPE_RINGBUF map and its wake-up epoll."""

    def __init__(self, map_fd: int, size: int) -> None:
        if platform.machine() != "x86_64":
            raise KernelError("the mmap ring-buffer reader relies on x86-64 memory ordering")
        if size & (size - 1) or size < mmap.PAGESIZE:
            raise KernelError(f"ring buffer size {size} is not a power of two >= one page")
        self._fd = map_fd
        self._mask = size - 1
        self.size = size  # bytes of record data the ring holds (headers included)
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data_off = page
        self._wakeups = select.epoll()
        self._wakeups.register(map_fd, select.EPOLLIN | select.EPOLLET)
        self.foreign_records = 0  # records this reader does not know, skipped (counted)

    def fileno(self) -> int:
        """Readable after a producer woke readers (edge-triggered); consume() re-arms it."""
        return self._wakeups.fileno()

    def _positions(self) -> tuple[int, int]:
        """(consumer, producer) positions, taking the pending wake-up edge."""
        self._wakeups.poll(0)
        return _U64.unpack_from(self._cons, 0)[0], _U64.unpack_from(self._prod, 0)[0]

    def close(self) -> None:
        self._wakeups.close()
        self._cons.close()
        self._prod.close()


class RecordRing(_Ring):
    """Reads records of the ctypes types in `kinds` (first byte -> type), each possibly shorter
    than its type (a trailing array written only as far as its count): the missing bytes read
    as zeros."""

    def __init__(self, map_fd: int, size: int, kinds: Mapping[int, type[ctypes.Structure]]) -> None:
        super().__init__(map_fd, size)
        self._kinds = {k: (t, ctypes.sizeof(t)) for k, t in kinds.items()}

    def consume(self, budget: int = 1 << 16) -> list[ctypes.Structure]:
        """Up to `budget` ready records, decoded, in order; never blocks."""
        cons, prod = self._positions()
        out: list[ctypes.Structure] = []
        data, base, mask, kinds = self._prod, self._data_off, self._mask, self._kinds
        while cons < prod and len(out) < budget:
            start = base + (cons & mask)
            (length,) = _HDR.unpack_from(data, start)
            if length & BUSY_BIT:
                break
            size = length & ~DISCARD_BIT
            if not length & DISCARD_BIT:
                raw = data[start + HDR_SIZE:start + HDR_SIZE + size]
                known = kinds.get(raw[0]) if raw else None
                if known is None or size > known[1]:
                    self.foreign_records += 1
                else:
                    out.append(known[0].from_buffer_copy(raw.ljust(known[1], b"\0")))
            cons += (HDR_SIZE + size + 7) & ~7
        _U64.pack_into(self._cons, 0, cons)
        return out


class RingBuffer(_Ring):
    """Reads fixed-size records of ctypes type `record` from a BPF_MAP_TYPE_RINGBUF map."""

    def __init__(self, map_fd: int, size: int, record: type[ctypes.Structure]) -> None:
        super().__init__(map_fd, size)
        self.dtype = _dtype_of(record)
        self._payload_len = ctypes.sizeof(record)

    def consume(self, budget: int = 1 << 16) -> np.ndarray:
        """Up to `budget` ready records as a numpy structured array (a copy); never blocks."""
        cons, prod = self._positions()
        step = self.dtype.itemsize
        n = min((prod - cons) // step, budget)
        if n <= 0:
            return np.empty(0, self.dtype)
        view = np.frombuffer(self._prod, dtype=self.dtype, count=n, offset=self._data_off + (cons & self._mask))
        lens = view["_len"]
        bad = np.flatnonzero(lens & ~np.uint32(DISCARD_BIT) != self._payload_len)
        k = int(bad[0]) if bad.size else n
        out = view[:k][(lens[:k] & DISCARD_BIT) == 0].copy()
        del view, lens
        cons += k * step
        if k < n:
            cons = self._skip_one(cons)
        _U64.pack_into(self._cons, 0, cons)
        return out

    def _skip_one(self, cons: int) -> int:
        """Step over a record that is not ours in size (or stop at one still being written)."""
        (length,) = struct.unpack_from("<I", self._prod, self._data_off + (cons & self._mask))
        if length & BUSY_BIT:
            return cons
        self.foreign_records += 1
        return cons + ((HDR_SIZE + (length & ~DISCARD_BIT) + 7) & ~7)
