"""DANE for SMTP (RFC 7672): whether TLSA records apply to an MX host, and whether the
certificate chain a server sent matches them.

DNSSEC is trusted only through the AD flag of the configured validating resolver (see
`mailrelay.resolver`). The lookup never downgrades: a TLSA lookup that fails is `DaneTrouble`
(defer that MX), never "no DANE". Matching runs on the chain as sent, after a handshake made
without verification; it never raises on what a server or a zone publishes, however broken.
Only DANE-TA(2) and DANE-EE(3) apply to SMTP (RFC 7672 §3.1); PKIX-TA(0) and PKIX-EE(1)
records are "unusable".
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdtypes.ANY.TLSA
import dns.resolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from mailrelay.delivery.certificates import dns_names, name_matches
from mailrelay.delivery.mx import MxHost
from mailrelay.resolver import authenticated

PORT = 25
DANE_TA = 2
DANE_EE = 3
_DIGESTS: dict[int, Callable[[bytes], bytes]] = {
    1: lambda b: hashlib.sha256(b).digest(),
    2: lambda b: hashlib.sha512(b).digest(),
}
_DIGEST_SIZES = {1: 32, 2: 64}
# Longer than any real chain: bounds on the search over what a server sent.
_MAX_PATH = 8
_MAX_SENT = 20


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698 §2.1)."""

    usage: int
    selector: int  # 0: the whole certificate, 1: its SubjectPublicKeyInfo
    mtype: int  # 0: the bytes themselves, 1: SHA2-256, 2: SHA2-512
    data: bytes

    @classmethod
    def from_text(cls, text: str) -> Tlsa:
        """From presentation form, "3 1 1 ab12..."; ValueError if it is not one."""
        try:
            usage, selector, mtype, *hex_parts = text.split()
            fields = (int(usage), int(selector), int(mtype))
            data = bytes.fromhex("".join(hex_parts))
        except ValueError as e:
            raise ValueError(f"not a TLSA record: {text!r}") from e
        if not all(0 <= f <= 255 for f in fields) or not data:
            raise ValueError(f"not a TLSA record: {text!r}")
        return cls(*fields, data)

    @property
    def usable(self) -> bool:
        """Whether an SMTP client can use the record at all (RFC 7672 §3.1, RFC 6698 §2.1):
        a DANE usage, a known selector and matching type, and data that fits them."""
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (0, 1):
            return False
        if self.mtype == 0:
            return self._full is not None
        return len(self.data) == _DIGEST_SIZES.get(self.mtype)

    @functools.cached_property
    def _full(self) -> x509.Certificate | PublicKeyTypes | None:
        # A full certificate or key that does not parse can match nothing a server could send
        # in a way that means anything; OpenSSL drops such records as unusable too.
        try:
            if self.selector == 0:
                return x509.load_der_x509_certificate(self.data)
            return serialization.load_der_public_key(self.data)
        except (ValueError, UnsupportedAlgorithm):
            return None

    @property
    def anchor_key(self) -> PublicKeyTypes | None:
        """The trust anchor a "2 1 0" record publishes as a bare public key."""
        if (self.usage, self.selector, self.mtype) != (DANE_TA, 1, 0):
            return None
        full = self._full
        return None if isinstance(full, x509.Certificate) else full

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    def brief(self) -> str:
        """For diagnostics: digests in full, whole certificates and keys shortened."""
        data = self.data.hex()
        if len(self.data) > 64:
            data = f"{data[:32]}...({len(self.data)} bytes)"
        return f"{self.usage} {self.selector} {self.mtype} {data}"


@dataclass(frozen=True)
class DaneRecords:
    """A validated TLSA RRset exists, so DANE applies: TLS is mandatory. With usable records
    the server must match one of them; with none, TLS is still mandatory but nothing can be
    authenticated (RFC 7672 §2.2). The client sends `base_domain` as SNI (RFC 7672 §8.1)."""

    base_domain: str  # where the records were found: the MX host name or its CNAME target
    records: tuple[Tlsa, ...]
    port: int = PORT

    @property
    def owner(self) -> str:
        return f"_{self.port}._tcp.{self.base_domain}"

    @property
    def usable(self) -> tuple[Tlsa, ...]:
        return tuple(r for r in self.records if r.usable)


@dataclass(frozen=True)
class NoDane:
    """DANE does not apply to this host: the MX or address answers were not validated, or no
    validated TLSA RRset exists. Other policies decide."""

    reason: str


@dataclass(frozen=True)
class DaneTrouble:
    """The TLSA lookup failed (SERVFAIL, which is also how a validating resolver reports bogus
    data, or a timeout): defer this MX, never deliver to it without DANE (RFC 7672 §2.1.1)."""

    detail: str


