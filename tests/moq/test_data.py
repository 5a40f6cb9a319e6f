"""MoQT data plane codec: subgroup/fetch streams and datagrams, drafts 14 and 16."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrelay.moq.data import (
    DRAFT_14,
    DRAFT_16,
    IMMUTABLE_EXTENSIONS,
    PRIOR_GROUP_ID_GAP,
    PRIOR_OBJECT_ID_GAP,
    DataStreamParser,
    EndOfRange,
    FetchHeader,
    MalformedTrack,
    Object,
    ObjectDatagram,
    ObjectStatus,
    ObjectTooLarge,
    SubgroupHeader,
    SubgroupIdMode,
    datagram_type,
    decode_datagram,
    encode_datagram,
    encode_end_of_range,
    encode_fetch_header,
    encode_fetch_object,
    encode_subgroup_header,
    encode_subgroup_object,
    known_stream_type,
    subgroup_header_for,
)
from fastrelay.moq.wire import VARINT_MAX, ErrorCode, NeedMore, ProtocolError, Writer

VERSIONS = [DRAFT_14, DRAFT_16]
NORMAL, DNE = ObjectStatus.NORMAL, ObjectStatus.DOES_NOT_EXIST
EOG, EOT = ObjectStatus.END_OF_GROUP, ObjectStatus.END_OF_TRACK

DATAGRAM_TYPES = {
    DRAFT_14: set(range(0x08)) | {0x20, 0x21},
    DRAFT_16: set(range(0x10)) | {0x20, 0x21, 0x24, 0x25, 0x28, 0x29, 0x2C, 0x2D},
}
SUBGROUP_TYPES = {
    DRAFT_14: set(range(0x10, 0x16)) | set(range(0x18, 0x1E)),
    DRAFT_16: {t + hi for t in [*range(0x10, 0x16), *range(0x18, 0x1E)] for hi in (0, 0x20)},
}


def parse(version: int, data: bytes, cuts: list[int] = (), **kw) -> tuple[list, DataStreamParser]:
    p = DataStreamParser(version, **kw)
    events, last = [], 0
    for cut in [*sorted(cuts), len(data)]:
        events += p.feed(data[last:cut])
        last = cut
    p.finish()
    return events, p


def kvp_block(pairs: list[tuple[int, int | bytes]], version: int) -> bytes:
    """Key-Value-Pairs as the draft serializes them (delta types in 16, absolute in 14)."""
    w = Writer()
    if version == DRAFT_16:
        w.key_value_pairs(pairs)
    else:
        for pair in pairs:
            w.key_value_pairs([pair])
    return bytes(w)


# --- strategies ------------------------------------------------------------------------

ids = st.one_of(st.integers(0, 70), st.integers(0, VARINT_MAX))
small_ids = st.one_of(st.integers(0, 4), ids)
payloads = st.binary(max_size=40)
plain_types = st.one_of(
    st.sampled_from([0x02, 0x04, 0x07, 0x0D, 0x21, 0x4D, 0x3FFF, 0x4000, VARINT_MAX - 1, VARINT_MAX]),
    st.integers(0, 500),
).filter(lambda t: t not in (IMMUTABLE_EXTENSIONS, PRIOR_GROUP_ID_GAP, PRIOR_OBJECT_ID_GAP))


def pair_for(kind: int) -> st.SearchStrategy:
    value = st.integers(0, VARINT_MAX) if kind % 2 == 0 else st.binary(max_size=20)
    return value.map(lambda v: (kind, v))


plain_pairs = st.lists(plain_types.flatmap(pair_for), max_size=4)


@st.composite
def extensions(draw, version: int, group_id: int, object_id: int) -> list:
    pairs = draw(plain_pairs)
    if draw(st.booleans()):
        pairs.append((PRIOR_GROUP_ID_GAP, draw(st.integers(0, group_id))))
    if draw(st.booleans()):
        pairs.append((PRIOR_OBJECT_ID_GAP, draw(st.integers(0, object_id))))
    if draw(st.booleans()):
        inner = draw(plain_pairs)
        pairs.append((IMMUTABLE_EXTENSIONS, kvp_block(sorted(inner, key=lambda p: p[0])
                                                      if version == DRAFT_16 else inner, version)))
    if version == DRAFT_16:
        return sorted(pairs, key=lambda p: p[0])
    return draw(st.permutations(pairs))


def statuses(version: int) -> st.SearchStrategy:
    return st.sampled_from([NORMAL, NORMAL, EOG, EOT] + ([DNE] if version == DRAFT_14 else []))


def extensions_allowed(status: ObjectStatus, version: int) -> bool:
    return status is NORMAL if version == DRAFT_16 else status is not DNE


@st.composite
def object_body(draw, version: int, group_id: int, object_id: int, *, status: bool = True,
                ext: bool = True) -> tuple:
    """(status, extensions, payload) consistent with the draft's rules."""
    s = draw(statuses(version)) if status else NORMAL
    with_ext = ext and extensions_allowed(s, version) and draw(st.booleans())
    exts = draw(extensions(version, group_id, object_id)) if with_ext else []
    return s, exts, draw(payloads) if s is NORMAL else b""


