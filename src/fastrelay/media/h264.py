"""Frame sources for the publisher: real H.264 from ffmpeg, and synthetic objects.

Both sources yield :class:`Frame` objects (one per access unit, i.e. one MoQT Object) in
decoding order, numbered ``group_id`` / ``object_id`` the way LOC's examples map video
onto MoQT: a new Group at every keyframe (IDR), Object IDs from 0 within the Group. A
:class:`Gop` boundary marker precedes the first frame of every Group in the
``iter_events()`` / ``events()`` streams.

Iteration::

    with H264Source(width=320, height=240, fps=30, gop=30, duration=3) as src:
        for frame in src:                      # blocking
            ...

    async with contextlib.aclosing(src.frames()) as frames:   # asyncio
        async for frame in frames:
            ...

Every iteration starts its own ffmpeg process; leaving the loop early (break, exception,
``aclose()``, ``close()``) terminates and reaps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import IO, Literal, Self

from .nal import (
    AccessUnit,
    AccessUnitAssembler,
    AnnexBParser,
    AvcConfig,
    SpsInfo,
    build_avc_config,
    iter_access_units,
    join_annexb,
    parse_sps,
    split_annexb,
)

__all__ = [
    "AccessUnit",
    "AccessUnitAssembler",
    "AnnexBParser",
    "AvcConfig",
    "FFmpegError",
    "FFmpegNotFoundError",
    "Frame",
    "FrameSource",
    "Gop",
    "H264Source",
    "SpsInfo",
    "SyntheticSource",
    "available_h264_encoders",
    "build_avc_config",
    "is_synthetic_payload",
    "iter_access_units",
    "join_annexb",
    "parse_sps",
    "require_tool",
    "split_annexb",
    "synthetic_payload",
    "verify_synthetic_payload",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "install ffmpeg: run make demo / scripts/setup"
# H.264 encoders to fall back on, in order, when ffmpeg lacks libx264.
FALLBACK_ENCODERS = (
    "libopenh264",
    "h264_videotoolbox",
    "h264_vaapi",
    "h264_nvenc",
    "h264_qsv",
    "h264_amf",
    "h264_mf",
    "h264_v4l2m2m",
    "h264_omx",
)
_TERMINATE_GRACE_S = 2.0


class FFmpegError(RuntimeError):
    """ffmpeg/ffprobe failed; the message ends with the tail of its stderr."""


class FFmpegNotFoundError(FFmpegError):
    """ffmpeg or ffprobe is not installed (or not on PATH)."""


def require_tool(name: str = "ffmpeg") -> str:
    """Absolute path of ffmpeg/ffprobe, or FFmpegNotFoundError with the install hint."""
    path = shutil.which(name)
    if path is None:
        raise FFmpegNotFoundError(f"{name} not found on PATH ({os.environ.get('PATH', '')!r}): {INSTALL_HINT}")
    return path


_ENCODER_CACHE: dict[str, tuple[str, ...]] = {}


def available_h264_encoders(ffmpeg: str = "ffmpeg") -> tuple[str, ...]:
    """Names of the H.264 video encoders this ffmpeg build lists (``ffmpeg -encoders``)."""
    path = require_tool(ffmpeg)
    if path not in _ENCODER_CACHE:
        out = _run_tool([path, "-hide_banner", "-encoders"])
        names = []
        for line in out.splitlines():
            m = re.match(r"\s*V\S*\s+(\S+)\s+.*\b(H\.264|AVC)\b", line)
            if m:
                names.append(m.group(1))
        _ENCODER_CACHE[path] = tuple(names)
    return _ENCODER_CACHE[path]


_MUXER_CACHE: dict[str, frozenset[str]] = {}


def _has_muxers(ffmpeg: str, *names: str) -> bool:
    if ffmpeg not in _MUXER_CACHE:
        out = _run_tool([ffmpeg, "-hide_banner", "-muxers"])
        _MUXER_CACHE[ffmpeg] = frozenset(m.group(1) for m in re.finditer(r"^\s*D?E\s+(\S+)", out, re.M))
    return all(n in _MUXER_CACHE[ffmpeg] for n in names)


def _run_tool(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise FFmpegNotFoundError(f"{cmd[0]} not found: {INSTALL_HINT}") from None
    if proc.returncode != 0:
        raise FFmpegError(f"{os.path.basename(cmd[0])} exited with {proc.returncode}: {_tail(proc.stderr)}")
    return proc.stdout


def _tail(text: str | bytes, limit: int = 2000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


# ---------------------------------------------------------------------------------------
# Frames and groups


@dataclass(frozen=True, slots=True)
class Frame:
    """One access unit = one MoQT Object.

    ``pts_us`` is the capture timestamp in microseconds: media time (``index / fps``) when
    ``wallclock`` is False, Unix-epoch wall clock when True (realtime sources). ``data``
    is the Annex-B access unit with 4-byte start codes (H.264), or opaque bytes when
    ``codec`` is ``"raw"`` (SyntheticSource)."""

    index: int
    pts_us: int
    keyframe: bool
    data: bytes
    group_id: int = 0
    object_id: int = 0
    wallclock: bool = False
    codec: str = "h264"

    @property
    def size(self) -> int:
        return len(self.data)

    def nal_units(self) -> list[bytes]:
        return split_annexb(self.data) if self.codec == "h264" else []


@dataclass(frozen=True, slots=True)
class Gop:
    """Start of a Group (keyframe interval): emitted just before its first Frame."""

    group_id: int
    first_index: int
    pts_us: int


Event = Frame | Gop


class FrameSource:
    """Common iteration API; subclasses implement ``_events_sync`` / ``_events_async``."""

    def __iter__(self) -> Iterator[Frame]:
        return self.iter_frames()

    def iter_frames(self) -> Iterator[Frame]:
        """Blocking iterator over frames."""
        with contextlib.closing(self.iter_events()) as events:
            for ev in events:
                if isinstance(ev, Frame):
                    yield ev

    def iter_events(self) -> Iterator[Event]:
        """Blocking iterator over Gop boundaries and frames."""
        return self._events_sync()

    async def frames(self) -> AsyncIterator[Frame]:
        """Async iterator over frames (use ``contextlib.aclosing`` when breaking early)."""
        async with contextlib.aclosing(self.events()) as events:
            async for ev in events:
                if isinstance(ev, Frame):
                    yield ev

    def events(self) -> AsyncIterator[Event]:
        """Async iterator over Gop boundaries and frames."""
        return self._events_async()

    def _events_sync(self) -> Iterator[Event]:
        raise NotImplementedError

    def _events_async(self) -> AsyncIterator[Event]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop whatever is running (idempotent)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class _Grouper:
    """Numbers access units into Groups/Objects; drops what precedes the first keyframe."""

    def __init__(self, fps: Fraction, wallclock: bool) -> None:
        self.fps = fps
        self.wallclock = wallclock
        self.index = 0
        self.group = -1
        self.object = 0
        self.dropped_leading = 0

    def events(self, au: AccessUnit) -> list[Event]:
        index = self.index
        self.index += 1
        if self.wallclock:
            pts = int((au.stamp if au.stamp is not None else time.time()) * 1_000_000)
        else:
            pts = round(index * 1_000_000 / self.fps)
        key = au.keyframe
        out: list[Event] = []
        if key:
            self.group += 1
            self.object = 0
            out.append(Gop(self.group, index, pts))
        elif self.group < 0:
            self.dropped_leading += 1  # not decodable without an earlier keyframe
            return out
        out.append(Frame(index, pts, key, au.data, self.group, self.object, self.wallclock))
        self.object += 1
        return out


# ---------------------------------------------------------------------------------------
# ffmpeg source


def _fraction(value: float | str | Fraction) -> Fraction:
    fps = Fraction(value).limit_denominator(100_000) if not isinstance(value, str) else Fraction(value)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {value!r}")
    return fps


class H264Source(FrameSource):
    """H.264 frames encoded (or stream-copied) by an ffmpeg subprocess.

    Without ``input`` the lavfi test pattern ``pattern`` (``testsrc``/``testsrc2``/...) is
    encoded at ``width``x``height`` and ``fps``; with ``input`` a media file is either
    transcoded or, when it already holds H.264 and ``mode`` is ``"auto"``/``"copy"``,
    stream-copied through ``h264_mp4toannexb``. Encoding uses libx264 with
    ``-tune zerolatency``, no B-frames, a fixed keyframe interval of ``gop`` frames and
    SPS/PPS plus an AUD in every keyframe/access unit (``repeat-headers=1:aud=1``), so a
    subscriber joining at any Group can decode. Without libx264 another listed H.264
    encoder is used (with a warning; ``encoder_note`` says which).

    ``duration`` (seconds) limits the output; ``None`` runs until ``close()`` (or the end
    of the file; ``loop=True`` repeats the file forever). ``realtime`` paces ffmpeg's
    input with ``-re``; timestamps are then wall clock (``timestamps="wallclock"``) taken
    when the access unit's first bytes were read, else media time from index and fps.

    Framing: with ``framing="annexb"`` access units are found by parsing the Annex-B
    stream (AUD / slice rules), so an access unit is known complete only when the next
    one starts: one frame interval of delay when ffmpeg runs in real time.
    ``framing="sized"`` (the default when ``realtime``) additionally has ffmpeg's tee
    muxer write a framecrc line with each packet's size to a side pipe just before the
    packet, so every access unit is emitted as soon as its last byte arrives.

    Copy mode keeps the file's own GOP structure (``gop`` and ``bitrate`` are ignored);
    if the file has B-frames, frames are still yielded in decoding order.
    """

    def __init__(
        self,
        input: str | os.PathLike[str] | None = None,
        *,
        pattern: str = "testsrc",
        width: int | None = None,
        height: int | None = None,
        fps: float | str | Fraction | None = None,
        gop: int = 30,
        bitrate: int = 1_000_000,
        duration: float | None = 10.0,
        realtime: bool = False,
        timestamps: Literal["media", "wallclock"] | None = None,
        mode: Literal["auto", "transcode", "copy"] = "auto",
        framing: Literal["auto", "annexb", "sized"] = "auto",
        loop: bool = False,
        preset: str = "veryfast",
        encoder: str | None = None,
        ffmpeg: str = "ffmpeg",
        ffprobe: str = "ffprobe",
        read_size: int = 1 << 16,
    ) -> None:
        if gop < 1:
            raise ValueError("gop must be >= 1")
        if bitrate < 1000:
            raise ValueError("bitrate is in bit/s and must be >= 1000")
        if duration is not None and duration <= 0:
            raise ValueError("duration must be positive (None = endless)")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", pattern):
            raise ValueError(f"bad lavfi source name {pattern!r}")
        if mode not in ("auto", "transcode", "copy"):
            raise ValueError(f"bad mode {mode!r}")
        if framing not in ("auto", "annexb", "sized"):
            raise ValueError(f"bad framing {framing!r}")
        self.ffmpeg = require_tool(ffmpeg)
        self.input = os.fspath(input) if input is not None else None
        self.pattern = pattern
        self.gop = gop
        self.bitrate = bitrate
        self.duration = duration
        self.realtime = realtime
        self.wallclock = (timestamps or ("wallclock" if realtime else "media")) == "wallclock"
        self.loop = loop
        self.preset = preset
        self.read_size = read_size
        self.input_codec: str | None = None
        self._procs: set[subprocess.Popen[bytes] | asyncio.subprocess.Process] = set()
        self.last_pid: int | None = None
        self._terminated: set[int] = set()  # pids close() stopped: their exit is not an error
        self.dropped_leading = 0  # frames before the first keyframe of the last run

        src_fps = None
        if self.input is not None:
            probe = self._probe(require_tool(ffprobe))
            self.input_codec = probe.get("codec_name")
            src_fps = probe.get("fps")
            if mode == "auto":
                keep = width is None and height is None and fps is None
                mode = "copy" if self.input_codec == "h264" and keep else "transcode"
            if mode == "copy" and self.input_codec != "h264":
                raise ValueError(f"cannot stream-copy {self.input_codec!r} as H.264; use mode='transcode'")
            self.width = width or probe.get("width")
            self.height = height or probe.get("height")
        else:
            if mode == "copy":
                raise ValueError("mode='copy' needs an input file")
            mode = "transcode"
            self.width = width or 640
            self.height = height or 360
        self.mode: Literal["transcode", "copy"] = mode  # type: ignore[assignment]
        self.fps = _fraction(fps if fps is not None else (src_fps or 30))
        self.encoder: str | None = None
        self.encoder_note = ""
        if self.mode == "transcode":
            self.encoder = encoder or self._pick_encoder()
        if framing == "auto":
            framing = "sized" if realtime and _has_muxers(self.ffmpeg, "tee", "framecrc") else "annexb"
        elif framing == "sized" and not _has_muxers(self.ffmpeg, "tee", "framecrc"):
            raise FFmpegError(f"{self.ffmpeg} lacks the tee/framecrc muxers needed for framing='sized'")
        self.framing: Literal["annexb", "sized"] = framing

    # -- setup ---------------------------------------------------------------------------

    def _probe(self, ffprobe: str) -> dict:
        out = _run_tool(
            [
                ffprobe,
                "-v",
                "error",
                "-select_streams",
                "v:0",
                "-show_entries",
                "stream=codec_name,width,height,r_frame_rate,avg_frame_rate",
                "-of",
                "json",
                self.input or "",
            ]
        )
        streams = json.loads(out or "{}").get("streams") or []
        if not streams:
            raise FFmpegError(f"no video stream in {self.input!r}")
        st = streams[0]
        fps = None
        for key in ("avg_frame_rate", "r_frame_rate"):
            with contextlib.suppress(ValueError, ZeroDivisionError):
                rate = Fraction(st.get(key, "0/0"))
                if rate > 0:
                    fps = rate
                    break
        return {"codec_name": st.get("codec_name"), "width": st.get("width"), "height": st.get("height"), "fps": fps}

    def _pick_encoder(self) -> str:
        encoders = available_h264_encoders(self.ffmpeg)
        if "libx264" in encoders:
            return "libx264"
        for name in FALLBACK_ENCODERS:
            if name in encoders:
                self.encoder_note = f"libx264 is not available in {self.ffmpeg}; falling back to {name}"
                warnings.warn(self.encoder_note, RuntimeWarning, stacklevel=3)
                log.warning("%s", self.encoder_note)
                return name
        raise FFmpegError(f"{self.ffmpeg} has no H.264 encoder (found {encoders!r}): {INSTALL_HINT}")

    def build_command(self, side_fd: int | None = 3) -> list[str]:
        """The ffmpeg command line: Annex-B H.264 on stdout; with ``framing="sized"`` also
        a framecrc line per packet (its size) on file descriptor ``side_fd``, written just
        before the packet itself (tee muxer)."""
        cmd = [self.ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error"]
        if self.realtime:
            cmd.append("-re")
        if self.input is None:
            spec = f"{self.pattern}=size={self.width}x{self.height}:rate={self.fps}"
            if self.duration is not None:
                spec += f":duration={self.duration:g}"
            cmd += ["-f", "lavfi", "-i", spec]
        else:
            if self.loop:
                cmd += ["-stream_loop", "-1"]
            cmd += ["-i", self.input]
            if self.duration is not None:
                cmd += ["-t", f"{self.duration:g}"]
        cmd += ["-map", "0:v:0", "-an", "-sn", "-dn"]
        if self.mode == "copy":
            # AUDs make access-unit framing exact; mp4toannexb inserts SPS/PPS before IDRs.
            cmd += ["-c:v", "copy", "-bsf:v", "h264_mp4toannexb,h264_metadata=aud=insert"]
        else:
            vf = []
            if self.input is not None:
                vf.append(f"scale={self.width}:{self.height}")
                vf.append(f"fps={self.fps}")
            if vf:
                cmd += ["-vf", ",".join(vf)]
            cmd += ["-pix_fmt", "yuv420p", "-c:v", self.encoder or "libx264"]
            rate = str(self.bitrate)
            cmd += ["-b:v", rate, "-maxrate", rate, "-bufsize", rate, "-g", str(self.gop), "-bf", "0"]
            if self.encoder == "libx264":
                cmd += ["-preset", self.preset, "-tune", "zerolatency", "-keyint_min", str(self.gop)]
                cmd += ["-sc_threshold", "0", "-x264-params", "repeat-headers=1:aud=1:scenecut=0:bframes=0"]
            else:
                # Generic encoders: SPS/PPS before every keyframe and AUDs via bitstream filters.
                cmd += ["-bsf:v", "dump_extra=freq=keyframe,h264_metadata=aud=insert"]
        cmd += ["-flush_packets", "1"]
        if self.framing == "sized" and side_fd is not None:
            slaves = f"[f=framecrc:flush_packets=1]pipe\\:{side_fd}|[f=h264:flush_packets=1]pipe\\:1"
            cmd += ["-f", "tee", slaves]
        else:
            cmd += ["-f", "h264", "pipe:1"]
        return cmd

    # -- running -------------------------------------------------------------------------

    def _error(self, rc: int, errf: IO[bytes]) -> FFmpegError:
        errf.seek(0)
        return FFmpegError(f"ffmpeg exited with {rc}: {_tail(errf.read())}\ncommand: {' '.join(self.build_command())}")

    def _events_sync(self) -> Iterator[Event]:
        framer = _Framer(self.fps, self.wallclock)
        with tempfile.TemporaryFile() as errf, _SidePipe(self.framing == "sized") as side:
            try:
                proc = subprocess.Popen(
                    self.build_command(side.child_fd),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=errf,
                    bufsize=0,
                    pass_fds=side.pass_fds,
                )
            except FileNotFoundError:
                raise FFmpegNotFoundError(f"{self.ffmpeg} not found: {INSTALL_HINT}") from None
            finally:
                side.parent_started()
            self._procs.add(proc)
            self.last_pid = proc.pid
            try:
                stdout = proc.stdout
                assert stdout is not None
                if side.fd is not None:
                    with open(side.take(), "rb") as sizes:
                        while line := sizes.readline():
                            if (size := _packet_size(line)) is None:
                                continue
                            now = time.time()
                            data = _read_exact(stdout, size)
                            if len(data) < size:
                                break  # ffmpeg died mid-packet: do not emit a truncated frame
                            yield from framer.packet(data, now)
                while chunk := stdout.read(self.read_size):
                    yield from framer.stream(chunk, time.time())
                yield from framer.end(time.time())
                rc = proc.wait()
                if rc != 0 and proc.pid not in self._terminated:
                    raise self._error(rc, errf)
            finally:
                self.dropped_leading = framer.grouper.dropped_leading
                _stop_sync(proc)
                self._procs.discard(proc)

    async def _events_async(self) -> AsyncIterator[Event]:
        framer = _Framer(self.fps, self.wallclock)
        with tempfile.TemporaryFile() as errf, _SidePipe(self.framing == "sized") as side:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.build_command(side.child_fd),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=errf,
                    pass_fds=side.pass_fds,
                )
            except FileNotFoundError:
                raise FFmpegNotFoundError(f"{self.ffmpeg} not found: {INSTALL_HINT}") from None
            finally:
                side.parent_started()
            self._procs.add(proc)
            self.last_pid = proc.pid
            transport = None
            try:
                stdout = proc.stdout
                assert stdout is not None
                if side.fd is not None:
                    sizes = asyncio.StreamReader()
                    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                        lambda: asyncio.StreamReaderProtocol(sizes),
                        open(side.take(), "rb", buffering=0),  # noqa: SIM115 (the transport closes it)
                    )
                    while line := await sizes.readline():
                        if (size := _packet_size(line)) is None:
                            continue
                        now = time.time()
                        try:
                            data = await stdout.readexactly(size)
                        except asyncio.IncompleteReadError:
                            break  # ffmpeg died mid-packet: do not emit a truncated frame
                        for ev in framer.packet(data, now):
                            yield ev
                while chunk := await stdout.read(self.read_size):
                    for ev in framer.stream(chunk, time.time()):
                        yield ev
                for ev in framer.end(time.time()):
                    yield ev
                rc = await proc.wait()
                if rc != 0 and proc.pid not in self._terminated:
                    raise self._error(rc, errf)
            finally:
                self.dropped_leading = framer.grouper.dropped_leading
                if transport is not None:
                    transport.close()
                await _stop_async(proc)
                self._procs.discard(proc)

    def close(self) -> None:
        """Terminate every ffmpeg this source started that is still running."""
        for proc in list(self._procs):
            if proc.returncode is None:
                self._terminated.add(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            if isinstance(proc, subprocess.Popen):
                _stop_sync(proc)
                self._procs.discard(proc)
            # asyncio processes are reaped by their own iterator's finally block.


class _Framer:
    """Access units -> events for one ffmpeg run. ``stream()`` takes arbitrary chunks
    (AU boundaries found by parsing, so an AU is complete when the next one starts);
    ``packet()`` takes exactly one ffmpeg packet (= one AU, complete at once)."""

    def __init__(self, fps: Fraction, wallclock: bool) -> None:
        self.parser = AnnexBParser()
        self.asm = AccessUnitAssembler()
        self.grouper = _Grouper(fps, wallclock)

    def stream(self, chunk: bytes, now: float) -> list[Event]:
        out: list[Event] = []
        for nal in self.parser.feed(chunk):
            if (au := self.asm.push(nal, now)) is not None:
                out += self.grouper.events(au)
        return out

    def packet(self, data: bytes, now: float) -> list[Event]:
        out: list[Event] = []
        for nal in self.parser.feed(data) + self.parser.flush():
            if (au := self.asm.push(nal, now)) is not None:
                out += self.grouper.events(au)
        if (au := self.asm.flush()) is not None:
            out += self.grouper.events(au)
        return out

    def end(self, now: float) -> list[Event]:
        return self.packet(b"", now)


class _SidePipe:
    """The pipe ffmpeg's framecrc tee slave writes packet sizes to (framing="sized")."""

    def __init__(self, enabled: bool) -> None:
        self.fd: int | None = None
        self.child_fd: int | None = None
        if enabled:
            self.fd, self.child_fd = os.pipe()

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.child_fd,) if self.child_fd is not None else ()

    def parent_started(self) -> None:
        if self.child_fd is not None:
            os.close(self.child_fd)  # only the child keeps the write end
            self.child_fd = None

    def take(self) -> int:
        """Hand the read end over to a file object that will close it."""
        fd, self.fd = self.fd, None
        assert fd is not None
        return fd

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in (self.fd, self.child_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.child_fd = None


def _packet_size(line: bytes) -> int | None:
    """Packet size from a framecrc line (``stream, dts, pts, duration, size, crc...``)."""
    if not line.strip() or line.startswith(b"#"):
        return None
    try:
        return int(line.split(b",")[4])
    except (IndexError, ValueError):
        raise FFmpegError(f"unexpected framecrc line from ffmpeg: {line!r}") from None


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    parts, need = [], size
    while need > 0:
        chunk = stream.read(need)
        if not chunk:
            break
        parts.append(chunk)
        need -= len(chunk)
    return b"".join(parts)


def _stop_sync(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(_TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


async def _stop_async(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), _TERMINATE_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


# ---------------------------------------------------------------------------------------
# Synthetic source

_SYN_MAGIC = b"FRSY"
_SYN_HEADER = struct.Struct(">4sQQI")  # magic, group, object, size: 24 bytes


def synthetic_payload(group_id: int, object_id: int, size: int, seed: int = 0) -> bytes:
    """Deterministic payload of ``size`` bytes for (group, object): a 24-byte header
    (b"FRSY", group, object, size) followed by a BLAKE2b keystream."""
    if size < 0:
        raise ValueError("size must be >= 0")
    header = _SYN_HEADER.pack(_SYN_MAGIC, group_id, object_id, size)
    if size <= len(header):
        return header[:size]
    block = hashlib.blake2b(header, key=seed.to_bytes(8, "big"), digest_size=64).digest()
    body = size - len(header)
    return header + (block * (body // 64 + 1))[:body]


def is_synthetic_payload(payload: bytes) -> bool:
    """Whether ``payload`` starts like a synthetic_payload (its magic): worth verifying."""
    return payload[: len(_SYN_MAGIC)] == _SYN_MAGIC


def verify_synthetic_payload(group_id: int, object_id: int, payload: bytes, seed: int = 0) -> bool:
    """True iff ``payload`` is exactly what SyntheticSource sends for (group, object): its whole
    header, declaring the payload's actual length, then the body. A cut payload fails: one too
    short to hold the header (a prefix of any payload's header), or one shorter than declared."""
    if len(payload) < _SYN_HEADER.size or _SYN_HEADER.unpack_from(payload)[3] != len(payload):
        return False
    return payload == synthetic_payload(group_id, object_id, len(payload), seed)


TAG_SIZE = 16


def tag_bytes(seq: int, stream: int = 0) -> bytes:
    """struct fr_tag (bpf/include/fastrelay.h) for the lab's delay probes."""
    from ..lab.traffic import MAGIC, TAG

    return TAG.pack(MAGIC, stream, seq)


class SyntheticSource(FrameSource):
    """Opaque objects of fixed sizes at a fixed rate, for benchmarks.

    ``gop`` objects per Group; object 0 of each Group is a "keyframe" of
    ``keyframe_size`` bytes (default ``object_size``), the others ``object_size`` bytes.
    ``count`` objects (or ``duration`` seconds worth at ``fps``; both None = endless).
    ``realtime`` paces emission on an absolute schedule (no drift) and stamps wall-clock
    timestamps; otherwise frames come as fast as they are consumed with media time.
    Payloads are ``synthetic_payload(group, object, size, seed)``; check them with
    ``verify()``. Frames have ``codec="raw"`` (LOC carries them unchanged).
    """

    def __init__(
        self,
        *,
        object_size: int = 1200,
        keyframe_size: int | None = None,
        fps: float = 30.0,
        gop: int = 30,
        count: int | None = None,
        duration: float | None = None,
        realtime: bool = False,
        seed: int = 0,
        tag: bool = False,
    ) -> None:
        if object_size < 0 or (keyframe_size is not None and keyframe_size < 0):
            raise ValueError("sizes must be >= 0")
        if tag and min(object_size, object_size if keyframe_size is None else keyframe_size) < TAG_SIZE:
            raise ValueError(f"tagged objects need at least {TAG_SIZE} bytes")
        if fps <= 0 or gop < 1:
            raise ValueError("fps must be > 0 and gop >= 1")
        if count is not None and duration is not None:
            raise ValueError("give count or duration, not both")
        self.object_size = object_size
        self.keyframe_size = object_size if keyframe_size is None else keyframe_size
        self.fps = float(fps)
        self.gop = gop
        self.count = count if duration is None else round(duration * fps)
        self.realtime = realtime
        self.seed = seed
        self.tag = tag
        self._closed = False

    @property
    def bitrate(self) -> float:
        """Average payload bit rate in bit/s."""
        per_gop = self.keyframe_size + (self.gop - 1) * self.object_size
        return per_gop * 8 * self.fps / self.gop

    def verify(self, group_id: int, object_id: int, payload: bytes) -> bool:
        size = self.keyframe_size if object_id == 0 else self.object_size
        if self.tag:
            expected = synthetic_payload(group_id, object_id, size, self.seed)
            return len(payload) == size and payload[TAG_SIZE:] == expected[TAG_SIZE:]
        return len(payload) == size and verify_synthetic_payload(group_id, object_id, payload, self.seed)

    def _make(self, index: int) -> list[Event]:
        group, obj = divmod(index, self.gop)
        key = obj == 0
        pts = int(time.time() * 1_000_000) if self.realtime else round(index * 1_000_000 / self.fps)
        data = synthetic_payload(group, obj, self.keyframe_size if key else self.object_size, self.seed)
        if self.tag:  # the lab probes' tag (fastrelay.h struct fr_tag) leads the payload: seq = object index
            data = tag_bytes(index) + data[TAG_SIZE:]
        frame = Frame(index, pts, key, data, group, obj, self.realtime, "raw")
        return [Gop(group, index, pts), frame] if key else [frame]

    def _due(self, index: int, start: float) -> float:
        return start + index / self.fps - time.monotonic()

    def _events_sync(self) -> Iterator[Event]:
        self._closed = False
        start = time.monotonic()
        index = 0
        while not self._closed and (self.count is None or index < self.count):
            if self.realtime and (delay := self._due(index, start)) > 0:
                time.sleep(delay)
            yield from self._make(index)
            index += 1

    async def _events_async(self) -> AsyncIterator[Event]:
        self._closed = False
        start = time.monotonic()
        index = 0
        while not self._closed and (self.count is None or index < self.count):
            if self.realtime:
                await asyncio.sleep(max(0.0, self._due(index, start)))
            for ev in self._make(index):
                yield ev
            index += 1

    def close(self) -> None:
        self._closed = True
