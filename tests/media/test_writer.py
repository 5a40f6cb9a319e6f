"""AnnexBWriter: what a subscriber writes must stay decodable despite losses."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastrelay.media.h264 import Frame
from fastrelay.media.loc import package, unpackage
from fastrelay.media.nal import NAL_PPS, NAL_SPS, join_annexb, split_annexb
from fastrelay.media.writer import AnnexBWriter

from .conftest import GOP, ffprobe_count, framemd5

GAP = 45  # a delta frame in the middle of group 1


@pytest.fixture(scope="module")
def reference_md5(ref_frames: list[Frame], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    path = tmp_path_factory.mktemp("ref") / "all.h264"
    path.write_bytes(b"".join(f.data for f in ref_frames))
    md5 = framemd5(path)
    assert len(md5) == len(ref_frames)
    return md5


@pytest.mark.parametrize("first", [GOP, 10], ids=["first-gop-missing", "joined-mid-gop"])
def test_first_gop_missing_and_gap(
    ref_frames: list[Frame], reference_md5: list[str], tmp_path: Path, first: int
) -> None:
    received = [f for f in ref_frames if f.index >= first and f.index != GAP]
    path = tmp_path / "out.h264"
    written: list[int] = []
    with AnnexBWriter(path) as writer:
        for frame in received:
            if writer.write(frame):
                written.append(frame.index)
    expected = [i for i in range(len(ref_frames)) if GOP <= i < GAP or i >= 2 * GOP]
    assert written == expected
    assert writer.frames_written == len(expected) == 45
    assert writer.skipped_before_keyframe == GOP - first
    assert writer.skipped_after_gap == 2 * GOP - GAP - 1
    assert writer.frames_skipped == len(received) - len(expected)
    assert (writer.keyframes_written, writer.gaps, writer.skipped_stale) == (2, 1, 0)
    assert writer.bytes_written == path.stat().st_size
    assert ffprobe_count(path) == (len(expected), "")
    # Every written frame decodes to exactly the picture the encoder produced.
    assert framemd5(path) == [reference_md5[i] for i in expected]


def test_naive_concatenation_would_be_corrupt(
    ref_frames: list[Frame], reference_md5: list[str], tmp_path: Path
) -> None:
    """Control for the test above: without the writer the frames after the gap decode wrong."""
    path = tmp_path / "naive.h264"
    path.write_bytes(b"".join(f.data for f in ref_frames if f.index != GAP))
    kept = [i for i in range(len(ref_frames)) if i != GAP]
    assert framemd5(path) != [reference_md5[i] for i in kept]


def test_through_loc_with_losses(ref_frames: list[Frame], reference_md5: list[str], tmp_path: Path) -> None:
    path = tmp_path / "loc.h264"
    with AnnexBWriter(path) as writer:
        for frame in ref_frames:
            if frame.index < 12 or frame.index == 70:
                continue
            ext, payload = package(frame)
            writer.write(unpackage(ext, payload, group_id=frame.group_id, object_id=frame.object_id))
    expected = [i for i in range(len(ref_frames)) if 30 <= i < 70]
    assert writer.frames_written == len(expected)
    assert (writer.skipped_before_keyframe, writer.skipped_after_gap) == (18, 19)
    assert framemd5(path) == [reference_md5[i] for i in expected]


def test_stale_duplicates_and_skipped_groups(ref_frames: list[Frame]) -> None:
    buf = io.BytesIO()
    writer = AnnexBWriter(buf)
    order = [0, 1, 2, 1, 2, 3, *range(60, 63)]  # repeats, then group 1 entirely missing
    results = [writer.write(ref_frames[i]) for i in order]
    assert results == [True, True, True, False, False, True, True, True, True]
    assert (writer.skipped_stale, writer.gaps, writer.frames_written) == (2, 1, 7)
    writer.close()
    assert buf.getvalue() == b"".join(ref_frames[i].data for i in (0, 1, 2, 3, 60, 61, 62))


def test_index_only_frames_and_mark_gap() -> None:
    idr = join_annexb([b"\x09\x10", b"\x67\x42", b"\x68\xce", b"\x65\x88"])
    p = join_annexb([b"\x09\x30", b"\x41\x9a"])
    frames = [SimpleNamespace(index=i, keyframe=i % 4 == 0, data=idr if i % 4 == 0 else p) for i in range(8)]
    writer = AnnexBWriter(io.BytesIO())
    assert [writer.write(f) for f in frames[:2]] == [True, True]
    writer.mark_gap()
    assert [writer.write(f) for f in frames[2:]] == [False, False, True, True, True, True]
    assert writer.stats()["gaps"] == 1 and writer.skipped_after_gap == 2


def test_keyframe_without_parameter_sets() -> None:
    sps, pps = b"\x67\x42\xc0\x1e", b"\x68\xce\x3c\x80"
    bare_idr = join_annexb([b"\x09\x10", b"\x65\x88\x84"])
    full_idr = join_annexb([b"\x09\x10", sps, pps, b"\x65\x88\x84"])
    buf = io.BytesIO()
    writer = AnnexBWriter(buf)
    # Never saw SPS/PPS: an IDR alone cannot be decoded.
    assert not writer.write(SimpleNamespace(group_id=0, object_id=0, keyframe=True, data=bare_idr))
    assert writer.write(SimpleNamespace(group_id=1, object_id=0, keyframe=True, data=full_idr))
    assert writer.write(SimpleNamespace(group_id=2, object_id=0, keyframe=True, data=bare_idr))
    written = split_annexb(buf.getvalue())
    assert [n[0] & 0x1F for n in written].count(NAL_SPS) == 2
    assert [n[0] & 0x1F for n in written].count(NAL_PPS) == 2
    assert buf.getvalue().endswith(full_idr)  # the cached sets were inserted after the AUD