@st.composite
def subgroup_streams(draw) -> tuple[int, SubgroupHeader, list[Object]]:
    version = draw(st.sampled_from(VERSIONS))
    mode = draw(st.sampled_from(SubgroupIdMode))
    priority = draw(st.integers(0, 255) | (st.none() if version == DRAFT_16 else st.nothing()))
    group, ext = draw(ids), draw(st.booleans())
    object_ids = sorted(draw(st.lists(ids, max_size=6, unique=True)))
    subgroup = {SubgroupIdMode.ZERO: 0, SubgroupIdMode.EXPLICIT: draw(ids),
                SubgroupIdMode.FIRST_OBJECT: None}[mode]
    header = SubgroupHeader(draw(ids), group, subgroup, mode, priority, ext, draw(st.booleans()))
    resolved = object_ids[0] if subgroup is None and object_ids else subgroup
    objects = [Object(group, resolved, oid, priority, *draw(object_body(version, group, oid, ext=ext)))
               for oid in object_ids]
    return version, header, objects


def encode_subgroup_stream(version: int, header: SubgroupHeader, objects: list[Object]) -> tuple[bytes, list[int]]:
    data, offsets, prev = encode_subgroup_header(header, version), [], None
    for obj in objects:
        offsets.append(len(data))
        data += encode_subgroup_object(obj, header, prev, version)
        prev = obj.object_id
    return data, offsets


@st.composite
def fetch_streams(draw) -> tuple[int, list]:
    version = draw(st.sampled_from(VERSIONS))
    items: list = []
    for _ in range(draw(st.integers(0, 7))):
        if version == DRAFT_16 and draw(st.integers(0, 5)) == 0:
            items.append(EndOfRange(draw(small_ids), draw(small_ids), draw(st.booleans())))
            continue
        group, object_id = draw(small_ids), draw(small_ids)
        subgroup = draw(small_ids | (st.none() if version == DRAFT_16 else st.nothing()))
        priority = draw(st.sampled_from([0, 128, 255]) | st.integers(0, 255))
        if version == DRAFT_16 and items and draw(st.booleans()):  # exercise the omitted-field paths
            object_id = min(items[-1].object_id + 1, VARINT_MAX)
            group = items[-1].group_id
            last = next((i for i in reversed(items) if isinstance(i, Object)), None)
            if last is not None and draw(st.booleans()):
                priority = last.publisher_priority
                if last.subgroup_id is not None:
                    subgroup = min(last.subgroup_id + draw(st.integers(0, 1)), VARINT_MAX)
        body = draw(object_body(version, group, object_id, status=version == DRAFT_14))
        items.append(Object(group, subgroup, object_id, priority, *body))
    return version, items


def encode_fetch_stream(version: int, request_id: int, items: list) -> tuple[bytes, list[int]]:
    data, offsets, prev, last = encode_fetch_header(FetchHeader(request_id)), [], None, None
    for item in items:
        offsets.append(len(data))
        if isinstance(item, EndOfRange):
            data += encode_end_of_range(item, version)
        else:
            data += encode_fetch_object(item, prev, version, last_object=last)
            last = item
        prev = item
    return data, offsets


