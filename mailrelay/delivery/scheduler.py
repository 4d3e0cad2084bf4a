"""The delivery side's lifecycle: claim due work from the queue, hand it to a fixed pool of
workers, record every outcome, and queue a bounce for what could not be delivered."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time

from mailrelay.config import Config
from mailrelay.delivery import retry
from mailrelay.delivery.bounce import bounce_for
from mailrelay.delivery.courier import Courier
from mailrelay.delivery.mx import MxResolver
from mailrelay.delivery.pool import SessionPool
from mailrelay.metrics import Metrics
from mailrelay.store import Store, accounts, queue
from mailrelay.store.queue import Job, Outcome

log = logging.getLogger("mailrelay.delivery")

# The scheduler looks at the queue at least this often, and at once when woken by a new message
# or a `queue retry` (which only touches the database, so the poll is what notices it).
POLL_SECONDS = 1.0


class DeliveryService:
    def __init__(self, config: Config, store: Store, metrics: Metrics, wake: asyncio.Event) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.wake = wake
        self.pool = SessionPool(config, metrics)
        resolver = MxResolver(config.delivery.nameservers, timeout=config.delivery.dns_timeout)
        self.courier = Courier(config, resolver, self.pool, metrics)
        workers = config.delivery.workers
        self._jobs: asyncio.Queue[Job] = asyncio.Queue(maxsize=workers)
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics.delivery_workers.set(workers)

    async def start(self) -> None:
        if self.config.delivery.hold:
            log.warning("event=delivery_held (delivery.hold = true: mail is queued, not sent)")
            return
        await self.pool.start()
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"mailrelay-delivery-{i}")
            for i in range(self.config.delivery.workers)
        ]
        self._tasks.append(asyncio.create_task(self._schedule(), name="mailrelay-scheduler"))

    async def stop(self, grace: float = 10.0) -> None:
        """Let attempts in flight finish for up to `grace` seconds, then cancel the rest; their
        recipients stay 'active' in the database and are due again at the next start."""
        scheduler = self._tasks[-1] if self._tasks else None
        if scheduler is not None:
            scheduler.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._jobs.join(), grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.pool.stop()

    async def _schedule(self) -> None:
        while True:
            free = self._jobs.maxsize - self._jobs.qsize()
            jobs: list[Job] = []
            if free > 0:
                try:
                    claim = functools.partial(queue.claim_due, now=time.time(), limit=free)
                    jobs = await self.store.write(claim)
                except sqlite3.Error as exc:
                    log.error("event=claim_failed error=%r", str(exc))
            for job in jobs:
                await self._jobs.put(job)
            if len(jobs) >= free > 0:
                continue  # more may be due; the queue's bound paces us
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL_SECONDS)

    async def _worker(self) -> None:
        while True:
            job = await self._jobs.get()
            self.metrics.delivery_workers_busy.inc()
            try:
                await self._deliver(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug must not take the worker down, nor strand the recipients: they are
                # retried later like any deferral, and the traceback says what to fix.
                log.exception(
                    "event=delivery_error queue_id=%s domain=%s", job.message_id, job.domain
                )
                release = functools.partial(
                    queue.release,
                    recipient_ids=[r.id for r in job.recipients],
                    when=time.time() + retry.FIRST_DELAY,
                )
                with contextlib.suppress(sqlite3.Error, RuntimeError):
                    await self.store.write(release)
            finally:
                self.metrics.delivery_workers_busy.dec()
                self._jobs.task_done()

    async def _deliver(self, job: Job) -> None:
        outcomes = await self.courier.deliver(job)
        bounced = [o for o in outcomes if o.state == "bounced"]
        notify = None
        if bounced and not job.is_bounce and job.sender_domain:
            domain = await self.store.read(
                lambda c: accounts.get_domain(c, job.sender_domain or "")
            )
            notify = domain.notify if domain else None
        dsn = bounce_for(self.config, job, bounced, notify) if bounced else None
        now = time.time()

        def commit(conn: sqlite3.Connection) -> str | None:
            queue.record_outcomes(conn, job.message_id, outcomes, now)
            return queue.enqueue(conn, dsn, now) if dsn is not None else None

        bounce_id = await self.store.write(commit)
        if bounce_id is not None:
            self.wake.set()
        self._account(job, outcomes, now, bounce_id)

    def _account(
        self, job: Job, outcomes: list[Outcome], now: float, bounce_id: str | None
    ) -> None:
        for o in outcomes:
            self.metrics.smtp_messages_processed.labels(status=o.state).inc()
            if o.state == "sent":
                self.metrics.smtp_delivery_delay.observe(max(0.0, now - job.created_at))
            last = o.attempts[-1] if o.attempts else None
            # Postfix's status= line, minus the address: the journal is kept and shipped with
            # less care than the database, so it names the domain; `mailrelay log` the address.
            log.info(
                "event=delivery queue_id=%s domain=%s mx=%s tls=%s cipher=%s status=%s dsn=%s"
                " delay=%.1f attempts=%d reply=%r%s",
                job.message_id,
                job.domain,
                f"{last.mx_host}[{last.mx_address}]" if last and last.mx_host else "none",
                (last.tls_protocol if last else None) or "none",
                (last.tls_cipher if last else None) or "none",
                o.state,
                o.status,
                now - job.created_at,
                len(o.attempts),
                o.reply,
                f" bounce_id={bounce_id}" if bounce_id and o.state == "bounced" else "",
            )
        if job.is_bounce and any(o.state == "bounced" for o in outcomes):
            log.warning(
                "event=bounce_undeliverable queue_id=%s note=%r",
                job.message_id,
                "a bounce is never bounced",
            )
