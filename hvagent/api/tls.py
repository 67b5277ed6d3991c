"""TLS for the agent's TCP listener: its own CA and server certificate (made on first
start in state_dir/tls unless configured), the server's SSL context (TLS 1.2+), the CA
fingerprint clients pin (hvctl's side of the pinning: hvagent.cli.hvctl.pinning)."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hvagent.errors import InvalidRequest

# cryptography is imported where a certificate is made or read, not at module load: it
# costs the daemon ~8 MiB of RSS, and an agent without a TLS listener never needs it.
if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

VALIDITY = dt.timedelta(days=3650)


@dataclass(frozen=True)
class ServerCert:
    cert: Path  # server certificate followed by the CA certificate
    key: Path
    ca: Path | None  # None when the certificate was configured, not made here


def fingerprint(pem: bytes) -> str:
    """sha256 of the (first) certificate's DER, as AB:CD:..."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Temp file + rename: a crash never leaves half a key or certificate."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _names(extra: list[str]) -> list[x509.GeneralName]:
    from cryptography import x509

    out: list[x509.GeneralName] = []
    for n in ["localhost", socket.gethostname(), "127.0.0.1", "::1", *extra]:
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(n))
        except ValueError:
            name = x509.DNSName(n)
        if name not in out:
            out.append(name)
    return out


def ensure_server_cert(directory: Path, hostnames: list[str]) -> ServerCert:
    """The CA and server certificate in `directory`, made on the first call."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_pem, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key = directory / "server.pem", directory / "server.key"
    if cert.exists() and key.exists() and ca_pem.exists():
        return ServerCert(cert, key, ca_pem)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = dt.datetime.now(dt.UTC)
    if ca_pem.exists() and ca_key.exists():  # keep the CA clients pinned
        ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), None)
        assert isinstance(ca_private, ec.EllipticCurvePrivateKey)
    else:
        ca_private = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                f"hvagent CA {socket.gethostname()}")])
        ca_cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(ca_private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + VALIDITY)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                False, False), critical=True)
                   .sign(ca_private, hashes.SHA256()))
        _write(ca_key, _key_pem(ca_private), 0o600)
        _write(ca_pem, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    private = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        socket.gethostname())]))
            .issuer_name(ca_cert.subject).public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName(_names(hostnames)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_private, hashes.SHA256()))
    _write(key, _key_pem(private), 0o600)
    _write(cert, leaf.public_bytes(serialization.Encoding.PEM)
           + ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return ServerCert(cert, key, ca_pem)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise InvalidRequest(f"tls: cannot load {cert} / {key}: {e}") from e
    return ctx
