"""Track cache: bounds, eviction order, ranges, duplicates (pure logic)."""

from hypothesis import given
from hypothesis import strategies as st

from fastrelay.moq.cache import CachedObject, TrackCache
from fastrelay.moq.wire import Location


def obj(g: int, o: int, payload: bytes = b"x" * 100, status: int = 0) -> CachedObject:
    return CachedObject(Location(g, o), 0, 128, status, (), payload)


def test_group_bound_evicts_oldest_whole_groups():
    c = TrackCache(max_groups=2)
    for g in range(4):
        for o in range(3):
            c.add(obj(g, o))
    assert c.groups == [2, 3] and c.evicted_groups == 2
    assert c.largest() == Location(3, 2)
    assert [x.location.object for x in c.group(2)] == [0, 1, 2]


def test_byte_bound_evicts_older_groups_whole_then_the_newest_groups_oldest_objects():
    c = TrackCache(max_groups=10, max_bytes=250)  # room for two 116-byte objects
    c.add(obj(0, 0))
    c.add(obj(0, 1))
    assert c.add(obj(1, 0)) and c.groups == [1] and c.floor == Location(1, 0)  # group 0 went whole
    for o in range(1, 5):
        c.add(obj(1, o))
    # one huge group: its head goes, the cache stays within bounds and says from where it is complete
    assert [x.location.object for x in c.group(1)] == [3, 4]
    assert c.bytes == 2 * obj(1, 0).size <= 250
    assert c.floor == Location(1, 3) and c.evicted_objects == 3 and c.evicted_groups == 1
    assert c.largest() == Location(1, 4)
    assert not c.add(obj(1, 1))  # a late copy of an evicted object is not taken back: no hole behind it
    assert c.get(Location(1, 1)) is None


def test_an_object_bigger_than_the_bound_is_not_kept_but_still_counts_as_largest():
    c = TrackCache(max_bytes=1000)
    c.add(obj(0, 0))
    assert not c.add(obj(0, 1, b"x" * 2000))
    assert c.groups == [] and c.bytes == 0 and c.floor == Location(0, 2)
    assert c.largest() == Location(0, 1)
    assert c.add(obj(0, 2)) and c.groups == [0]


def test_begin_after_marks_what_came_before_the_upstream_subscription_unknown():
    c = TrackCache()
    c.begin_after(Location(4, 7))  # the upstream SUBSCRIBE_OK said Largest Object = 4/7
    assert c.largest() == Location(4, 7) and c.floor == Location(4, 8)
    assert not c.add(obj(4, 3))  # reordered: older than the subscription's start
    assert c.add(obj(4, 8)) and c.add(obj(5, 0))
    assert c.largest() == Location(5, 0)


def test_duplicates_keep_the_first_copy_and_count_conflicts():
    c = TrackCache()
    assert c.add(obj(0, 0, b"a"))
    assert not c.add(obj(0, 0, b"a"))
    assert not c.add(obj(0, 0, b"b"))
    assert c.get(Location(0, 0)).payload == b"a" and c.conflicts == 1


def test_too_old_objects_are_not_stored_when_full():
    c = TrackCache(max_groups=2)
    c.add(obj(5, 0))
    c.add(obj(6, 0))
    assert not c.add(obj(1, 0))
    assert c.groups == [5, 6]


def test_range_ascending_descending_and_bounds():
    c = TrackCache()
    for g in range(3):
        for o in range(3):
            c.add(obj(g, o))
    locs = [(x.location.group, x.location.object) for x in c.range(Location(0, 2), Location(2, 0))]
    assert locs == [(0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    desc = [(x.location.group, x.location.object) for x in c.range(Location(1, 0), None, descending=True)]
    assert desc == [(2, 0), (2, 1), (2, 2), (1, 0), (1, 1), (1, 2)]


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), st.binary(max_size=300)), max_size=200),
       st.integers(1, 5), st.integers(1, 2000))
def test_bounds_always_hold_and_everything_from_the_floor_on_is_cached(ops, max_groups, max_bytes):
    c = TrackCache(max_groups=max_groups, max_bytes=max_bytes)
    offered: set[Location] = set()
    for g, o, p in ops:
        c.add(obj(g, o, p))
        offered.add(Location(g, o))
        assert len(c.groups) <= max_groups
        assert c.bytes <= max_bytes
        assert c.bytes == sum(x.size for gid in c.groups for x in c.group(gid))
        # no hole: every location offered at or above the floor is cached
        assert all(c.get(loc) is not None for loc in offered if not loc < c.floor)
        assert c.largest() == max(offered, key=lambda loc: (loc.group, loc.object))
