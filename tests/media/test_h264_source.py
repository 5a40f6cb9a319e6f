"""H264Source against the real ffmpeg."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fastrelay.media import h264
from fastrelay.media.h264 import FFmpegError, FFmpegNotFoundError, Frame, Gop, H264Source
from fastrelay.media.nal import NAL_AUD, NAL_IDR, NAL_PPS, NAL_SPS, parse_sps

from .conftest import FPS, GOP, HEIGHT, SECONDS, WIDTH, ffprobe_count, framemd5


def _gone(pid: int) -> bool:
    """True once the process has exited *and* been reaped (a zombie still answers kill 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_frames_keyframes_parameter_sets_and_timestamps(ref_frames: list[Frame]) -> None:
    frames = ref_frames
    assert len(frames) == FPS * SECONDS
    assert frames[0].keyframe
    assert [f.index for f in frames] == list(range(len(frames)))
    assert [f.index for f in frames if f.keyframe] == list(range(0, len(frames), GOP))
    for f in frames:
        types = [n[0] & 0x1F for n in f.nal_units()]
        assert types[0] == NAL_AUD
        assert f.data.startswith(b"\x00\x00\x00\x01")
        if f.keyframe:
            assert NAL_SPS in types and NAL_PPS in types and NAL_IDR in types
        else:
            assert NAL_IDR not in types
        assert (f.group_id, f.object_id) == divmod(f.index, GOP)
        assert not f.wallclock
        assert f.pts_us == round(f.index * 1_000_000 / FPS)
    pts = [f.pts_us for f in frames]
    assert all(b > a for a, b in itertools.pairwise(pts))
    sps = next(n for n in frames[0].nal_units() if n[0] & 0x1F == NAL_SPS)
    assert (parse_sps(sps).width, parse_sps(sps).height) == (WIDTH, HEIGHT)


def test_concatenated_stream_decodes(ref_frames: list[Frame], tmp_path: Path) -> None:
    path = tmp_path / "all.h264"
    path.write_bytes(b"".join(f.data for f in ref_frames))
    count, stderr = ffprobe_count(path)
    assert stderr == ""
    assert count == len(ref_frames)
    assert len(framemd5(path)) == len(ref_frames)


def test_late_joiner_can_start_at_any_group(ref_frames: list[Frame], tmp_path: Path) -> None:
    path = tmp_path / "late.h264"
    path.write_bytes(b"".join(f.data for f in ref_frames if f.group_id >= 1))
    count, stderr = ffprobe_count(path)
    assert (count, stderr) == (len(ref_frames) - GOP, "")


def test_events_mark_group_boundaries() -> None:
    with H264Source(width=160, height=120, fps=FPS, gop=10, duration=1) as src:
        events = list(src.iter_events())
    gops = [e for e in events if isinstance(e, Gop)]
    assert [g.group_id for g in gops] == [0, 1, 2]
    for i, ev in enumerate(events):
        if isinstance(ev, Gop):
            nxt = events[i + 1]
            assert isinstance(nxt, Frame) and nxt.keyframe and nxt.object_id == 0
            assert (nxt.group_id, nxt.index, nxt.pts_us) == (ev.group_id, ev.first_index, ev.pts_us)


def test_async_iterator_matches_blocking(ref_frames: list[Frame]) -> None:
    async def collect() -> list[Frame]:
        src = H264Source(width=WIDTH, height=HEIGHT, fps=FPS, gop=GOP, duration=SECONDS)
        return [f async for f in src.frames()]

    frames = asyncio.run(collect())
    assert [(f.index, f.keyframe, f.group_id, f.object_id, f.pts_us) for f in frames] == [
        (f.index, f.keyframe, f.group_id, f.object_id, f.pts_us) for f in ref_frames
    ]


def test_early_break_terminates_ffmpeg_sync() -> None:
    src = H264Source(width=160, height=120, duration=None)  # endless
    for frame in src:
        if frame.index == 5:
            break
    assert src.last_pid is not None and _gone(src.last_pid)
    assert not src._procs


def test_close_from_context_manager_terminates_ffmpeg() -> None:
    with H264Source(width=160, height=120, duration=None) as src:
        it = iter(src)
        next(it)
        pid = src.last_pid
        assert pid is not None and not _gone(pid)
    assert _gone(pid)
    it.close()


def test_close_from_another_thread_ends_iteration_cleanly() -> None:
    src = H264Source(width=160, height=120, fps=FPS, duration=None, realtime=True)
    timer = threading.Timer(0.3, src.close)
    timer.start()
    frames = list(src)  # blocks in a pipe read until close() stops ffmpeg; no FFmpegError
    timer.join()
    assert 3 <= len(frames) <= 30
    assert src.last_pid is not None and _gone(src.last_pid)


@pytest.mark.parametrize("framing", ["annexb", "sized"])
def test_early_break_terminates_ffmpeg_async(framing: str) -> None:
    async def run() -> int | None:
        src = H264Source(width=160, height=120, duration=None, framing=framing)
        async with contextlib.aclosing(src.frames()) as frames:
            async for frame in frames:
                if frame.index == 5:
                    break
        return src.last_pid

    pid = asyncio.run(run())
    assert pid is not None and _gone(pid)


@pytest.mark.parametrize("framing", ["sized", "annexb"])
def test_realtime_paces_and_stamps_wall_clock(framing: str) -> None:
    src = H264Source(width=160, height=120, fps=FPS, gop=GOP, duration=None, realtime=True, framing=framing)
    t0 = time.time()
    frames, delays = [], []
    for frame in src:
        delays.append(time.time() * 1e6 - frame.pts_us)  # emission time - arrival stamp
        frames.append(frame)
        if len(frames) == 10:
            break
    elapsed = time.time() - t0
    assert all(f.wallclock for f in frames)
    assert 9 / FPS * 0.8 < elapsed < 3.0  # paced by -re, not as fast as possible
    assert t0 * 1e6 - 1e5 < frames[0].pts_us < frames[-1].pts_us <= time.time() * 1e6
    spacing = (frames[-1].pts_us - frames[1].pts_us) / 8 / 1e6
    assert 0.5 / FPS < spacing < 2.0 / FPS
    delay_ms = sorted(delays)[len(delays) // 2] / 1000
    if framing == "sized":
        assert delay_ms < 15  # emitted as soon as the packet's last byte is read
    else:
        assert delay_ms > 0.5 * 1000 / FPS  # complete only once the next AU starts


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_sized_framing_matches_annexb_parsing(ref_frames: list[Frame]) -> None:
    fds = _open_fds()
    src = H264Source(width=WIDTH, height=HEIGHT, fps=FPS, gop=GOP, duration=SECONDS, framing="sized")
    assert src.framing == "sized" and "tee" in src.build_command()
    frames = list(src)

    async def collect() -> list[Frame]:
        return [f async for f in src.frames()]

    for got in (frames, asyncio.run(collect())):
        assert [(f.index, f.keyframe, f.pts_us) for f in got] == [(f.index, f.keyframe, f.pts_us) for f in ref_frames]
        # x264 with sliced threads is not bit-exact run to run: compare the NAL structure.
        assert [[n[0] for n in f.nal_units()] for f in got] == [[n[0] for n in f.nal_units()] for f in ref_frames]
    for frame in src:  # early exit closes the side pipe too
        if frame.index == 3:
            break
    assert _gone(src.last_pid or 0) and _open_fds() == fds


@pytest.fixture(scope="module")
def mp4_with_bframes(ffmpeg_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("media") / "in.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-f", "lavfi", "-i", "testsrc2=size=192x128:rate=25:duration=2",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "25", "-bf", "2", str(path)],
        check=True, timeout=30,
    )  # fmt: skip
    return path


@pytest.mark.parametrize("framing", ["annexb", "sized"])
def test_file_input_stream_copy(mp4_with_bframes: Path, tmp_path: Path, framing: str) -> None:
    src = H264Source(mp4_with_bframes, framing=framing)
    assert (src.mode, src.input_codec, src.fps, src.width, src.height) == ("copy", "h264", 25, 192, 128)
    frames = list(src)
    assert len(frames) == 50 and frames[0].keyframe
    assert [f.index for f in frames if f.keyframe] == [0, 25]
    assert all(NAL_SPS in [n[0] & 0x1F for n in f.nal_units()] for f in frames if f.keyframe)
    out = tmp_path / "copy.h264"
    out.write_bytes(b"".join(f.data for f in frames))
    assert ffprobe_count(out) == (50, "")


def test_file_input_transcode(mp4_with_bframes: Path) -> None:
    src = H264Source(mp4_with_bframes, mode="transcode", gop=10, width=96, height=64)
    assert src.mode == "transcode" and src.encoder == "libx264"
    frames = list(src)
    assert len(frames) == 50
    assert [f.index for f in frames if f.keyframe] == list(range(0, 50, 10))


def test_missing_ffmpeg_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory
    with pytest.raises(FFmpegNotFoundError, match=r"install ffmpeg: run make demo / scripts/setup"):
        H264Source()
    with pytest.raises(FFmpegNotFoundError, match="ffprobe"):
        h264.require_tool("ffprobe")


def test_ffmpeg_failure_is_reported(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-video.mp4"
    bogus.write_bytes(b"this is not a video")
    with pytest.raises(FFmpegError):
        H264Source(bogus)
    src = H264Source(width=160, height=120, duration=1, preset="no-such-preset")
    with pytest.raises(FFmpegError, match="exited with"):
        list(src)
    assert not src._procs


def test_encoder_fallback_when_libx264_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h264, "available_h264_encoders", lambda ffmpeg="ffmpeg": ("h264_vaapi", "libopenh264"))
    with pytest.warns(RuntimeWarning, match="falling back to libopenh264"):
        src = H264Source(width=160, height=120)
    cmd = src.build_command()
    assert src.encoder == "libopenh264" and "libx264" not in cmd
    assert "dump_extra=freq=keyframe,h264_metadata=aud=insert" in cmd
    assert cmd[cmd.index("-bf") + 1] == "0" and cmd[cmd.index("-g") + 1] == "30"


def test_x264_command_line() -> None:
    cmd = H264Source(pattern="testsrc2", width=320, height=240, fps=25, gop=50, bitrate=300_000).build_command()
    joined = " ".join(cmd)
    assert "testsrc2=size=320x240:rate=25:duration=10" in joined
    assert "-tune zerolatency" in joined and "-bf 0" in joined and "-g 50" in joined
    assert "repeat-headers=1" in joined and "aud=1" in joined and "-re" not in cmd
    assert "-re" in H264Source(realtime=True).build_command()
    assert H264Source(realtime=True).framing == "sized" and H264Source().framing == "annexb"
    assert "-f tee [f=framecrc:flush_packets=1]pipe\\:7|[f=h264:flush_packets=1]pipe\\:1" in " ".join(
        H264Source(framing="sized").build_command(7)
    )
    with pytest.raises(ValueError):
        H264Source(pattern="testsrc;rm")
