"""`tls-check`: connect to every MX of a domain exactly as delivery would, send no mail, and
report what each one offers and whether the current policy accepts it."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Literal

from mailrelay.config import CipherProfile, Config, SecurityLevel
from mailrelay.delivery.mx import MxFailure, MxResolver
from mailrelay.delivery.pool import open_configured
from mailrelay.delivery.session import Failure, Outcome, TlsFacts

Verdict = Literal["secure", "insecure", "unreachable"]
Overall = Literal["secure", "partly secure", "insecure", "unreachable", "no mail service"]


@dataclass(frozen=True)
class MxReport:
    host: str
    preference: int
    address: str
    starttls: bool | None  # None: we never got far enough to know
    protocol: str | None
    cipher: str | None
    certificate_subject: str | None
    certificate_issuer: str | None
    certificate_not_before: str | None
    certificate_not_after: str | None
    certificate_verified: bool | None
    verdict: Verdict
    status: str  # RFC 3463, as delivery would record it
    detail: str


@dataclass(frozen=True)
class TlsCheckReport:
    domain: str
    security_level: str
    cipher_profile: str
    verdict: Overall
    detail: str
    mx: tuple[MxReport, ...]

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "mx": [asdict(m) for m in self.mx]}


async def tls_check(config: Config, domain: str) -> TlsCheckReport:
    domain = domain.lower().rstrip(".")
    d = config.delivery
    level, profile = d.security_level_for(domain), d.cipher_profile_for(domain)
    resolver = MxResolver(d.nameservers, timeout=d.dns_timeout)
    hosts = await resolver.resolve_mx(domain)
    if isinstance(hosts, MxFailure):
        overall: Overall = "no mail service" if hosts.permanent else "unreachable"
        return TlsCheckReport(domain, level, profile, overall, hosts.detail, ())
    probes = [
        _probe(config, host.name, host.preference, address, level, profile)
        for host in hosts
        for address in host.addresses
    ]
    reports = tuple(await asyncio.gather(*probes))
    verdicts = {r.verdict for r in reports}
    if verdicts == {"secure"}:
        overall, detail = "secure", "every MX meets the policy"
    elif "secure" in verdicts:
        overall, detail = "partly secure", "mail goes only to the MX hosts marked secure"
    elif verdicts == {"insecure"}:
        overall, detail = "insecure", "no MX meets the policy: mail to this domain bounces"
    else:
        overall, detail = "unreachable", "no MX could be checked completely: mail would wait"
    return TlsCheckReport(domain, level, profile, overall, detail, reports)


async def _probe(
    config: Config,
    host: str,
    preference: int,
    address: str,
    level: SecurityLevel,
    profile: CipherProfile,
) -> MxReport:
    opened = await open_configured(config, host, address, level, profile)
    if not isinstance(opened, Failure):
        await opened.close()
        accepted = f"{opened.where}: accepted"
        return _report(host, preference, address, True, opened.tls, "secure", "2.0.0", accepted)
    failure = opened
    facts = failure.tls
    if facts is None and level == "verify" and failure.insecure is not None:
        # A certificate refused under "verify" leaves no session to describe; look again under
        # "encrypt" only to show the operator what the certificate is.
        again = await open_configured(config, host, address, "encrypt", profile)
        if isinstance(again, Failure):
            facts = again.tls
        else:
            facts = again.tls
            await again.close()
    starttls = None
    if failure.insecure is not None:
        starttls = failure.insecure.value not in ("no_starttls", "starttls_refused")
    elif facts is not None:
        starttls = True
    verdict: Verdict = "insecure" if failure.outcome is Outcome.PERMANENT else "unreachable"
    return _report(
        host, preference, address, starttls, facts, verdict, failure.status, failure.detail
    )


def _report(
    host: str,
    preference: int,
    address: str,
    starttls: bool | None,
    tls: TlsFacts | None,
    verdict: Verdict,
    status: str,
    detail: str,
) -> MxReport:
    cert = tls.certificate if tls else None
    return MxReport(
        host=host,
        preference=preference,
        address=address,
        starttls=starttls,
        protocol=tls.protocol if tls else None,
        cipher=tls.cipher if tls else None,
        certificate_subject=cert.subject if cert else None,
        certificate_issuer=cert.issuer if cert else None,
        certificate_not_before=cert.not_before.isoformat() if cert else None,
        certificate_not_after=cert.not_after.isoformat() if cert else None,
        certificate_verified=tls.verified if tls else None,
        verdict=verdict,
        status=status,
        detail=detail,
    )