@st.composite
def datagrams(draw) -> tuple[int, ObjectDatagram]:
    version = draw(st.sampled_from(VERSIONS))
    group, object_id = draw(ids), draw(st.integers(0, 2) | ids)
    priority = draw(st.integers(0, 255) | (st.none() if version == DRAFT_16 else st.nothing()))
    status, exts, payload = draw(object_body(version, group, object_id))
    eog = status is NORMAL and draw(st.booleans())
    return version, ObjectDatagram(draw(ids), Object(group, None, object_id, priority, status, exts, payload), eog)


def cuts_for(data: bytes) -> st.SearchStrategy:
    return st.lists(st.integers(0, len(data)), max_size=8)


# --- round trips ----------------------------------------------------------------------


@given(subgroup_streams(), st.data())
def test_subgroup_stream_round_trip_any_split(stream, data):
    version, header, objects = stream
    raw, offsets = encode_subgroup_stream(version, header, objects)
    events, parser = parse(version, raw, data.draw(cuts_for(raw)))
    assert events == [header, *objects]
    assert [e.offset for e in events[1:]] == offsets
    assert parser.consumed == len(raw)
    assert known_stream_type(raw, version) == "subgroup"


@given(fetch_streams(), ids, st.data())
def test_fetch_stream_round_trip_any_split(stream, request_id, data):
    version, items = stream
    raw, offsets = encode_fetch_stream(version, request_id, items)
    events, parser = parse(version, raw, data.draw(cuts_for(raw)))
    assert events == [FetchHeader(request_id), *items]
    assert [e.offset for e in events[1:]] == offsets
    assert parser.consumed == len(raw)
    assert known_stream_type(raw, version) == "fetch"


@given(datagrams())
def test_datagram_round_trip(dg):
    version, datagram = dg
    raw = encode_datagram(datagram, version)
    assert raw[0] == datagram_type(datagram, version)
    assert decode_datagram(raw, version) == datagram


def test_datagram_type_choice_covers_the_type_table():
    """Every valid type is chosen for some properties, except draft-16 STATUS|EXTENSIONS
    types: extensions are allowed only on Normal Objects, and an empty Normal Object is
    sent more compactly as an empty payload."""
    for version in VERSIONS:
        chosen = set()
        for bits in range(32):
            ext, eog, zero, default, status = (bool(bits & 1 << i) for i in range(5))
            if (status and eog) or (default and version == DRAFT_14) or (status and ext and version == DRAFT_16):
                continue
            obj = Object(1, None, 0 if zero else 9, None if default else 7, EOG if status else NORMAL,
                         [(2, 1)] if ext else [], b"" if status else b"p")
            dg = ObjectDatagram(3, obj, eog)
            chosen.add(datagram_type(dg, version))
            assert decode_datagram(encode_datagram(dg, version), version) == dg
        unreachable = {0x21, 0x25, 0x29, 0x2D} if version == DRAFT_16 else set()
        assert chosen == DATAGRAM_TYPES[version] - unreachable


# --- hand-written vectors from the draft text ---------------------------------------------

ABCD_EFGH = [
    # SUBGROUP_HEADER: Type 0x14 (Subgroup ID field present, no extensions, priority present),
    # Track Alias 2, Group 0, Subgroup 0, Publisher Priority 0 (the draft's first example)
    "14 02 00 00 00",
    "00 04 61626364",  # Object ID Delta 0 (id 0), Payload Length 4, "abcd"
    "00 04 65666768",  # Object ID Delta 0 (id 0 + 0 + 1 = 1), Payload Length 4, "efgh"
]
TRACE = "0e" + b"traceID:123456".hex()  # odd type: length 14, value
EXT_EXAMPLE = {
    # The draft's second example (its Extension Headers Length of 33 does not add up: the
    # value it shows is 14 bytes, so the block is 26 = 0x1a bytes).
    DRAFT_16: [
        "35 02 00 00",  # Type 0x35: DEFAULT_PRIORITY|explicit Subgroup ID|EXTENSIONS; alias 2, group 0, sub 0
        "00 1a 04 c00000008257dcd3 4049" + TRACE + " 04 61626364",  # type 4 = 2186796243; delta 73 -> type 77
        "00 00 04 65666768",  # delta 0 (id 1), no extensions, "efgh"
    ],
    DRAFT_14: [
        "15 02 00 00 00",  # Type 0x15 (explicit Subgroup ID, EXTENSIONS); priority 0 is mandatory
        "00 1a 04 c00000008257dcd3 404d" + TRACE + " 04 61626364",  # absolute type 77 = 0x404d
        "00 00 04 65666768",
    ],
}


