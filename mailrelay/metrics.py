"""Every Prometheus metric mailrelay exports, declared in one place, and the /metrics listener.

Names follow postfix_exporter's so that existing dashboards carry over. No label ever holds an
address, a subject or any other per-message value: labels are bounded sets (codes, states,
reasons, protocol and cipher names).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from mailrelay.config import ListenAddress

log = logging.getLogger("mailrelay.metrics")

# A counter's `_created` series doubles every series for a value no dashboard reads.
# prometheus-client has no per-registry switch for it, only this process-wide one; the delivery
# process imports this module too, so its snapshots (`delivery_text`) carry none either.
disable_created_metrics()  # type: ignore[no-untyped-call]

# The bounded label values known in advance, exported at 0 from the start so that `rate()` and
# `increase()` see the first event (a series that appears at 1 looks to Prometheus like no
# change). They mirror the code that counts them: replies.py, ConnectionCounts and the user
# limits, delivery.result.Insecure, and the DANE and MTA-STS policy failures.
REJECTED_CODES = ("452", "500", "501", "550", "552", "553", "554")
LIMITS = (
    "connections",
    "connections_per_ip",
    "unauthenticated_per_ip",
    "pre_auth_timeout",
    "messages_per_minute",
    "recipients_per_hour",
    "recipients_per_day",
    "auth_backoff",
)
DELIVERY_STATUSES = ("sent", "deferred", "bounced")
WEBHOOK_RESULTS = ("sent", "failed", "retried")  # mailrelay.webhooks.dispatcher
INSECURE_REASONS = (
    "no_starttls",
    "starttls_refused",
    "certificate",
    "handshake",
    "protocol",
    "cipher",
    "dane",
    "dane_required",
    "mta_sts",
    "requiretls",
)
POLICY_FAILURES = (
    ("dane", "certificate_mismatch"),
    ("dane", "tlsa_lookup"),
    ("dane", "dane_required"),
    ("mta-sts", "certificate"),
    ("mta-sts", "mx_mismatch"),
    ("mta-sts", "sts-policy-fetch-error"),
    ("mta-sts", "sts-policy-invalid"),
    ("mta-sts", "sts-webpki-invalid"),
)
TLSRPT_METHODS = ("mailto", "https")
TLSRPT_RESULTS = ("sent", "failed")
# The send endpoints' usual answers, and the reasons they refuse a message (mailrelay/api).
_SEND_ANSWERS = ("202", "400", "401", "403", "413", "422", "429", "503")
API_ANSWERS = {
    "/v1/messages": _SEND_ANSWERS,
    "/v1/messages/batch": ("200", "400", "401", "403", "413", "422", "429", "503"),
    "/v1/messages/{message_id}": ("200", "401", "404"),
}
API_REFUSALS = (
    "rate_limited",
    "all_recipients_suppressed",
    "sender_not_allowed",
    "domain_not_verified",
    "too_large",
    "too_many_recipients",
    "invalid_message",
)


def _version() -> str:
    try:
        return importlib.metadata.version("mailrelay")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_DELAY_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 5 * 86400)


class Metrics:
    """One set of metrics per service instance (its own registry, so tests can run several)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # ---- submission (postfix_exporter: smtpd) ----
        self.smtpd_messages_processed = Counter(
            "mailrelay_smtpd_messages_processed",
            "Messages accepted by the submission server and committed to the queue.",
            registry=r,
        )
        self.smtpd_messages_rejected = Counter(
            "mailrelay_smtpd_messages_rejected",
            "Commands refused by the submission server, by reply code.",
            ["code"],
            registry=r,
        )
        self.smtpd_limit_refusals = Counter(
            "mailrelay_smtpd_limit_refusals",
            "Connections and commands refused by a [limits] setting, by limit: connections,"
            " connections_per_ip, unauthenticated_per_ip, pre_auth_timeout, messages_per_minute,"
            " recipients_per_hour, recipients_per_day, auth_backoff.",
            ["limit"],
            registry=r,
        )
        self.smtpd_sasl_authentication_failures = Counter(
            "mailrelay_smtpd_sasl_authentication_failures",
            "Failed SMTP AUTH attempts.",
            registry=r,
        )
        # ---- delivery (postfix_exporter: smtp) ----
        self.smtp_messages_processed = Counter(
            "mailrelay_smtp_messages_processed",
            "Delivery outcomes, one per recipient and attempt.",
            ["status"],
            registry=r,
        )
        self.smtp_tls_connections = Counter(
            "mailrelay_smtp_tls_connections",
            "Outbound TLS sessions established, by protocol, cipher, certificate trust and the"
            " policy that accepted them (encrypt, verify, mta-sts, dane-ee, dane-ta).",
            ["protocol", "cipher", "trust", "policy"],
            registry=r,
        )
        self.smtp_tls_policy_failures = Counter(
            "mailrelay_smtp_tls_policy_failures",
            "Failures of a policy the recipient publishes (policy: dane, mta-sts), by reason:"
            " a refused MX or certificate, a failed TLSA lookup, a failed policy fetch.",
            ["policy", "reason"],
            registry=r,
        )
        self.smtp_insecure_refusals = Counter(
            "mailrelay_smtp_insecure_refusals",
            "MX hosts refused because their transport security was below policy, by reason.",
            ["reason"],
            registry=r,
        )
        self.smtp_delivery_delay = Histogram(
            "mailrelay_smtp_delivery_delay_seconds",
            "Time from acceptance to delivery, per delivered recipient.",
            buckets=_DELAY_BUCKETS,
            registry=r,
        )
        self.dns_lookup_failures = Counter(
            "mailrelay_dns_lookup_failures",
            "MX lookups that failed temporarily (SERVFAIL, timeout).",
            registry=r,
        )
        self.delivery_workers_busy = Gauge(
            "mailrelay_delivery_workers_busy",
            "Delivery workers currently working on a message.",
            registry=r,
        )
        self.delivery_workers = Gauge(
            "mailrelay_delivery_workers", "Size of the delivery worker pool.", registry=r
        )
        self.tlsrpt_reports = Counter(
            "mailrelay_tlsrpt_reports",
            "TLS-RPT (RFC 8460) reports that reached their end, one per report and rua URI, by"
            " method (mailto, https) and result: sent (POSTed, or mailed and delivered) or"
            " failed (given up on).",
            ["method", "result"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "mailrelay_webhook_deliveries",
            "Webhook POSTs by result: sent (answered 2xx), retried (will be tried again) or"
            " failed (given up on, 24 hours after the event).",
            ["result"],
            registry=r,
        )
        # ---- the HTTP API (issue 15) ----
        self.api_requests = Counter(
            "mailrelay_api_requests",
            'HTTP API answers, by endpoint (the route\'s path template, or "other") and status.',
            ["endpoint", "status"],
            registry=r,
        )
        self.api_refusals = Counter(
            "mailrelay_api_refusals",
            "Messages the API's send endpoints refused (one per message, a batch's items each),"
            " by error code: rate_limited, all_recipients_suppressed, sender_not_allowed, ...",
            ["code"],
            registry=r,
        )
        self.tls_certificate_expiry = Gauge(
            "mailrelay_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the submission certificate loaded now (at start, and by each SIGHUP).",
            registry=r,
        )
        self.build_info = Gauge(
            "mailrelay_build_info", "Always 1; the version running.", ["version"], registry=r
        )
        self.build_info.labels(version=_version()).set(1)
        # Not "instance": Prometheus sets that label to the scrape target and would rename ours.
        self.instance_info = Gauge(
            "mailrelay_instance_info",
            "Always 1; instance_id is this relay's [instance] id, which its claims carry in the"
            " shared queue (`queue list`).",
            ["instance_id"],
            registry=r,
        )
        for code in REJECTED_CODES:
            self.smtpd_messages_rejected.labels(code=code)
        for limit in LIMITS:
            self.smtpd_limit_refusals.labels(limit=limit)
        for endpoint, statuses in API_ANSWERS.items():
            for status in statuses:
                self.api_requests.labels(endpoint=endpoint, status=status)
        for code in API_REFUSALS:
            self.api_refusals.labels(code=code)
        for status in DELIVERY_STATUSES:
            self.smtp_messages_processed.labels(status=status)
        for reason in INSECURE_REASONS:
            self.smtp_insecure_refusals.labels(reason=reason)
        for policy, reason in POLICY_FAILURES:
            self.smtp_tls_policy_failures.labels(policy=policy, reason=reason)
        for method in TLSRPT_METHODS:
            for result in TLSRPT_RESULTS:
                self.tlsrpt_reports.labels(method=method, result=result)
        for result in WEBHOOK_RESULTS:
            self.webhook_deliveries.labels(result=result)
        # What the delivery side counts; with delivery in its own process, the child keeps
        # these and the parent serves the child's latest snapshot in their place.
        self._delivery: tuple[Collector, ...] = (
            self.smtp_messages_processed,
            self.smtp_tls_connections,
            self.smtp_tls_policy_failures,
            self.smtp_insecure_refusals,
            self.smtp_delivery_delay,
            self.dns_lookup_failures,
            self.delivery_workers_busy,
            self.delivery_workers,
            self.tlsrpt_reports,  # the report task runs beside the queue runner
            self.webhook_deliveries,  # and so does the webhook dispatcher
        )
        self._adopted: _Adopted | None = None

    def set_instance(self, instance_id: str) -> None:
        self.instance_info.clear()
        self.instance_info.labels(instance_id=instance_id).set(1)

    def delivery_text(self) -> str:
        """The delivery metrics in the text exposition format (the child's snapshot)."""
        return generate_latest(_Together(self._delivery)).decode()

    def take_delivery_metrics_from(self, text: str | None) -> None:
        """Serve delivery metrics from another process's snapshots (`delivery_text`) instead
        of this process's own; None switches over before the first snapshot arrives."""
        if self._adopted is None:
            for collector in self._delivery:
                self.registry.unregister(collector)
            self._adopted = _Adopted()
            self.registry.register(self._adopted)
        if text is not None:
            self._adopted.update(text)

    def add_queue_collector(
        self, snapshot: Callable[[], tuple[dict[str, int], float | None] | None]
    ) -> None:
        """Queue depth and age are read at scrape time from a snapshot; None (the database
        could not be read) leaves both out of that scrape."""
        self.registry.register(_QueueCollector(snapshot))


class _Together:
    """Several collectors seen as one, for `generate_latest`."""

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self._collectors = tuple(collectors)

    def collect(self) -> Iterable[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


class _Adopted(Collector):
    """The latest metric snapshot of another process, re-exported as it came."""

    def __init__(self) -> None:
        self._families: list[Metric] = []
        self._lock = threading.Lock()  # scrapes run on the HTTP server's thread

    def update(self, text: str) -> None:
        families = list(text_string_to_metric_families(text))
        with self._lock:
            self._families = families

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            return list(self._families)


class _QueueCollector(Collector):
    def __init__(self, snapshot: Callable[[], tuple[dict[str, int], float | None] | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> list[GaugeMetricFamily]:
        snapshot = self._snapshot()
        if snapshot is None:
            return []
        counts, oldest_age = snapshot
        depth = GaugeMetricFamily(
            "mailrelay_queue_recipients", "Recipients in the queue, by state.", labels=["state"]
        )
        for state, n in sorted(counts.items()):
            depth.add_metric([state], n)
        age = GaugeMetricFamily(
            "mailrelay_queue_oldest_age_seconds",
            "Age of the oldest recipient not yet delivered or bounced.",
            value=oldest_age or 0.0,
        )
        return [depth, age]


class MetricsServer:
    """Serves /metrics over HTTP on its own thread (prometheus-client's own server)."""

    def __init__(self, metrics: Metrics, listen: ListenAddress | None) -> None:
        self.metrics = metrics
        self.listen = listen
        self._server: WSGIServer | None = None

    async def start(self) -> None:
        if self.listen is None:
            return
        server, _thread = await asyncio.to_thread(
            start_http_server, self.listen.port, self.listen.host, self.metrics.registry
        )
        self._server = server
        log.info("event=listening address=%s service=metrics", self.listen)

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_address[1])

    async def stop(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(self._server.shutdown)
            self._server.server_close()
            self._server = None
