"""The daily report task: once a UTC day is over (and `tlsrpt.send_hour` has come), each domain
with sessions that day and a usable `_smtp._tls` record gets its report, mailed and POSTed to
every rua URI; failed POSTs are retried for a day (§5.5), mailed reports are retried by the
queue like any mail.

It runs beside the queue runner, in the process that delivers, and wakes once a minute; each
pass (`run_once`) is also what `mailrelay tlsrpt send-now` and the tests call. Deliveries are
claimed in the store before they are attempted, so a pass in another process never sends the
same report at the same time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.asyncresolver

from mailrelay.config import Config
from mailrelay.delivery import retry
from mailrelay.metrics import Metrics
from mailrelay.periodic import Periodic
from mailrelay.resolver import make_resolver
from mailrelay.store import Store, queue, tlsrpt
from mailrelay.store.backend import Connection
from mailrelay.store.tlsrpt import Delivery, utc_day
from mailrelay.tlsrpt import mail, post, record, report

log = logging.getLogger("mailrelay.tlsrpt")

TICK = 60.0  # seconds between passes
# A claimed delivery whose attempt never finished (the process died) is due again after this.
LEASE = 600.0
RETRY_FOR = 86400.0  # §5.5: "redelivery for up to 24 hours after the initial attempt"
KEEP_REPORTS_DAYS = 31  # reports stay listed (`tlsrpt list`) this long
# Sessions of a day that never became a report (reporting off; the domain's record unreadable
# for days) are forgotten after this many days.
KEEP_SESSIONS_DAYS = 3
AT_ONCE = 8  # lookups and deliveries in flight at a time
PRUNE_EVERY = 3600.0  # seconds between prunes: an idle pass reads, and commits nothing


@dataclass
class Pass:
    """What one pass did, for `tlsrpt send-now` and the tests."""

    reports: list[str] = field(default_factory=list)  # keys of the reports made
    queued: int = 0  # reports handed to the queue as mail
    sent: int = 0  # POSTed, or mailed and delivered
    failed: int = 0  # given up on
    retrying: int = 0  # POSTs that failed and will be tried again


class Reporter(Periodic):
    retry_after = TICK

    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics,
        wake: asyncio.Event,
        *,
        clock: Callable[[], float] = time.time,
        resolver: dns.asyncresolver.Resolver | None = None,
    ) -> None:
        super().__init__("mailrelay-tlsrpt", log, "tlsrpt_pass_failed")
        self.config = config
        self.store = store
        self.metrics = metrics
        self.wake = wake  # set when a report was queued: the queue runner sends it at once
        self.clock = clock
        self.resolver = resolver or make_resolver(
            config.delivery.nameservers, config.delivery.dns_timeout
        )
        self.who = report.identity(config)
        self._lock = asyncio.Lock()  # one pass at a time in this process
        self._pruned_at = -PRUNE_EVERY  # the first pass prunes

    async def _pass(self) -> float:
        await self.run_once()
        return TICK

    async def run_once(self, now: float | None = None, *, force: bool = False) -> Pass:
        """One pass: make the reports that are due, deliver what is due, note which mailed
        reports have been delivered, forget old ones. `force` makes every finished day's
        reports now, whatever `send_hour` says."""
        async with self._lock:
            now = self.clock() if now is None else now
            done = Pass()
            if self.config.tlsrpt.enabled:
                await self._make_reports(now, force, done)
            due, queued = await self.store.read(lambda c: tlsrpt.waiting(c, now))
            if due and self.config.tlsrpt.enabled:
                await self._deliver(now, done)
            if queued:
                await self._settle(now, done)
            if abs(now - self._pruned_at) >= PRUNE_EVERY:
                await self.store.write(
                    lambda c: tlsrpt.prune(
                        c,
                        reports_before_day=utc_day(now - KEEP_REPORTS_DAYS * report.DAY_SECONDS),
                        aggregates_before_day=utc_day(
                            now - KEEP_SESSIONS_DAYS * report.DAY_SECONDS
                        ),
                    )
                )
                self._pruned_at = now
            return done

    # -- making reports ---------------------------------------------------------------------

    def _due(self, day: str, now: float, force: bool) -> bool:
        day_over = report.day_start(day) + report.DAY_SECONDS
        return force or now >= day_over + self.config.tlsrpt.send_hour * 3600

    async def _make_reports(self, now: float, force: bool, done: Pass) -> None:
        today = utc_day(now)
        days = await self.store.read(lambda c: tlsrpt.days_with_sessions(c, today))
        due = [(domain, day) for domain, day in days if self._due(day, now, force)]
        if not due:
            return
        limit = asyncio.Semaphore(AT_ONCE)
        max_rua = self.config.tlsrpt.max_rua

        async def look(domain: str) -> record.Lookup:
            async with limit:
                return await record.lookup(self.resolver, domain, max_rua)

        domains = sorted({domain for domain, _day in due})
        found = dict(zip(domains, await asyncio.gather(*map(look, domains)), strict=True))
        for domain, day in due:
            key = await self._make_report(domain, day, found[domain], now)
            if key is not None:
                done.reports.append(key)

    async def _make_report(
        self, domain: str, day: str, found: record.Lookup, now: float
    ) -> str | None:
        if found.temporary:
            # Not "no record": the sessions wait for the next pass (up to KEEP_SESSIONS_DAYS).
            log.warning(
                "event=tlsrpt_lookup_failed domain=%s day=%s why=%r", domain, day, found.temporary
            )
            return None
        for why in found.ignored:
            log.info("event=tlsrpt_rua_ignored domain=%s why=%r", domain, why)
        if not found.destinations:
            log.debug("event=tlsrpt_no_record domain=%s day=%s", domain, day)
            await self.store.write(lambda c: tlsrpt.drop_aggregates(c, domain, day))
            return None
        key = report.new_report_key()

        def make(conn: Connection) -> bool:
            # In one transaction with the read, so that no session recorded meanwhile is lost.
            if tlsrpt.has_report(conn, domain, day):
                # Sessions recorded after the day's report was made (an attempt that ended
                # after midnight, say) cannot go into it any more.
                tlsrpt.drop_aggregates(conn, domain, day)
                return False
            policies = tlsrpt.aggregates(conn, domain, day)
            if not policies:
                return False
            tlsrpt.add_report(
                conn,
                report_key=key,
                report_id=report.report_id(key, self.who),
                domain=domain,
                day=day,
                report_json=report.encode(report.build(self.who, key, domain, day, policies)),
                destinations=[(d.uri, d.method) for d in found.destinations],
                now=now,
            )
            return True

        if not await self.store.write(make):
            return None
        log.info(
            "event=tlsrpt_report report=%s domain=%s day=%s destinations=%d",
            key,
            domain,
            day,
            len(found.destinations),
        )
        return key

    # -- delivering them ----------------------------------------------------------------------

    async def _deliver(self, now: float, done: Pass) -> None:
        claimed = await self.store.write(lambda c: tlsrpt.claim_due(c, now, LEASE))
        limit = asyncio.Semaphore(AT_ONCE)

        async def one(delivery: Delivery) -> None:
            async with limit:
                try:
                    if delivery.method == "https":
                        await self._post(delivery, now, done)
                    else:
                        await self._mail(delivery, now, done)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug or a store failure: logged, and the others go on. This delivery
                    # stays claimed and is tried again when its lease runs out.
                    log.exception(
                        "event=tlsrpt_delivery_error report=%s uri=%s",
                        delivery.report_key,
                        delivery.uri,
                    )

        await asyncio.gather(*map(one, claimed))

    async def _post(self, d: Delivery, now: float, done: Pass) -> None:
        destination = record.destination_for(d.uri)
        assert destination is not None  # it was parsed before it was stored
        try:
            await post.post(
                self.resolver,
                destination.target,
                report.compress(d.report_json),
                ca_file=self.config.delivery.ca_file,
                time_limit=self.config.tlsrpt.https_timeout,
            )
        except post.PostFailed as exc:
            why = str(exc)
            if now - d.first_attempt_at >= RETRY_FOR:
                await self._failed(d, why, now, done)
                return
            later = now + retry.next_delay(d.attempts)
            await self.store.write(
                lambda c: tlsrpt.finish(
                    c, d.report_key, d.uri, "pending", now, detail=why, next_attempt_at=later
                )
            )
            done.retrying += 1
            log.info(
                "event=tlsrpt_retry report=%s domain=%s uri=%s attempts=%d retry_in=%.0f why=%r",
                d.report_key,
                d.domain,
                d.uri,
                d.attempts,
                later - now,
                why,
            )
            return
        await self.store.write(lambda c: tlsrpt.finish(c, d.report_key, d.uri, "sent", now))
        self._count(d.method, "sent", done)
        log.info(
            "event=tlsrpt_sent report=%s domain=%s method=https uri=%s",
            d.report_key,
            d.domain,
            d.uri,
        )

    async def _mail(self, d: Delivery, now: float, done: Pass) -> None:
        destination = record.destination_for(d.uri)
        assert destination is not None
        to = destination.target
        message = mail.build(
            self.who,
            to=to,
            domain=d.domain,
            day=d.day,
            report_id=d.report_id,
            attachment_name=report.filename(self.who, d.report_key, d.domain, d.day),
            report_gz=report.compress(d.report_json),
        )
        try:
            signed = await self.store.read(lambda c: mail.sign(c, message, self.who.from_address))
        except mail.CannotSign as exc:
            await self._failed(d, str(exc), now, done)
            return

        def enqueue(conn: Connection) -> str:
            # The queue's own clock, not the pass's `now`: the message is due at once.
            message_id = queue.enqueue(conn, mail.queued(signed, to), self.clock())
            tlsrpt.mark_report_message(conn, message_id)
            tlsrpt.finish(conn, d.report_key, d.uri, "queued", now, message_id=message_id)
            return message_id

        message_id = await self.store.write(enqueue)
        self.wake.set()
        done.queued += 1
        log.info(
            "event=tlsrpt_queued report=%s domain=%s uri=%s queue_id=%s",
            d.report_key,
            d.domain,
            d.uri,
            message_id,
        )

    async def _failed(self, d: Delivery, why: str, now: float, done: Pass) -> None:
        await self.store.write(
            lambda c: tlsrpt.finish(c, d.report_key, d.uri, "failed", now, detail=why)
        )
        self._count(d.method, "failed", done)
        log.warning(
            "event=tlsrpt_failed report=%s domain=%s method=%s uri=%s why=%r",
            d.report_key,
            d.domain,
            d.method,
            d.uri,
            why,
        )

    async def _settle(self, now: float, done: Pass) -> None:
        """Mailed reports whose message the queue has finished with."""
        for o in await self.store.write(lambda c: tlsrpt.settle_queued(c, now)):
            self._count("mailto", o.state, done)
            line = "event=tlsrpt_%s report=%s method=mailto uri=%s why=%r"
            level = logging.INFO if o.state == "sent" else logging.WARNING
            log.log(level, line, o.state, o.report_key, o.uri, o.detail)

    def _count(self, method: str, result: str, done: Pass) -> None:
        self.metrics.tlsrpt_reports.labels(method=method, result=result).inc()
        if result == "sent":
            done.sent += 1
        else:
            done.failed += 1
