"""`tls-check`: connect to every MX of a domain exactly as delivery would, send no mail, and
report what each one offers, what the domain publishes (DNSSEC, TLSA, MTA-STS), and whether the
transport policy accepts it."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, replace
from typing import Literal

from mailrelay.config import Config
from mailrelay.delivery.dane import DaneRecords, DaneTrouble, NoDane
from mailrelay.delivery.mta_sts import ConnectionStsCache, StsCache
from mailrelay.delivery.policy import Destination, Encrypt, Route
from mailrelay.delivery.pool import open_configured
from mailrelay.delivery.published import DaneDomain, StsDomain, transport_policy
from mailrelay.delivery.result import Insecure, Kind, Result
from mailrelay.delivery.session import TlsFacts
from mailrelay.store import connect

ProbeVerdict = Literal["secure", "insecure", "unreachable"]
Overall = Literal["secure", "partly secure", "insecure", "unreachable", "no mail service"]


@dataclass(frozen=True)
class MxReport:
    host: str
    preference: int
    address: str
    dnssec: bool  # the MX answer and this host's addresses were DNSSEC-validated (AD)
    tlsa: str  # "secure", "unusable", "none", "lookup failed": what DANE found for the host
    tlsa_detail: str  # the TLSA owner and records, or why there are none
    tlsa_records: tuple[str, ...]
    starttls: bool | None  # None: we never got far enough to know
    protocol: str | None
    cipher: str | None
    certificate_subject: str | None
    certificate_issuer: str | None
    certificate_not_before: str | None
    certificate_not_after: str | None
    certificate_verified: bool | None
    policy: str | None  # the policy that accepted or refused the session
    policy_detail: str | None  # e.g. the TLSA record that matched, the MTA-STS policy id
    verdict: ProbeVerdict
    status: str  # RFC 3463, as delivery would record it
    detail: str


@dataclass(frozen=True)
class StsReport:
    """The domain's MTA-STS policy as delivery would apply it now."""

    mode: str | None  # None: no policy applies
    policy_id: str | None
    mx: tuple[str, ...]
    max_age: int | None
    source: str  # "fresh" (fetched now), "cache" (from the store), "none"
    error: str | None  # a failed discovery or fetch (RFC 8460 result type), even if cached
    detail: str


@dataclass(frozen=True)
class TlsCheckReport:
    domain: str
    security_level: str
    cipher_profile: str
    verdict: Overall
    detail: str
    mta_sts: StsReport | None
    mx: tuple[MxReport, ...]

    def to_json(self) -> dict[str, object]:
        return {
            **asdict(self),
            "mta_sts": asdict(self.mta_sts) if self.mta_sts else None,
            "mx": [asdict(m) for m in self.mx],
        }


async def tls_check(
    config: Config, domain: str, sts_cache: StsCache | None = None
) -> TlsCheckReport:
    """Probe `domain`'s MX hosts; MTA-STS policies are read from and kept in `sts_cache`
    (None: a throw-away one, as on a machine where the service never ran)."""
    domain = domain.lower().rstrip(".")
    if sts_cache is None:
        sts_cache = ConnectionStsCache(connect(":memory:"))
    d = config.delivery
    level, profile = d.security_level_for(domain), d.cipher_profile_for(domain)
    destination = await transport_policy(config, sts_cache).destination(domain)
    if isinstance(destination, Result):
        overall: Overall = (
            "no mail service" if destination.kind is Kind.PERMANENT else "unreachable"
        )
        return TlsCheckReport(domain, level, profile, overall, destination.diagnostic, None, ())
    probes = [
        _probe(config, destination, route, address)
        for route in destination.routes
        for address in route.host.addresses
    ]
    reports = tuple(await asyncio.gather(*probes))
    verdicts = {r.verdict for r in reports}
    if verdicts == {"secure"}:
        overall, detail = "secure", "every MX meets the policy"
    elif "secure" in verdicts:
        overall, detail = "partly secure", "mail goes only to the MX hosts marked secure"
    elif verdicts == {"insecure"}:
        overall, detail = "insecure", "no MX meets the policy: mail to this domain is refused"
    else:
        overall, detail = "unreachable", "no MX could be checked completely: mail would wait"
    sts = _sts_report(destination)
    return TlsCheckReport(domain, level, profile, overall, detail, sts, reports)


