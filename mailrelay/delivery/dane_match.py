"""DANE matching (RFC 7672 §3, RFC 7671 §5): whether the certificate chain a server sent, after
a handshake made without verification, matches the host's TLSA records. It never raises on what a
server or a zone publishes, however broken: that is a mismatch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from mailrelay.delivery.certificates import dns_names, name_matches
from mailrelay.delivery.dane import (
    DANE_EE,
    DANE_TA,
    DIGESTS,
    DaneMatch,
    DaneMismatch,
    DaneRecords,
    Tlsa,
)

_MAX_PATH = 8  # longer than any real chain: bounds the search over what a server sent
_MAX_SENT = 20


def match(
    chain_der: Sequence[bytes], tlsa: DaneRecords, names: Sequence[str], now: datetime
) -> DaneMatch | DaneMismatch:
    """Whether the chain a server sent (DER, leaf first) matches `tlsa`.

    DANE-EE(3): the leaf matches; its names and dates do not matter (RFC 7672 §3.1.1).
    DANE-TA(2): a certificate the server sent above the leaf, a certificate the record
    publishes whole, or a key it publishes whole is the trust anchor; the leaf must chain to it
    (signatures, CA constraints), every certificate on that path must be valid at `now`, and
    the leaf must be issued to one of `names` (RFC 7672 §3.1.2, §3.2; RFC 7671 §5.2).
    """
    records = _agile(tlsa.usable)
    listing = ", ".join(r.brief() for r in tlsa.records) or "none"
    if not records:
        return DaneMismatch(f"no usable TLSA records at {tlsa.owner} ({listing})")
    if not chain_der:
        return DaneMismatch(f"the server sent no certificate; TLSA at {tlsa.owner}: {listing}")
    chain: list[_Cert] = []
    for position, der in enumerate(chain_der, start=1):
        try:
            chain.append(_Cert(der))
        except ValueError:
            return DaneMismatch(
                f"certificate {position} of the {len(chain_der)} the server sent is unreadable; "
                f"TLSA: {listing}"
            )
    leaf = chain[0]
    for record in records:
        if record.usage == DANE_EE and _matches(record, leaf):
            return DaneMatch("dane-ee", record, f"DANE-EE {record.brief()} matches the leaf")
    why = ["no DANE-EE record matches the leaf"] if any(r.usage == DANE_EE for r in records) else []
    anchors = [r for r in records if r.usage == DANE_TA]
    if anchors:
        found = _dane_ta(chain, anchors, names, now)
        if isinstance(found, DaneMatch):
            return found
        why.append(found)
    return DaneMismatch(
        f"certificate (leaf SHA-256 {hashlib.sha256(leaf.der).hexdigest()}) does not match "
        f"the TLSA records at {tlsa.owner}: {'; '.join(why)}; records: {listing}"
    )


def _agile(records: Sequence[Tlsa]) -> list[Tlsa]:
    """Digest algorithm agility (RFC 7671 §9), as OpenSSL applies it: for each usage and
    selector, only the strongest digest published counts (SHA2-512 over SHA2-256), so a
    weaker digest left beside a stronger one cannot be the one that matches. Full data
    (matching type 0) always counts."""
    strongest: dict[tuple[int, int], int] = {}
    for r in records:
        if r.mtype:
            key = (r.usage, r.selector)
            strongest[key] = max(strongest.get(key, 0), r.mtype)
    return [r for r in records if r.mtype in (0, strongest.get((r.usage, r.selector)))]


class _Cert:
    """A certificate from the server or from a record: its DER, parsed form and raw SPKI.

    ValueError if any of it does not parse. cryptography parses extensions only when first
    asked, so they are asked for here: later checks can then not fail on them.
    """

    def __init__(self, der: bytes) -> None:
        self.der = der
        self.x509 = x509.load_der_x509_certificate(der)
        self.extensions = self.x509.extensions
        self.spki = _spki(self.x509.tbs_certificate_bytes)

    def __str__(self) -> str:
        return self.x509.subject.rfc4514_string() or "(empty subject)"


def _matches(record: Tlsa, cert: _Cert) -> bool:
    selected = cert.der if record.selector == 0 else cert.spki
    digest = DIGESTS.get(record.mtype)
    return (digest(selected) if digest is not None else selected) == record.data


def _spki(tbs: bytes) -> bytes:
    """The SubjectPublicKeyInfo exactly as encoded in a TBSCertificate (RFC 5280 §4.1).

    Selector 1 digests these bytes; re-encoding the parsed key can differ from them (an
    unusual algorithm's parameters, say), so they are cut out of the DER instead.
    """
    _, start, _ = _tlv(tbs, 0)
    tag, _, position = _tlv(tbs, start)
    if tag != 0xA0:  # no explicit version: a v1 certificate starts with its serial number
        position = start
    # serialNumber, signature, issuer, validity, subject, then subjectPublicKeyInfo
    for _field in range(5):
        _, _, position = _tlv(tbs, position)
    _, _, end = _tlv(tbs, position)
    return tbs[position:end]


def _tlv(der: bytes, position: int) -> tuple[int, int, int]:
    """(tag, start of contents, end) of the DER element at `position`; ValueError if none."""
    if position + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length = der[position], der[position + 1]
    start = position + 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or start + count > len(der):
            raise ValueError("bad DER length")
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + length > len(der):
        raise ValueError("truncated DER")
    return tag, start, start + length


def _dane_ta(
    chain: list[_Cert], anchors: list[Tlsa], names: Sequence[str], now: datetime
) -> DaneMatch | str:
    """A DANE-TA match, or why there is none."""
    published = [c for r in anchors if (c := _published(r)) is not None]
    found = _path(chain[0], chain[1:_MAX_SENT] + published, anchors)
    if found is None:
        return "no DANE-TA record names a certificate or key that the leaf chains to"
    record, path = found
    for cert in path:
        if not cert.x509.not_valid_before_utc <= now <= cert.x509.not_valid_after_utc:
            return (
                f"certificate {cert} is valid from {cert.x509.not_valid_before_utc:%Y-%m-%d} "
                f"to {cert.x509.not_valid_after_utc:%Y-%m-%d} only"
            )
    if problem := _path_length_problem(path):
        return problem
    if not _for_servers(path[0]):
        return "the leaf certificate is not for TLS servers (extended key usage)"
    issued_to = dns_names(path[0].x509)
    if not any(name_matches(pattern, name) for pattern in issued_to for name in names):
        return (
            f"the certificate is issued to {', '.join(issued_to) or 'no DNS name'}, "
            f"not to {' or '.join(names)}"
        )
    anchor = str(path[-1]) if len(path) > 1 and _matches(record, path[-1]) else "a public key"
    return DaneMatch("dane-ta", record, f"DANE-TA {record.brief()}: chain to {anchor}")


def _published(record: Tlsa) -> _Cert | None:
    """The trust anchor a "2 0 0" record publishes whole, which the server may then leave out
    of its chain (RFC 7671 §5.2.2), as an issuer candidate."""
    if (record.usage, record.selector, record.mtype) != (DANE_TA, 0, 0):
        return None
    try:
        return _Cert(record.data)
    except ValueError:
        return None


def _path(leaf: _Cert, pool: list[_Cert], anchors: list[Tlsa]) -> tuple[Tlsa, list[_Cert]] | None:
    """A path from the leaf up to a trust anchor, with the record that names the anchor.

    A server may send its chain out of order or with extra certificates, so issuers are
    looked for among all of them, depth first. A certificate from which no path led anywhere
    is not tried again, which bounds the work a hostile server can cause to one signature
    check per pair of certificates.
    """
    dead: set[bytes] = set()

    def extend(path: list[_Cert]) -> tuple[Tlsa, list[_Cert]] | None:
        cert = path[-1]
        if len(path) > 1:
            # OpenSSL's rule: a DANE-TA record matches issuers only, never the leaf itself.
            for record in anchors:
                if _matches(record, cert):
                    return record, path
        for record in anchors:
            key = record.anchor_key
            if key is not None and _signed_by_key(cert.x509, key):
                return record, path
        if len(path) < _MAX_PATH:
            for issuer in pool:
                if issuer.der in dead or any(issuer.der == c.der for c in path):
                    continue
                if _issued_by(cert, issuer) and (found := extend([*path, issuer])):
                    return found
        dead.add(cert.der)
        return None

    return extend([leaf])


def _issued_by(cert: _Cert, issuer: _Cert) -> bool:
    try:
        cert.x509.verify_directly_issued_by(issuer.x509)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return _may_issue(issuer)


def _may_issue(ca: _Cert) -> bool:
    """Whether `ca` may sign certificates (RFC 5280 §4.2.1.9, §4.2.1.3)."""
    try:
        if not ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        # Only a version 1 certificate, from before extensions, may be a CA without saying so.
        return ca.x509.version == x509.Version.v1
    try:
        return ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True


def _path_length_problem(path: list[_Cert]) -> str | None:
    for depth, cert in enumerate(path[1:], start=1):
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            continue
        limit = constraints.value.path_length
        if limit is not None and depth - 1 > limit:
            return f"certificate {cert} allows {limit} intermediate CAs below it, not {depth - 1}"
    return None


def _signed_by_key(cert: x509.Certificate, key: PublicKeyTypes) -> bool:
    """Whether `key` (a bare DANE-TA key) made the signature on `cert`."""
    signature, tbs = cert.signature, cert.tbs_certificate_bytes
    try:
        params = cert.signature_algorithm_parameters
        hash_algorithm = cert.signature_hash_algorithm
        if isinstance(key, rsa.RSAPublicKey):
            if not isinstance(params, padding.PKCS1v15 | padding.PSS) or hash_algorithm is None:
                return False
            key.verify(signature, tbs, params, hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(params, ec.ECDSA):
                return False
            key.verify(signature, tbs, params)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            if params is not None:
                return False
            key.verify(signature, tbs)
        else:
            return False
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return True


def _for_servers(leaf: _Cert) -> bool:
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return any(
        oid in (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)
        for oid in usages
    )
