"""Per-track cache of recent groups, bounded by group count and bytes (sans-I/O).

The relay keeps what it forwarded so that late joiners start at the latest group, FETCH
is answered locally and lost ranges can be re-sent.

Eviction drops the oldest groups whole; when the newest group alone exceeds the byte bound,
its oldest objects go too, so both bounds always hold. The cache keeps a *floor*: every
object received at or above it is still cached; below it, objects have unknown status
(evicted, or never received because the upstream subscription began later). The floor only
rises and objects arriving below it are not stored, so what is cached from the floor on has
no hole where an object was dropped. The relay refuses a FETCH that reaches below the floor
instead of leaving out objects whose status it does not know (which would tell the
subscriber they do not exist).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

from .wire import Location


@dataclass(frozen=True, slots=True)
class CachedObject:
    location: Location
    subgroup_id: int | None  # None: Forwarding Preference Datagram
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
    ids: list[int] = field(default_factory=list)  # heap of the object IDs: the oldest goes first
    bytes: int = 0


class TrackCache:
    """Recent groups of one track."""

    def __init__(self, max_groups: int = 8, max_bytes: int = 64 << 20) -> None:
        if max_groups < 1 or max_bytes < 1:
            raise ValueError("cache bounds must be positive")
        self.max_groups = max_groups
        self.max_bytes = max_bytes
        self._groups: dict[int, _Group] = {}
        self._largest: Location | None = None
        self.floor = Location(0, 0)  # everything received at or above it is cached
        self.bytes = 0
        self.conflicts = 0  # same location seen again with different content
        self.evicted_groups = 0
        self.evicted_objects = 0  # from the newest group, when it alone exceeded the byte bound

    def begin_after(self, largest: Location) -> None:
        """The upstream subscription delivers what follows `largest` (its SUBSCRIBE_OK or PUBLISH
        said so): that is the track's largest location so far, and an empty cache will never
        hold what came before it."""
        if self._largest is None or self._largest < largest:
            self._largest = largest
        if not self._groups:
            self._raise_floor(Location(largest.group, largest.object + 1))

    def add(self, obj: CachedObject) -> bool:
        """Store an object; False if it is not stored: its location is already cached (the first
        copy wins), below the floor, or evicted at once to keep the bounds."""
        loc = obj.location
        if self._largest is None or self._largest < loc:
            self._largest = loc
        if loc < self.floor:
            return False
        g = self._groups.get(loc.group)
        if g is None:
            if len(self._groups) >= self.max_groups and loc.group < min(self._groups):
                self._raise_floor(Location(min(self._groups), 0))  # older than everything kept, no room
                return False
            g = self._groups[loc.group] = _Group()
        old = g.objects.get(loc.object)
        if old is not None:
            if old.payload != obj.payload or old.status != obj.status:
                self.conflicts += 1
            return False
        g.objects[loc.object] = obj
        heapq.heappush(g.ids, loc.object)
        g.bytes += obj.size
        self.bytes += obj.size
        self._evict()
        return self.get(loc) is obj

    def _raise_floor(self, loc: Location) -> None:
        if self.floor < loc:
            self.floor = loc

    def _evict(self) -> None:
        while len(self._groups) > self.max_groups or (self.bytes > self.max_bytes and len(self._groups) > 1):
            self.bytes -= self._groups.pop(min(self._groups)).bytes
            self.evicted_groups += 1
            self._raise_floor(Location(min(self._groups), 0))
        if self.bytes <= self.max_bytes:
            return
        gid, g = next(iter(self._groups.items()))  # the only group left is too big on its own
        while self.bytes > self.max_bytes:
            oid = heapq.heappop(g.ids)
            size = g.objects.pop(oid).size
            g.bytes -= size
            self.bytes -= size
            self.evicted_objects += 1
            self._raise_floor(Location(gid, oid + 1))
        if not g.objects:
            del self._groups[gid]

    @property
    def groups(self) -> list[int]:
        return sorted(self._groups)

    def largest(self) -> Location | None:
        """Largest location received (cached or not): the track's Largest Object as the relay knows it."""
        return self._largest

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
