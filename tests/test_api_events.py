"""GET /v1/events (issue 15) over real HTTP: the delivery log of the key's domains, paged."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from mailrelay.store import apikeys, queue
from mailrelay.store.queue import transaction
from tests.conftest import RelayFactory
from tests.test_api import Api, error, start_api


@pytest.fixture
async def api(tmp_path: Path, relay_factory: RelayFactory) -> Api:
    return await start_api(tmp_path, relay_factory)


def enqueue(api: Api, sender: str, recipients: tuple[str, ...]) -> str:
    """A message queued as submission queues it: its QUEUED events go into the log."""
    conn = api.relay.db()
    try:
        with transaction(conn):
            return queue.enqueue(
                conn,
                queue.NewMessage(
                    sender=sender,
                    recipients=recipients,
                    data=b"Subject: x\r\n\r\nx\r\n",
                    auth_user=sender,
                    client_ip="127.0.0.1",
                    sender_domain=sender.rpartition("@")[2],
                ),
                time.time(),
            )
    finally:
        conn.close()


def seen(page: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(e["queue_id"], e["recipient"], e["event"]) for e in page["events"]]


async def test_events_of_the_keys_domain_page_newest_first_with_a_cursor(api: Api) -> None:
    first = enqueue(api, "alice@example.org", ("bob@example.net", "carol@example.com"))
    other = enqueue(api, "zed@other.example", ("bob@example.net",))
    second = enqueue(api, "alice@example.org", ("dave@example.net",))
    async with api.client() as client:
        one = await client.get("/v1/events", params={"limit": 2})
        assert one.status_code == 200, one.text
        assert seen(one.json()) == [
            (second, "dave@example.net", "QUEUED"),
            (first, "carol@example.com", "QUEUED"),
        ]
        cursor = one.json()["next_cursor"]
        assert isinstance(cursor, str)
        two = await client.get("/v1/events", params={"limit": 2, "cursor": cursor})
        assert two.status_code == 200
        assert seen(two.json()) == [(first, "bob@example.net", "QUEUED")]
        assert two.json()["next_cursor"] is None
        # `domain` is the recipient's, as for `mailrelay log --domain`.
        by_domain = await client.get(
            "/v1/events", params={"domain": "Example.NET", "status": "queued", "since": "1h"}
        )
        assert seen(by_domain.json()) == [
            (second, "dave@example.net", "QUEUED"),
            (first, "bob@example.net", "QUEUED"),
        ]
        delivered = await client.get("/v1/events", params={"status": "delivered"})
        assert delivered.json() == {"events": [], "next_cursor": None}
    [event] = [e for e in one.json()["events"] if e["recipient"] == "dave@example.net"]
    assert event == {
        "at": event["at"],
        "queue_id": second,
        "recipient": "dave@example.net",
        "domain": "example.net",
        "event": "QUEUED",
        "mx": None,
        "reply": None,
        "tls_protocol": None,
        "tls_cipher": None,
        "policy": None,
        "policy_detail": None,
    }
    assert other not in {e["queue_id"] for e in one.json()["events"] + two.json()["events"]}


async def test_a_key_of_two_domains_sees_both(api: Api) -> None:
    mine = enqueue(api, "alice@example.org", ("bob@example.net",))
    theirs = enqueue(api, "zed@other.example", ("bob@example.net",))
    conn = api.relay.db()
    with transaction(conn):
        _, token = apikeys.add(conn, ["other.example", "example.org"], "read", time.time())
    conn.close()
    async with api.client(token) as client:
        got = await client.get("/v1/events")
    assert seen(got.json()) == [
        (theirs, "bob@example.net", "QUEUED"),
        (mine, "bob@example.net", "QUEUED"),
    ]


async def test_a_deleted_message_leaves_the_keys_log(api: Api) -> None:
    gone = enqueue(api, "alice@example.org", ("bob@example.net",))
    async with api.client() as client:
        deleted = await client.delete(f"/v1/messages/{gone}")
        assert deleted.status_code == 204
        got = await client.get("/v1/events")
    assert got.json() == {"events": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"status": "lost"},
            error(
                "invalid",
                "unknown status 'lost'; one of: QUEUED, REFUSED, DELIVERED, SOFT-BOUNCE,"
                " HARD-BOUNCE",
                "status",
            ),
        ),
        (
            {"since": "yesterday"},
            error(
                "invalid",
                "'yesterday' is neither an ISO 8601 time nor a duration like 1h or 2d",
                "since",
            ),
        ),
        (
            {"cursor": "abc"},
            error("invalid", "not a cursor from this command: 'abc'", "cursor"),
        ),
        (
            {"limit": "0"},
            error("invalid", "Input should be greater than or equal to 1", "limit"),
        ),
        (
            {"limit": "501"},
            error("invalid", "Input should be less than or equal to 500", "limit"),
        ),
    ],
)
async def test_bad_filters_are_422_with_the_field(
    api: Api, params: dict[str, str], expected: dict[str, Any]
) -> None:
    async with api.client() as client:
        got = await client.get("/v1/events", params=params)
    assert (got.status_code, got.json()) == (422, expected)


async def test_events_need_the_read_scope(api: Api) -> None:
    _, token = api.add_key("example.org", "send")
    async with api.client(token) as sender:
        got = await sender.get("/v1/events")
    assert (got.status_code, got.json()) == (
        403,
        error("forbidden", "the key's scope 'send' does not allow read"),
    )
    async with api.client("mrk_nothing") as nobody:
        got = await nobody.get("/v1/events")
    assert (got.status_code, got.json()) == (401, error("unauthorized", "the API key is not valid"))
