"""The suppression list over HTTP: a key lists, adds and removes its own domain's entries, and
an entry added over the API refuses that recipient over SMTP and over the API alike."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import pytest

from tests.conftest import RelayFactory, add_user
from tests.test_api import TEXT_MESSAGE, Api, error, start_api


@pytest.fixture
async def api(tmp_path: Path, relay_factory: RelayFactory) -> Api:
    return await start_api(tmp_path, relay_factory)


async def test_added_over_the_api_it_refuses_over_smtp_and_the_api(api: Api) -> None:
    async with api.client() as client:
        added = await client.post(
            "/v1/suppressions",
            json={
                "address": "Bob@Example.NET",
                "reason": "asked not to be mailed",
                "expires": "30d",
            },
        )
        listed = await client.get("/v1/suppressions")
        sent = await client.post("/v1/messages", json={**TEXT_MESSAGE, "to": ["bob@example.net"]})
    assert added.status_code == 201
    entry = added.json()
    assert (entry["domain"], entry["address"], entry["reason"], entry["source"]) == (
        "example.org",
        "bob@example.net",
        "asked not to be mailed",
        "manual",
    )
    assert entry["expires_at"] == pytest.approx(entry["created_at"] + 30 * 86400)
    assert listed.json() == {"suppressions": [entry], "next_cursor": None}
    assert sent.status_code == 422 and sent.json()["error"]["code"] == "all_recipients_suppressed"

    def smtp_rcpt() -> tuple[int, bytes]:
        client: smtplib.SMTP = api.relay.session()
        try:
            assert client.mail("alice@example.org")[0] == 250
            return client.rcpt("bob@example.net")
        finally:
            client.quit()

    add_user(api.relay.config, "alice@example.org")
    code, text = await asyncio.to_thread(smtp_rcpt)
    assert code == 550 and text.startswith(
        b"5.7.1 <bob@example.net>: suppressed for example.org since "
    )
    assert b"(asked not to be mailed)" in text

    async with api.client() as client:
        removed = await client.delete("/v1/suppressions/example.org/bob@example.net")
        again = await client.delete("/v1/suppressions/example.org/bob@example.net")
        after = await client.get("/v1/suppressions")
        sent = await client.post("/v1/messages", json={**TEXT_MESSAGE, "to": ["bob@example.net"]})
    assert removed.status_code == 204
    assert (again.status_code, again.json()) == (
        404,
        error("not_found", "bob@example.net is not suppressed for example.org", "address"),
    )
    assert after.json() == {"suppressions": [], "next_cursor": None}
    assert sent.status_code == 202


async def test_only_the_keys_domains_and_valid_input(api: Api) -> None:
    _, read_token = api.add_key("example.org", "read")
    async with api.client() as client:
        other = await client.post(
            "/v1/suppressions", json={"address": "x@example.net", "domain": "other.example"}
        )
        bad_address = await client.post("/v1/suppressions", json={"address": "not an address"})
        bad_expiry = await client.post(
            "/v1/suppressions", json={"address": "x@example.net", "expires": "soon"}
        )
        other_list = await client.get("/v1/suppressions", params={"domain": "other.example"})
        other_remove = await client.delete("/v1/suppressions/other.example/x@example.net")
    async with api.client(read_token) as reader:
        listed = await reader.get("/v1/suppressions")
        refused = await reader.post("/v1/suppressions", json={"address": "x@example.net"})
    assert (other.status_code, other.json()) == (
        403,
        error("forbidden", "the key is not for other.example", "domain"),
    )
    assert (bad_address.status_code, bad_address.json()) == (
        422,
        error("invalid", "'not an address' is not an e-mail address", "address"),
    )
    assert (bad_expiry.status_code, bad_expiry.json()) == (
        422,
        error("invalid", "'soon' is not a duration such as 30d, 12h or 0 (never)", "expires"),
    )
    assert other_list.status_code == 403 and other_remove.status_code == 403
    assert listed.json() == {"suppressions": [], "next_cursor": None}
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"


async def test_pages_with_a_cursor(api: Api) -> None:
    async with api.client() as client:
        for i in range(101):
            got = await client.post("/v1/suppressions", json={"address": f"u{i:03d}@example.net"})
            assert got.status_code == 201
        first = await client.get("/v1/suppressions")
        second = await client.get(
            "/v1/suppressions", params={"cursor": first.json()["next_cursor"]}
        )
    page = first.json()
    assert len(page["suppressions"]) == 100 and page["next_cursor"] == "u099@example.net"
    assert [e["address"] for e in second.json()["suppressions"]] == ["u100@example.net"]
    assert second.json()["next_cursor"] is None
