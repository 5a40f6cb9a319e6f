"""Annex-B / AVCC / avcC utilities (no ffmpeg needed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrelay.media.nal import (
    AccessUnitAssembler,
    AnnexBParser,
    annexb_to_avcc,
    avcc_to_annexb,
    build_avc_config,
    escape_rbsp,
    iter_access_units,
    join_annexb,
    nals_to_avcc,
    parse_avc_config,
    parse_sps,
    split_annexb,
    split_avcc,
    unescape_rbsp,
)

# A 320x240 High-profile SPS/PPS as x264 writes them.
SPS = bytes.fromhex("6764000dacb40a0fd80880000003008000001e478a1550")
PPS = bytes.fromhex("68ef3cb0")


@st.composite
def nal_units(draw: st.DrawFn) -> bytes:
    """A valid NAL unit: header byte, emulation-prevented RBSP, non-zero last byte."""
    header = draw(st.integers(0, 0x7F).filter(lambda b: b & 0x1F != 0))
    rbsp = draw(st.binary(max_size=64).map(lambda b: b.replace(b"\x01", b"\x00")))  # many zero runs
    last = draw(st.integers(1, 255))
    return bytes([header]) + escape_rbsp(rbsp + bytes([last]))


nal_lists = st.lists(nal_units(), min_size=1, max_size=12)


@settings(max_examples=300)
@given(nal_lists)
def test_annexb_avcc_round_trip(nals: list[bytes]) -> None:
    annexb = join_annexb(nals)
    assert split_annexb(annexb) == nals
    avcc = annexb_to_avcc(annexb)
    assert split_avcc(avcc) == nals
    assert avcc == nals_to_avcc(nals)
    assert avcc_to_annexb(avcc) == annexb
    for size in (1, 2):
        if all(len(n) < 1 << (8 * size) for n in nals):
            assert avcc_to_annexb(annexb_to_avcc(annexb, size), size) == annexb


@settings(max_examples=300)
@given(nal_lists, st.data())
def test_incremental_parser_any_chunking_and_start_code_sizes(nals: list[bytes], data: st.DataObject) -> None:
    stream = bytearray(b"\x00" * data.draw(st.integers(0, 3)))  # leading_zero_8bits
    for nal in nals:
        stream += data.draw(st.sampled_from([b"\x00\x00\x01", b"\x00\x00\x00\x01"])) + nal
        stream += b"\x00" * data.draw(st.integers(0, 2))  # trailing_zero_8bits
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser, out, prev = AnnexBParser(), [], 0
    for cut in [*cuts, len(stream)]:
        out += parser.feed(bytes(stream[prev:cut]))
        prev = cut
    out += parser.flush()
    assert out == nals
    assert parser.discarded == 0


@given(st.binary(max_size=200))
def test_escape_unescape_round_trip(rbsp: bytes) -> None:
    escaped = escape_rbsp(rbsp)
    assert unescape_rbsp(escaped) == rbsp
    for bad in (b"\x00\x00\x00", b"\x00\x00\x01", b"\x00\x00\x02"):
        assert bad not in escaped


def test_parser_discards_leading_junk_and_one_shot_split() -> None:
    parser = AnnexBParser()
    assert parser.feed(b"junk\x00\x00\x01\x09\xf0\x00\x00") == []
    assert parser.feed(b"\x01\x67\x42") == [b"\x09\xf0"]
    assert parser.flush() == [b"\x67\x42"]
    assert parser.discarded == 4
    assert split_annexb(b"") == []
    assert split_annexb(b"\x00\x00\x01\x00\x00\x01\x65\x88") == [b"\x65\x88"]  # empty NAL skipped


def test_split_avcc_rejects_malformed() -> None:
    with pytest.raises(ValueError):
        split_avcc(b"\x00\x00\x00\x05\x65\x88")  # truncated NAL
    with pytest.raises(ValueError):
        split_avcc(b"\x00\x00\x00\x00")  # zero length
    with pytest.raises(ValueError):
        split_avcc(b"\x00\x00\x01")  # truncated length
    with pytest.raises(ValueError):
        nals_to_avcc([b""])


def _slice(kind: int, first_mb_zero: bool) -> bytes:
    return bytes([0x60 | kind, 0x88 if first_mb_zero else 0x40, 0x84])


def test_access_unit_rules() -> None:
    aud, sei = b"\x09\xf0", b"\x06\x05\x01\x80"
    stream = [
        aud, SPS, PPS, sei, _slice(5, True), _slice(5, False),  # IDR in two slices
        aud, _slice(1, True), _slice(1, False),  # P frame, AUD-delimited
        _slice(1, True),  # P frame without AUD: first_mb_in_slice == 0 starts it
        sei, _slice(1, True),  # SEI after a VCL NAL starts a new AU
        SPS, PPS, _slice(5, True),  # IDR without AUD
    ]  # fmt: skip
    asm = AccessUnitAssembler()
    aus = [au for i, nal in enumerate(stream) if (au := asm.push(nal, float(i))) is not None]
    aus.append(asm.flush())
    assert [au.types for au in aus] == [(9, 7, 8, 6, 5, 5), (9, 1, 1), (1,), (6, 1), (7, 8, 5)]
    assert [au.keyframe for au in aus] == [True, False, False, False, True]
    assert [au.stamp for au in aus] == [0.0, 6.0, 9.0, 10.0, 12.0]
    assert asm.flush() is None
    assert [au.types for au in iter_access_units(join_annexb(stream))] == [au.types for au in aus]


def test_sps_and_avc_config() -> None:
    info = parse_sps(SPS)
    assert (info.profile_idc, info.level_idc, info.width, info.height) == (100, 13, 320, 240)
    assert (info.chroma_format_idc, info.bit_depth_luma, info.bit_depth_chroma) == (1, 8, 8)
    assert info.codec_string() == "avc3.64000d"
    config = build_avc_config([SPS], [PPS])
    # Byte-identical to the avcC box ffmpeg's mp4 muxer writes for this stream.
    assert config.hex() == "0164000dffe10017" + SPS.hex() + "0100" + "04" + PPS.hex() + "fdf8f800"
    parsed = parse_avc_config(config)
    assert (parsed.sps, parsed.pps, parsed.length_size, parsed.profile_idc) == ((SPS,), (PPS,), 4, 100)
    with pytest.raises(ValueError):
        parse_avc_config(config[:10])
    with pytest.raises(ValueError):
        build_avc_config([], [PPS])