def hexjoin(parts: list[str]) -> bytes:
    return bytes.fromhex("".join(parts).replace(" ", ""))


@pytest.mark.parametrize("version", VERSIONS)
def test_vector_subgroup_two_objects(version):
    raw = hexjoin(ABCD_EFGH)
    header = SubgroupHeader(2, 0, 0, SubgroupIdMode.EXPLICIT, 0)
    objects = [Object(0, 0, 0, 0, payload=b"abcd"), Object(0, 0, 1, 0, payload=b"efgh")]
    events, _ = parse(version, raw)
    assert events == [header, *objects]
    assert [e.offset for e in events[1:]] == [5, 11]
    assert encode_subgroup_stream(version, header, objects)[0] == raw


@pytest.mark.parametrize("version", VERSIONS)
def test_vector_subgroup_with_extensions(version):
    raw = hexjoin(EXT_EXAMPLE[version])
    priority = None if version == DRAFT_16 else 0
    header = SubgroupHeader(2, 0, 0, SubgroupIdMode.EXPLICIT, priority, extensions=True)
    objects = [Object(0, 0, 0, priority, extensions=[(4, 2186796243), (77, b"traceID:123456")], payload=b"abcd"),
               Object(0, 0, 1, priority, payload=b"efgh")]
    assert parse(version, raw)[0] == [header, *objects]
    assert encode_subgroup_stream(version, header, objects)[0] == raw
    other = DRAFT_14 if version == DRAFT_16 else DRAFT_16
    if other == DRAFT_16:  # the same bytes mean another extension type in the other draft
        assert parse(other, raw)[0][1].extensions[1][0] == 4 + 77
    else:
        with pytest.raises(ProtocolError):  # 0x35 is not a draft-14 stream type
            parse(other, raw)


DATAGRAM_VECTORS = [
    # draft-16 Type 0x0C: ZERO_OBJECT_ID|DEFAULT_PRIORITY; alias 2, group 5, payload "hi"
    (DRAFT_16, "0c 02 05 6869", ObjectDatagram(2, Object(5, None, 0, None, payload=b"hi"))),
    # draft-16 Type 0x2C: STATUS|ZERO_OBJECT_ID|DEFAULT_PRIORITY; status 0x3 End of Group
    (DRAFT_16, "2c 02 05 03", ObjectDatagram(2, Object(5, None, 0, None, EOG))),
    # draft-16 Type 0x03: EXTENSIONS|END_OF_GROUP; object 7, priority 0x80, 4 bytes of
    # extensions (type 6 = 42, delta 2 -> type 8 = 1), payload "hi"
    (DRAFT_16, "03 02 05 07 80 04 062a 0201 6869",
     ObjectDatagram(2, Object(5, None, 7, 0x80, extensions=[(6, 42), (8, 1)], payload=b"hi"), True)),
    # draft-14 Type 0x03: same fields, but the second extension type is absolute (8)
    (DRAFT_14, "03 02 05 07 80 04 062a 0801 6869",
     ObjectDatagram(2, Object(5, None, 7, 0x80, extensions=[(6, 42), (8, 1)], payload=b"hi"), True)),
    # draft-14 Type 0x20: status datagram, Object ID always present (0), priority 0x80,
    # status 0x1 Object Does Not Exist
    (DRAFT_14, "20 02 05 00 80 01", ObjectDatagram(2, Object(5, None, 0, 0x80, DNE))),
    # draft-14 Type 0x06: END_OF_GROUP|no Object ID; priority 1, empty payload
    (DRAFT_14, "06 02 05 01", ObjectDatagram(2, Object(5, None, 0, 1), True)),
]


@pytest.mark.parametrize(("version", "hexdata", "dg"), DATAGRAM_VECTORS)
def test_vector_datagram(version, hexdata, dg):
    raw = bytes.fromhex(hexdata.replace(" ", ""))
    assert decode_datagram(raw, version) == dg
    assert encode_datagram(dg, version) == raw


