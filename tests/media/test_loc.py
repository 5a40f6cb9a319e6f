"""LOC packaging (draft-ietf-moq-loc-02) of real and synthetic frames."""

from __future__ import annotations

import time

import pytest

from fastrelay.media.h264 import Frame, SyntheticSource
from fastrelay.media.loc import (
    EXTENSION_TABLE,
    FASTRELAY_SEND_TIME,
    MEDIA_TIMESCALE,
    LocError,
    LocProperty,
    extension_overhead,
    package,
    unpackage,
)
from fastrelay.media.nal import (
    NAL_PPS,
    NAL_SPS,
    START_CODE,
    join_annexb,
    nals_to_avcc,
    parse_avc_config,
    split_annexb,
    split_avcc,
)

from .conftest import FPS


def _check_encodings(ext: list[tuple[int, int | bytes]]) -> None:
    types = [k for k, _ in ext]
    assert types == sorted(types) and len(set(types)) == len(types)
    for kind, value in ext:
        assert kind in EXTENSION_TABLE
        # MoQT Key-Value-Pair rule: even type -> varint, odd type -> bytes (<= 65535).
        if kind % 2 == 0:
            assert isinstance(value, int) and 0 <= value < 1 << 62
        else:
            assert isinstance(value, bytes) and len(value) <= 0xFFFF
        assert isinstance(value, EXTENSION_TABLE[kind][2])


def test_table_ids() -> None:
    assert LocProperty.VIDEO_FRAME_MARKING == 4
    assert LocProperty.TIMESTAMP == 0x06
    assert LocProperty.TIMESCALE == 0x08
    assert LocProperty.VIDEO_CONFIG == 13
    assert FASTRELAY_SEND_TIME % 2 == 0 and FASTRELAY_SEND_TIME >= 16384


def test_round_trip_every_frame(ref_frames: list[Frame]) -> None:
    sps = pps = None
    for frame in ref_frames:
        ext, payload = package(frame, send_time_us=1_700_000_000_000_000 + frame.index)
        _check_encodings(ext)
        props = dict(ext)
        assert props[LocProperty.TIMESTAMP] == frame.pts_us
        assert props[LocProperty.TIMESCALE] == MEDIA_TIMESCALE
        assert props[FASTRELAY_SEND_TIME] == 1_700_000_000_000_000 + frame.index
        assert props[LocProperty.VIDEO_FRAME_MARKING] == (0xE0 if frame.keyframe else 0xC0)
        # Payload: 4-byte big-endian length before each NAL unit, nothing else.
        assert not payload.startswith(START_CODE)
        assert split_avcc(payload) == split_annexb(frame.data)
        if frame.keyframe:
            config = parse_avc_config(props[LocProperty.VIDEO_CONFIG])
            nals = split_annexb(frame.data)
            sps = [n for n in nals if n[0] & 0x1F == NAL_SPS]
            pps = [n for n in nals if n[0] & 0x1F == NAL_PPS]
            assert (list(config.sps), list(config.pps), config.length_size) == (sps, pps, 4)
        else:
            assert LocProperty.VIDEO_CONFIG not in props
        back = unpackage(ext, payload, group_id=frame.group_id, object_id=frame.object_id)
        assert back.data == frame.data
        assert (back.keyframe, back.pts_us, back.wallclock) == (frame.keyframe, frame.pts_us, False)
        assert back.send_time_us == 1_700_000_000_000_000 + frame.index
        assert (back.group_id, back.object_id, back.discardable) == (frame.group_id, frame.object_id, False)
    assert sps and pps


def test_wallclock_frames_omit_timescale_and_send_time_defaults_to_now() -> None:
    now_us = time.time_ns() // 1000
    frame = Frame(0, now_us, True, join_annexb([b"\x09\x10", b"\x65\x88\x84"]), wallclock=True)
    ext, payload = package(frame)
    props = dict(ext)
    assert LocProperty.TIMESCALE not in props
    assert LocProperty.VIDEO_CONFIG not in props  # no SPS/PPS in this AU: nothing to describe
    assert 0 <= props[FASTRELAY_SEND_TIME] - now_us < 5_000_000
    back = unpackage(ext, payload)
    assert back.wallclock and back.pts_us == now_us and back.keyframe
    ext, _ = package(frame, include_send_time=False)
    assert FASTRELAY_SEND_TIME not in dict(ext)


