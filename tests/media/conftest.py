"""Fixtures for the media tests: real ffmpeg/ffprobe (skipped locally if missing, fatal on CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fastrelay.media.h264 import Frame, H264Source

# The reference stream of the brief: testsrc 320x240, 30 fps, GOP 30, 3 s.
WIDTH, HEIGHT, FPS, GOP, SECONDS = 320, 240, 30, 30, 3


def _need(tool: str) -> None:
    if shutil.which(tool):
        return
    reason = f"{tool} not installed (run scripts/setup)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ffmpeg_tools() -> None:
    _need("ffmpeg")
    _need("ffprobe")


@pytest.fixture(scope="session")
def ref_frames(ffmpeg_tools: None) -> list[Frame]:
    with H264Source(pattern="testsrc", width=WIDTH, height=HEIGHT, fps=FPS, gop=GOP, duration=SECONDS) as src:
        return list(src)


def ffprobe_count(path: Path) -> tuple[int, str]:
    """(frames decoded by ffprobe -count_frames, ffprobe's stderr at -v error)."""
    proc = subprocess.run(
        [
            "ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
            "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(path),
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip() or 0), proc.stderr.strip()


def framemd5(path: Path) -> list[str]:
    """MD5 of every decoded picture, in output order (ffmpeg -f framemd5)."""
    proc = subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-f", "framemd5", "-"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    return [line.rsplit(",", 1)[1].strip() for line in proc.stdout.splitlines() if line and not line.startswith("#")]
