"""Subscriber side: write received H.264 frames to a decodable Annex-B (.h264) file."""

from __future__ import annotations

import os
from typing import IO, Any, Self

from .nal import NAL_AUD, NAL_PPS, NAL_SPS, join_annexb, split_annexb

__all__ = ["AnnexBWriter"]


class AnnexBWriter:
    """Appends frames (``h264.Frame``, ``loc.LocFrame`` or anything with ``keyframe`` and
    Annex-B ``data``) to a file, keeping the output decodable:

    * frames before the first keyframe are dropped;
    * a delta frame is written only if it directly follows the last written frame
      (same ``group_id`` and ``object_id + 1``; or ``index + 1`` when the frame has no
      ids; frames with neither are assumed contiguous). After a gap nothing is written
      until the next keyframe (``mark_gap()`` forces that, e.g. on a stream reset);
    * frames at or before the last written position (late duplicates) are dropped;
    * a keyframe without in-band SPS/PPS gets the last ones seen inserted; if none were
      ever seen it cannot be decoded and is dropped like a delta frame.

    Counters: ``frames_written``, ``frames_skipped`` (= ``skipped_before_keyframe`` +
    ``skipped_after_gap`` + ``skipped_stale``), ``keyframes_written``, ``gaps``,
    ``bytes_written``.
    """

    def __init__(self, target: str | os.PathLike[str] | IO[bytes], *, append: bool = False) -> None:
        if isinstance(target, str | os.PathLike):
            self.path: str | None = os.fspath(target)
            self._file: IO[bytes] = open(self.path, "ab" if append else "wb")  # noqa: SIM115
            self._owns = True
        else:
            self.path = None
            self._file = target
            self._owns = False
        self._synced = False
        self._last: tuple[int, ...] | None = None  # position of the last written frame
        self._sps: list[bytes] = []
        self._pps: list[bytes] = []
        self.frames_written = 0
        self.keyframes_written = 0
        self.bytes_written = 0
        self.skipped_before_keyframe = 0
        self.skipped_after_gap = 0
        self.skipped_stale = 0
        self.gaps = 0

    @property
    def frames_skipped(self) -> int:
        return self.skipped_before_keyframe + self.skipped_after_gap + self.skipped_stale

    @staticmethod
    def _position(frame: Any) -> tuple[int, ...] | None:
        group, obj = getattr(frame, "group_id", None), getattr(frame, "object_id", None)
        if group is not None and obj is not None:
            return (int(group), int(obj))
        index = getattr(frame, "index", None)
        return (int(index),) if index is not None else None

    def _follows(self, pos: tuple[int, ...] | None) -> bool:
        last = self._last
        if pos is None or last is None or len(pos) != len(last):
            return True
        if len(pos) == 1:
            return pos[0] == last[0] + 1
        return pos[0] == last[0] and pos[1] == last[1] + 1

    def _stale(self, pos: tuple[int, ...] | None) -> bool:
        last = self._last
        return pos is not None and last is not None and len(pos) == len(last) and pos <= last

    def _groups_missing(self, pos: tuple[int, ...] | None) -> bool:
        last = self._last
        return pos is not None and last is not None and len(pos) == len(last) == 2 and pos[0] > last[0] + 1

    def mark_gap(self) -> None:
        """Declare that frames were lost: resume at the next keyframe."""
        if self._synced:
            self._synced = False
            self.gaps += 1

    def write(self, frame: Any) -> bool:
        """Write ``frame`` if that keeps the output decodable; True if written."""
        pos = self._position(frame)
        if self._stale(pos):
            self.skipped_stale += 1
            return False
        if frame.keyframe:
            data = self._with_parameter_sets(bytes(frame.data))
            if data is not None:
                if self._synced and self._groups_missing(pos):
                    self.gaps += 1  # whole Groups lost; the keyframe resyncs anyway
                self._emit(data, pos)
                self.keyframes_written += 1
                self._synced = True
                return True
        elif self._synced:
            if self._follows(pos):
                self._emit(bytes(frame.data), pos)
                return True
            self._synced = False
            self.gaps += 1
        if self.frames_written == 0:
            self.skipped_before_keyframe += 1
        else:
            self.skipped_after_gap += 1
        return False

    def _with_parameter_sets(self, data: bytes) -> bytes | None:
        nals = split_annexb(data)
        types = [n[0] & 0x1F for n in nals]
        sps = [n for n, t in zip(nals, types, strict=True) if t == NAL_SPS]
        pps = [n for n, t in zip(nals, types, strict=True) if t == NAL_PPS]
        if sps and pps:
            self._sps, self._pps = sps, pps
            return data
        if not (self._sps and self._pps):
            return None
        at = 1 if types and types[0] == NAL_AUD else 0
        nals[at:at] = [*(sps or self._sps), *(pps or self._pps)]
        return join_annexb(nals)

    def _emit(self, data: bytes, pos: tuple[int, ...] | None) -> None:
        self._file.write(data)
        self.frames_written += 1
        self.bytes_written += len(data)
        if pos is not None:
            self._last = pos

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if self._owns and not self._file.closed:
            self._file.close()
        elif not self._owns:
            self._file.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        return {
            "frames_written": self.frames_written,
            "frames_skipped": self.frames_skipped,
            "keyframes_written": self.keyframes_written,
            "skipped_before_keyframe": self.skipped_before_keyframe,
            "skipped_after_gap": self.skipped_after_gap,
            "skipped_stale": self.skipped_stale,
            "gaps": self.gaps,
            "bytes_written": self.bytes_written,
        }
