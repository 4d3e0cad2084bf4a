"""The webhook task: posts the outbox (`store.webhooks`), signed, to each endpoint; a delivery
that is not answered 2xx is retried on a schedule until a day after its event, then failed.

It runs beside the queue runner, in the process that delivers. Deliveries are claimed with a
lease before they are posted, so a second process (or this one after a crash) never posts the
same one at the same time; a POST cut short is posted again when its lease runs out, with the
same webhook-id, so that a receiver can drop the duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver

from mailrelay.config import Config
from mailrelay.metrics import Metrics
from mailrelay.periodic import Periodic
from mailrelay.resolver import make_resolver
from mailrelay.store import Store
from mailrelay.store import webhooks as outbox
from mailrelay.store.backend import Connection
from mailrelay.store.webhooks import Delivery
from mailrelay.webhooks import post, signature

log = logging.getLogger("mailrelay.webhooks")

# Seconds after the n-th failed attempt (the first is `[webhooks] first_retry`); the last one
# repeats until RETRY_FOR has passed since the event.
SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0)
RETRY_FOR = 86400.0
POLL = 1.0  # the most seconds between looks at the outbox
LEASE_MARGIN = 60.0  # a claim outlives the POST's timeout by this much
AT_ONCE = 8  # POSTs in flight at a time
KEEP_FOR = 7 * 86400.0  # settled deliveries stay listed (`webhook deliveries`) this long
PRUNE_EVERY = 3600.0


def next_delay(
    attempts: int, first: float = SCHEDULE[0], rand: Callable[[], float] = random.random
) -> float:
    """The wait after `attempts` failed attempts: the schedule, with ±10 % jitter so that the
    retries of many events to one endpoint that was down do not all arrive at once."""
    base = first if attempts <= 1 else SCHEDULE[min(attempts, len(SCHEDULE)) - 1]
    return base * (0.9 + 0.2 * rand())


@dataclass
class Pass:
    """What one pass did, for the tests."""

    sent: int = 0
    retried: int = 0
    failed: int = 0


class Dispatcher(Periodic):
    retry_after = POLL

    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        resolver: dns.asyncresolver.Resolver | None = None,
    ) -> None:
        super().__init__("mailrelay-webhooks", log, "webhook_pass_failed")
        self.config = config
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.resolver = resolver or make_resolver(
            config.delivery.nameservers, config.delivery.dns_timeout
        )
        self._lock = asyncio.Lock()  # one pass at a time in this process
        self._pruned_at = -PRUNE_EVERY

    async def _pass(self) -> float:
        await self.run_once()
        due = await self.store.read(outbox.next_due)
        return POLL if due is None else min(POLL, max(0.0, due - self.clock()))

    async def run_once(self, now: float | None = None) -> Pass:
        """Post every delivery that is due (AT_ONCE at a time), and settle each."""
        async with self._lock:
            now = self.clock() if now is None else now
            done = Pass()
            if abs(now - self._pruned_at) >= PRUNE_EVERY:
                await self.store.write(lambda c: outbox.prune(c, now - KEEP_FOR))
                self._pruned_at = now
            lease = self.config.webhooks.timeout + LEASE_MARGIN
            while claimed := await self.store.write(
                lambda c: outbox.claim_due(c, now, lease, AT_ONCE)
            ):
                await asyncio.gather(*(self._one(d, done) for d in claimed))
                if len(claimed) < AT_ONCE:
                    break
            return done

    async def _one(self, d: Delivery, done: Pass) -> None:
        try:
            await self._post(d, done)
        except asyncio.CancelledError:
            raise
        except Exception:
            # This delivery stays claimed and is posted again when its lease runs out.
            log.exception("event=webhook_error webhook_id=%s endpoint=%s", d.id, d.endpoint_id)

    async def _post(self, d: Delivery, done: Pass) -> None:
        body = d.payload.encode()
        # The signature's timestamp is the attempt's (Standard Webhooks): receivers refuse old
        # ones to stop replays, and a retry hours later must not look like one.
        stamp = int(self.clock())
        try:
            await post.post(
                self.resolver,
                d.url,
                body,
                signature.headers(d.secret, d.id, stamp, body),
                ca_file=self.config.delivery.ca_file,
                time_limit=self.config.webhooks.timeout,
                allow_private=self.config.webhooks.allow_private_addresses,
            )
        except post.PostFailed as exc:
            await self._failed_attempt(d, str(exc), done)
            return
        now = self.clock()
        await self.store.write(lambda c: outbox.finish(c, d.id, "sent", now))
        done.sent += 1
        self.metrics.webhook_deliveries.labels(result="sent").inc()
        log.info(
            "event=webhook_sent webhook_id=%s endpoint=%s type=%s attempts=%d",
            d.id,
            d.endpoint_id,
            d.event,
            d.attempts,
        )

    async def _failed_attempt(self, d: Delivery, why: str, done: Pass) -> None:
        now = self.clock()
        if now - d.created_at >= RETRY_FOR:
            await self.store.write(lambda c: outbox.finish(c, d.id, "failed", now, error=why))
            done.failed += 1
            self.metrics.webhook_deliveries.labels(result="failed").inc()
            log.warning(
                "event=webhook_failed webhook_id=%s endpoint=%s type=%s attempts=%d why=%r",
                d.id,
                d.endpoint_id,
                d.event,
                d.attempts,
                why,
            )
            return
        # The last retry is at the end of the day, not after it.
        delay = next_delay(d.attempts, self.config.webhooks.first_retry)
        later = min(now + delay, d.created_at + RETRY_FOR)

        def retry(c: Connection) -> None:
            outbox.finish(c, d.id, "pending", now, error=why, next_attempt_at=later)

        await self.store.write(retry)
        done.retried += 1
        self.metrics.webhook_deliveries.labels(result="retried").inc()
        log.info(
            "event=webhook_retry webhook_id=%s endpoint=%s type=%s attempts=%d retry_in=%.0f"
            " why=%r",
            d.id,
            d.endpoint_id,
            d.event,
            d.attempts,
            later - now,
            why,
        )
