"""Ring-buffer reader with a per-call budget.

libbpf 1.1's ring_buffer__poll never returns under sustained load and has no
consume_n, so the sample callback stops the walk (returns -1) once the budget is used;
libbpf has already advanced past that record, so nothing is lost or seen twice.
Consume when `fileno()` is readable and on a timer (producers may skip wake-ups).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Generic, TypeVar

from .libbpf import RING_BUFFER_SAMPLE_FN, check_ptr, lib

R = TypeVar("R", bound=ctypes.Structure)


class RingBuffer(Generic[R]):
    """Calls `handler(record)` for each record; `record` is only valid during the call."""

    def __init__(self, map_fd: int, record: type[R], handler: Callable[[R], None]) -> None:
        self._record = record
        self._size = ctypes.sizeof(record)
        self._handler = handler
        self._budget = 0
        self._seen = 0
        self._error: BaseException | None = None
        self.short_records = 0
        self._cb = RING_BUFFER_SAMPLE_FN(self._sample)
        self._rb = check_ptr(lib.ring_buffer__new(map_fd, self._cb, None, None), "ring_buffer__new")

    def _sample(self, _ctx: int, data: int, size: int) -> int:
        if size < self._size:
            self.short_records += 1
        else:
            try:
                self._handler(self._record.from_address(data))
            except BaseException as exc:  # re-raised by consume(); a C callback must not unwind
                self._error = exc
                return -1
        self._seen += 1
        return -1 if self._seen >= self._budget else 0

    def consume(self, budget: int = 65536) -> int:
        """Process up to `budget` ready records without blocking; returns how many."""
        self._budget, self._seen = budget, 0
        lib.ring_buffer__consume(self._rb)
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return self._seen

    def fileno(self) -> int:
        """An epoll fd that becomes readable when the kernel wakes readers."""
        return lib.ring_buffer__epoll_fd(self._rb)

    def close(self) -> None:
        if self._rb:
            lib.ring_buffer__free(self._rb)
            self._rb = 0

    def __del__(self) -> None:
        self.close()
