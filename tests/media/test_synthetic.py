"""SyntheticSource: sizes, rates, Group numbering, verifiable payloads."""

from __future__ import annotations

import asyncio
import time

import pytest

from fastrelay.media.h264 import Frame, Gop, SyntheticSource, synthetic_payload, verify_synthetic_payload


def test_sizes_groups_and_verification() -> None:
    src = SyntheticSource(object_size=1000, keyframe_size=5000, fps=50, gop=10, count=35)
    events = list(src.iter_events())
    frames = [e for e in events if isinstance(e, Frame)]
    assert len(frames) == 35
    assert [e.group_id for e in events if isinstance(e, Gop)] == [0, 1, 2, 3]
    for f in frames:
        assert (f.group_id, f.object_id) == divmod(f.index, 10)
        assert f.keyframe == (f.object_id == 0)
        assert f.size == (5000 if f.keyframe else 1000)
        assert f.pts_us == f.index * 20_000 and not f.wallclock and f.codec == "raw"
        assert src.verify(f.group_id, f.object_id, f.data)
        assert f.data[:4] == b"FRSY"
    assert src.bitrate == (5000 + 9 * 1000) * 8 * 50 / 10
    a, b = frames[3].data, frames[13].data
    assert not src.verify(1, 3, a)  # wrong (group, object)
    assert not src.verify(0, 3, a[:-1] + bytes([a[-1] ^ 1]))  # corrupted
    assert not src.verify(0, 3, a[:-1])  # truncated
    assert a[24:] != b[24:]  # bodies differ between objects


def test_payload_is_deterministic_and_seeded() -> None:
    assert synthetic_payload(3, 4, 10_000) == synthetic_payload(3, 4, 10_000)
    assert synthetic_payload(3, 4, 10_000, seed=1) != synthetic_payload(3, 4, 10_000)
    assert [len(synthetic_payload(0, 0, n)) for n in (0, 1, 24, 25, 100_000)] == [0, 1, 24, 25, 100_000]
    assert not verify_synthetic_payload(7, 8, synthetic_payload(7, 8, 3))  # shorter than its header: unverifiable
    with pytest.raises(ValueError):
        synthetic_payload(0, 0, -1)


def test_duration_and_unpaced_speed() -> None:
    src = SyntheticSource(object_size=64 * 1024, fps=1000, gop=100, duration=2.0)
    t0 = time.perf_counter()
    frames = list(src)
    assert len(frames) == 2000
    assert time.perf_counter() - t0 < 2.0  # not paced: much faster than real time


def test_realtime_rate() -> None:
    src = SyntheticSource(object_size=100, fps=200, gop=20, count=41, realtime=True)
    t0 = time.monotonic()
    frames = list(src)
    elapsed = time.monotonic() - t0
    assert 0.19 < elapsed < 0.5  # 40 intervals of 5 ms, absolute schedule
    assert all(f.wallclock for f in frames)
    spacing = (frames[-1].pts_us - frames[0].pts_us) / 40
    assert 4_500 < spacing < 7_000


def test_async_realtime_and_close() -> None:
    async def run() -> tuple[list[Frame], float]:
        src = SyntheticSource(object_size=10, fps=100, gop=5, realtime=True)  # endless
        out: list[Frame] = []
        t0 = time.monotonic()
        async for frame in src.frames():
            out.append(frame)
            if len(out) == 11:
                src.close()
        return out, time.monotonic() - t0

    frames, elapsed = asyncio.run(run())
    assert len(frames) == 11 and 0.09 < elapsed < 0.5
    assert [f.group_id for f in frames] == [i // 5 for i in range(11)]


def test_tagged_objects_carry_the_probe_tag_and_still_verify():
    from fastrelay.lab.traffic import MAGIC, TAG

    src = SyntheticSource(object_size=100, gop=5, count=7, tag=True)
    frames = list(src)
    assert [TAG.unpack_from(f.data) for f in frames] == [(MAGIC, 0, i) for i in range(7)]
    assert all(src.verify(f.group_id, f.object_id, f.data) for f in frames)
    assert not src.verify(frames[1].group_id, frames[1].object_id, frames[1].data[:-1] + b"x")
    with pytest.raises(ValueError):
        SyntheticSource(object_size=10, tag=True)
