"""TLS material for QUIC endpoints: load a given certificate/key, or make a self-signed one."""

from __future__ import annotations

import datetime
import ipaddress
import logging
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger("fastrelay.tls")


def self_signed(hosts: list[str], days: int = 30) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for `hosts` (DNS names or IP literals), ECDSA P-256."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "fastrelay")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def certificate_files(cert: str | None, key: str | None, hosts: list[str], state_dir: Path) -> tuple[Path, Path]:
    """The given cert/key paths, or a self-signed pair written under `state_dir` (and said so)."""
    if cert or key:
        if not (cert and key):
            raise ValueError("--cert and --key go together")
        for p in (cert, key):
            if not Path(p).is_file():
                raise ValueError(f"{p}: no such file")
        return Path(cert), Path(key)
    state_dir.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = self_signed(hosts)
    cert_path, key_path = state_dir / "selfsigned.crt", state_dir / "selfsigned.key"
    cert_path.write_bytes(cert_pem)
    key_path.touch(mode=0o600)
    key_path.write_bytes(key_pem)
    log.warning("no --cert/--key given: using a self-signed certificate for %s (%s); clients must not verify it"
                " or must trust that file", ", ".join(hosts), cert_path)
    return cert_path, key_path
