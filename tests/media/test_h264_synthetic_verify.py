"""verify_synthetic_payload: a cut payload never verifies (the header's declared size and the
actual length must agree, and the header must be whole)."""

from __future__ import annotations

import pytest

from fastrelay.media.h264 import is_synthetic_payload, synthetic_payload, verify_synthetic_payload

HEADER = 24  # magic, group, object, size


@pytest.mark.parametrize("cut", [0, 1, 4, 12, 20, 22, 23])
def test_a_payload_cut_inside_its_header_is_bad(cut):
    whole = synthetic_payload(3, 7, 1000)
    assert verify_synthetic_payload(3, 7, whole)
    assert not verify_synthetic_payload(3, 7, whole[:cut])


@pytest.mark.parametrize("cut", [HEADER, HEADER + 1, 500, 999])
def test_a_payload_cut_after_its_header_is_bad(cut):
    assert not verify_synthetic_payload(3, 7, synthetic_payload(3, 7, 1000)[:cut])


def test_the_declared_size_must_be_the_actual_length():
    whole = synthetic_payload(3, 7, 1000)
    longer = synthetic_payload(3, 7, 1200)
    assert not verify_synthetic_payload(3, 7, whole + longer[1000:])  # extended with the right body
    assert verify_synthetic_payload(3, 7, longer) and verify_synthetic_payload(3, 7, synthetic_payload(3, 7, HEADER))


def test_synthetic_payloads_are_told_by_their_magic():
    assert is_synthetic_payload(synthetic_payload(0, 0, 100)) and is_synthetic_payload(synthetic_payload(0, 0, 4))
    assert not is_synthetic_payload(b"\x00\x00\x00\x01\x67") and not is_synthetic_payload(b"FRS")
