"""QUIC "plaintext" packet protection for the kernel fast path (INSECURE by design, opt-in).

The handshake stays real TLS 1.3: Initial and Handshake packets are protected as usual. Only the 1-RTT
epoch becomes identity protection, so that TC eBPF programs can read and rewrite headers and frames:

- AEAD: the payload stays in clear and is followed by a 16-byte all-zero tag (packet sizes, and so
  aioquic's builder arithmetic, are unchanged). A received packet whose tag is not all zeros is rejected
  exactly like a packet that failed decryption.
- Header protection: none. The first byte (key phase, packet-number length) and the packet number are
  sent in clear; aioquic always sends 2-byte packet numbers.
- Key updates flip the key-phase bit and keep identity protection. Reordered packets of the previous
  phase (lower packet numbers than any of the current phase) are accepted without flipping back.

Negotiation: a private transport parameter, id ``TRANSPORT_PARAMETER_ID`` = 0x3f5a57 (a 4-byte varint,
randomly chosen as RFC 9000 section 22.1.2 asks, not a greasing value 31*N+27), with an empty value.
An endpoint offers it only after ``install()`` (fastrelay: ``link.configuration(plaintext=True)``), and
plaintext is used only when both endpoints offered it; otherwise the connection keeps standard crypto.
Each connection that runs in plaintext logs one WARNING line starting with "INSECURE".

This module is the only place that touches aioquic private names for this feature (aioquic is pinned;
tests/quic/test_plaintext.py checks every one of them so an upgrade that moves them fails loudly).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

from aioquic import tls
from aioquic._crypto import AEAD, CryptoError, HeaderProtection
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection, QuicConnectionError
from aioquic.quic.crypto import CryptoContext, CryptoPair, KeyUnavailableError, NoCallback
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, decode_packet_number

log = logging.getLogger("fastrelay.quic.plaintext")

TRANSPORT_PARAMETER_ID = 0x3F5A57
TAG_SIZE = 16
ZERO_TAG = bytes(TAG_SIZE)
MAX_CID_LENGTH = 20


def _encode_offer() -> bytes:
    """Our offer as appended to the serialized transport parameters: varint id, varint length 0."""
    buf = Buffer(capacity=16)
    buf.push_uint_var(TRANSPORT_PARAMETER_ID)
    buf.push_uint_var(0)
    return buf.data


_OFFER = _encode_offer()


class ShortHeader(NamedTuple):
    """A 1-RTT (short header) packet's header, read without header protection."""

    first_byte: int
    dcid: bytes
    packet_number_truncated: int
    pn_len: int
    payload_offset: int

    @property
    def key_phase(self) -> int:
        return (self.first_byte >> 2) & 1


def parse_short_header(datagram: bytes, cid_len: int) -> ShortHeader:
    """Read the short header at the start of `datagram` (meaningful only for plaintext packets, whose
    first byte and packet number are not masked). Raises ValueError on a long header, a cleared fixed bit
    or input too short for the header."""
    if not 0 <= cid_len <= MAX_CID_LENGTH:
        raise ValueError(f"connection id length {cid_len} is not in 0..{MAX_CID_LENGTH}")
    if not datagram:
        raise ValueError("empty datagram")
    first = datagram[0]
    if first & 0x80:
        raise ValueError(f"long header packet (first byte 0x{first:02x}), not 1-RTT")
    if not first & 0x40:
        raise ValueError(f"fixed bit not set (first byte 0x{first:02x})")
    pn_len = (first & 0x03) + 1
    payload_offset = 1 + cid_len + pn_len
    if len(datagram) < payload_offset:
        raise ValueError(f"truncated short header: {len(datagram)} bytes, need {payload_offset}")
    pn = int.from_bytes(datagram[1 + cid_len:payload_offset], "big")
    return ShortHeader(first, bytes(datagram[1:1 + cid_len]), pn, pn_len, payload_offset)


class IdentityAEAD(AEAD):
    """AEAD that leaves the payload in clear and uses an all-zero tag."""

    def __init__(self) -> None:  # no key: nothing of AEAD's state is used
        pass

    def encrypt(self, data: bytes, associated_data: bytes, packet_number: int) -> bytes:
        return data + ZERO_TAG

    def decrypt(self, data: bytes, associated_data: bytes, packet_number: int) -> bytes:
        if len(data) < TAG_SIZE or data[-TAG_SIZE:] != ZERO_TAG:
            raise CryptoError("plaintext packet without an all-zero tag")
        return data[:-TAG_SIZE]


class IdentityHeaderProtection(HeaderProtection):
    """Header protection that masks nothing."""

    def __init__(self) -> None:  # no key
        pass

    def apply(self, plain_header: bytes, protected_payload: bytes) -> bytes:
        return plain_header + protected_payload

    def remove(self, packet: bytes, pn_offset: int) -> tuple[bytes, int]:
        pn_end = pn_offset + (packet[0] & 0x03) + 1
        if pn_end > len(packet):
            raise CryptoError("packet too short for its packet number")
        return packet[:pn_end], int.from_bytes(packet[pn_offset:pn_end], "big")


