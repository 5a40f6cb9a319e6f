"""H.264 bitstream utilities (ITU-T H.264 Annex B and ISO/IEC 14496-15), no I/O.

* NAL units are handled as ``bytes`` *including* their one-byte NAL header and with
  emulation prevention bytes left intact (they are what the decoder expects).
* :class:`AnnexBParser` splits an Annex-B byte stream incrementally (3- and 4-byte start
  codes, chunks may end anywhere, trailing zero bytes are stripped as the standard says).
* :class:`AccessUnitAssembler` groups NAL units into access units (frames) with the rules
  of H.264 section 7.4.1.2.3 (AUD / SPS / PPS / SEI after a VCL NAL, or a slice with
  ``first_mb_in_slice == 0``, starts a new access unit).
* Conversions between Annex-B (start codes) and the "avc"/AVCC format (big-endian length
  prefix before every NAL unit), and the AVCDecoderConfigurationRecord ("avcC",
  14496-15 section 5.3.3.1) that carries SPS/PPS as codec extradata.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

START_CODE = b"\x00\x00\x00\x01"

# nal_unit_type values (H.264 Table 7-1) used here.
NAL_SLICE = 1
NAL_SLICE_DPA = 2
NAL_IDR = 5
NAL_SEI = 6
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9
NAL_END_SEQ = 10
NAL_END_STREAM = 11
NAL_FILLER = 12

VCL_TYPES = frozenset({1, 2, 3, 4, 5})
# Slices that carry a slice header (first_mb_in_slice is their first field).
_SLICE_HEADER_TYPES = frozenset({NAL_SLICE, NAL_SLICE_DPA, NAL_IDR})
# Types that, after a VCL NAL unit of the current picture, start a new access unit.
_AU_START_AFTER_VCL = frozenset({NAL_SEI, NAL_SPS, NAL_PPS, 14, 15, 16, 17, 18})
# profile_idc values whose SPS has chroma_format_idc / bit depth / scaling matrices.
_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})
# profile_idc values whose avcC carries the chroma/bit-depth extension (14496-15).
_AVCC_EXT_PROFILES = frozenset({100, 110, 122, 144})


def nal_type(nal: bytes) -> int:
    return nal[0] & 0x1F


def nal_ref_idc(nal: bytes) -> int:
    return (nal[0] >> 5) & 0x3


# ---------------------------------------------------------------------------------------
# Annex B


class AnnexBParser:
    """Incremental Annex-B splitter: ``feed()`` chunks, get back the NAL units completed so
    far; ``flush()`` at end of stream returns the last one. Bytes before the first start
    code are discarded (counted in ``discarded``)."""

    __slots__ = ("_buf", "_nal_start", "_scan", "discarded")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._nal_start: int | None = None  # offset in _buf of the NAL unit being read
        self._scan = 0  # where the next start-code search begins
        self.discarded = 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = self._scan
        while (i := buf.find(b"\x00\x00\x01", pos)) >= 0:
            if self._nal_start is None:
                self.discarded += len(buf[:i].strip(b"\x00"))  # junk; zero bytes are legal padding
            else:
                self._emit(self._nal_start, i, out)
            self._nal_start = pos = i + 3
        if self._nal_start is None:
            keep = min(len(buf), 2)  # a start code may straddle the chunk boundary
            self.discarded += len(buf[: len(buf) - keep].strip(b"\x00"))
            del buf[: len(buf) - keep]
            self._scan = 0
        else:
            del buf[: self._nal_start]
            self._nal_start = 0
            self._scan = max(0, len(buf) - 2)
        return out

    def flush(self) -> list[bytes]:
        out: list[bytes] = []
        if self._nal_start is not None:
            self._emit(self._nal_start, len(self._buf), out)
        else:
            self.discarded += len(self._buf.strip(b"\x00"))
        self._buf.clear()
        self._nal_start = None
        self._scan = 0
        return out

    def _emit(self, start: int, end: int, out: list[bytes]) -> None:
        buf = self._buf
        # Zero bytes before a start code are zero_byte / trailing_zero_8bits of the byte
        # stream, never part of a NAL unit (a NAL unit's last byte is non-zero).
        while end > start and buf[end - 1] == 0:
            end -= 1
        if end > start:
            out.append(bytes(buf[start:end]))


def split_annexb(data: bytes | bytearray | memoryview) -> list[bytes]:
    """All NAL units of a complete Annex-B buffer."""
    parser = AnnexBParser()
    return parser.feed(data) + parser.flush()


def join_annexb(nals: Iterable[bytes]) -> bytes:
    """Annex-B bytes with a 4-byte start code before every NAL unit (LOC's preferred size)."""
    return b"".join(START_CODE + nal for nal in nals)


def is_annexb(data: bytes | bytearray | memoryview) -> bool:
    return bytes(data[:4]) == START_CODE or bytes(data[:3]) == b"\x00\x00\x01"


# ---------------------------------------------------------------------------------------
# AVCC (length-prefixed)


def nals_to_avcc(nals: Iterable[bytes], length_size: int = 4) -> bytes:
    if length_size not in (1, 2, 4):
        raise ValueError("length_size must be 1, 2 or 4")
    limit = 1 << (8 * length_size)
    out = bytearray()
    for nal in nals:
        if not nal or len(nal) >= limit:
            raise ValueError(f"NAL unit of {len(nal)} bytes does not fit a {length_size}-byte length")
        out += len(nal).to_bytes(length_size, "big")
        out += nal
    return bytes(out)


def split_avcc(data: bytes | bytearray | memoryview, length_size: int = 4) -> list[bytes]:
    """NAL units of a length-prefixed buffer; ValueError on zero or truncated lengths."""
    if length_size not in (1, 2, 4):
        raise ValueError("length_size must be 1, 2 or 4")
    data = bytes(data)
    out: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        if pos + length_size > end:
            raise ValueError(f"truncated NAL length at offset {pos}")
        n = int.from_bytes(data[pos : pos + length_size], "big")
        pos += length_size
        if n == 0 or pos + n > end:
            raise ValueError(f"bad NAL length {n} at offset {pos - length_size} ({end - pos} bytes left)")
        out.append(data[pos : pos + n])
        pos += n
    return out


def annexb_to_avcc(data: bytes | bytearray | memoryview, length_size: int = 4) -> bytes:
    return nals_to_avcc(split_annexb(data), length_size)


def avcc_to_annexb(data: bytes | bytearray | memoryview, length_size: int = 4) -> bytes:
    return join_annexb(split_avcc(data, length_size))


# ---------------------------------------------------------------------------------------
# Emulation prevention and exp-Golomb bit reading

_NEEDS_EPB = re.compile(rb"\x00\x00(?=[\x00-\x03])")


def unescape_rbsp(data: bytes) -> bytes:
    """Remove emulation_prevention_three_bytes (NAL unit payload -> RBSP). As in H.264
    section 7.3.1, every 00 00 03 (scanned left to right, non-overlapping) is one."""
    return data.replace(b"\x00\x00\x03", b"\x00\x00")


def escape_rbsp(rbsp: bytes) -> bytes:
    """Insert emulation_prevention_three_bytes (RBSP -> NAL unit payload)."""
    out = _NEEDS_EPB.sub(b"\x00\x00\x03", rbsp)
    # An RBSP ending in 00 00 (cabac_zero_words) gets a final 03 as well.
    return out + b"\x03" if out.endswith(b"\x00\x00") else out


class BitReader:
    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def u(self, n: int) -> int:
        value = 0
        for _ in range(n):
            byte = self._pos >> 3
            if byte >= len(self._data):
                raise ValueError("bitstream truncated")
            value = (value << 1) | ((self._data[byte] >> (7 - (self._pos & 7))) & 1)
            self._pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("invalid exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


# ---------------------------------------------------------------------------------------
# SPS / avcC


@dataclass(frozen=True, slots=True)
class SpsInfo:
    profile_idc: int
    constraint_flags: int
    level_idc: int
    sps_id: int
    chroma_format_idc: int
    bit_depth_luma: int
    bit_depth_chroma: int
    width: int
    height: int

    def codec_string(self, sample_entry: str = "avc3") -> str:
        """RFC 6381 codecs string, e.g. ``avc3.64000d`` (avc3: parameter sets in-band)."""
        return f"{sample_entry}.{self.profile_idc:02x}{self.constraint_flags:02x}{self.level_idc:02x}"


def _skip_scaling_list(r: BitReader, size: int) -> None:
    last = nxt = 8
    for _ in range(size):
        if nxt:
            nxt = (last + r.se() + 256) % 256
        last = nxt or last


def parse_sps(nal: bytes) -> SpsInfo:
    """Parse the fields of a sequence parameter set NAL unit needed for avcC and catalogs."""
    if nal_type(nal) != NAL_SPS or len(nal) < 4:
        raise ValueError("not an SPS NAL unit")
    r = BitReader(unescape_rbsp(nal[1:]))
    profile, constraints, level = r.u(8), r.u(8), r.u(8)
    sps_id = r.ue()
    chroma, depth_luma, depth_chroma, separate_planes = 1, 8, 8, 0
    if profile in _HIGH_PROFILES:
        chroma = r.ue()
        if chroma == 3:
            separate_planes = r.u(1)
        depth_luma = r.ue() + 8
        depth_chroma = r.ue() + 8
        r.u(1)  # qpprime_y_zero_transform_bypass_flag
        if r.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma != 3 else 12):
                if r.u(1):
                    _skip_scaling_list(r, 16 if i < 6 else 64)
    r.ue()  # log2_max_frame_num_minus4
    poc_type = r.ue()
    if poc_type == 0:
        r.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif poc_type == 1:
        r.u(1)
        r.se()
        r.se()
        for _ in range(r.ue()):
            r.se()
    r.ue()  # max_num_ref_frames
    r.u(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = r.ue() + 1
    height_units = r.ue() + 1
    frame_mbs_only = r.u(1)
    if not frame_mbs_only:
        r.u(1)  # mb_adaptive_frame_field_flag
    r.u(1)  # direct_8x8_inference_flag
    crop = (0, 0, 0, 0)
    if r.u(1):
        crop = (r.ue(), r.ue(), r.ue(), r.ue())
    chroma_array_type = 0 if separate_planes else chroma
    sub_w = 2 if chroma_array_type in (1, 2) else 1
    sub_h = 2 if chroma_array_type == 1 else 1
    crop_x = sub_w if chroma_array_type else 1
    crop_y = (sub_h if chroma_array_type else 1) * (2 - frame_mbs_only)
    width = width_mbs * 16 - crop_x * (crop[0] + crop[1])
    height = (2 - frame_mbs_only) * height_units * 16 - crop_y * (crop[2] + crop[3])
    return SpsInfo(profile, constraints, level, sps_id, chroma, depth_luma, depth_chroma, width, height)


@dataclass(frozen=True, slots=True)
class AvcConfig:
    """AVCDecoderConfigurationRecord (ISO/IEC 14496-15 section 5.3.3.1)."""

    profile_idc: int
    profile_compatibility: int
    level_idc: int
    length_size: int
    sps: tuple[bytes, ...]
    pps: tuple[bytes, ...]
    ext: bytes = field(default=b"")  # high-profile chroma/bit-depth/SPS-ext trailer, verbatim


def build_avc_config(sps: Sequence[bytes], pps: Sequence[bytes], length_size: int = 4) -> bytes:
    """Serialize an avcC record ("extradata", WebCodecs VideoDecoderConfig.description)."""
    if not sps or not pps:
        raise ValueError("avcC needs at least one SPS and one PPS")
    if length_size not in (1, 2, 4):
        raise ValueError("length_size must be 1, 2 or 4")
    if len(sps) > 31 or len(pps) > 255:
        raise ValueError("too many parameter sets for avcC")
    first = sps[0]
    out = bytearray((1, first[1], first[2], first[3], 0xFC | (length_size - 1), 0xE0 | len(sps)))
    for nal in sps:
        out += len(nal).to_bytes(2, "big") + nal
    out.append(len(pps))
    for nal in pps:
        out += len(nal).to_bytes(2, "big") + nal
    if first[1] in _AVCC_EXT_PROFILES:
        info = parse_sps(first)
        out.append(0xFC | (info.chroma_format_idc & 3))
        out.append(0xF8 | ((info.bit_depth_luma - 8) & 7))
        out.append(0xF8 | ((info.bit_depth_chroma - 8) & 7))
        out.append(0)  # numOfSequenceParameterSetExt
    return bytes(out)


def parse_avc_config(data: bytes) -> AvcConfig:
    """Parse an avcC record; ValueError if malformed."""
    try:
        if data[0] != 1:
            raise ValueError(f"unsupported avcC configurationVersion {data[0]}")
        profile, compat, level = data[1], data[2], data[3]
        length_size = (data[4] & 3) + 1
        if length_size == 3:
            raise ValueError("avcC lengthSizeMinusOne of 2 is not allowed")
        pos = 6
        sets: list[list[bytes]] = [[], []]
        for which, count in ((0, data[5] & 0x1F), (1, None)):
            if count is None:
                count = data[pos]
                pos += 1
            for _ in range(count):
                n = int.from_bytes(data[pos : pos + 2], "big")
                nal = data[pos + 2 : pos + 2 + n]
                if n == 0 or len(nal) != n:
                    raise ValueError("truncated parameter set in avcC")
                sets[which].append(nal)
                pos += 2 + n
    except IndexError:
        raise ValueError("truncated avcC") from None
    return AvcConfig(profile, compat, level, length_size, tuple(sets[0]), tuple(sets[1]), bytes(data[pos:]))


# ---------------------------------------------------------------------------------------
# Access units


@dataclass(frozen=True, slots=True)
class AccessUnit:
    """The NAL units of one coded picture; ``stamp`` is whatever the caller attached to
    the first NAL unit (e.g. the wall-clock time its bytes arrived)."""

    nals: tuple[bytes, ...]
    stamp: float | None = None

    @property
    def types(self) -> tuple[int, ...]:
        return tuple(n[0] & 0x1F for n in self.nals)

    @property
    def keyframe(self) -> bool:
        """An IDR access unit (nal_unit_type 5): decodable without earlier frames."""
        return any(n[0] & 0x1F == NAL_IDR for n in self.nals)

    @property
    def has_vcl(self) -> bool:
        return any(n[0] & 0x1F in VCL_TYPES for n in self.nals)

    @property
    def data(self) -> bytes:
        return join_annexb(self.nals)


class AccessUnitAssembler:
    """Feed NAL units in decoding order with ``push()``; it returns the previous access
    unit when the pushed NAL unit starts a new one. ``flush()`` returns the last one."""

    __slots__ = ("_has_vcl", "_nals", "_stamp")

    def __init__(self) -> None:
        self._nals: list[bytes] = []
        self._has_vcl = False
        self._stamp: float | None = None

    def push(self, nal: bytes, stamp: float | None = None) -> AccessUnit | None:
        if not nal:
            return None
        kind = nal[0] & 0x1F
        done = None
        if self._nals and self._starts_new_au(kind, nal):
            done = self.flush()
        if not self._nals:
            self._stamp = stamp
        self._nals.append(nal)
        if kind in VCL_TYPES:
            self._has_vcl = True
        return done

    def flush(self) -> AccessUnit | None:
        if not self._nals:
            return None
        au = AccessUnit(tuple(self._nals), self._stamp)
        self._nals = []
        self._has_vcl = False
        self._stamp = None
        return au

    def _starts_new_au(self, kind: int, nal: bytes) -> bool:
        if kind == NAL_AUD:
            return True  # an AUD is always the first NAL unit of an access unit
        if not self._has_vcl:
            return False
        if kind in _AU_START_AFTER_VCL:
            return True
        # first_mb_in_slice is ue(v) right after the NAL header; it is 0 iff its first bit
        # is 1. (Byte 1 can never be an emulation prevention byte.)
        return kind in _SLICE_HEADER_TYPES and len(nal) > 1 and bool(nal[1] & 0x80)


def iter_access_units(data: bytes) -> list[AccessUnit]:
    """Split a complete Annex-B buffer into access units."""
    asm = AccessUnitAssembler()
    out = [au for nal in split_annexb(data) if (au := asm.push(nal)) is not None]
    last = asm.flush()
    return [*out, last] if last is not None else out
