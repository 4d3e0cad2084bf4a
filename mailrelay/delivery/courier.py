"""Couriers deliver one message to the recipients of one domain and say how each attempt ended.

`Courier` is the seam between the queue runner, which owns every recipient's life, and SMTP.
`SmtpCourier` asks the transport policy for the routes, tries MX hosts in order over sessions
the policy accepts, and returns one `Result` per recipient with the evidence of every
connection it made. It never retries later, counts, bounces or writes: the runner does.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Protocol

from mailrelay.delivery import reporting
from mailrelay.delivery.policy import Destination, Route, TransportPolicy, relaxed
from mailrelay.delivery.pool import SessionPool
from mailrelay.delivery.published import refuse_host
from mailrelay.delivery.result import Evidence, Insecure, Kind, Result, most_telling
from mailrelay.delivery.session import StaleSession
from mailrelay.metrics import Metrics
from mailrelay.store.claims import Job
from mailrelay.tlsrpt import model as tlsrpt

log = logging.getLogger("mailrelay.delivery")
# Sessions a published policy refused: (policy, reason) for the policy-failure counter.
_PUBLISHED = {
    Insecure.DANE: ("dane", "certificate_mismatch"),
    Insecure.MTA_STS: ("mta-sts", "certificate"),
}


class Courier(Protocol):
    async def deliver(self, job: Job) -> list[Result]:
        """One result per recipient of `job`, in the order of `job.recipients`."""
        ...


class SmtpCourier:
    def __init__(self, policy: TransportPolicy, pool: SessionPool, metrics: Metrics) -> None:
        self.policy = policy
        self.pool = pool
        self.metrics = metrics

    async def deliver(self, job: Job) -> list[Result]:
        destination = await self.policy.destination(job.domain)
        if isinstance(destination, Result):
            if destination.kind is Kind.TRANSIENT:
                self.metrics.dns_lookup_failures.inc()
            return [destination] * len(job.recipients)
        attempt = _Attempt(job, destination)
        attempt.reports += [p.report_failure for p in destination.prepared if p.report_failure]
        for route in destination.routes:
            route = self._route_for(job, route)
            if route.refusal is not None:
                self._refused(destination, route, route.refusal)
                attempt.tried_on(route, route.refusal)
                continue
            for address in route.host.addresses:
                results = await self._transaction(attempt, route, address)
                if results is not None:
                    # RFC 5321 §5.1: a reply from an MX that took the transaction is final for
                    # this attempt; other MX hosts are tried only when no session could be set up.
                    earlier = _evidence(attempt.tried)
                    return attempt.finish([r.with_evidence(earlier) for r in results])
        return attempt.finish([_unreached(job.domain, attempt.tried)] * len(job.recipients))

    def _route_for(self, job: Job, route: Route) -> Route:
        """`route` as this message may use it: REQUIRETLS (RFC 8689 §4.2) refuses a host whose
        TLS would not be authenticated before any connection; "TLS-Required: No" sets the
        recipient's policies aside where the operator allows it (never past encryption)."""
        delivery = self.policy.config.delivery
        if job.requiretls:
            if route.refusal is None and not route.tls.authentication.authenticated:
                why = (
                    "REQUIRETLS: no authenticated TLS for this MX (no DANE, no MTA-STS enforce,"
                    f" security_level {delivery.security_level_for(job.domain)})"
                )
                refusal = refuse_host(route.host, Insecure.REQUIRETLS, why, "requiretls", None)
                return replace(route, refusal=refusal)
            return route
        if job.tls_optional and delivery.honours_tls_required_no(job.domain):
            return relaxed(route, delivery.ca_file)
        return route

    async def _transaction(
        self, attempt: _Attempt, route: Route, address: str
    ) -> list[Result] | None:
        """The results of one transaction on `address`, or None when no session was set up."""
        job, destination = attempt.job, attempt.destination
        rcpts = [r.address for r in job.recipients]
        for fresh in (False, True):
            async with self.pool.session(route.host.name, address, route.tls, fresh=fresh) as s:
                if isinstance(s, Result):
                    self._refused(destination, route, s)
                    if s.insecure in _PUBLISHED:
                        policy, reason = _PUBLISHED[s.insecure]
                        self.metrics.smtp_tls_policy_failures.labels(policy, reason).inc()
                    attempt.tried_on(route, s)
                    return None
                if s.fresh:  # a new connection whose TLS passed: one successful session
                    evidence = s.evidence(Kind.SENT, None)
                    attempt.reports.append(reporting.succeeded(route, job.domain, evidence))
                if job.requiretls and not s.offers("requiretls"):
                    # RFC 8689 §4.2.1: only to a server that will hold the next hop to TLS too.
                    why = f"{s.where}: REQUIRETLS: the server does not offer REQUIRETLS"
                    refusal = Result.refused(
                        Insecure.REQUIRETLS, why, s.evidence(Kind.INSECURE, why)
                    )
                    self._refused(destination, route, refusal)
                    attempt.tried_on(route, refusal)
                    return None
                try:
                    return await s.send(job.sender, rcpts, job.data, requiretls=job.requiretls)
                except StaleSession as exc:
                    # Nothing of this transaction left: go again at once on a new connection
                    # rather than defer the recipients for a retry interval.
                    log.info("event=stale_session domain=%s detail=%r", job.domain, str(exc))
        raise AssertionError("a fresh session cannot be stale")

    def _refused(self, destination: Destination, route: Route, result: Result) -> None:
        if result.insecure is not None:
            self.metrics.smtp_insecure_refusals.labels(reason=result.insecure.value).inc()
        last = result.evidence[-1] if result.evidence else None
        log.info(
            "event=mx_refused mx=%s[%s] domain=%s verdict=%s status=%s detail=%r",
            route.host.name,
            last.mx_address if last else "-",
            destination.domain,
            result.insecure.value if result.insecure else result.kind.value,
            result.status,
            result.diagnostic,
        )


