"""The API's send path beyond the basics (issue 15): suppressed recipients, per-key rates and
quotas with their RateLimit fields, REQUIRETLS, the Received line, the metrics; a real service
on loopback called with httpx."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx

from mailrelay.api import quota
from mailrelay.config import LimitsConfig
from mailrelay.store import suppressions, usage, webhooks
from mailrelay.store.queue import transaction
from mailrelay.submission.handler import SUPPRESSED
from tests.conftest import RelayFactory
from tests.test_api import TEXT_MESSAGE, Api, error, start_api
from tests.test_observability import key, scrape

BOUNCED = "550 5.1.1 user unknown"
NO_LIMITS = {"messages_per_minute": 0, "recipients_per_hour": 0, "recipients_per_day": 0}


def suppress(api: Api, address: str) -> suppressions.Suppression:
    conn = api.relay.db()
    try:
        with transaction(conn):
            return suppressions.add(conn, "example.org", address, time.time(), reason=BOUNCED)
    finally:
        conn.close()


def refused_events(api: Api) -> list[tuple[str, str, str]]:
    conn = api.relay.db()
    try:
        rows = conn.execute(
            "SELECT message_id, recipient, reply FROM events WHERE event = 'REFUSED' ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    return [(r[0], r[1], r[2]) for r in rows]


def queued(api: Api) -> list[tuple[str, str, int]]:
    """(message id, recipient, requiretls) of everything queued."""
    conn = api.relay.db()
    try:
        rows = conn.execute(
            "SELECT m.id, r.address, m.requiretls FROM messages m"
            " JOIN recipients r ON r.message_id = m.id ORDER BY m.created_at, r.rowid"
        ).fetchall()
    finally:
        conn.close()
    return [(r[0], r[1], r[2]) for r in rows]


def rate_fields(headers: httpx.Headers) -> dict[str, tuple[int, int]]:
    """RateLimit: '"name";r=1;t=30, ...' -> {name: (remaining, reset seconds)}."""
    found = re.findall(r'"([a-z-]+)";r=(\d+);t=(\d+)', headers["ratelimit"])
    return {name: (int(r), int(t)) for name, r, t in found}


# ---- suppression ---------------------------------------------------------------------------


async def test_a_suppressed_recipient_is_not_queued_and_named(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    api = await start_api(tmp_path, relay_factory)
    entry = suppress(api, "bob@example.net")
    message = {**TEXT_MESSAGE, "cc": ["carol@example.net"]}
    async with api.client() as client:
        got = await client.post("/v1/messages", json=message)
    assert got.status_code == 202, got.text
    queue_id = got.json()["id"]
    assert got.json()["recipients"] == [
        {
            "address": "bob@example.net",
            "state": "suppressed",
            "reason": f"suppressed for example.org since {entry.since} ({BOUNCED})",
        },
        {"address": "carol@example.net", "state": "queued"},
    ]
    assert queued(api) == [(queue_id, "carol@example.net", 0)]
    reply = SUPPRESSED.format(address="bob@example.net", why=entry.describe(), domain="example.org")
    assert refused_events(api) == [(queue_id, "bob@example.net", reply)]


async def test_every_recipient_suppressed_is_422(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    api = await start_api(tmp_path, relay_factory)
    entry = suppress(api, "bob@example.net")
    async with api.client() as client:
        got = await client.post("/v1/messages", json=TEXT_MESSAGE)
    assert (got.status_code, got.json()) == (
        422,
        error(
            "all_recipients_suppressed",
            f"every recipient is suppressed: bob@example.net: {entry.describe()}",
            "to",
        ),
    )
    assert queued(api) == []
    [(_, recipient, reply)] = refused_events(api)
    assert (recipient, reply.split(" ", 2)[:2]) == ("bob@example.net", ["550", "5.7.1"])
    samples = await scrape(api.relay)
    assert samples[key("mailrelay_api_refusals_total", code="all_recipients_suppressed")] == 1
    assert samples[key("mailrelay_api_requests_total", endpoint="/v1/messages", status="422")] == 1


async def test_a_suppressed_recipient_is_a_webhook_event_as_over_smtp(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    # Only the outbox row is looked at: its POST goes nowhere (no DNS answers in tests).
    api = await start_api(tmp_path, relay_factory, webhooks={"timeout": 1})
    conn = api.relay.db()
    try:
        with transaction(conn):
            webhooks.add_endpoint(
                conn, "example.org", "https://hooks.example.org/in", ["suppressed"], time.time()
            )
    finally:
        conn.close()
    entry = suppress(api, "bob@example.net")
    async with api.client() as client:
        got = await client.post("/v1/messages", json=TEXT_MESSAGE)
    assert got.status_code == 422
    conn = api.relay.db()
    try:
        [delivery] = webhooks.recent(conn, domain="example.org")
    finally:
        conn.close()
    assert delivery.event == "suppressed"
    data = json.loads(delivery.payload)["data"]
    assert (data["recipient"], data["reason"]) == ("bob@example.net", entry.describe())


async def test_with_suppression_off_a_suppressed_address_is_queued(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    api = await start_api(tmp_path, relay_factory, suppression={"enabled": False})
    suppress(api, "bob@example.net")
    async with api.client() as client:
        got = await client.post("/v1/messages", json=TEXT_MESSAGE)
    assert got.status_code == 202
    assert got.json()["recipients"] == [{"address": "bob@example.net", "state": "queued"}]


# ---- rates and quotas ----------------------------------------------------------------------


def test_limits_are_checked_and_advertised_per_window() -> None:
    limits = LimitsConfig(messages_per_minute=2, recipients_per_hour=5, recipients_per_day=0)
    now = 1_800_000_030.0  # 30 s into a minute and an hour
    used: usage.Usage = {
        "minute": usage.Window("minute", 1_800_000_000.0, 1, 4),
        "hour": usage.Window("hour", 1_800_000_000.0, 1, 4),
        "day": usage.Window("day", 1_799_971_200.0, 1, 4),
    }
    assert quota.headers(limits, used, now) == {
        "RateLimit-Policy": '"messages-minute";q=2;w=60, "recipients-hour";q=5;w=3600',
        "RateLimit": '"messages-minute";r=1;t=30, "recipients-hour";r=1;t=3570',
    }
    assert quota.over(limits, used, 1, 1, now) is None
    over = quota.over(limits, used, 2, 1, now)
    assert over is not None and (over.policy.setting, over.retry_after) == (
        "messages_per_minute",
        30,
    )
    over = quota.over(limits, used, 1, 2, now)
    assert over is not None and (over.policy.setting, over.retry_after) == (
        "recipients_per_hour",
        3570,
    )
    # A window that has ended is empty again.
    assert quota.over(limits, used, 2, 1, now + 60) is None
    assert quota.headers(LimitsConfig(**NO_LIMITS), used, now) == {}


async def test_over_a_quota_is_429_with_retry_after_and_counts_nothing(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    # The day's quota: a window that a test run does not cross (a UTC day).
    limits = {**NO_LIMITS, "recipients_per_day": 3}
    api = await start_api(tmp_path, relay_factory, limits=limits)
    two = {**TEXT_MESSAGE, "cc": ["carol@example.net"]}
    async with api.client() as client:
        first = await client.post("/v1/messages", json=two)
        assert first.status_code == 202
        assert first.headers["ratelimit-policy"] == '"recipients-day";q=3;w=86400'
        assert rate_fields(first.headers)["recipients-day"][0] == 1
        over = await client.post("/v1/messages", json=two)
        invalid = await client.post("/v1/messages", json={"to": ["bob@example.net"]})
        one = await client.post("/v1/messages", json=TEXT_MESSAGE)
        none_left = await client.post("/v1/messages", json=TEXT_MESSAGE)
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        unauthenticated = await anonymous.post("/v1/messages", json=TEXT_MESSAGE)
    assert over.status_code == 429
    retry_after = int(over.headers["retry-after"])
    assert over.json() == error(
        "rate_limited",
        f"this key may send 3 recipients a day ([limits] recipients_per_day);"
        f" try again in {retry_after} seconds",
    )
    assert rate_fields(over.headers) == {"recipients-day": (1, retry_after)}
    assert invalid.status_code == 422
    assert rate_fields(invalid.headers)["recipients-day"][0] == 1
    assert one.status_code == 202
    assert rate_fields(one.headers)["recipients-day"][0] == 0
    assert none_left.status_code == 429
    assert "ratelimit" not in unauthenticated.headers
    assert [r for _, r, _ in queued(api)] == [
        "bob@example.net",
        "carol@example.net",
        "bob@example.net",
    ]
    replies = [(r, reply.split(":")[0]) for _, r, reply in refused_events(api)]
    assert replies == [
        ("bob@example.net", "HTTP 429 rate_limited"),
        ("carol@example.net", "HTTP 429 rate_limited"),
        ("bob@example.net", "HTTP 429 rate_limited"),
    ]
    conn = api.relay.db()
    try:
        counted = usage.current(conn, f"apikey:{api.key_id}", time.time())
    finally:
        conn.close()
    assert (counted["day"].messages, counted["day"].recipients) == (2, 3)
    samples = await scrape(api.relay)
    assert samples[key("mailrelay_api_refusals_total", code="rate_limited")] == 2
    assert samples[key("mailrelay_api_requests_total", endpoint="/v1/messages", status="429")] == 2
    assert samples[key("mailrelay_api_requests_total", endpoint="/v1/messages", status="202")] == 2
    assert samples[key("mailrelay_api_requests_total", endpoint="/v1/messages", status="401")] == 1


# ---- REQUIRETLS, Received, Message-ID ------------------------------------------------------

RAW = b"From: alice@example.org\nTo: bob@example.net\nSubject: raw\n\nHello Bob.\n"


async def test_requiretls_and_the_received_line(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    api = await start_api(tmp_path, relay_factory)
    raw_headers = {"Content-Type": "message/rfc822"}
    async with api.client() as client:
        json_tls = await client.post("/v1/messages", json={**TEXT_MESSAGE, "requiretls": True})
        raw_tls = await client.post(
            "/v1/messages", params={"requiretls": "true"}, content=RAW, headers=raw_headers
        )
        raw_plain = await client.post("/v1/messages", content=RAW, headers=raw_headers)
    assert [a.status_code for a in (json_tls, raw_tls, raw_plain)] == [202, 202, 202]
    ids = [a.json()["id"] for a in (json_tls, raw_tls, raw_plain)]
    assert [(i, flag) for i, _, flag in queued(api)] == [(ids[0], 1), (ids[1], 1), (ids[2], 0)]
    conn = api.relay.db()
    try:
        data: bytes = conn.execute("SELECT data FROM messages WHERE id = ?", (ids[2],)).fetchone()[
            0
        ]
    finally:
        conn.close()
    received = data.split(b"\r\n")[0].decode()
    assert re.fullmatch(
        rf"Received: by relay\.test \(mailrelay\) with HTTP id {ids[2]}; .+", received
    )
    # A raw message's Message-ID is reported: here the one submission added.
    message_id = raw_plain.json()["message_id"]
    assert message_id is not None and message_id.startswith(f"<{ids[2]}.")
    assert f"Message-ID: {message_id}\r\n".encode() in data


async def test_a_raw_message_keeps_and_reports_its_own_message_id(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    api = await start_api(tmp_path, relay_factory)
    raw = b"Message-ID: <own.1@example.org>\n" + RAW
    async with api.client() as client:
        got = await client.post(
            "/v1/messages", content=raw, headers={"Content-Type": "message/rfc822"}
        )
    assert (got.status_code, got.json()["message_id"]) == (202, "<own.1@example.org>")


# ---- batch ---------------------------------------------------------------------------------


def batch_of(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"messages": list(messages)}


async def test_a_batch_answers_each_message_and_queues_the_good_ones(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    api = await start_api(tmp_path, relay_factory)
    entry = suppress(api, "mallory@example.net")
    batch = batch_of(
        TEXT_MESSAGE,
        {**TEXT_MESSAGE, "to": ["not an address"]},
        {**TEXT_MESSAGE, "from": "alice@other.example"},
        {**TEXT_MESSAGE, "to": ["mallory@example.net"]},
        {"to": ["bob@example.net"]},
        {**TEXT_MESSAGE, "to": ["carol@example.net", "mallory@example.net"]},
    )
    async with api.client() as client:
        got = await client.post("/v1/messages/batch", json=batch, headers={"Idempotency-Key": "b1"})
        again = await client.post(
            "/v1/messages/batch", json=batch, headers={"Idempotency-Key": "b1"}
        )
        other = await client.post(
            "/v1/messages/batch", json=batch_of(TEXT_MESSAGE), headers={"Idempotency-Key": "b1"}
        )
    assert got.status_code == 200, got.text
    results = got.json()["results"]
    first, last = results[0], results[5]
    assert results == [
        {
            "status": 202,
            "id": first["id"],
            "message_id": first["message_id"],
            "recipients": [{"address": "bob@example.net", "state": "queued"}],
            "attachments": [],
        },
        {"status": 422, **error("invalid_address", "not an address: 'not an address'", "to[0]")},
        {
            "status": 403,
            **error("sender_not_allowed", "this key sends for example.org only", "from"),
        },
        {
            "status": 422,
            **error(
                "all_recipients_suppressed",
                f"every recipient is suppressed: mallory@example.net: {entry.describe()}",
                "to",
            ),
        },
        {"status": 422, **error("invalid", "Field required", "from")},
        {
            "status": 202,
            "id": last["id"],
            "message_id": last["message_id"],
            "recipients": [
                {"address": "carol@example.net", "state": "queued"},
                {
                    "address": "mallory@example.net",
                    "state": "suppressed",
                    "reason": entry.describe(),
                },
            ],
            "attachments": [],
        },
    ]
    assert queued(api) == [
        (first["id"], "bob@example.net", 0),
        (last["id"], "carol@example.net", 0),
    ]
    assert [r for _, r, _ in refused_events(api)] == [
        "bob@example.net",  # the message from other.example
        "mallory@example.net",
        "mallory@example.net",
    ]
    assert (again.status_code, again.json()) == (200, got.json())
    assert again.headers["idempotent-replayed"] == "true"
    assert (other.status_code, other.json()["error"]["code"]) == (422, "idempotency_key_reused")
    assert len(queued(api)) == 2


async def test_a_batch_over_the_quota_queues_what_fits(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    api = await start_api(tmp_path, relay_factory, limits={**NO_LIMITS, "recipients_per_day": 2})
    async with api.client() as client:
        got = await client.post("/v1/messages/batch", json=batch_of(*[TEXT_MESSAGE] * 3))
        full = await client.post("/v1/messages/batch", json=batch_of(TEXT_MESSAGE))
    assert got.status_code == 200
    statuses = [r["status"] for r in got.json()["results"]]
    assert statuses == [202, 202, 429]
    assert got.json()["results"][2]["error"]["code"] == "rate_limited"
    assert rate_fields(got.headers)["recipients-day"][0] == 0
    assert full.status_code == 429
    assert full.headers["retry-after"] == str(rate_fields(full.headers)["recipients-day"][1])
    assert len(queued(api)) == 2


async def test_a_batch_must_be_1_to_1000_messages(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    api = await start_api(tmp_path, relay_factory)
    async with api.client() as client:
        too_many = await client.post("/v1/messages/batch", json=batch_of(*[TEXT_MESSAGE] * 1001))
        empty = await client.post("/v1/messages/batch", json=batch_of())
        not_a_batch = await client.post("/v1/messages/batch", json=[TEXT_MESSAGE])
        raw = await client.post(
            "/v1/messages/batch", content=RAW, headers={"Content-Type": "message/rfc822"}
        )
    assert (too_many.status_code, too_many.json()) == (
        422,
        error("too_many_messages", "at most 1000 messages in a batch", "messages"),
    )
    assert (empty.status_code, empty.json()) == (
        422,
        error("invalid", "give at least one message", "messages"),
    )
    assert (not_a_batch.status_code, not_a_batch.json()) == (
        422,
        error("invalid", 'the body is {"messages": [...]}', "messages"),
    )
    assert (raw.status_code, raw.json()["error"]["code"]) == (415, "unsupported_media_type")
    assert queued(api) == []
