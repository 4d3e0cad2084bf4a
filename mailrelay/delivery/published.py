"""The policies a recipient publishes, as transport-policy rules: MTA-STS (RFC 8461) and DANE
(RFC 7672). Each raises what an MX host's TLS must show, or refuses the host; DANE runs last
and wins where it applies (RFC 8461 §2), except that an enforced MTA-STS policy still decides
which MX names are acceptable.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import dns.asyncresolver

from mailrelay.config import Config
from mailrelay.delivery import dane, dane_match
from mailrelay.delivery.dane import DaneMatch, DaneRecords, DaneTrouble, NoDane
from mailrelay.delivery.mta_sts import MtaSts, StsCache, StsLookup, StsPolicy
from mailrelay.delivery.mx import MxHost, MxResolver
from mailrelay.delivery.policy import (
    Accepted,
    Authentication,
    Handshake,
    Judgement,
    Refusal,
    Route,
    TransportPolicy,
    WebPki,
    raised,
)
from mailrelay.delivery.result import Evidence, Insecure, Kind, Result
from mailrelay.metrics import Metrics
from mailrelay.resolver import make_resolver
from mailrelay.tlsrpt import model as tlsrpt

log = logging.getLogger("mailrelay.delivery")


def refuse_host(
    host: MxHost, reason: Insecure, detail: str, policy: str, note: str | None
) -> Result:
    """A refusal of `host` before any connection: the same result for each of its addresses."""
    diagnostic = f"{host.name}: {detail}"
    evidence = Evidence(
        time.time(), Kind.INSECURE, host.name, None, diagnostic, policy=policy, policy_detail=note
    )
    return Result.refused(reason, diagnostic, evidence)


# -- MTA-STS -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StsTesting:
    """A `testing` policy (RFC 8461 §5): deliver as `inner` decides, and record what `enforce`
    would have said, for the operator and for TLS-RPT."""

    inner: Authentication
    check: Authentication | None  # None: the MX is already outside the policy
    policy_id: str
    mx_problem: str | None = None

    @property
    def label(self) -> str:
        return self.inner.label

    @property
    def authenticated(self) -> bool:
        # A testing policy changes nothing about delivery, so it authenticates what `inner` does.
        return self.inner.authenticated

    async def judge(self, handshake: Handshake) -> Judgement:
        decision = await self.inner.judge(handshake)
        problem = self.mx_problem
        if problem is None and self.check is not None:
            verdict = await self.check.judge(handshake)
            if isinstance(verdict, Refusal):
                problem = verdict.detail
        if not isinstance(decision, Accepted):
            return decision
        note = f"mta-sts testing id={self.policy_id}: " + (
            f"enforce would refuse: {problem}" if problem else "passes"
        )
        detail = f"{decision.detail}; {note}" if decision.detail else note
        return Accepted(decision.policy, decision.verified, decision.verify_error, detail)


class StsRule:
    def __init__(self, sts: MtaSts, config: Config, metrics: Metrics | None = None) -> None:
        self.sts = sts
        self.ca_file = config.delivery.ca_file
        self.metrics = metrics

    async def prepare(self, domain: str, hosts: Sequence[MxHost]) -> StsDomain:
        found = await self.sts.lookup(domain)
        if found.error is not None and self.metrics is not None:
            self.metrics.smtp_tls_policy_failures.labels(policy="mta-sts", reason=found.error).inc()
        return StsDomain(domain, found, self.ca_file, self.metrics)


class StsDomain:
    def __init__(
        self, domain: str, lookup: StsLookup, ca_file: str, metrics: Metrics | None
    ) -> None:
        self.domain = domain
        self.lookup = lookup
        self.ca_file = ca_file
        self.metrics = metrics

    @property
    def report_failure(self) -> tlsrpt.Session | None:
        """A discovery or fetch failure as TLS-RPT counts it (RFC 8460 §4.3.2.2): a failed
        session of the domain's (unfetchable) policy, with no receiving MX."""
        lookup = self.lookup
        if lookup.error is None:
            return None
        policy = tlsrpt.AppliedPolicy("sts", self.domain) if lookup.policy else None
        return tlsrpt.Session(
            at=time.time(),
            policy=policy or tlsrpt.AppliedPolicy("no-policy-found", self.domain),
            result_type=lookup.error,
            failure_reason_code=lookup.detail[:200] or None,
        )

    def report_policy(self) -> tlsrpt.AppliedPolicy | None:
        policy = self.lookup.policy
        if policy is None or policy.mode == "none":
            return None
        lines = tuple(line.strip() for line in policy.body.splitlines() if line.strip())
        return tlsrpt.AppliedPolicy("sts", policy.domain, lines, policy.mx)

    def route(self, route: Route) -> Route:
        policy = self.lookup.policy
        if policy is None or policy.mode == "none":
            return route
        route = replace(route, report=self.report_policy())
        host = route.host
        note = f"MTA-STS policy id={policy.policy_id}"
        webpki = WebPki(
            (host.name,), self.ca_file, "mta-sts", f"MTA-STS policy id={policy.policy_id}",
            Insecure.MTA_STS,
        )  # fmt: skip
        if not policy.matches(host.name):
            listed = ", ".join(policy.mx)
            why = (
                f"not an MX host of the MTA-STS policy"
                f" (id={policy.policy_id} mode={policy.mode}, mx: {listed})"
            )
            if policy.mode == "enforce":
                self._failed(policy, "mx_mismatch")
                return Route(
                    host, route.tls, refuse_host(host, Insecure.MTA_STS, why, "mta-sts", note)
                )
            testing = StsTesting(route.tls.authentication, None, policy.policy_id, why)
            return raised(route, testing)
        if policy.mode == "enforce":
            return raised(route, webpki)
        return raised(route, StsTesting(route.tls.authentication, webpki, policy.policy_id))

    def _failed(self, policy: StsPolicy, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.smtp_tls_policy_failures.labels(policy="mta-sts", reason=reason).inc()


# -- DANE --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DaneAuthentication:
    """The certificate must match the host's TLSA records (RFC 7672 §3)."""

    records: DaneRecords
    names: tuple[str, ...]  # for DANE-TA: the reference identifiers (RFC 7672 §3.2.2)
    label: str = "dane"
    authenticated: bool = True

    async def judge(self, handshake: Handshake) -> Judgement:
        now = dt.datetime.now(dt.UTC)
        found = dane_match.match(handshake.chain, self.records, self.names, now)
        if isinstance(found, DaneMatch):
            detail = f"{self.records.owner} TLSA {found.record}"
            return Accepted(found.usage, True, None, detail)
        return Refusal(Insecure.DANE, found.detail, self.label, verified=False)


class DaneRule:
    """DANE applies where the resolver validated the MX answer, the host's addresses and its
    TLSA RRset (the AD bit); it never applies otherwise, so a resolver that does not validate
    leaves delivery exactly as without DANE."""

    def __init__(
        self, resolver: dns.asyncresolver.Resolver, config: Config, metrics: Metrics | None = None
    ) -> None:
        self.resolver = resolver
        self.config = config
        self.metrics = metrics

    async def prepare(self, domain: str, hosts: Sequence[MxHost]) -> DaneDomain:
        found = await asyncio.gather(*(dane.lookup_tlsa(self.resolver, h) for h in hosts))
        required = self.config.delivery.security_level_for(domain) == "dane"
        by_host = dict(zip((h.name for h in hosts), found, strict=True))
        return DaneDomain(domain, by_host, required, self.metrics)


class DaneDomain:
    def __init__(
        self,
        domain: str,
        tlsa: dict[str, DaneRecords | NoDane | DaneTrouble],
        required: bool,
        metrics: Metrics | None,
    ) -> None:
        self.domain = domain
        self.tlsa = tlsa
        self.required = required
        self.metrics = metrics
        # A failed TLSA lookup is reported per host, as the session that could not be made.
        self.report_failure: tlsrpt.Session | None = None

    def route(self, route: Route) -> Route:
        host = route.host
        found = self.tlsa.get(host.name)
        if isinstance(found, DaneTrouble):
            # RFC 7672 §2.1.1: a failed lookup is no proof of absence; never fall back.
            self._failed("tlsa_lookup")
            diagnostic = (
                f"{host.name}: TLSA lookup failed, not delivering without DANE: {found.detail}"
            )
            evidence = Evidence(
                time.time(), Kind.TRANSIENT, host.name, None, diagnostic, policy="dane"
            )
            return Route(
                host, route.tls, Result(Kind.TRANSIENT, "4.4.3", diagnostic, None, (evidence,))
            )
        if isinstance(found, DaneRecords) and found.usable:
            names = dane.reference_names(self.domain, host, found)
            strings = tuple(
                f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in found.records
            )
            # Reported to, and named by, the recipient domain (whose _smtp._tls is asked).
            report = tlsrpt.AppliedPolicy("tlsa", self.domain, strings, (host.name,))
            dane_route = raised(route, DaneAuthentication(found, names), sni=found.base_domain)
            return replace(dane_route, report=report)
        if self.required:
            if isinstance(found, NoDane):
                why = f"security_level is dane, and {found.reason}"
            else:
                owner = found.owner if found is not None else host.name
                why = f"security_level is dane, and {owner} has no usable TLSA records"
            self._failed("dane_required")
            return Route(
                host, route.tls, refuse_host(host, Insecure.DANE_REQUIRED, why, "dane", None)
            )
        # A secure RRset of unusable records still makes TLS mandatory (RFC 7672 §2.2), which
        # it always is here; with no DANE, the other rules decide.
        return route

    def _failed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.smtp_tls_policy_failures.labels(policy="dane", reason=reason).inc()


def transport_policy(
    config: Config, sts_cache: StsCache, metrics: Metrics | None = None
) -> TransportPolicy:
    """The transport policy delivery and `tls-check` use: the local rules, then MTA-STS, then
    DANE, all asking the configured nameservers."""
    d = config.delivery
    resolver = make_resolver(d.nameservers, d.dns_timeout)
    sts = MtaSts(
        sts_cache, resolver, ca_file=d.ca_file, port=d.mta_sts_port, timeout=d.mta_sts_timeout
    )
    rules = (StsRule(sts, config, metrics), DaneRule(resolver, config, metrics))
    return TransportPolicy(config, MxResolver(d.nameservers, timeout=d.dns_timeout), rules)