def test_vector_fetch_draft16():
    raw = hexjoin([
        "05 07",                 # FETCH_HEADER, Request ID 7
        "1f 01 02 03 80 02 6162",  # flags 0x1F: group, subgroup field, object, priority present
        "01 01 63",              # flags 0x01: same group/subgroup/priority, object id 3 + 1
        "4040 00",               # flags 0x40 (datagram), object 5, empty payload (no status)
        "408c 03 00",            # End of Non-Existent Range up to {3, 0}
        "00 01 64",              # flags 0: group 3 and object 0 + 1 from the range, subgroup 0,
                                 # priority 0x80 from the last Object
    ])
    items = [Object(1, 2, 3, 0x80, payload=b"ab"), Object(1, 2, 4, 0x80, payload=b"c"),
             Object(1, None, 5, 0x80), EndOfRange(3, 0), Object(3, 0, 1, 0x80, payload=b"d")]
    events, _ = parse(DRAFT_16, raw)
    assert events == [FetchHeader(7), *items]
    assert [e.offset for e in events[1:]] == [2, 10, 13, 16, 20]
    assert encode_fetch_stream(DRAFT_16, 7, items)[0] == raw
    # without the last Object the encoder cannot inherit its priority after the range
    assert encode_fetch_object(items[4], items[3], DRAFT_16) == bytes.fromhex("10 80 01 64")


def test_vector_fetch_draft14():
    raw = hexjoin([
        "05 07",
        "01 02 03 80 00 02 6162",  # group 1, subgroup 2, object 3, prio 0x80, no extensions, "ab"
        "01 04 04 80 00 00 03",    # datagram object: subgroup = object id 4, length 0, End of Group
    ])
    events, _ = parse(DRAFT_14, raw)
    assert events == [FetchHeader(7), Object(1, 2, 3, 0x80, payload=b"ab"), Object(1, 4, 4, 0x80, EOG)]
    assert encode_fetch_stream(DRAFT_14, 7, [Object(1, 2, 3, 0x80, payload=b"ab"),
                                             Object(1, None, 4, 0x80, EOG)])[0] == raw


# --- type tables ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_stream_types(version):
    for t in range(0x100):
        first = bytes(Writer().varint(t))
        expected = "fetch" if t == 5 else "subgroup" if t in SUBGROUP_TYPES[version] else None
        assert known_stream_type(first, version) == expected
        if expected is None:
            with pytest.raises(ProtocolError):
                DataStreamParser(version).feed(first)
    with pytest.raises(NeedMore):
        known_stream_type(b"\x40", version)


@pytest.mark.parametrize("version", VERSIONS)
def test_datagram_types(version):
    for t in range(0x100):
        body = bytes(Writer().varint(t)) + b"\x01\x02"  # alias 1, group 2
        body += b"" if t & 0x04 and t in DATAGRAM_TYPES[version] else b"\x03"  # object id
        body += b"" if t & 0x08 and version == DRAFT_16 else b"\x04"  # priority
        body += b"\x02\x02\x05" if t & 0x01 else b""  # extension type 2 = 5
        # status (draft-16 allows extensions only with status Normal) or payload
        status = NORMAL if t & 0x01 and version == DRAFT_16 else EOG
        body += bytes([status]) if t & 0x20 else b"xy"
        if t in DATAGRAM_TYPES[version]:
            dg = decode_datagram(body, version)
            assert dg.end_of_group == bool(t & 0x02)
            assert dg.object.status is (status if t & 0x20 else NORMAL)
        else:
            with pytest.raises(ProtocolError):
                decode_datagram(body, version)


# --- stream framing, bounds, offsets --------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_finish_inside_an_object_raises(version):
    raw = hexjoin(ABCD_EFGH)
    for cut in range(len(raw)):
        p = DataStreamParser(version)
        p.feed(raw[:cut])
        if cut in (5, 11):  # header / first object boundaries
            p.finish()
            continue
        with pytest.raises(ProtocolError) as e:
            p.finish()
        assert e.value.code == ErrorCode.PROTOCOL_VIOLATION
        with pytest.raises(ProtocolError):  # the parser stays dead
            p.feed(raw[cut:])


