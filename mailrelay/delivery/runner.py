"""The queue runner owns every recipient's life: it claims due work, hands each job to the
courier, decides from each `Result` what becomes of the recipient (sent, retried later, or
bounced, with the expiry at `max_queue_lifetime`), queues the bounce, and records it all.

Nothing else decides a recipient's state. A result is kept in memory until its record is on
disk: a commit that fails after the remote server said 250 is retried, never turned into a
second delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
import sqlite3
import time
from collections.abc import Callable

from mailrelay.config import Config
from mailrelay.delivery import retry
from mailrelay.delivery.bounce import bounce_for
from mailrelay.delivery.courier import Courier
from mailrelay.delivery.result import Insecure, Kind, Result
from mailrelay.metrics import Metrics
from mailrelay.store import Store, accounts, claims, queue, suppressions, webhooks
from mailrelay.store import tlsrpt as tlsrpt_store
from mailrelay.store.backend import Connection
from mailrelay.store.claims import ClaimedRecipient, Job, RecipientUpdate
from mailrelay.store.writer import StoreClosed
from mailrelay.tlsrpt import model as tlsrpt_model

log = logging.getLogger("mailrelay.delivery")

# A failed record is retried with a delay doubling from the first value to the cap.
RECORD_RETRY_FIRST = 0.1
RECORD_RETRY_MAX = 5.0
# One line per recipient and attempt; docs/operating.md describes each field.
DELIVERY_LINE = (
    "event=delivery queue_id=%s domain=%s mx=%s tls=%s cipher=%s policy=%s"
    " status=%s dsn=%s delay=%.1f attempts=%d reply=%r%s"
)
# An address inside a reply or diagnostic: a remote server echoing the recipient or the sender
# ("550 5.1.1 <bob@example.net>: Recipient address rejected"), or our own "invalid address".
# The local part, quoted or not, up to the "@".
_LOCAL_PART = re.compile(r"""(?:"(?:[^"\\]|\\.)*"|[^\s"<>()\[\],;:@]+)@""")


class QueueRunner:
    def __init__(
        self,
        config: Config,
        store: Store,
        courier: Courier,
        metrics: Metrics,
        wake: asyncio.Event,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.courier = courier
        self.metrics = metrics
        self.wake = wake
        self.clock = clock
        self.workers = config.delivery.workers
        self._jobs: asyncio.Queue[Job] = asyncio.Queue()
        self._busy = 0
        self._backlog = False  # the last claim filled every free worker: more may be due
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics.delivery_workers.set(self.workers)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"mailrelay-delivery-{i}")
            for i in range(self.workers)
        ]
        self._tasks.append(asyncio.create_task(self._schedule(), name="mailrelay-scheduler"))

    async def stop(self, grace: float = 10.0) -> None:
        """Let attempts in flight finish for up to `grace` seconds, then cancel the rest; their
        recipients stay claimed in the database and are due again at the next start."""
        scheduler = self._tasks[-1] if self._tasks else None
        if scheduler is not None:
            scheduler.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._jobs.join(), grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # -- claiming ---------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            # Cleared before the claim, so that mail queued while it runs wakes the next one.
            self.wake.clear()
            free = self.workers - self._busy - self._jobs.qsize()
            jobs: list[Job] = []
            if free > 0:
                try:
                    jobs = await self.store.write(functools.partial(self._claim, free))
                except sqlite3.Error as exc:
                    log.error("event=claim_failed error=%r", str(exc))
            for job in jobs:
                self._jobs.put_nowait(job)
            # Every free worker got a job (or none was free): more may be due, so a worker
            # that finishes wakes the next claim rather than leave it to the poll.
            self._backlog = len(jobs) >= free
            # The queue at least every delivery.poll_interval, and at once when woken by a new
            # message (on PostgreSQL any instance's: LISTEN/NOTIFY) or a finished job. The poll
            # notices retries coming due and, on SQLite, `queue retry`.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.config.delivery.poll_interval)

    def _claim(self, limit: int, conn: Connection) -> list[Job]:
        """Take back what a dead instance held, then claim, in one transaction. The lease
        outlasts the attempt's deadline (`_deliver`), so ours never runs out while we deliver."""
        now = self.clock()
        instance = self.config.instance
        recovered = claims.recover_expired(conn, now, instance.id)
        if recovered:
            log.warning("event=recovered_expired_leases recipients=%d", recovered)
        lease = now + self.config.delivery.attempt_deadline + instance.lease_margin
        return claims.claim_due(conn, now, limit, instance.id, lease)

    async def _worker(self) -> None:
        while True:
            job = await self._jobs.get()
            self._busy += 1
            self.metrics.delivery_workers_busy.inc()
            try:
                await self.attempt(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                # `attempt` keeps its own failures in hand; this is a bug in the runner itself.
                # The recipients stay claimed and are released at the next start.
                log.exception("event=runner_error queue_id=%s", job.message_id)
            finally:
                self._busy -= 1
                self.metrics.delivery_workers_busy.dec()
                self._jobs.task_done()
                if self._backlog:
                    self.wake.set()  # a worker is free and work is waiting

    # -- one attempt, start to record -------------------------------------------------------

    async def attempt(self, job: Job) -> None:
        """Deliver `job` once and record what became of every recipient."""
        now = self.clock()
        lifetime = self.config.delivery.max_queue_lifetime
        # A recipient whose previous attempt never came back (the process died during it) and
        # whose time is up is not tried again: a message that crashes the relay must not keep
        # doing so forever.
        given_up = [
            r
            for r in job.recipients
            if r.interrupted and retry.expired(job.created_at, now, lifetime)
        ]
        due = [r for r in job.recipients if r not in given_up]
        updates = [
            self._expire(r, r.last_diagnostic or "the attempt was interrupted") for r in given_up
        ]
        insecure: dict[int, Insecure] = {}  # for the bounce: why no MX met the policy
        reports: tuple[tlsrpt_model.Session, ...] = ()
        if due:
            results = await self._deliver(dataclasses.replace(job, recipients=tuple(due)))
            now = self.clock()
            updates += [self.decide(job, r, res, now) for r, res in zip(due, results, strict=True)]
            insecure = {
                r.id: res.insecure for r, res in zip(due, results, strict=True) if res.insecure
            }
            reports = results[0].reports if results else ()
        await self._record(job, updates, insecure, reports)

    async def _deliver(self, job: Job) -> list[Result]:
        deadline = self.config.delivery.attempt_deadline
        try:
            async with asyncio.timeout(deadline):
                results = await self.courier.deliver(job)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            # A server that answers slowly enough to stay inside every command timeout must not
            # hold a worker for hours; whatever it had, the attempt is over and counts.
            why = f"the delivery attempt took longer than {deadline:g}s (delivery.attempt_deadline)"
            return [Result(Kind.TRANSIENT, "4.4.1", why)] * len(job.recipients)
        except Exception as exc:
            # A bug must not take the worker down nor strand the recipients: the attempt counts
            # as transient, so it is retried on schedule and ends at max_queue_lifetime.
            log.exception("event=delivery_error queue_id=%s domain=%s", job.message_id, job.domain)
            failed = Result(Kind.TRANSIENT, "4.3.0", f"internal error during delivery: {exc!r}")
            return [failed] * len(job.recipients)
        if len(results) != len(job.recipients):
            raise AssertionError(f"courier gave {len(results)} results for {len(job.recipients)}")
        return results

    def decide(
        self, job: Job, recipient: ClaimedRecipient, result: Result, now: float
    ) -> RecipientUpdate:
        """What becomes of `recipient` after an attempt that ended as `result`."""
        match result.kind:
            case Kind.SENT:
                return self._update(recipient, "sent", result.status, result.diagnostic, result)
            case Kind.PERMANENT:
                return self._update(recipient, "bounced", result.status, result.diagnostic, result)
            case Kind.INSECURE:
                action = self.config.delivery.insecure_action_for(job.domain)
                if result.insecure is Insecure.REQUIRETLS:
                    # The sender's demand, not the destination's passing state: RFC 8689 §5
                    # returns the message at once, whatever insecure_action says.
                    action = "bounce"
                if action == "bounce" and not (result.insecure and result.insecure.defers):
                    return self._update(
                        recipient, "bounced", result.status, result.diagnostic, result
                    )
                if retry.expired(job.created_at, now, self.config.delivery.max_queue_lifetime):
                    # Waited as long as we may: the bounce gives the real reason, not "expired".
                    return self._update(
                        recipient, "bounced", result.status, result.diagnostic, result
                    )
                status = "4" + result.status[1:]
                return self._defer(recipient, status, result, now)
            case Kind.TRANSIENT:
                if retry.expired(job.created_at, now, self.config.delivery.max_queue_lifetime):
                    return self._expire(recipient, result.diagnostic, result)
                return self._defer(recipient, result.status, result, now)

    def _defer(
        self, recipient: ClaimedRecipient, status: str, result: Result, now: float
    ) -> RecipientUpdate:
        update = self._update(recipient, "deferred", status, result.diagnostic, result)
        when = now + retry.next_delay(max(1, recipient.attempts))
        return dataclasses.replace(update, next_attempt_at=when)

    def _expire(
        self, recipient: ClaimedRecipient, last_error: str, result: Result | None = None
    ) -> RecipientUpdate:
        diagnostic = f"message expired in the queue; last error: {last_error}"
        return self._update(recipient, "bounced", "4.4.7", diagnostic, result)

    @staticmethod
    def _update(
        recipient: ClaimedRecipient,
        state: claims.AttemptState,
        status: str,
        diagnostic: str,
        result: Result | None,
    ) -> RecipientUpdate:
        return RecipientUpdate(
            recipient.id,
            recipient.address,
            state,
            status,
            diagnostic,
            None,
            result.evidence if result else (),
        )

    # -- recording --------------------------------------------------------------------------

    async def _record(
        self,
        job: Job,
        updates: list[RecipientUpdate],
        insecure: dict[int, Insecure],
        reports: tuple[tlsrpt_model.Session, ...] = (),
    ) -> None:
        bounced = [u for u in updates if u.state == "bounced"]
        notify = None
        if bounced and not job.is_bounce and job.sender_domain:
            domain = await self.store.read(
                lambda c: accounts.get_domain(c, job.sender_domain or "")
            )
            notify = domain.notify if domain else None
        dsn = bounce_for(self.config, job, bounced, notify, insecure) if bounced else None
        now = self.clock()
        suppression = self.config.suppression

        def commit(conn: Connection) -> str | None:
            stale = claims.record(conn, job.message_id, updates, now, self.config.instance.id)
            if stale:
                log.warning(
                    "event=record_after_lease queue_id=%s recipients=%d",
                    job.message_id,
                    len(stale),
                )
            if len(stale) == len(updates):
                # Another instance took the job back after our lease ran out and owns what
                # happens next: its outcome, not ours, makes the bounce and the webhooks.
                return None
            if bounced and suppression.enabled:  # a hard bounce stops the sending domain
                suppressions.add_from_bounces(conn, job, bounced, now, suppression.expiry)
            # TLS-RPT counts this attempt's sessions, in the same commit as their outcome. A
            # report's own delivery is never reported on (RFC 8460 §5.3: no report loops).
            if reports and not tlsrpt_store.is_report_message(conn, job.message_id):
                tlsrpt_store.record_sessions(conn, reports)
            if self.config.webhooks.enabled:  # each outcome's webhooks, with the outcome
                webhooks.enqueue_outcomes(conn, job, updates, insecure, now)
            return queue.enqueue(conn, dsn, now) if dsn is not None else None

        delay = RECORD_RETRY_FIRST
        for tries in range(1, 1_000_000):
            try:
                bounce_id = await self.store.write(commit)
                break
            except StoreClosed:
                # Shutting down: the recipients stay claimed and go again after the restart
                # (the one window in which a message may arrive twice, as DESIGN.md says).
                log.error("event=record_lost_at_stop queue_id=%s", job.message_id)
                return
            except sqlite3.Error as exc:
                # The outcome is real (the MX may have said 250): keep it and try again,
                # rather than release the recipients and deliver them a second time.
                log.error(
                    "event=record_failed queue_id=%s tries=%d retry_in=%.1f error=%r",
                    job.message_id,
                    tries,
                    delay,
                    str(exc),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECORD_RETRY_MAX)
        if bounce_id is not None:
            self.wake.set()
        self._account(job, updates, now, bounce_id)

    def _account(
        self, job: Job, updates: list[RecipientUpdate], now: float, bounce_id: str | None
    ) -> None:
        for u in updates:
            self.metrics.smtp_messages_processed.labels(status=u.state).inc()
            if u.state == "sent":
                self.metrics.smtp_delivery_delay.observe(max(0.0, now - job.created_at))
            last = u.evidence[-1] if u.evidence else None
            # Postfix's status= line, minus the address: the journal is kept and shipped with
            # less care than the database, so it names the domain; `mailrelay log` the address.
            # The reply stays, because it says why (as Postfix's line does), but with every
            # address in it reduced to its domain, "<…@example.net>": a remote server often
            # echoes the recipient. The event record keeps the reply as the server sent it.
            log.info(
                DELIVERY_LINE,
                job.message_id,
                job.domain,
                f"{last.mx_host}[{last.mx_address}]" if last and last.mx_host else "none",
                (last.tls_protocol if last else None) or "none",
                (last.tls_cipher if last else None) or "none",
                (last.policy if last else None) or "none",
                u.state,
                u.status,
                now - job.created_at,
                len(u.evidence),
                _LOCAL_PART.sub("…@", u.diagnostic),
                f" bounce_id={bounce_id}" if bounce_id and u.state == "bounced" else "",
            )
        if job.is_bounce and any(u.state == "bounced" for u in updates):
            log.warning(
                "event=bounce_undeliverable queue_id=%s note=%r",
                job.message_id,
                "a bounce is never bounced",
            )
