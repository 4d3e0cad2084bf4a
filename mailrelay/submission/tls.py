"""The submission server's TLS: its context (reloadable, for certificate renewals), and a
self-signed certificate for development."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class CertificateError(Exception):
    """The configured certificate or key cannot be used."""


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2+ with forward-secret AEAD suites only: clients are our own users' mail programs,
    so there is no legacy peer to accommodate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(
            f"cannot load certificate {cert_file} with key {key_file}: {exc}"
        ) from exc
    return ctx


def certificate_not_after(cert_file: str) -> float:
    """The notAfter of the first (leaf) certificate in `cert_file`, as a Unix time."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot read certificate {cert_file}: {exc}") from exc
    return cert.not_valid_after_utc.timestamp()


class ReloadableContext:
    """One SSLContext for the listeners (asyncio keeps the implicit-TLS port's for good) whose
    certificate and key can be replaced: at each handshake its servername callback, which
    OpenSSL calls whether or not the client sent SNI, hands the connection the context loaded
    last. Sessions already set up keep the certificate they were given."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._current = server_context(cert_file, key_file)
        self.not_after = certificate_not_after(cert_file)
        self.context = server_context(cert_file, key_file)
        self.context.sni_callback = self._select

    def _select(self, connection: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        connection.context = self._current

    def reload(self) -> float:
        """Load the files again; on CertificateError the loaded pair stays. Returns notAfter."""
        context = server_context(self.cert_file, self.key_file)
        not_after = certificate_not_after(self.cert_file)
        self._current, self.not_after = context, not_after
        return not_after


def ensure_self_signed(cert_file: str, key_file: str, hostname: str) -> bool:
    """Make a self-signed certificate for `hostname` unless both files exist; True if made."""
    cert_path, key_path = Path(cert_file), Path(key_file)
    if cert_path.exists() and key_path.exists():
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    # The loopback addresses too: `make run` listens on 127.0.0.1, and a client that checks the
    # certificate against the address it dialled must find it there.
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    for path in (cert_path, key_path):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return True