@pytest.mark.parametrize("version", VERSIONS)
def test_object_size_bound(version):
    header = encode_subgroup_header(SubgroupHeader(1, 1, 0, SubgroupIdMode.ZERO, 0), version)
    h = SubgroupHeader(1, 1, 0, SubgroupIdMode.ZERO, 0)
    ok = encode_subgroup_object(Object(1, 0, 0, 0, payload=b"x" * 62), h, None, version)
    assert len(ok) == 64  # delta, length, payload
    assert parse(version, header + ok, max_object_size=64)[0][1].payload == b"x" * 62
    big = encode_subgroup_object(Object(1, 0, 0, 0, payload=b"x" * 63), h, None, version)
    p = DataStreamParser(version, max_object_size=64)
    assert p.feed(header) == [SubgroupHeader(1, 1, 0, SubgroupIdMode.ZERO, 0)]
    with pytest.raises(ObjectTooLarge):  # detected from the length prefix, before the payload arrives
        p.feed(big[:2])
    # extension blocks count as well
    h = SubgroupHeader(1, 1, 0, SubgroupIdMode.ZERO, 0, extensions=True)
    p = DataStreamParser(version, max_object_size=64)
    p.feed(encode_subgroup_header(h, version))
    with pytest.raises(ProtocolError):
        p.feed(b"\x00\x40\x80")  # delta 0, Extension Headers Length 128


def test_large_object_in_small_chunks_is_linear():
    payload = bytes(range(256)) * 4096  # 1 MiB
    header = SubgroupHeader(1, 1, 0, SubgroupIdMode.ZERO, 0)
    raw = encode_subgroup_stream(DRAFT_16, header, [Object(1, 0, 0, 0, payload=payload)])[0]
    p = DataStreamParser(DRAFT_16)
    events = []
    for i in range(0, len(raw), 1000):
        events += p.feed(raw[i:i + 1000])
    p.finish()
    assert events[1].payload == payload and events[1].offset == 4  # after "10 01 01 00"


def test_header_only_stream_and_empty_stream():
    p = DataStreamParser(DRAFT_16)
    assert p.feed(b"\x05\x09") == [FetchHeader(9)]
    p.finish()
    with pytest.raises(ProtocolError):
        DataStreamParser(DRAFT_16).finish()


def test_first_object_subgroup_mode_resolves_from_first_object():
    h = SubgroupHeader(1, 2, None, SubgroupIdMode.FIRST_OBJECT, None)
    objects = [Object(2, 7, 7, None), Object(2, 7, 9, None, payload=b"z")]
    raw, _ = encode_subgroup_stream(DRAFT_16, h, objects)
    assert raw[:3] == b"\x32\x01\x02"  # 0x32: DEFAULT_PRIORITY | mode 0b01, no subgroup field
    assert parse(DRAFT_16, raw)[0] == [h, *objects]


def test_subgroup_header_for_is_compact():
    h = subgroup_header_for(1, 2, 0, 5, publisher_priority=9, default_priority=9, version=DRAFT_16)
    assert (h.subgroup_id_mode, h.publisher_priority, h.stream_type) == (SubgroupIdMode.ZERO, None, 0x30)
    h = subgroup_header_for(1, 2, 5, 5, publisher_priority=9, default_priority=9, version=DRAFT_14,
                            extensions=True, end_of_group=True)
    assert (h.subgroup_id_mode, h.publisher_priority, h.stream_type) == (SubgroupIdMode.FIRST_OBJECT, 9, 0x1B)
    h = subgroup_header_for(1, 2, 6, 5, publisher_priority=9, version=DRAFT_16)
    assert (h.subgroup_id, h.stream_type) == (6, 0x14)


# --- malformed input ------------------------------------------------------------------------


