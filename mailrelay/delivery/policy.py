"""The transport policy: for a destination domain, which MX hosts are acceptable, what a TLS
session to each must show before MAIL FROM, and under which key a session may be reused.

The session asks; it does not know the rules. Each standard is a small object behind one
Protocol (`Rule`, in the spirit of maddy's `mxauth` checks): it prepares the domain (its lookups
start together), then looks at every MX host and may raise what that host's TLS must show, or
refuse the host. What they leave is a `Route` per MX address, whose `TlsRequirement` judges the
finished handshake. Today's rules are the local ones (`encrypt` / `verify`, the cipher profile,
`ca_file`, `[delivery.domains."…"]`); DANE and MTA-STS are further rules, not session code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from mailrelay.config import CipherProfile, Config
from mailrelay.delivery import ciphers
from mailrelay.delivery.certificates import CertificateFacts, verify_chain, weak_chain
from mailrelay.delivery.mx import MxFailure, MxHost, MxResolver
from mailrelay.delivery.result import Insecure, Kind, Result
from mailrelay.tlsrpt import model as tlsrpt


@dataclass(frozen=True)
class Handshake:
    """What a finished TLS handshake showed, before anything judged it."""

    mx_host: str
    protocol: str  # "TLSv1.3", as ssl reports it
    cipher: str  # OpenSSL suite name
    chain: tuple[bytes, ...]  # DER, leaf first, as the server sent it
    certificate: CertificateFacts | None  # the leaf's; None if the server sent none


@dataclass(frozen=True)
class Accepted:
    """The session may carry mail; how it was authenticated goes into the evidence."""

    policy: str  # "encrypt", "verify", ...: the label `queue show` and the metrics use
    # Whether the certificate is authenticated: it matched the recipient's TLSA records (DANE),
    # or its chain reaches a trusted root and names the MX (WebPKI). `policy` says which.
    verified: bool | None
    verify_error: str | None = None
    detail: str | None = None  # e.g. the record that matched


@dataclass(frozen=True)
class Refusal:
    """The session must not carry mail: only QUIT is sent over it."""

    reason: Insecure
    detail: str  # "negotiated TLSv1.0", "certificate not accepted: ..."
    policy: str
    verified: bool | None = None
    policy_detail: str | None = None  # what asked for the check, e.g. the MTA-STS policy id


Judgement = Accepted | Refusal


class Authentication(Protocol):
    """How a server's certificate must be authenticated. Implementations are frozen and
    hashable: they are part of the key under which a session is pooled."""

    @property
    def label(self) -> str: ...

    @property
    def authenticated(self) -> bool:
        """Whether a session it accepts has an authenticated server (REQUIRETLS asks that)."""
        ...

    async def judge(self, handshake: Handshake) -> Judgement: ...


@dataclass(frozen=True)
class Encrypt:
    """Any certificate (Postfix's `encrypt`): encryption against passive eavesdropping. Whether
    the chain would have verified is still recorded as evidence."""

    ca_file: str = ""
    label: str = "encrypt"
    authenticated: bool = False

    async def judge(self, handshake: Handshake) -> Judgement:
        # Off the event loop: the first verification parses the system trust store.
        error = await asyncio.to_thread(
            verify_chain, handshake.chain, handshake.mx_host, self.ca_file
        )
        return Accepted(self.label, error is None, error)


@dataclass(frozen=True)
class WebPki:
    """A chain to a trusted root (system store plus `ca_file`) naming one of `names`, with the
    key-size and signature floor of OpenSSL's security level 2."""

    names: tuple[str, ...]
    ca_file: str = ""
    label: str = "verify"
    detail: str | None = None  # what asked for it, e.g. the MTA-STS policy id, for the evidence
    reason: Insecure = Insecure.CERTIFICATE  # what a refusal is called
    authenticated: bool = True

    async def judge(self, handshake: Handshake) -> Judgement:
        errors = []
        for name in self.names:
            error = await asyncio.to_thread(verify_chain, handshake.chain, name, self.ca_file)
            if error is None:
                weak = weak_chain(handshake.chain)
                if weak is None:
                    return Accepted(self.label, True, detail=self.detail)
                error = weak
            errors.append(error)
        why = errors[0] if errors else "no name to verify against"
        detail = f"certificate not accepted: {why}"
        if self.detail:
            detail += f" ({self.detail})"
        return Refusal(self.reason, detail, self.label, False, self.detail)


@dataclass(frozen=True)
class TlsRequirement:
    """What one TLS session must satisfy before it may carry mail. Hashable: sessions are
    reused only under an equal requirement, so one graded under `encrypt` never carries mail
    for a destination that asks for more."""

    profile: CipherProfile
    authentication: Authentication
    sni: str | None  # the server name sent in the handshake

    async def judge(self, handshake: Handshake) -> Judgement:
        # The certificate first: where both fail, a forged or wrong certificate is what the
        # operator must hear about, not the cipher the forger chose.
        judgement = await self.authentication.judge(handshake)
        if isinstance(judgement, Refusal):
            return judgement
        grade = ciphers.grade(self.profile, handshake.protocol, handshake.cipher)
        if isinstance(grade, ciphers.Refused):
            return Refusal(
                grade.reason, grade.detail, judgement.policy, judgement.verified, judgement.detail
            )
        return judgement


@dataclass(frozen=True)
class Route:
    """One MX host as the policy sees it: what its sessions must show, or why it is refused
    before any connection (a refusal is a `Result` for every recipient routed there)."""

    host: MxHost
    tls: TlsRequirement
    refusal: Result | None = None
    # The recipient's published policy that applies, as a TLS-RPT report names it; None: none.
    report: tlsrpt.AppliedPolicy | None = None


class Rule(Protocol):
    """One standard's say over a destination. `prepare` runs the domain's lookups (every
    rule's at once); `route` may raise a host's requirement or refuse the host."""

    async def prepare(self, domain: str, hosts: Sequence[MxHost]) -> DomainRule: ...


class DomainRule(Protocol):
    def route(self, route: Route) -> Route: ...

    @property
    def report_failure(self) -> tlsrpt.Session | None:
        """A failure of the policy itself (not of a session), for TLS-RPT; None if none."""
        ...


@dataclass(frozen=True)
class Destination:
    domain: str
    routes: tuple[Route, ...]  # in the order to try them
    prepared: tuple[DomainRule, ...] = ()  # what each rule found, for `tls-check` to show


class TransportPolicy:
    """Builds the `Destination` for a domain from the local configuration and each `Rule`."""

    def __init__(self, config: Config, resolver: MxResolver, rules: Sequence[Rule] = ()) -> None:
        self.config = config
        self.resolver = resolver
        self.rules = tuple(rules)

    def local(self, domain: str, host: MxHost) -> TlsRequirement:
        """What `[delivery]` and its per-domain overrides ask of `host`, before other rules."""
        d = self.config.delivery
        authentication: Authentication
        if d.security_level_for(domain) == "verify":
            authentication = WebPki((host.name,), d.ca_file)
        else:
            authentication = Encrypt(d.ca_file)
        return TlsRequirement(d.cipher_profile_for(domain), authentication, host.name)

    async def destination(self, domain: str) -> Destination | Result:
        """The routes for `domain`, or why there are none (DNS: transient or permanent)."""
        found = await self.resolver.resolve_mx(domain)
        if isinstance(found, MxFailure):
            kind = Kind.PERMANENT if found.permanent else Kind.TRANSIENT
            return Result(kind, found.status, found.detail)
        hosts = self.within_limits(found)
        if not hosts:
            family = self.config.delivery.address_family
            detail = f"no address of any MX host of {domain} is {family} (delivery.address_family)"
            return Result(Kind.TRANSIENT, "4.4.4", detail)
        prepared = await asyncio.gather(*(rule.prepare(domain, hosts) for rule in self.rules))
        routes = []
        for host in hosts:
            route = Route(host, self.local(domain, host))
            for rule in prepared:
                if route.refusal is None:
                    route = rule.route(route)
            routes.append(route)
        return Destination(domain, tuple(routes), tuple(prepared))

    def within_limits(self, hosts: Sequence[MxHost]) -> list[MxHost]:
        """The MX hosts an attempt tries: the first `max_mx_hosts`, each with the addresses of
        the configured family, `max_mx_addresses` in all; hosts left with none are dropped."""
        d = self.config.delivery
        left = d.max_mx_addresses
        kept = []
        for host in hosts[: d.max_mx_hosts]:
            addresses = tuple(a for a in host.addresses if _family_ok(a, d.address_family))
            addresses = addresses[: max(left, 0)]
            left -= len(addresses)
            if addresses:
                kept.append(replace(host, addresses=addresses))
        return kept


def _family_ok(address: str, family: str) -> bool:
    return family == "both" or (":" in address) == (family == "ipv6")


def relaxed(route: Route, ca_file: str) -> Route:
    """`route` as a "TLS-Required: No" message (RFC 8689 §4.2.1) may take it, where the operator
    lets it: the recipient's DANE and MTA-STS refusals are set aside, and any certificate is
    accepted -- but still only over TLS with the configured ciphers, never in plaintext."""
    refusal = route.refusal
    if refusal is not None and refusal.insecure in _PUBLISHED_POLICY:
        refusal = None
    tls = replace(route.tls, authentication=Encrypt(ca_file))
    return replace(route, tls=tls, refusal=refusal)


_PUBLISHED_POLICY = (Insecure.DANE, Insecure.DANE_REQUIRED, Insecure.MTA_STS)


def raised(route: Route, authentication: Authentication, sni: str | None = None) -> Route:
    """`route` with its certificate check replaced by a stronger one."""
    tls = replace(route.tls, authentication=authentication, sni=sni or route.tls.sni)
    return replace(route, tls=tls)
