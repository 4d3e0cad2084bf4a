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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdtypes.ANY.TLSA
import dns.resolver
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from mailrelay.delivery.mx import MxHost
from mailrelay.resolver import authenticated

PORT = 25
DANE_TA = 2
DANE_EE = 3
DIGESTS: dict[int, Callable[[bytes], bytes]] = {
    1: lambda b: hashlib.sha256(b).digest(),
    2: lambda b: hashlib.sha512(b).digest(),
}
_DIGEST_SIZES = {1: 32, 2: 64}


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