def stream_error(version: int, raw: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        parse(version, raw)
    return e.value


def datagram_error(version: int, raw: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        decode_datagram(raw, version)
    return e.value


def test_datagram_violations():
    assert datagram_error(DRAFT_16, bytes.fromhex("01020307 80 00 6869")).code == ErrorCode.PROTOCOL_VIOLATION
    datagram_error(DRAFT_16, bytes.fromhex("2c 02 05 03 00"))  # bytes after the status
    datagram_error(DRAFT_16, bytes.fromhex("2c 02 05 02"))  # status 0x2 is undefined
    datagram_error(DRAFT_16, bytes.fromhex("2c 02 05 01"))  # Does Not Exist is draft-14 only
    decode_datagram(bytes.fromhex("2c 02 05 00"), DRAFT_16)  # explicit Normal status
    datagram_error(DRAFT_16, bytes.fromhex("2d 02 05 02 0201 03"))  # extensions on End of Group
    assert decode_datagram(bytes.fromhex("21 02 05 00 80 02 0201 03"), DRAFT_14).object.status is EOG
    datagram_error(DRAFT_14, bytes.fromhex("21 02 05 00 80 02 0201 01"))  # extensions on Does Not Exist
    datagram_error(DRAFT_14, bytes.fromhex("00 02"))  # truncated


@pytest.mark.parametrize("version", VERSIONS)
def test_subgroup_violations(version):
    ext_header = "15 01 02 03 04"  # explicit subgroup 3, priority 4, extensions
    # a non-empty extension block on End of Track (draft-16) / Does Not Exist (draft-14)
    status = "04" if version == DRAFT_16 else "01"
    err = stream_error(version, hexjoin([ext_header, "00 02 0201 00", status]))
    assert err.code == ErrorCode.PROTOCOL_VIOLATION
    stream_error(version, hexjoin([ext_header, "00 00 00 07"]))  # unknown status 7
    # object id delta overflow: id 2^62-1, then delta 0 -> 2^62
    stream_error(version, hexjoin(["14 01 02 03 04", "ffffffffffffffff 01 61", "00 01 61"]))
    # KVP value longer than 2^16-1
    stream_error(version, hexjoin([ext_header, "00 05 01 80010000 01 61"]))
    # KVPs overrunning the Extension Headers Length
    stream_error(version, hexjoin([ext_header, "00 02 01 05 6162636465 01 61"]))


@pytest.mark.parametrize("version", VERSIONS)
def test_extension_rules(version):
    def obj_with(exts: list, group: int = 5, object_id: int = 5) -> bytes:
        h = SubgroupHeader(1, group, 0, SubgroupIdMode.ZERO, 1, extensions=True)
        return encode_subgroup_header(h, version) + encode_subgroup_object(
            Object(group, 0, object_id, 1, extensions=exts, payload=b"p"), h, None, version)

    assert parse(version, obj_with([(PRIOR_GROUP_ID_GAP, 5), (PRIOR_OBJECT_ID_GAP, 5)]))[0][1].payload == b"p"
    for exts in ([(PRIOR_GROUP_ID_GAP, 6)], [(PRIOR_OBJECT_ID_GAP, 6)],
                 [(PRIOR_GROUP_ID_GAP, 1), (PRIOR_GROUP_ID_GAP, 1)],
                 [(IMMUTABLE_EXTENSIONS, kvp_block([(PRIOR_OBJECT_ID_GAP, 1)], version)), (PRIOR_OBJECT_ID_GAP, 1)],
                 [(IMMUTABLE_EXTENSIONS, kvp_block([(IMMUTABLE_EXTENSIONS, b"")], version))]):
        with pytest.raises(MalformedTrack) as e:
            parse(version, obj_with(exts))
        assert e.value.reset_code == 0x12
    bad_inner = stream_error(version, obj_with([(IMMUTABLE_EXTENSIONS, b"\x03\x05ab")]))
    assert bad_inner.code == ErrorCode.KEY_VALUE_FORMATTING_ERROR
    two = [(IMMUTABLE_EXTENSIONS, b""), (IMMUTABLE_EXTENSIONS, b"")]
    if version == DRAFT_16:
        with pytest.raises(MalformedTrack):
            parse(version, obj_with(two))
    else:
        parse(version, obj_with(two))


def test_fetch16_violations():
    def err(items: str) -> ProtocolError:
        return stream_error(DRAFT_16, bytes.fromhex("0501" + items.replace(" ", "")))

    # first object referencing the prior object: group, object, priority, subgroup (0x01, 0x02)
    for flags in (0x17, 0x1B, 0x0F, 0x1D, 0x1E):
        first = bytes(Writer().varint(flags)).hex()
        fields = ("01" if flags & 0x08 else "") + ("02" if flags & 3 == 3 else "") + \
            ("03" if flags & 0x04 else "") + ("80" if flags & 0x10 else "")
        err(first + fields + "00")
    for flags in (0x80, 0x8B, 0x8D, 0xFF, 0x10B, 0x200):  # not flags, not End of Range
        err(bytes(Writer().varint(flags)).hex() + "00 00 00 00 00")
    err("405c 01 02 80 00 01 00")  # mode 0x01 after a Datagram object (it has no Subgroup ID)
    err("408c 01 02 01 00")  # after an End of Range there is no prior Object for subgroup/priority
    # after an End of Range {1, 2}: group 1 and object 3 are implied, priority is explicit
    assert parse(DRAFT_16, bytes.fromhex("0501 408c 0102 10 80 00"))[0][2] == Object(1, 0, 3, 0x80)
    # 0x5F: a Datagram object ignores the subgroup bits (no Subgroup ID field follows)
    assert parse(DRAFT_16, bytes.fromhex("0501 405f 01 02 80 00"))[0][1] == Object(1, None, 2, 0x80)


def test_encoder_rejects_what_the_draft_cannot_carry():
    h16 = SubgroupHeader(1, 1, 0, SubgroupIdMode.ZERO, None, extensions=True)
    with pytest.raises(ValueError):
        encode_subgroup_header(h16, DRAFT_14)  # draft-14 has no DEFAULT_PRIORITY
    with pytest.raises(ValueError):
        encode_subgroup_object(Object(1, 0, 0, None, EOG, payload=b"x"), h16, None, DRAFT_16)
    with pytest.raises(ValueError):
        encode_subgroup_object(Object(1, 0, 0, None, extensions=[(4, 1), (2, 1)]), h16, None, DRAFT_16)
    with pytest.raises(ValueError):
        encode_subgroup_object(Object(1, 0, 3, None), h16, 3, DRAFT_16)
    with pytest.raises(ValueError):
        encode_fetch_object(Object(1, 0, 3, 1, EOG), None, DRAFT_16)
    with pytest.raises(ValueError):
        encode_datagram(ObjectDatagram(1, Object(1, None, 0, 1, EOG), end_of_group=True), DRAFT_16)
    with pytest.raises(ValueError):
        encode_datagram(ObjectDatagram(1, Object(1, None, 0, None)), DRAFT_14)
    with pytest.raises(ValueError):
        encode_end_of_range(EndOfRange(1, 1), DRAFT_14)


# --- robustness -----------------------------------------------------------------------------


def feed_all(version: int, raw: bytes, cuts: list[int]) -> None:
    try:
        parse(version, raw, cuts, max_object_size=1 << 12)
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(st.sampled_from(VERSIONS), st.binary(max_size=200), st.data())
def test_random_bytes_only_raise_protocol_error(version, raw, data):
    feed_all(version, raw, data.draw(cuts_for(raw)))
    for prefix in (b"\x05", b"\x15\x01\x02\x03\x04", b"\x35\x01\x02\x03"):
        feed_all(version, prefix + raw, data.draw(cuts_for(raw)))
    try:
        decode_datagram(raw, version)
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(st.one_of(subgroup_streams(), fetch_streams().map(lambda s: (s[0], None, s[1]))), st.data())
def test_mutated_streams_only_raise_protocol_error(stream, data):
    version, header, items = stream
    raw = bytearray(encode_subgroup_stream(version, header, items)[0] if header
                    else encode_fetch_stream(version, 1, items)[0])
    for _ in range(data.draw(st.integers(1, 4))):
        op, pos = data.draw(st.sampled_from(["flip", "insert", "delete"])), data.draw(st.integers(0, len(raw)))
        if op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=3))
        elif pos < len(raw):
            if op == "flip":
                raw[pos] ^= data.draw(st.integers(1, 255))
            else:
                del raw[pos]
    feed_all(version, bytes(raw), data.draw(cuts_for(raw)))


@settings(max_examples=300)
@given(datagrams(), st.data())
def test_mutated_datagrams_only_raise_protocol_error(dg, data):
    version, datagram = dg
    raw = bytearray(encode_datagram(datagram, version))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    try:
        decode_datagram(bytes(raw[:data.draw(st.integers(0, len(raw)))]), version)
    except ProtocolError:
        pass
