"""What an operator sees of the relay's health: /metrics scraped over HTTP and parsed as
Prometheus does, and the dashboard built on those metrics."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Relay, RelayFactory
from tests.test_delivery import settled, start_relay, submit
from tests.test_submission import AUTH_FAILED
from tests.world import MODERN, TLS10_ONLY, World

DASHBOARD = Path(__file__).parent.parent / "config" / "grafana-dashboard.json"
MODERN_TLS = {
    "protocol": "TLSv1.3",
    "cipher": "TLS_AES_256_GCM_SHA384",
    "trust": "verified",
    "policy": "encrypt",
}

Sample = tuple[str, tuple[tuple[str, str], ...]]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path / "world") as w:
        await w.add_mx("example.org", MODERN)  # the sender's domain: bounces go here
        yield w


# ---- scraping ----------------------------------------------------------------------------------


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 -- loopback http only
        assert response.status == 200
        return str(response.read().decode())


async def scrape(relay: Relay) -> dict[Sample, float]:
    """Every sample of one real scrape, keyed by sample name and labels."""
    port = relay.service.metrics_server.port
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def key(name: str, **labels: str) -> Sample:
    return (name, tuple(sorted(labels.items())))


AGE = key("mailrelay_queue_oldest_age_seconds")


def delta(before: dict[Sample, float], after: dict[Sample, float]) -> dict[Sample, float]:
    """What moved, leaving out the queue's age (a clock, not a count)."""
    moved = {}
    for k in before.keys() | after.keys():
        if k == AGE:
            continue
        change = after.get(k, 0.0) - before.get(k, 0.0)
        if change:
            moved[k] = round(change, 6)
    return moved


def delay_samples(scraped: dict[Sample, float], delays: list[float]) -> dict[Sample, float]:
    """The histogram's expected change for these observed delays, in the buckets it exports."""
    name = "mailrelay_smtp_delivery_delay_seconds"
    moved: dict[Sample, float] = {key(f"{name}_count"): len(delays)}
    if sum(delays):
        moved[key(f"{name}_sum")] = round(sum(delays), 6)
    for sample_name, labels in scraped:
        if sample_name == f"{name}_bucket":
            n = sum(1 for d in delays if d <= float(dict(labels)["le"]))
            if n:
                moved[(sample_name, labels)] = n
    return moved


def delivered_delays(relay: Relay, after_event: int) -> list[float]:
    """Acceptance to delivery for each recipient delivered since event id `after_event`: the
    same two times the scheduler subtracts for the histogram."""
    conn = relay.db()
    rows = conn.execute(
        "SELECT e.at - m.created_at FROM events e JOIN messages m ON m.id = e.message_id"
        " WHERE e.event = 'DELIVERED' AND e.id > ? ORDER BY e.id",
        (after_event,),
    ).fetchall()
    conn.close()
    return [max(0.0, float(r[0])) for r in rows]


def last_event_id(relay: Relay) -> int:
    conn = relay.db()
    (n,) = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()
    conn.close()
    return int(n)


async def moved_by(
    relay: Relay, before: dict[Sample, float], expected: dict[Sample, float]
) -> dict[Sample, float]:
    """Poll until the metrics moved by exactly `expected` (workers go idle a moment after the
    database says done); fail with the last difference seen."""
    deadline = time.monotonic() + 10
    while True:
        after = await scrape(relay)
        if delta(before, after) == expected:
            return after
        assert time.monotonic() < deadline, delta(before, after)
        await asyncio.sleep(0.05)


def queue_depth(**states: int) -> dict[Sample, float]:
    return {key("mailrelay_queue_recipients", state=s): n for s, n in states.items() if n}


# ---- metrics -----------------------------------------------------------------------------------


