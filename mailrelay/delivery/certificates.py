"""Certificates of the MX hosts we deliver to: the facts we record, whether the chain would
verify, and whether it is built from keys and signatures too weak to count as verified."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import ssl
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError


@dataclass(frozen=True)
class CertificateFacts:
    sha256: str  # lowercase hex of the SHA-256 of the leaf's DER
    subject: str  # RFC 4514
    issuer: str
    not_before: dt.datetime  # UTC
    not_after: dt.datetime


def certificate_facts(leaf_der: bytes) -> CertificateFacts:
    """Fingerprint, names and validity period of a DER certificate."""
    cert = x509.load_der_x509_certificate(leaf_der)
    return CertificateFacts(
        sha256=hashlib.sha256(leaf_der).hexdigest(),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def verify_chain(
    chain_der: Sequence[bytes], host: str, ca_file: str = "", now: dt.datetime | None = None
) -> str | None:
    """Check a peer's chain (leaf first) against system roots plus `ca_file` and the host name.

    Returns None when it verifies, else why not. Used under "encrypt", where OpenSSL was told
    not to verify, so that the record still says whether the certificate would have passed.
    This is pyca/cryptography's Web PKI verifier, which is stricter than OpenSSL in places.
    """
    if not chain_der:
        return "the server sent no certificate"
    now = now or dt.datetime.now(dt.UTC)
    host = host.rstrip(".").lower()
    try:
        leaf, *intermediates = (x509.load_der_x509_certificate(der) for der in chain_der)
    except ValueError as exc:
        return f"unreadable certificate: {exc}"
    try:
        verifier = (
            PolicyBuilder()
            .store(_trust_store(ca_file, mtime(ca_file)))
            .time(now)
            .build_server_verifier(x509.DNSName(host))
        )
        verifier.verify(leaf, intermediates)
    except (VerificationError, ValueError) as exc:
        # cryptography says what broke in its own terms ("candidates exhausted"); the
        # operator reading a bounce wants the usual words for the usual causes.
        return _plain_reason(leaf, host, now) or str(exc).split(" (encountered", 1)[0]
    return None


def _plain_reason(leaf: x509.Certificate, host: str, now: dt.datetime) -> str | None:
    if leaf.not_valid_after_utc < now:
        return f"certificate has expired (notAfter {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)"
    if leaf.not_valid_before_utc > now:
        return f"certificate is not yet valid (notBefore {leaf.not_valid_before_utc:%Y-%m-%d})"
    names = dns_names(leaf)
    if not any(name_matches(pattern, host) for pattern in names):
        return (
            f"hostname mismatch: the certificate names {', '.join(names) or 'no host'}, not {host}"
        )
    if leaf.issuer == leaf.subject:
        return "self-signed certificate"
    issuer = leaf.issuer.rfc4514_string()
    return f"unable to get local issuer certificate: {issuer} is not a trusted root"


def dns_names(cert: x509.Certificate) -> list[str]:
    """The DNS names in the subjectAltName (RFC 6125 §6.4.4: no CN fallback when SANs exist)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name.lower().rstrip(".") for name in san.get_values_for_type(x509.DNSName)]


def name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 §6.4.3: exact, or "*." standing for exactly one whole left-most label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:] and "." in rest
    return pattern == host


def mtime(path: str) -> int:
    """A file's modification time in ns (0 if absent): part of cache keys, so that a replaced
    trust-anchor file is read again."""
    try:
        return os.stat(path).st_mtime_ns if path else 0
    except OSError:
        return 0


@functools.lru_cache(maxsize=8)
def _trust_store(ca_file: str, _mtime_ns: int) -> Store:
    # The modification time is part of the cache key so a replaced ca_file is read again.
    paths = ssl.get_default_verify_paths()
    files = [p for p in (paths.cafile, paths.openssl_cafile) if p and os.path.isfile(p)][:1]
    if ca_file:
        files.append(ca_file)
    certs: list[x509.Certificate] = []
    for path in files:
        with open(path, "rb") as f:
            certs.extend(_load_pems(f.read()))
    return Store(certs)


def _load_pems(data: bytes) -> list[x509.Certificate]:
    # One by one: a single root that cryptography cannot parse must not lose all the others.
    certs = []
    end = b"-----END CERTIFICATE-----"
    for block in data.split(end)[:-1]:
        with warnings.catch_warnings():
            # Some roots in distribution bundles have non-positive serial numbers, which
            # cryptography parses with a deprecation warning (an error under pytest).
            warnings.simplefilter("ignore")
            try:
                certs.append(x509.load_pem_x509_certificate(block + end))
            except ValueError:
                continue
    return certs


_WEAK_HASHES = (hashes.MD5, hashes.SHA1)


def weak_chain(chain_der: Sequence[bytes]) -> str | None:
    """Why the chain the server sent is too weak to count as verified, or None.

    The delivery context runs at OpenSSL @SECLEVEL=0 so that it can name what old servers offer
    (see tls_policy.client_context); that also lets a chain with a 1024-bit RSA key or a SHA-1
    signature pass OpenSSL's verification under "verify". This puts the floor back (RSA and DSA
    at least 2048 bits, EC at least 256, no MD5 or SHA-1 signatures), as SECLEVEL 2 would. A
    self-signed certificate in the chain is a trust anchor, whose own signature proves nothing,
    so only its key is judged.
    """
    for der in chain_der:
        cert = x509.load_der_x509_certificate(der)
        who = cert.subject.rfc4514_string() or "the certificate"
        key = cert.public_key()
        if isinstance(key, (rsa.RSAPublicKey, dsa.DSAPublicKey)) and key.key_size < 2048:
            kind = "RSA" if isinstance(key, rsa.RSAPublicKey) else "DSA"
            return f"{who} has a {key.key_size}-bit {kind} key"
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < 256:
            return f"{who} has a {key.curve.key_size}-bit EC key"
        algorithm = cert.signature_hash_algorithm
        if cert.issuer != cert.subject and isinstance(algorithm, _WEAK_HASHES):
            return f"{who} is signed with {algorithm.name.upper()}"
    return None