def _sts_report(destination: Destination) -> StsReport | None:
    for rule in destination.prepared:
        if isinstance(rule, StsDomain):
            found = rule.lookup
            p = found.policy
            return StsReport(
                p.mode if p else None,
                p.policy_id if p else None,
                p.mx if p else (),
                p.max_age if p else None,
                found.source,
                found.error,
                found.detail,
            )
    return None


def _dane_facts(destination: Destination, route: Route) -> tuple[str, str, tuple[str, ...]]:
    for rule in destination.prepared:
        if isinstance(rule, DaneDomain):
            found = rule.tlsa.get(route.host.name)
            if isinstance(found, DaneRecords):
                records = tuple(str(r) for r in found.records)
                kind = "secure" if found.usable else "unusable"
                return kind, f"{found.owner} (DNSSEC-validated)", records
            if isinstance(found, DaneTrouble):
                return "lookup failed", found.detail, ()
            if isinstance(found, NoDane):
                return "none", found.reason, ()
    return "none", "", ()


async def _probe(config: Config, destination: Destination, route: Route, address: str) -> MxReport:
    host, preference = route.host.name, route.host.preference
    tlsa, tlsa_detail, tlsa_records = _dane_facts(destination, route)
    head = (host, preference, address, route.host.dnssec, tlsa, tlsa_detail, tlsa_records)
    opened = route.refusal or await open_configured(config, host, address, route.tls)
    if not isinstance(opened, Result):
        await opened.close()
        accepted = f"{opened.where}: accepted"
        return _report(*head, True, opened.tls, "secure", "2.0.0", accepted)
    failure = opened
    last = failure.evidence[-1] if failure.evidence else None
    facts = None
    if last is not None and last.tls_protocol:
        facts = TlsFacts(
            last.tls_protocol,
            last.tls_cipher or "",
            None,
            last.cert_verified,
            None,
            last.policy,
            last.policy_detail,
        )
    refused_session = route.refusal is None
    if refused_session and failure.insecure in (
        Insecure.CERTIFICATE,
        Insecure.DANE,
        Insecure.MTA_STS,
    ):
        # A refused certificate leaves no session to describe; look again accepting any
        # certificate, only to show the operator what the certificate is.
        anything = replace(route.tls, authentication=Encrypt(config.delivery.ca_file))
        again = await open_configured(config, host, address, anything)
        if not isinstance(again, Result):
            await again.close()
            if facts is not None:
                facts = replace(facts, certificate=again.tls.certificate)
    starttls = None
    if failure.insecure is not None:
        starttls = failure.insecure not in (Insecure.NO_STARTTLS, Insecure.STARTTLS_REFUSED)
        if route.refusal is not None:
            starttls = None  # refused before connecting
    elif facts is not None:
        starttls = True
    verdict: ProbeVerdict = "unreachable" if failure.kind is Kind.TRANSIENT else "insecure"
    return _report(*head, starttls, facts, verdict, failure.status, failure.diagnostic)


def _report(
    host: str,
    preference: int,
    address: str,
    dnssec: bool,
    tlsa: str,
    tlsa_detail: str,
    tlsa_records: tuple[str, ...],
    starttls: bool | None,
    tls: TlsFacts | None,
    verdict: ProbeVerdict,
    status: str,
    detail: str,
) -> MxReport:
    cert = tls.certificate if tls else None
    return MxReport(
        host=host,
        preference=preference,
        address=address,
        dnssec=dnssec,
        tlsa=tlsa,
        tlsa_detail=tlsa_detail,
        tlsa_records=tlsa_records,
        starttls=starttls,
        protocol=tls.protocol if tls else None,
        cipher=tls.cipher if tls else None,
        certificate_subject=cert.subject if cert else None,
        certificate_issuer=cert.issuer if cert else None,
        certificate_not_before=cert.not_before.isoformat() if cert else None,
        certificate_not_after=cert.not_after.isoformat() if cert else None,
        certificate_verified=tls.verified if tls else None,
        policy=tls.policy if tls else None,
        policy_detail=tls.policy_detail if tls else None,
        verdict=verdict,
        status=status,
        detail=detail,
    )
