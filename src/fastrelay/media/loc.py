"""LOC (Low Overhead Media Container, draft-ietf-moq-loc-02) packaging of frames.

A LOC object is a MoQT Object whose Extension Headers carry the *LOC Public Properties*
and whose payload is the *LOC Private Properties* followed by the *LOC Payload*
(draft section "MOQ Object Mapping"). fastrelay does not use end-to-end encryption /
Secure Objects, so there are no LOC Private Properties: the MoQT payload is exactly the
LOC Payload.

Extension headers (MoQT Key-Value-Pairs: even type -> varint value, odd type -> bytes)
written by :func:`package`, sorted by type as MoQT's delta encoding requires:

====== ========================= ======== ===============================================
Type   Name                      Status   Value
====== ========================= ======== ===============================================
0x04   VIDEO_FRAME_MARKING       draft ID RFC 9626 non-scalable octet ``S|E|I|D|0000`` in
                                 pending  the low bits of the varint: 0xE0 keyframe, 0xC0
                                 IANA     delta frame, +0x10 if discardable (all slices
                                          have nal_ref_idc 0). One object = one whole
                                          frame, so S and E are always set.
0x06   TIMESTAMP                 IANA     capture time, varint
                                 (draft)
0x08   TIMESCALE                 IANA     1000000 when TIMESTAMP is media time in us;
                                 (draft)  omitted when TIMESTAMP is Unix-epoch wall clock
                                          in us (the draft's default without TIMESCALE)
0x0D   VIDEO_CONFIG              draft ID AVCDecoderConfigurationRecord ("avcC",
                                 pending  ISO/IEC 14496-15) built from the SPS/PPS, on
                                 IANA     keyframes only
0x4652 FASTRELAY_SEND_TIME       private  publisher wall clock (Unix us) when packaged
====== ========================= ======== ===============================================

Provisional choices (see :data:`EXTENSION_TABLE`):

* VIDEO_FRAME_MARKING = 4 and VIDEO_CONFIG = 13 are the values the draft proposes with
  "IANA, please assign"; only TIMESTAMP (0x06) and TIMESCALE (0x08) are in the draft's
  IANA table. 0x04 also collides with MoQT draft-16's MAX_CACHE_DURATION, which is a
  Track-scope extension (so not expected on Objects), and the draft's AUDIO_LEVEL ID (6)
  collides with TIMESTAMP; fastrelay carries no audio, so it defines no AUDIO_LEVEL.
* FASTRELAY_SEND_TIME = 0x4652 ("FR") is fastrelay-private: MoQT draft-16's IANA notes
  want types >= 16384 for first-come-first-served, non-standard use; even, so the value
  is a varint. It is a *relay-visible* extension header, not a LOC Private Property.

LOC Payload for H.264 (draft "Video Payload Format"): the canonical "avc" format with a
4-byte big-endian length before every NAL unit, with the parameter sets *also* in-band
before every IDR ("avc3" behaviour, codec string ``avc3.PPCCLL``). The draft reserves a
length value of 1 to mean a start code, so an access unit containing a 1-byte NAL unit
(end of sequence/stream) is sent in the draft's alternative start-code format (4-byte
start codes) instead; :func:`unpackage` accepts both. NAL units (AUD, SEI included) are
carried unchanged, so Annex-B -> LOC -> Annex-B is byte-exact for 4-byte start codes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

from .nal import (
    NAL_AUD,
    NAL_IDR,
    NAL_PPS,
    NAL_SPS,
    START_CODE,
    VCL_TYPES,
    annexb_to_avcc,
    avcc_to_annexb,
    build_avc_config,
    join_annexb,
    nals_to_avcc,
    parse_avc_config,
    split_annexb,
    split_avcc,
)

__all__ = [
    "EXTENSION_TABLE",
    "FASTRELAY_SEND_TIME",
    "FM_DISCARDABLE",
    "FM_END",
    "FM_INDEPENDENT",
    "FM_START",
    "MEDIA_TIMESCALE",
    "LocError",
    "LocFrame",
    "LocProperty",
    "annexb_to_avcc",
    "avcc_to_annexb",
    "extension_overhead",
    "package",
    "unpackage",
]


class LocProperty(IntEnum):
    """LOC Public Property / MoQT Object extension header types used by fastrelay."""

    VIDEO_FRAME_MARKING = 0x04  # PROVISIONAL: draft says "4 (IANA, please assign)"
    TIMESTAMP = 0x06  # draft IANA table
    TIMESCALE = 0x08  # draft IANA table
    VIDEO_CONFIG = 0x0D  # PROVISIONAL: draft says "13 (IANA, please assign)"


# fastrelay-PRIVATE (not LOC, not IANA): wall-clock send time, Unix epoch microseconds.
FASTRELAY_SEND_TIME = 0x4652

MEDIA_TIMESCALE = 1_000_000

# The one table of every type package() emits: type -> (name, status, value kind).
EXTENSION_TABLE: dict[int, tuple[str, str, type]] = {
    LocProperty.VIDEO_FRAME_MARKING: ("VIDEO_FRAME_MARKING", "provisional (draft-proposed, IANA pending)", int),
    LocProperty.TIMESTAMP: ("TIMESTAMP", "LOC draft IANA registration", int),
    LocProperty.TIMESCALE: ("TIMESCALE", "LOC draft IANA registration", int),
    LocProperty.VIDEO_CONFIG: ("VIDEO_CONFIG", "provisional (draft-proposed, IANA pending)", bytes),
    FASTRELAY_SEND_TIME: ("FASTRELAY_SEND_TIME", "fastrelay-private (>= 16384 FCFS range)", int),
}

# RFC 9626 frame marking, non-scalable short form: |S|E|I|D|0 0 0 0|
FM_START = 0x80
FM_END = 0x40
FM_INDEPENDENT = 0x20
FM_DISCARDABLE = 0x10
FM_BASE_SYNC = 0x08  # scalable form only
_FM_MAX = 0xFFFFFFFF  # the draft allows 1-4 bytes

VARINT_MAX = (1 << 62) - 1
KVP_VALUE_MAX = 0xFFFF


class LocError(ValueError):
    """A LOC object whose properties or payload do not follow the encodings above
    (maps to MoQT's KEY_VALUE_FORMATTING_ERROR for extension-header mismatches)."""


class FrameLike(Protocol):
    pts_us: int
    keyframe: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class LocFrame:
    """What :func:`unpackage` recovers; duck-compatible with ``h264.Frame`` for
    :class:`~fastrelay.media.writer.AnnexBWriter` (``keyframe``, ``data``, ids)."""

    pts_us: int | None
    keyframe: bool
    data: bytes  # Annex-B access unit (4-byte start codes), or raw bytes for codec "raw"
    wallclock: bool = False  # pts_us is Unix-epoch wall clock (no TIMESCALE sent)
    timestamp: int | None = None  # TIMESTAMP as sent
    timescale: int | None = None  # TIMESCALE as sent
    frame_marking: int | None = None
    discardable: bool = False
    video_config: bytes | None = None
    send_time_us: int | None = None
    group_id: int | None = None
    object_id: int | None = None
    codec: str = "h264"
    unknown_extensions: tuple[tuple[int, int | bytes], ...] = ()

    @property
    def size(self) -> int:
        return len(self.data)


def _frame_marking(key: bool, discardable: bool) -> int:
    return FM_START | FM_END | (FM_INDEPENDENT if key else 0) | (FM_DISCARDABLE if discardable else 0)


def package(
    frame: FrameLike,
    *,
    send_time_us: int | None = None,
    include_send_time: bool = True,
    include_config: bool = True,
) -> tuple[list[tuple[int, int | bytes]], bytes]:
    """LOC-package one frame: (extension headers sorted by type, MoQT Object payload).

    ``send_time_us`` defaults to the wall clock now (call this right before sending).
    """
    codec = getattr(frame, "codec", "h264")
    key = bool(frame.keyframe)
    config = None
    if codec == "h264":
        nals = split_annexb(frame.data)
        if not nals:
            raise LocError("frame has no NAL units")
        vcl = [n for n in nals if n[0] & 0x1F in VCL_TYPES]
        discardable = bool(vcl) and all(n[0] & 0x60 == 0 for n in vcl)
        if include_config and key:
            sps = [n for n in nals if n[0] & 0x1F == NAL_SPS]
            pps = [n for n in nals if n[0] & 0x1F == NAL_PPS]
            if sps and pps:
                config = build_avc_config(sps, pps)
        # A 4-byte length of 1 would read as a start code: use start codes for such AUs.
        payload = join_annexb(nals) if any(len(n) == 1 for n in nals) else nals_to_avcc(nals)
    else:
        discardable = False
        payload = bytes(frame.data)
    pts = int(frame.pts_us)
    if not 0 <= pts <= VARINT_MAX:
        raise LocError(f"timestamp {pts} does not fit a varint")
    ext: list[tuple[int, int | bytes]] = [
        (LocProperty.VIDEO_FRAME_MARKING, _frame_marking(key, discardable)),
        (LocProperty.TIMESTAMP, pts),
    ]
    if not getattr(frame, "wallclock", False):
        ext.append((LocProperty.TIMESCALE, MEDIA_TIMESCALE))
    if config is not None:
        ext.append((LocProperty.VIDEO_CONFIG, config))
    if include_send_time:
        ext.append((FASTRELAY_SEND_TIME, time.time_ns() // 1000 if send_time_us is None else int(send_time_us)))
    return [(int(k), v) for k, v in ext], payload


def _collect(extensions: Iterable[tuple[int, Any]] | Mapping[int, Any]) -> tuple[dict[int, Any], list]:
    pairs = list(extensions.items()) if isinstance(extensions, Mapping) else list(extensions)
    known: dict[int, Any] = {}
    unknown: list[tuple[int, int | bytes]] = []
    for kind, value in pairs:
        if kind in EXTENSION_TABLE:
            name, _, expected = EXTENSION_TABLE[kind]
            if kind in known:
                raise LocError(f"{name} (0x{kind:x}) appears twice")
            if expected is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise LocError(f"{name} (0x{kind:x}) must be a varint, got {type(value).__name__}")
            if expected is bytes and not isinstance(value, bytes | bytearray | memoryview):
                raise LocError(f"{name} (0x{kind:x}) must be bytes, got {type(value).__name__}")
            known[kind] = value
        else:
            unknown.append((kind, value))  # other extensions are not ours: keep, ignore
    return known, unknown


def unpackage(
    extensions: Iterable[tuple[int, int | bytes]] | Mapping[int, int | bytes],
    payload: bytes | bytearray | memoryview,
    *,
    codec: str = "h264",
    length_size: int = 4,
    group_id: int | None = None,
    object_id: int | None = None,
) -> LocFrame:
    """Rebuild a frame from a received LOC object. For H.264 ``data`` is an Annex-B
    access unit; if a keyframe lacks in-band SPS/PPS, those from VIDEO_CONFIG are
    inserted so the Annex-B stream stays decodable. ``length_size`` applies when the
    object has no VIDEO_CONFIG (whose lengthSizeMinusOne wins otherwise)."""
    known, unknown = _collect(extensions)
    marking = known.get(LocProperty.VIDEO_FRAME_MARKING)
    if marking is not None and marking > _FM_MAX:
        raise LocError(f"VIDEO_FRAME_MARKING 0x{marking:x} is longer than 4 bytes")
    timestamp = known.get(LocProperty.TIMESTAMP)
    timescale = known.get(LocProperty.TIMESCALE)
    if timescale == 0:
        raise LocError("TIMESCALE must not be 0")
    config = known.get(LocProperty.VIDEO_CONFIG)
    config = bytes(config) if config is not None else None
    payload = bytes(payload)

    key_from_payload: bool | None = None
    if codec == "h264":
        if config is not None:
            try:
                cfg = parse_avc_config(config)
            except ValueError as exc:
                raise LocError(f"bad VIDEO_CONFIG: {exc}") from None
            length_size = cfg.length_size
        try:
            nals = split_annexb(payload) if payload[:4] == START_CODE else split_avcc(payload, length_size)
        except ValueError as exc:
            raise LocError(f"bad H.264 LOC payload: {exc}") from None
        types = [n[0] & 0x1F for n in nals]
        key_from_payload = NAL_IDR in types
        if key_from_payload and config is not None and NAL_SPS not in types:
            at = 1 if types and types[0] == NAL_AUD else 0
            nals[at:at] = [*cfg.sps, *cfg.pps]
        data = join_annexb(nals)
    else:
        data = payload

    if marking is not None:
        flags = marking >> (8 * ((marking.bit_length() - 1) // 8)) if marking else 0
        keyframe = bool(flags & FM_INDEPENDENT)
        discardable = bool(flags & FM_DISCARDABLE)
    else:
        keyframe = bool(key_from_payload)
        discardable = False

    pts_us = None
    if timestamp is not None:
        scale = timescale or MEDIA_TIMESCALE
        pts_us = timestamp if scale == MEDIA_TIMESCALE else timestamp * MEDIA_TIMESCALE // scale
    return LocFrame(
        pts_us=pts_us,
        keyframe=keyframe,
        data=data,
        wallclock=timestamp is not None and timescale is None,
        timestamp=timestamp,
        timescale=timescale,
        frame_marking=marking,
        discardable=discardable,
        video_config=config,
        send_time_us=known.get(FASTRELAY_SEND_TIME),
        group_id=group_id,
        object_id=object_id,
        codec=codec,
        unknown_extensions=tuple(unknown),
    )


def extension_overhead(extensions: Iterable[tuple[int, int | bytes]]) -> int:
    """Bytes these (sorted) pairs take on the wire as MoQT delta-encoded Key-Value-Pairs
    (QUIC varints), excluding the Extension Headers Length field."""

    def vlen(v: int) -> int:
        return 1 if v < 0x40 else 2 if v < 0x4000 else 4 if v < 0x40000000 else 8

    total, prev = 0, 0
    for kind, value in extensions:
        total += vlen(kind - prev)
        prev = kind
        total += vlen(value) if isinstance(value, int) else vlen(len(value)) + len(value)
    return total
