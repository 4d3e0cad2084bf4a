"""`tls-check`: connect to every MX of a domain exactly as delivery would, send no mail, and
report what each one offers and whether the current policy accepts it."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, replace
from typing import Literal

from mailrelay.config import Config
from mailrelay.delivery.mx import MxResolver
from mailrelay.delivery.policy import Encrypt, Route, TransportPolicy
from mailrelay.delivery.pool import open_configured
from mailrelay.delivery.result import Insecure, Kind, Result
from mailrelay.delivery.session import TlsFacts

ProbeVerdict = Literal["secure", "insecure", "unreachable"]
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
    verdict: ProbeVerdict
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
    destination = await TransportPolicy(config, resolver).destination(domain)
    if isinstance(destination, Result):
        overall: Overall = (
            "no mail service" if destination.kind is Kind.PERMANENT else "unreachable"
        )
        return TlsCheckReport(domain, level, profile, overall, destination.diagnostic, ())
    probes = [
        _probe(config, route, address)
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
        overall, detail = "insecure", "no MX meets the policy: mail to this domain bounces"
    else:
        overall, detail = "unreachable", "no MX could be checked completely: mail would wait"
    return TlsCheckReport(domain, level, profile, overall, detail, reports)


async def _probe(config: Config, route: Route, address: str) -> MxReport:
    host, preference = route.host.name, route.host.preference
    opened = route.refusal or await open_configured(config, host, address, route.tls)
    if not isinstance(opened, Result):
        await opened.close()
        accepted = f"{opened.where}: accepted"
        return _report(host, preference, address, True, opened.tls, "secure", "2.0.0", accepted)
    failure = opened
    facts = None
    if failure.insecure is Insecure.CERTIFICATE:
        # A refused certificate leaves no session to describe; look again accepting any
        # certificate, only to show the operator what the certificate is.
        anything = replace(route.tls, authentication=Encrypt(config.delivery.ca_file))
        again = await open_configured(config, host, address, anything)
        if not isinstance(again, Result):
            facts = again.tls
            await again.close()
    starttls = None
    if failure.insecure is not None:
        starttls = failure.insecure not in (Insecure.NO_STARTTLS, Insecure.STARTTLS_REFUSED)
    elif failure.evidence and failure.evidence[-1].tls_protocol:
        starttls = True
    verdict: ProbeVerdict = "unreachable" if failure.kind is Kind.TRANSIENT else "insecure"
    last = failure.evidence[-1] if failure.evidence else None
    if facts is None and last is not None and last.tls_protocol:
        facts = TlsFacts(
            last.tls_protocol, last.tls_cipher or "", None, last.cert_verified, None, last.policy
        )
    detail = last.reply if last and last.reply else failure.diagnostic
    if failure.kind is Kind.INSECURE or last is None:
        detail = failure.diagnostic
    return _report(host, preference, address, starttls, facts, verdict, failure.status, detail)


def _report(
    host: str,
    preference: int,
    address: str,
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
