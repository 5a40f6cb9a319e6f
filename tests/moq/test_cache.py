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


def test_byte_bound_keeps_at_least_the_newest_group():
    c = TrackCache(max_groups=10, max_bytes=250)
    for o in range(5):
        c.add(obj(0, o))
    assert c.groups == [0] and len(c.group(0)) == 5  # one group is never evicted
    c.add(obj(1, 0))
    assert c.groups == [1]
    assert c.bytes == obj(1, 0).size


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


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), st.binary(max_size=50)), max_size=200),
       st.integers(1, 5), st.integers(1, 2000))
def test_bounds_always_hold(ops, max_groups, max_bytes):
    c = TrackCache(max_groups=max_groups, max_bytes=max_bytes)
    for g, o, p in ops:
        c.add(obj(g, o, p))
        assert len(c.groups) <= max_groups
        assert c.bytes <= max_bytes or len(c.groups) == 1
        assert c.bytes == sum(x.size for gid in c.groups for x in c.group(gid))
