"""Composition root: builds every part from the config, starts them in dependency order, stops
them in reverse, and speaks to systemd (sd_notify) and to signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sqlite3
import threading
import time
from typing import TYPE_CHECKING

from mailrelay import dkim, signing
from mailrelay.api.app import ApiServer
from mailrelay.api.context import ApiContext
from mailrelay.config import Config
from mailrelay.delivery.courier import SmtpCourier
from mailrelay.delivery.mta_sts import StoreStsCache
from mailrelay.delivery.pool import SessionPool
from mailrelay.delivery.process import DeliveryProcess
from mailrelay.delivery.published import transport_policy
from mailrelay.delivery.runner import QueueRunner
from mailrelay.instance import InstanceLock
from mailrelay.metrics import Metrics, MetricsServer
from mailrelay.store import Store, accounts, claims, connect, queue
from mailrelay.store.backend import Connection, is_lost, is_url
from mailrelay.submission.auth import PasswordChecker
from mailrelay.submission.handler import Accepted, SubmissionHandler
from mailrelay.submission.server import SubmissionServer
from mailrelay.submission.tls import ensure_self_signed
from mailrelay.tlsrpt.reporter import Reporter
from mailrelay.webhooks.dispatcher import Dispatcher

if TYPE_CHECKING:
    from mailrelay.store.listen import QueueListener

log = logging.getLogger("mailrelay.service")


class Service:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.metrics.set_instance(config.instance.id)
        # On PostgreSQL the lock still sits beside storage.path: one service per storage.path
        # (per machine, as a rule); several machines share the database, each with its own
        # [instance] id (store/claims.py).
        self.lock = InstanceLock(config.storage.path)
        self.store = Store(config.storage.database, on_failure=self._store_failed)
        self.failed = asyncio.Event()  # the store broke for good: `serve` exits non-zero
        self.queue_changed = asyncio.Event()
        if config.storage.url:
            # The DKIM keys in the shared store are sealed with it (`check-config` has checked
            # it unseals them); read once, for every signer in this process.
            key_file = config.dkim.master_key_file
            dkim.use_master_key(dkim.read_master_key(key_file) if key_file else None)
        sub = config.submission
        if sub.self_signed_if_missing and ensure_self_signed(
            sub.cert_file, sub.key_file, config.hostname
        ):
            log.warning("event=self_signed_certificate cert_file=%s", sub.cert_file)
        handler = SubmissionHandler(
            sub,
            config.hostname,
            self.store,
            signer=signing.Signer(self.store).sign,
            authentication_results_for=lambda user: signing.authentication_results(
                config.hostname, user
            ),
            on_queued=self.queue_changed.set,
            on_accepted=self._accepted,
            on_rejected=self._rejected,
            limits=config.limits,
            on_limit=lambda limit: self.metrics.smtpd_limit_refusals.labels(limit=limit).inc(),
            suppression=config.suppression.enabled,
            webhooks=config.webhooks.enabled,
        )
        checker = PasswordChecker(
            lambda login: self.store.read(lambda c: accounts.password_hash(c, login))
        )
        self.submission = SubmissionServer(
            config,
            handler,
            checker,
            on_auth_failure=self.metrics.smtpd_sasl_authentication_failures.inc,
            on_limit=lambda limit: self.metrics.smtpd_limit_refusals.labels(limit=limit).inc(),
        )
        self.delivery: InlineDelivery | DeliveryProcess | None = None
        if config.delivery.hold:
            pass
        elif config.delivery.separate_process:
            self.delivery = DeliveryProcess(config, self.metrics, self.queue_changed)
        else:
            self.delivery = InlineDelivery(config, self.store, self.metrics, self.queue_changed)
        # On PostgreSQL, mail queued by any instance wakes this one's delivery (LISTEN/NOTIFY).
        self.listener: QueueListener | None = None
        if self.delivery is not None and is_url(config.storage.database):
            from mailrelay.store.listen import QueueListener  # psycopg: PostgreSQL only

            self.listener = QueueListener(config.storage.database, self.queue_changed.set)
        self.metrics.tls_certificate_expiry.set(self.submission.tls.not_after)
        self.metrics_server = MetricsServer(self.metrics, config.metrics.listen)
        # The HTTP API (`[api] listen`; "" turns it off) shares submission's checks and signer.
        self.api: ApiServer | None = None
        if config.api.listen is not None:
            self.api = ApiServer(
                ApiContext(
                    config,
                    self.store,
                    handler.acceptor,
                    self.queue_changed.set,
                    metrics=self.metrics,
                )
            )
        self._snapshot_conn: Connection | None = None
        self._snapshot_lock = threading.Lock()
        self._stopped = False
        self.metrics.add_queue_collector(self._queue_snapshot)

    def _accepted(self, accepted: Accepted) -> None:
        self.metrics.smtpd_messages_processed.inc()

    def _rejected(self, code: str) -> None:
        self.metrics.smtpd_messages_rejected.labels(code=code).inc()

    def _queue_snapshot(self) -> tuple[dict[str, int], float | None] | None:
        with self._snapshot_lock:
            for attempt in (1, 2):
                if self._snapshot_conn is None:
                    return {}, None
                try:
                    if is_lost(self._snapshot_conn):
                        self._snapshot_conn.close()
                        self._snapshot_conn = connect(self.config.storage.database)
                    counts = queue.state_counts(self._snapshot_conn)
                    oldest = queue.oldest_pending(self._snapshot_conn)
                    break
                except sqlite3.Error as exc:
                    # A PostgreSQL connection is found lost by using it: once more on a new one.
                    if attempt == 1 and is_lost(self._snapshot_conn):
                        continue
                    # The scrape still answers, without the queue's gauges: an absent series
                    # says "unknown" where a zero would say "empty".
                    log.error("event=queue_snapshot_failed error=%r", str(exc))
                    return None
        return counts, None if oldest is None else max(0.0, time.time() - oldest)

    def reload_tls(self) -> None:
        """SIGHUP: the submission certificate and key again (certbot renewals)."""
        not_after = self.submission.reload_tls()
        if not_after is not None:
            self.metrics.tls_certificate_expiry.set(not_after)

    def _store_failed(self, error: BaseException) -> None:
        self.failed.set()

    async def start(self) -> None:
        """Start every part in dependency order. A start that fails half way (a port in use,
        say) stops what it had started, releases the lock, and raises."""
        self.lock.acquire()  # AlreadyRunning: another service has this database
        try:
            await self.store.start()
            self._snapshot_conn = connect(self.config.storage.database)
            await self.metrics_server.start()
            if self.delivery is None:
                log.warning("event=delivery_held (delivery.hold = true: mail is queued, not sent)")
            else:
                if self.listener is not None:
                    await self.listener.start()
                await self.delivery.start()
            await self.submission.start()
            if self.api is not None:
                await self.api.start()
        except BaseException:
            await self.stop(announce=False)
            raise
        sd_notify("READY=1\nSTATUS=accepting mail")
        log.info("event=started hostname=%s", self.config.hostname)

    async def stop(self, *, announce: bool = True) -> None:
        if self._stopped:
            return
        self._stopped = True
        if announce:
            sd_notify("STOPPING=1")
            log.info("event=stopping")
        if self.api is not None:
            await self.api.stop()
        await self.submission.stop()
        if self.delivery is not None:
            await self.delivery.stop()
        if self.listener is not None:
            await self.listener.stop()
        await self.metrics_server.stop()
        await self.store.stop()
        with self._snapshot_lock:
            if self._snapshot_conn is not None:
                self._snapshot_conn.close()
                self._snapshot_conn = None
        self.lock.release()
        if announce:
            log.info("event=stopped")


class InlineDelivery:
    """Delivery inside the service's own process (`[delivery] separate_process = false`)."""

    def __init__(self, config: Config, store: Store, metrics: Metrics, wake: asyncio.Event) -> None:
        self.store = store
        self.pool = SessionPool(config, metrics)
        policy = transport_policy(config, StoreStsCache(store), metrics)
        courier = SmtpCourier(policy, self.pool, metrics)
        self.runner = QueueRunner(config, store, courier, metrics, wake)
        self.reporter = Reporter(config, store, metrics, wake)  # TLS-RPT, beside the runner
        self.webhooks = Dispatcher(config, store, metrics) if config.webhooks.enabled else None

    async def start(self) -> None:
        # Whatever this instance (its [instance] id) still holds was being delivered when it
        # stopped; other instances' claims are theirs, or run out (claims.recover_expired).
        instance = self.runner.config.instance.id
        released = await self.store.write(
            lambda c: claims.release_interrupted(c, time.time(), instance)
        )
        if released:
            log.info("event=recovered recipients=%d", released)
        await self.pool.start()
        await self.runner.start()
        await self.reporter.start()
        if self.webhooks is not None:
            await self.webhooks.start()

    async def stop(self) -> None:
        if self.webhooks is not None:
            await self.webhooks.stop()
        await self.reporter.stop()
        await self.runner.stop()
        await self.pool.stop()


class ServiceFailed(Exception):
    """The service stopped because a part of it broke; the message says which."""


async def serve(config: Config, on_started: object = None) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully; raise ServiceFailed if the store
    broke for good (systemd's Restart=on-failure then starts a fresh process). SIGHUP reloads
    the submission certificate and key."""
    service = Service(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload_tls)
    await service.start()
    if callable(on_started):
        on_started(service)
    try:
        stopped, failed = (
            asyncio.create_task(stop.wait()),
            asyncio.create_task(service.failed.wait()),
        )
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
    finally:
        await service.stop()
    if service.failed.is_set():
        raise ServiceFailed(f"the store failed: {service.store.failure!r}")


def sd_notify(state: str) -> None:
    """Tell systemd about our state (Type=notify); a no-op when not started by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("event=sd_notify_failed error=%r", str(exc))