class PlaintextContext(CryptoContext):
    """One direction of identity protection; key phases only flip a bit (no key derivation)."""

    def __init__(self, setup_cb: Callable[[str], None] = NoCallback,
                 teardown_cb: Callable[[str], None] = NoCallback) -> None:
        super().__init__(setup_cb=setup_cb, teardown_cb=teardown_cb)
        self._lowest_pn_in_phase: int | None = None  # receive side: lowest number seen in this phase
        self._has_previous_phase = False

    def setup(self, *, cipher_suite: tls.CipherSuite, secret: bytes, version: int) -> None:
        self.aead = IdentityAEAD()
        self.hp = IdentityHeaderProtection()
        self.cipher_suite = cipher_suite
        self.secret = secret
        self.version = version
        self._setup_cb("tls")

    def decrypt_packet(self, packet: bytes, encrypted_offset: int,
                       expected_packet_number: int) -> tuple[bytes, bytes, int, bool]:
        if self.aead is None or self.hp is None:
            raise KeyUnavailableError("Decryption key is not available")
        plain_header, truncated = self.hp.remove(packet, encrypted_offset)
        first = plain_header[0]
        pn = decode_packet_number(truncated, ((first & 0x03) + 1) * 8, expected_packet_number)
        payload = self.aead.decrypt(packet[len(plain_header):], plain_header, pn)
        update = False
        if (first >> 2) & 1 == self.key_phase:
            self.note_received(pn)
        elif self._lowest_pn_in_phase is None:
            update = not self._has_previous_phase  # nothing seen in this phase yet: a late old-phase packet
        else:
            update = pn > self._lowest_pn_in_phase  # newer than this phase: the peer updated
        return plain_header, payload, pn, update

    def note_received(self, pn: int) -> None:
        if self._lowest_pn_in_phase is None or pn < self._lowest_pn_in_phase:
            self._lowest_pn_in_phase = pn

    def next_phase(self, trigger: str) -> None:
        self.key_phase ^= 1
        self._lowest_pn_in_phase = None
        self._has_previous_phase = True
        self._setup_cb(trigger)


class PlaintextCryptoPair(CryptoPair):
    """The 1-RTT CryptoPair of a plaintext connection."""

    recv: PlaintextContext
    send: PlaintextContext

    def __init__(self, replacing: CryptoPair) -> None:
        """Take the place of aioquic's (not yet keyed) 1-RTT pair, keeping its qlog callbacks."""
        if replacing.recv.is_valid() or replacing.send.is_valid():
            raise RuntimeError("1-RTT keys already installed: too late to switch to plaintext")
        super().__init__()
        self.recv = PlaintextContext(setup_cb=replacing.recv._setup_cb, teardown_cb=replacing.recv._teardown_cb)
        self.send = PlaintextContext(setup_cb=replacing.send._setup_cb, teardown_cb=replacing.send._teardown_cb)

    def decrypt_packet(self, packet: bytes, encrypted_offset: int,
                       expected_packet_number: int) -> tuple[bytes, bytes, int]:
        plain_header, payload, pn, update = self.recv.decrypt_packet(packet, encrypted_offset,
                                                                     expected_packet_number)
        if update:
            self._update_key("remote_update")
            self.recv.note_received(pn)
        return plain_header, payload, pn

    def _update_key(self, trigger: str) -> None:
        self.recv.next_phase(trigger)
        self.send.next_phase(trigger)
        self._update_key_requested = False


def install(quic: QuicConnection) -> None:
    """Offer plaintext 1-RTT protection on `quic`, in force if the peer offers it too.

    Call it before the connection starts (before `connect()` on a client, before the first datagram
    on a server): the hooks must see the transport parameters and the 1-RTT keys."""
    if quic._cryptos:
        raise RuntimeError("plaintext.install() must run before the connection starts")
    if "_update_traffic_key" in vars(quic):
        raise RuntimeError("plaintext.install() called twice on one connection")
    serialize = quic._serialize_transport_parameters
    parse = quic._parse_transport_parameters
    install_key = quic._update_traffic_key
    peer_offered = False

    def serialize_with_offer() -> bytes:
        return serialize() + _OFFER

    def parse_noting_offer(data: bytes, from_session_ticket: bool = False) -> None:
        nonlocal peer_offered
        parse(data, from_session_ticket)  # raises on malformed parameters
        if not from_session_ticket:
            peer_offered = _offered(data)

    def install_key_choosing_protection(direction: tls.Direction, epoch: tls.Epoch, cipher_suite: tls.CipherSuite,
                                        secret: bytes) -> None:
        if epoch == tls.Epoch.ONE_RTT and peer_offered and not is_plaintext(quic):
            quic._cryptos[epoch] = PlaintextCryptoPair(quic._cryptos[epoch])
            log.warning("INSECURE: packet protection disabled on connection %s (%s side) "
                        "(plaintext mode, for the kernel fast path)", quic.original_destination_connection_id.hex(),
                        "client" if quic.configuration.is_client else "server")
        install_key(direction, epoch, cipher_suite, secret)

    quic._serialize_transport_parameters = serialize_with_offer  # type: ignore[method-assign]
    quic._parse_transport_parameters = parse_noting_offer  # type: ignore[method-assign]
    quic._update_traffic_key = install_key_choosing_protection  # type: ignore[method-assign]


def is_plaintext(quic: QuicConnection) -> bool:
    """Whether `quic`'s 1-RTT packets are sent and received without protection."""
    return isinstance(quic._cryptos.get(tls.Epoch.ONE_RTT), PlaintextCryptoPair)


def _offered(data: bytes) -> bool:
    """Whether serialized transport parameters (aioquic parsed them already, so they are well-formed)
    carry the plaintext offer. A non-empty value is a TRANSPORT_PARAMETER_ERROR."""
    buf = Buffer(data=data)
    while not buf.eof():
        param_id = buf.pull_uint_var()
        value = buf.pull_bytes(buf.pull_uint_var())
        if param_id == TRANSPORT_PARAMETER_ID:
            if value:
                raise QuicConnectionError(error_code=QuicErrorCode.TRANSPORT_PARAMETER_ERROR,
                                          frame_type=QuicFrameType.CRYPTO,
                                          reason_phrase="plaintext transport parameter must be empty")
            return True
    return False
