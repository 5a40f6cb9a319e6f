"""Per-track cache of recent groups, bounded by group count and bytes (sans-I/O).

The relay keeps what it forwarded so that late joiners start at the latest group, FETCH
is answered locally and lost ranges can be re-sent. Eviction drops whole groups, oldest
first, and never the newest group.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .wire import Location


@dataclass(frozen=True, slots=True)
class CachedObject:
    location: Location
    subgroup_id: int
    publisher_priority: int
    status: int  # data.ObjectStatus value; 0 = normal
    extensions: tuple[tuple[int, int | bytes], ...]
    payload: bytes

    @property
    def size(self) -> int:
        return len(self.payload) + 16 + sum(len(v) if isinstance(v, bytes) else 8 for _, v in self.extensions)


@dataclass
class _Group:
    objects: dict[int, CachedObject] = field(default_factory=dict)
    bytes: int = 0
    end_object: int | None = None  # object id of END_OF_GROUP, when known


class TrackCache:
    """Recent groups of one track."""

    def __init__(self, max_groups: int = 8, max_bytes: int = 64 << 20) -> None:
        if max_groups < 1 or max_bytes < 1:
            raise ValueError("cache bounds must be positive")
        self.max_groups = max_groups
        self.max_bytes = max_bytes
        self._groups: dict[int, _Group] = {}
        self.bytes = 0
        self.conflicts = 0  # same location seen again with different content
        self.evicted_groups = 0

    def add(self, obj: CachedObject) -> bool:
        """Store an object; False if that location was already cached (the first copy wins)."""
        g = self._groups.get(obj.location.group)
        if g is None:
            if self._groups and obj.location.group < min(self._groups) and len(self._groups) >= self.max_groups:
                return False  # older than everything kept and no room: would be evicted at once
            g = self._groups[obj.location.group] = _Group()
        old = g.objects.get(obj.location.object)
        if old is not None:
            if old.payload != obj.payload or old.status != obj.status:
                self.conflicts += 1
            return False
        g.objects[obj.location.object] = obj
        g.bytes += obj.size
        self.bytes += obj.size
        if obj.status == 3:  # END_OF_GROUP
            g.end_object = obj.location.object
        self._evict()
        return True

    def _evict(self) -> None:
        while len(self._groups) > 1 and (len(self._groups) > self.max_groups or self.bytes > self.max_bytes):
            oldest = min(self._groups)
            self.bytes -= self._groups.pop(oldest).bytes
            self.evicted_groups += 1

    @property
    def groups(self) -> list[int]:
        return sorted(self._groups)

    def largest(self) -> Location | None:
        """Largest cached location."""
        if not self._groups:
            return None
        g = max(self._groups)
        return Location(g, max(self._groups[g].objects))

    def get(self, loc: Location) -> CachedObject | None:
        g = self._groups.get(loc.group)
        return g.objects.get(loc.object) if g else None

    def group(self, group_id: int) -> list[CachedObject]:
        """Cached objects of a group in object order."""
        g = self._groups.get(group_id)
        return [g.objects[k] for k in sorted(g.objects)] if g else []

    def range(self, start: Location, end: Location | None = None, descending: bool = False) -> Iterator[CachedObject]:
        """Cached objects with start <= location <= end (end None: to the newest), group order per
        `descending`, object order ascending within a group."""
        groups = sorted(self._groups, reverse=descending)
        for gid in groups:
            if gid < start.group or (end is not None and gid > end.group):
                continue
            for obj in self.group(gid):
                if obj.location < start or (end is not None and end < obj.location):
                    continue
                yield obj
