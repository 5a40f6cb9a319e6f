"""Media layer of fastrelay (no network code).

* :mod:`.h264` — frame sources: :class:`H264Source` (ffmpeg, Annex-B H.264, one Frame
  per access unit, one Group per GOP) and :class:`SyntheticSource` (benchmarks).
* :mod:`.nal` — Annex-B / AVCC / avcC bitstream utilities.
* :mod:`.loc` — LOC (draft-ietf-moq-loc-02) ``package`` / ``unpackage`` for MoQT Objects.
* :mod:`.writer` — :class:`AnnexBWriter` for subscribers.
"""

from .h264 import (
    FFmpegError,
    FFmpegNotFoundError,
    Frame,
    FrameSource,
    Gop,
    H264Source,
    SyntheticSource,
    synthetic_payload,
    verify_synthetic_payload,
)
from .loc import FASTRELAY_SEND_TIME, LocError, LocFrame, LocProperty, package, unpackage
from .writer import AnnexBWriter

__all__ = [
    "FASTRELAY_SEND_TIME",
    "AnnexBWriter",
    "FFmpegError",
    "FFmpegNotFoundError",
    "Frame",
    "FrameSource",
    "Gop",
    "H264Source",
    "LocError",
    "LocFrame",
    "LocProperty",
    "SyntheticSource",
    "package",
    "synthetic_payload",
    "unpackage",
    "verify_synthetic_payload",
]