async def test_each_counter_moves_by_exactly_what_happened(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    await world.add_mx("tls13.example", MODERN)
    weak = await world.add_mx("tls10.example", TLS10_ONLY)
    await world.add_mx("r451.example", dataclasses.replace(MODERN, rcpt_reply="451 4.3.0 Later"))
    world.dns.servfail("servfail.example")
    relay = await start_relay(tmp_path, relay_factory, world)
    home = world.servers[0]
    first = await scrape(relay)
    assert first[key("mailrelay_delivery_workers")] == relay.config.delivery.workers
    assert first[key("mailrelay_delivery_workers_busy")] == 0
    assert first[AGE] == 0

    # One delivered message.
    before, mark = first, last_event_id(relay)
    queue_id = await asyncio.to_thread(submit, relay, ["bob@tls13.example"])
    await settled(relay, queue_id, lambda r: r["state"] == "sent")
    before = await moved_by(
        relay,
        before,
        {
            key("mailrelay_smtpd_messages_processed_total"): 1,
            key("mailrelay_smtp_messages_processed_total", status="sent"): 1,
            key("mailrelay_smtp_tls_connections_total", **MODERN_TLS): 1,
            **delay_samples(before, delivered_delays(relay, mark)),
        },
    )

    # One insecure refusal: the recipient bounces, and the bounce (to the sender and the
    # domain's notification address) is itself delivered to the sender's MX over TLS 1.3.
    mark = last_event_id(relay)
    queue_id = await asyncio.to_thread(submit, relay, ["bob@tls10.example"])
    await settled(relay, queue_id, lambda r: r["state"] == "bounced")
    await home.wait_for_messages(1)
    assert weak.all_messages == []
    before = await moved_by(
        relay,
        before,
        {
            key("mailrelay_smtpd_messages_processed_total"): 1,
            key("mailrelay_smtp_insecure_refusals_total", reason="protocol"): 1,
            key("mailrelay_smtp_messages_processed_total", status="bounced"): 1,
            key("mailrelay_smtp_messages_processed_total", status="sent"): 2,
            key("mailrelay_smtp_tls_connections_total", **MODERN_TLS): 1,
            **delay_samples(before, delivered_delays(relay, mark)),
        },
    )

    # One authentication failure (one AUTH command: smtplib's login() would try two mechanisms).
    assert await asyncio.to_thread(wrong_password, relay) == AUTH_FAILED
    before = await moved_by(
        relay, before, {key("mailrelay_smtpd_sasl_authentication_failures_total"): 1}
    )

    # One deferral: the MX answers RCPT with 451. It stays in the queue, so the queue shows it.
    queue_id = await asyncio.to_thread(submit, relay, ["bob@r451.example"])
    await settled(relay, queue_id, lambda r: r["state"] == "deferred")
    before = await moved_by(
        relay,
        before,
        {
            key("mailrelay_smtpd_messages_processed_total"): 1,
            key("mailrelay_smtp_tls_connections_total", **MODERN_TLS): 1,
            key("mailrelay_smtp_messages_processed_total", status="deferred"): 1,
            **queue_depth(deferred=1),
        },
    )
    assert 0 < before[AGE] < 30

    # One DNS failure (SERVFAIL): deferred as well.
    queue_id = await asyncio.to_thread(submit, relay, ["bob@servfail.example"])
    await settled(relay, queue_id, lambda r: r["state"] == "deferred")
    before = await moved_by(
        relay,
        before,
        {
            key("mailrelay_smtpd_messages_processed_total"): 1,
            key("mailrelay_dns_lookup_failures_total"): 1,
            key("mailrelay_smtp_messages_processed_total", status="deferred"): 1,
            **queue_depth(deferred=1),
        },
    )

    # One refused recipient at submission, counted by its reply code.
    def bad_rcpt() -> tuple[int, bytes]:
        client = relay.session()
        try:
            client.mail("alice@example.org")
            return client.rcpt("not an address")
        finally:
            client.quit()

    assert (await asyncio.to_thread(bad_rcpt))[0] == 501
    after = await moved_by(
        relay, before, {key("mailrelay_smtpd_messages_rejected_total", code="501"): 1}
    )
    # No label ever holds an address.
    assert not [k for k in after if any("@" in v for _, v in k[1])]


def wrong_password(relay: Relay) -> tuple[int, bytes]:
    client = relay.smtp()
    try:
        client.starttls(context=relay.client_context())
        client.ehlo()
        plain = base64.b64encode(b"\0alice@example.org\0not the password").decode()
        return client.docmd("AUTH", "PLAIN " + plain)
    finally:
        client.quit()


# ---- the dashboard -----------------------------------------------------------------------------

_METRIC = re.compile(r"\bmailrelay_[a-z_]+")


def dashboard_metrics(dashboard: dict[str, Any]) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert exprs
    return {m for e in exprs for m in _METRIC.findall(e)}


def exported_names(text: str) -> dict[str, set[str]]:
    """Each metric family with the series names a query may use for it (no `_created`: it is
    not exported)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    return {
        f.name: {f.name + s for s in suffixes[f.type]} for f in text_string_to_metric_families(text)
    }


async def test_dashboard_uses_every_metric_and_only_real_ones(relay: Relay) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
            assert panel["targets"], panel["title"]
    port = relay.service.metrics_server.port
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    exported = exported_names(text)
    used = dashboard_metrics(dashboard)
    assert used <= set().union(*exported.values()), used - set().union(*exported.values())
    unused = {family for family, names in exported.items() if not names & used}
    assert unused == set()