@dataclass(frozen=True)
class DaneMatch:
    usage: Literal["dane-ee", "dane-ta"]
    record: Tlsa
    detail: str  # for the evidence: which record matched what


@dataclass(frozen=True)
class DaneMismatch:
    detail: str  # for the bounce: the TLSA owner, what failed, and the records


# -- lookup ----------------------------------------------------------------------------------------


async def lookup_tlsa(
    resolver: dns.asyncresolver.Resolver, host: MxHost, port: int = PORT
) -> DaneRecords | NoDane | DaneTrouble:
    """The TLSA records that apply to `host` (RFC 7672 §2.2), as found by `MxResolver`.

    With a validated MX RRset and validated addresses, the records are looked up at the end
    of the host name's CNAME chain first, then at the name itself (§2.2.3). Where the addresses
    are not validated but the host name is an alias whose own CNAME is, only the name itself is
    a TLSA base domain (as Postfix does). `resolver` must set AD in its queries
    (`mailrelay.resolver.make_resolver` does).
    """
    if host.dnssec:
        bases = [host.name] if host.expanded_name is None else [host.expanded_name, host.name]
    elif not host.mx_dnssec:
        return NoDane(f"the MX answer naming {host.name} is not DNSSEC-validated")
    elif host.expanded_name is None:
        return NoDane(f"the address records of {host.name} are not DNSSEC-validated")
    else:
        alias = await _alias_validated(resolver, host.name)
        if not isinstance(alias, bool):
            return alias
        if not alias:
            return NoDane(
                f"{host.name} is an alias of {host.expanded_name} and neither its CNAME nor "
                "the address records are DNSSEC-validated"
            )
        bases = [host.name]
    reasons: list[str] = []
    for base in bases:
        found = await _tlsa_at(resolver, base, port)
        if isinstance(found, DaneTrouble):
            return found  # an error at the first candidate is not "nothing there" (§2.2.3)
        if isinstance(found, str):
            reasons.append(found)
            continue
        return DaneRecords(base, found, port)
    return NoDane("; ".join(reasons))


async def _tlsa_at(
    resolver: dns.asyncresolver.Resolver, base: str, port: int
) -> tuple[Tlsa, ...] | str | DaneTrouble:
    """Validated records at `base`, or why there are none (a str), or trouble."""
    owner = f"_{port}._tcp.{base}"
    answer = await _ask(resolver, owner, "TLSA")
    if isinstance(answer, DaneTrouble):
        return answer
    if answer is None or answer.rrset is None:
        return f"no TLSA records at {owner}"
    if not authenticated(answer.response):
        # An unsigned TLSA RRset is what an attacker could have made up: it means nothing.
        return f"the TLSA records at {owner} are not DNSSEC-validated"
    return tuple(
        Tlsa(rd.usage, rd.selector, rd.mtype, rd.cert)
        for rd in answer.rrset
        if isinstance(rd, dns.rdtypes.ANY.TLSA.TLSA)
    )


async def _alias_validated(resolver: dns.asyncresolver.Resolver, name: str) -> bool | DaneTrouble:
    answer = await _ask(resolver, name, "CNAME")
    if isinstance(answer, DaneTrouble):
        return answer
    return answer is not None and answer.rrset is not None and authenticated(answer.response)


async def _ask(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
) -> dns.resolver.Answer | DaneTrouble | None:
    """The answer (NODATA included), None for NXDOMAIN, or trouble."""
    try:
        qname = dns.name.from_text(name, origin=dns.name.root)
        return await resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return None
    except dns.exception.Timeout:
        return DaneTrouble(f"{rdtype} lookup for {name} timed out")
    except dns.resolver.NoNameservers as e:
        return DaneTrouble(f"{rdtype} lookup for {name}: no nameserver gave an answer ({e})")
    except (dns.exception.DNSException, OSError, UnicodeError) as e:
        return DaneTrouble(f"{rdtype} lookup for {name}: {type(e).__name__}: {e}")


def reference_names(domain: str, host: MxHost, dane: DaneRecords) -> tuple[str, ...]:
    """The names a DANE-TA certificate may be issued to (RFC 7672 §3.2.2): the TLSA base
    domain, the MX host name (when the base domain is its CNAME target), and the next-hop
    domain. Lowercase, without duplicates, the base domain first."""
    names = (dane.base_domain, host.name, domain)
    return tuple(dict.fromkeys(n.rstrip(".").lower() for n in names))


# -- matching --------------------------------------------------------------------------------------


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
    digest = _DIGESTS.get(record.mtype)
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
