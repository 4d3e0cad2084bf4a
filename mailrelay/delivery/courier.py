"""One delivery attempt of one message to one domain: MX hosts in order, secure sessions only,
and a sent / deferred / bounced outcome for every recipient, with the evidence of each try."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from mailrelay.config import Config
from mailrelay.delivery import retry
from mailrelay.delivery.mx import MxFailure, MxHost, MxResolver
from mailrelay.delivery.pool import SessionPool
from mailrelay.delivery.session import Failure, Insecure, Outcome, RecipientResult, Session
from mailrelay.metrics import Metrics
from mailrelay.store.queue import Attempt, Job, Verdict
from mailrelay.store.queue import Outcome as RecipientOutcome

log = logging.getLogger("mailrelay.delivery")

_VERDICT: dict[Outcome, Verdict] = {
    Outcome.SENT: "sent",
    Outcome.TRANSIENT: "deferred",
    Outcome.PERMANENT: "bounced",
}


@dataclass
class _Tries:
    """What happened on each MX address tried so far, in order."""

    attempts: list[Attempt] = field(default_factory=list)
    insecure: list[Failure] = field(default_factory=list)
    transient: list[Failure] = field(default_factory=list)
    permanent: list[Failure] = field(default_factory=list)

    def note(self, failure: Failure, mx: MxHost, address: str) -> None:
        tls = failure.tls
        verdict: Verdict = (
            "insecure"
            if failure.insecure
            else "deferred"
            if failure.outcome is Outcome.TRANSIENT
            else "bounced"
        )
        self.attempts.append(
            Attempt(
                at=time.time(),
                mx_host=mx.name,
                mx_address=address,
                reply=failure.detail if failure.reply is None else str(failure.reply),
                tls_protocol=tls.protocol if tls else None,
                tls_cipher=tls.cipher if tls else None,
                cert_fingerprint=tls.certificate.sha256 if tls and tls.certificate else None,
                cert_verified=tls.verified if tls else None,
                verdict=verdict,
            )
        )
        if failure.insecure is not None:
            self.insecure.append(failure)
        elif failure.outcome is Outcome.TRANSIENT:
            self.transient.append(failure)
        else:
            self.permanent.append(failure)


class Courier:
    def __init__(
        self,
        config: Config,
        resolver: MxResolver,
        pool: SessionPool,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.pool = pool
        self.metrics = metrics
        self.clock = clock

    async def deliver(self, job: Job) -> list[RecipientOutcome]:
        mx = await self.resolver.resolve_mx(job.domain)
        if isinstance(mx, MxFailure):
            if not mx.permanent:
                self.metrics.dns_lookup_failures.inc()
            return self._all(job, mx.permanent, mx.status, mx.detail, [])
        tries = _Tries()
        pending = list(job.recipients)
        for host in mx:
            for address in host.addresses:
                session = await self._session(job.domain, host, address, tries)
                if session is None:
                    continue
                result = await session.send(job.sender, [r.address for r in pending], job.data)
                self.pool.release(session)
                outcomes = self._decided(job, result.recipients, session, tries)
                # RFC 5321 §5.1: a reply from an MX that took the transaction is final for this
                # attempt; other MX hosts are tried only when no session could be set up.
                return outcomes
        return self._unreached(job, tries)

    async def _session(
        self, domain: str, host: MxHost, address: str, tries: _Tries
    ) -> Session | None:
        opened = await self.pool.acquire(
            host.name,
            address,
            security_level=self.config.delivery.security_level_for(domain),
            cipher_profile=self.config.delivery.cipher_profile_for(domain),
        )
        if isinstance(opened, Failure):
            tries.note(opened, host, address)
            if opened.insecure is not None:
                self.metrics.smtp_insecure_refusals.labels(reason=opened.insecure.value).inc()
            log.info(
                "event=mx_refused mx=%s[%s] domain=%s verdict=%s status=%s detail=%r",
                host.name,
                address,
                domain,
                opened.insecure.value if opened.insecure else opened.outcome.value,
                opened.status,
                opened.detail,
            )
            return None
        return opened

    def _decided(
        self, job: Job, results: tuple[RecipientResult, ...], session: Session, tries: _Tries
    ) -> list[RecipientOutcome]:
        now = self.clock()
        tls = session.tls
        outcomes = []
        for claimed, result in zip(job.recipients, results, strict=True):
            verdict: Verdict = _VERDICT[result.outcome]
            attempt = Attempt(
                at=now,
                mx_host=session.mx_name,
                mx_address=session.address,
                reply=str(result.reply) if result.reply else result.detail,
                tls_protocol=tls.protocol,
                tls_cipher=tls.cipher,
                cert_fingerprint=tls.certificate.sha256 if tls.certificate else None,
                cert_verified=tls.verified,
                verdict=verdict,
            )
            attempts = (*tries.attempts, attempt)
            reply = result.diagnostic
            if result.outcome is Outcome.TRANSIENT:
                outcomes.append(
                    self._defer(
                        job,
                        claimed.id,
                        claimed.address,
                        claimed.attempts,
                        result.status,
                        reply,
                        attempts,
                    )
                )
                continue
            state: Literal["sent", "bounced"] = (
                "sent" if result.outcome is Outcome.SENT else "bounced"
            )
            outcomes.append(
                RecipientOutcome(
                    claimed.id, claimed.address, state, result.status, reply, None, attempts
                )
            )
        return outcomes

    def _unreached(self, job: Job, tries: _Tries) -> list[RecipientOutcome]:
        """No MX gave us a session. Insecure only if every MX was reached and refused."""
        if tries.insecure and not tries.transient:
            detail = "; ".join(f.detail for f in tries.insecure)
            status = _insecure_status(tries.insecure)
            if self.config.delivery.insecure_action_for(job.domain) == "defer":
                return self._all(job, False, "4" + status[1:], detail, tries.attempts)
            return self._all(job, True, status, detail, tries.attempts)
        if tries.transient or not tries.permanent:
            failures = tries.transient + tries.insecure
            detail = "; ".join(f.detail for f in failures) or f"no usable MX for {job.domain}"
            status = failures[0].status if failures else "4.4.1"
            return self._all(job, False, status, detail, tries.attempts)
        detail = "; ".join(f.diagnostic for f in tries.permanent)
        return self._all(job, True, tries.permanent[0].status, detail, tries.attempts)

    def _all(
        self, job: Job, permanent: bool, status: str, detail: str, attempts: list[Attempt]
    ) -> list[RecipientOutcome]:
        if permanent:
            return [
                RecipientOutcome(r.id, r.address, "bounced", status, detail, None, tuple(attempts))
                for r in job.recipients
            ]
        return [
            self._defer(job, r.id, r.address, r.attempts, status, detail, tuple(attempts))
            for r in job.recipients
        ]

    def _defer(
        self,
        job: Job,
        recipient_id: int,
        address: str,
        previous_attempts: int,
        status: str,
        reply: str,
        attempts: tuple[Attempt, ...],
    ) -> RecipientOutcome:
        now = self.clock()
        if retry.expired(job.created_at, now, self.config.delivery.max_queue_lifetime):
            # Given up: the DSN says the time ran out, and why the last attempt failed.
            expiry = f"message expired in the queue; last error: {reply}"
            return RecipientOutcome(
                recipient_id, address, "bounced", "4.4.7", expiry, None, attempts
            )
        when = now + retry.next_delay(previous_attempts + 1)
        return RecipientOutcome(recipient_id, address, "deferred", status, reply, when, attempts)


def _insecure_status(failures: list[Failure]) -> str:
    """The most telling RFC 3463 code among the MX hosts refused: an MX that did offer TLS
    (5.7.10, 5.7.5) says more about the destination than one that offered none (5.7.4)."""
    order = {"5.7.10": 0, "5.7.5": 1, "5.7.4": 2}
    codes = [f.insecure.status for f in failures if f.insecure is not None]
    return min(codes, key=lambda c: order.get(c, 3)) if codes else "5.7.0"


__all__ = ["Courier", "Insecure"]