def test_overhead_is_small(ref_frames: list[Frame]) -> None:
    key, delta = ref_frames[0], ref_frames[1]
    k_ext, _ = package(key, send_time_us=1 << 50)
    d_ext, _ = package(delta, send_time_us=1 << 50)
    # QUIC varints, delta-encoded types: marking 1+2, timestamp 1+4 (33333 us), timescale 1+4,
    # send time 4+8 bytes; the keyframe's timestamp is 0 (1+1) and it adds avcC (1+1+len).
    assert extension_overhead(d_ext) == 3 + 5 + 5 + 12
    assert extension_overhead(k_ext) == 3 + 2 + 5 + 2 + len(dict(k_ext)[LocProperty.VIDEO_CONFIG]) + 12


def test_discardable_flag_from_nal_ref_idc() -> None:
    frame = Frame(1, 33_333, False, join_annexb([b"\x09\x30", b"\x01\x9a\x02"]))  # nal_ref_idc 0
    ext, payload = package(frame)
    assert dict(ext)[LocProperty.VIDEO_FRAME_MARKING] == 0xD0
    assert unpackage(ext, payload).discardable


def test_one_byte_nal_uses_start_code_payload() -> None:
    nals = [b"\x09\xf0", b"\x65\x88\x84\x21", b"\x0b"]  # end-of-stream NAL is 1 byte
    frame = Frame(0, 0, True, join_annexb(nals))
    ext, payload = package(frame)
    assert payload == join_annexb(nals)  # a 4-byte "length" of 1 would read as a start code
    assert unpackage(ext, payload).data == frame.data


def test_config_only_keyframe_gets_parameter_sets_back(ref_frames: list[Frame]) -> None:
    key = ref_frames[0]
    nals = split_annexb(key.data)
    ext, _ = package(key, send_time_us=0)
    stripped = [n for n in nals if n[0] & 0x1F not in (NAL_SPS, NAL_PPS)]
    back = unpackage(ext, nals_to_avcc(stripped))
    types = [n[0] & 0x1F for n in split_annexb(back.data)]
    assert types[:3] == [9, NAL_SPS, NAL_PPS]
    assert sorted(split_annexb(back.data)) == sorted(nals)


def test_other_timescales_and_unknown_extensions() -> None:
    payload = b"\x00\x00\x00\x03\x65\x88\x84"
    back = unpackage([(4, 0xE0), (6, 180_000), (8, 90_000), (0x3C, 1), (0x99, b"x")], payload)
    assert back.pts_us == 2_000_000 and back.timestamp == 180_000 and back.timescale == 90_000
    assert back.unknown_extensions == ((0x3C, 1), (0x99, b"x"))
    assert unpackage({6: 5}, payload).keyframe  # no marking: the IDR NAL decides
    assert unpackage([], payload).pts_us is None


@pytest.mark.parametrize(
    ("ext", "payload"),
    [
        ([(6, b"\x01")], b"\x00\x00\x00\x01\x65"),  # even type with bytes
        ([(13, 5)], b"\x00\x00\x00\x01\x65"),  # odd type with an int
        ([(6, 1), (6, 2)], b"\x00\x00\x00\x01\x65"),  # duplicate
        ([(4, 1 << 40)], b"\x00\x00\x00\x01\x65"),  # frame marking longer than 4 bytes
        ([(8, 0)], b"\x00\x00\x00\x01\x65"),  # timescale 0
        ([(13, b"\x01\x64")], b"\x00\x00\x00\x01\x65"),  # truncated avcC
        ([], b"\x00\x00\x00\x09\x65"),  # NAL length past the end
    ],
)
def test_malformed_objects_raise(ext: list, payload: bytes) -> None:
    with pytest.raises(LocError):
        unpackage(ext, payload)


def test_synthetic_frames_pass_through_unchanged() -> None:
    src = SyntheticSource(object_size=500, keyframe_size=2000, fps=FPS, gop=5, count=10)
    for frame in src:
        ext, payload = package(frame, send_time_us=7)
        _check_encodings(ext)
        assert payload == frame.data
        assert LocProperty.VIDEO_CONFIG not in dict(ext)
        back = unpackage(ext, payload, codec="raw")
        assert back.data == frame.data and back.keyframe == frame.keyframe and back.pts_us == frame.pts_us
        assert src.verify(frame.group_id, frame.object_id, back.data)