class _Attempt:
    """One `deliver` call's running record: the MX addresses that gave no session, and the TLS
    sessions for TLS-RPT."""

    def __init__(self, job: Job, destination: Destination) -> None:
        self.job = job
        self.destination = destination
        self.tried: list[Result] = []  # how each MX address that gave no session ended, in order
        self.reports: list[tlsrpt.Session] = []

    def tried_on(self, route: Route, result: Result) -> None:
        self.tried.append(result)
        report = reporting.failed(route, self.job.domain, result)
        if report is not None:
            self.reports.append(report)

    def finish(self, results: list[Result]) -> list[Result]:
        reports = tuple(self.reports)
        return [replace(r, reports=reports) for r in results]


def _evidence(results: list[Result]) -> tuple[Evidence, ...]:
    return tuple(e for r in results for e in r.evidence)


def _unreached(domain: str, tried: list[Result]) -> Result:
    """No MX gave us a session. Insecure only if every MX was reached and refused: while one
    might still turn out fine (a transient failure), the recipients wait."""
    evidence = _evidence(tried)
    insecure = [r for r in tried if r.kind is Kind.INSECURE]
    unroutable = [r for r in tried if r.no_route]
    transient = [r for r in tried if r.kind is Kind.TRANSIENT and not r.no_route]
    permanent = [r for r in tried if r.kind is Kind.PERMANENT]
    if insecure and not transient:
        telling = most_telling(insecure)
        diagnostic = "; ".join(r.diagnostic for r in insecure)
        return Result(Kind.INSECURE, telling.status, diagnostic, telling.insecure, evidence)
    if transient or not permanent:
        failures = transient + insecure + unroutable
        diagnostic = "; ".join(r.diagnostic for r in failures) or f"no usable MX for {domain}"
        status = failures[0].status if failures else "4.4.1"
        return Result(Kind.TRANSIENT, status, diagnostic, evidence=evidence)
    diagnostic = "; ".join(r.diagnostic for r in permanent)
    return Result(Kind.PERMANENT, permanent[0].status, diagnostic, evidence=evidence)
