"""The HTTP API (issue 15) over real HTTP: a real service on loopback, called with httpx."""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim as dkimpy
import httpx
import pytest

from mailrelay import onboarding
from mailrelay.config import Config
from mailrelay.store import accounts, apikeys, connect
from mailrelay.store.queue import transaction
from tests.conftest import Relay, RelayFactory, free_port, make_config
from tests.test_delivery import delivery_config, settled
from tests.world import MODERN, World

TEXT_MESSAGE: dict[str, Any] = {
    "from": "Alice <alice@example.org>",
    "to": ["bob@example.net"],
    "subject": "Quarterly figures",
    "text": "Hello Bob.\n",
}


@dataclass
class Api:
    relay: Relay
    url: str
    token: str
    key_id: str

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10)

    def add_key(self, domain: str, scope: apikeys.Scope) -> tuple[str, str]:
        return add_key(self.relay.config, domain, scope)

    def stored(self) -> list[Any]:
        conn = self.relay.db()
        try:
            return [dict(r) for r in conn.execute("SELECT id, sender, data FROM messages")]
        finally:
            conn.close()


def add_domain(cfg: Config, domain: str, *, dkim_key: bool = False) -> None:
    conn = connect(cfg.storage.database)
    try:
        if dkim_key:
            onboarding.add(conn, cfg, domain, f"postmaster@{domain}")
        else:
            with transaction(conn):
                accounts.add_domain(conn, domain, f"postmaster@{domain}", time.time())
        with transaction(conn):
            accounts.set_domain_state(conn, domain, "valid", time.time())
    finally:
        conn.close()


def add_key(cfg: Config, domain: str, scope: apikeys.Scope) -> tuple[str, str]:
    conn = connect(cfg.storage.database)
    try:
        with transaction(conn):
            key, token = apikeys.add(conn, domain, scope, time.time())
    finally:
        conn.close()
    return key.id, token


async def start_api(
    tmp_path: Path, relay_factory: RelayFactory, *, dkim_key: bool = False, **sections: Any
) -> Api:
    port = free_port()
    cfg = make_config(tmp_path, api={"listen": f"127.0.0.1:{port}"}, **sections)
    add_domain(cfg, "example.org", dkim_key=dkim_key)
    add_domain(cfg, "other.example")
    key_id, token = add_key(cfg, "example.org", "manage")
    relay = await relay_factory(cfg)
    return Api(relay, f"http://127.0.0.1:{port}", token, key_id)


@pytest.fixture
async def api(tmp_path: Path, relay_factory: RelayFactory) -> Api:
    return await start_api(
        tmp_path, relay_factory, submission={"max_message_size": 4096, "max_recipients": 3}
    )


def error(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


# ---- keys ----------------------------------------------------------------------------------


async def test_no_wrong_or_revoked_key_is_401(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        got = await anonymous.post("/v1/messages", json=TEXT_MESSAGE)
    assert got.status_code == 401
    assert got.headers["www-authenticate"] == 'Bearer realm="mailrelay"'
    assert got.json() == error("unauthorized", "an API key is required: Authorization: Bearer KEY")
    async with api.client("mrk_not-a-key") as wrong:
        got = await wrong.post("/v1/messages", json=TEXT_MESSAGE)
    assert (got.status_code, got.json()) == (
        401,
        error("unauthorized", "the API key is not valid"),
    )
    key_id, token = api.add_key("example.org", "send")
    conn = api.relay.db()
    with transaction(conn):
        apikeys.revoke(conn, key_id, time.time())
    conn.close()
    async with api.client(token) as revoked:
        got = await revoked.post("/v1/messages", json=TEXT_MESSAGE)
    assert (got.status_code, got.json()) == (
        401,
        error("unauthorized", "the API key is not valid"),
    )
    assert api.stored() == []


async def test_a_key_of_another_domain_is_403(api: Api) -> None:
    _, token = api.add_key("other.example", "send")
    async with api.client(token) as other:
        got = await other.post("/v1/messages", json=TEXT_MESSAGE)
    assert (got.status_code, got.json()) == (
        403,
        error("sender_not_allowed", "this key sends for other.example only", "from"),
    )
    assert api.stored() == []


async def test_a_read_key_may_not_send(api: Api) -> None:
    _, token = api.add_key("example.org", "read")
    async with api.client(token) as reader:
        got = await reader.post("/v1/messages", json=TEXT_MESSAGE)
    assert (got.status_code, got.json()) == (
        403,
        error("forbidden", "the key's scope 'read' does not allow send"),
    )


# ---- sending -------------------------------------------------------------------------------


async def test_a_json_message_is_queued_signed_as_mime(api: Api) -> None:
    attachment = b"%PDF-1.4 figures"
    request = {
        **TEXT_MESSAGE,
        "from": "Zoë Ångström <alice@example.org>",
        "cc": ["carol@example.net"],
        "bcc": ["dave@example.net"],
        "reply_to": ["office@example.org"],
        "html": "<p>Hello Bob.</p>",
        "headers": {"X-Campaign": "q3"},
        "attachments": [
            {
                "filename": "figures.pdf",
                "content_type": "application/pdf",
                "content": base64.b64encode(attachment).decode(),
            }
        ],
    }
    async with api.client() as client:
        got = await client.post("/v1/messages", json=request)
    assert got.status_code == 202, got.text
    answer = got.json()
    queue_id = answer["id"]
    assert answer == {
        "id": queue_id,
        "message_id": answer["message_id"],
        "recipients": [
            {"address": a, "state": "queued"}
            for a in ("bob@example.net", "carol@example.net", "dave@example.net")
        ],
        "attachments": [
            {
                "filename": "figures.pdf",
                "content_type": "application/pdf",
                "size": len(attachment),
                "sha256": hashlib.sha256(attachment).hexdigest(),
            }
        ],
    }
    assert answer["message_id"].startswith(f"<{queue_id}.")
    [stored] = api.stored()
    assert (stored["id"], stored["sender"]) == (queue_id, "alice@example.org")
    data: bytes = stored["data"]
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    assert data.isascii()  # 7-bit: the display name is RFC 2047-encoded
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    assert str(msg["From"]) == "Zoë Ångström <alice@example.org>"
    assert str(msg["To"]) == "bob@example.net"
    assert str(msg["Cc"]) == "carol@example.net"
    assert msg["Bcc"] is None
    assert str(msg["Reply-To"]) == "office@example.org"
    assert str(msg["X-Campaign"]) == "q3"
    assert str(msg["Message-ID"]) == answer["message_id"]
    assert msg["Date"] is not None
    assert str(msg["Authentication-Results"]) == (
        f"relay.test; auth=pass (HTTP API key) smtp.auth={api.key_id}"
    )
    assert msg.get_content_type() == "multipart/mixed"
    body = msg.get_body(("plain",))
    assert body is not None and body.get_content() == "Hello Bob.\r\n"  # read as sent: CRLF
    [part] = list(msg.iter_attachments())
    assert (part.get_filename(), part.get_content()) == ("figures.pdf", attachment)


async def test_malformed_json_and_invalid_fields(api: Api) -> None:
    async with api.client() as client:
        got = await client.post(
            "/v1/messages", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert got.status_code == 400
        assert got.json()["error"]["code"] == "malformed_json"
        got = await client.post("/v1/messages", json={"to": ["bob@example.net"]})
        assert (got.status_code, got.json()) == (422, error("invalid", "Field required", "from"))
        bad = {**TEXT_MESSAGE, "attachments": [{"filename": "a", "content": "no base64!"}]}
        got = await client.post("/v1/messages", json=bad)
        assert (got.status_code, got.json()) == (
            422,
            error("invalid_base64", "not base64", "attachments[0].content"),
        )
        got = await client.post("/v1/messages", json={**TEXT_MESSAGE, "to": ["not an address"]})
        assert (got.status_code, got.json()) == (
            422,
            error("invalid_address", "not an address: 'not an address'", "to[0]"),
        )
        got = await client.post("/v1/messages", content=b"x", headers={"Content-Type": "text/x"})
        assert (got.status_code, got.json()["error"]["code"]) == (415, "unsupported_media_type")
    assert api.stored() == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"subject": "hi\r\nBcc: eve@example.net"}, "subject"),
        ({"subject": "hi\nX: y"}, "subject"),
        ({"headers": {"X-Tag": "a\r\nBcc: eve@example.net"}}, "headers.X-Tag"),
        ({"headers": {"X-Tag\r\nBcc": "eve@example.net"}}, "headers.X-Tag\r\nBcc"),
        ({"from": "Alice\r\nBcc: eve@example.net <alice@example.org>"}, "from"),
        ({"to": ["Bob\n <bob@example.net>"]}, "to[0]"),
    ],
)
async def test_header_injection_is_422_with_the_field(
    api: Api, change: dict[str, Any], field: str
) -> None:
    async with api.client() as client:
        got = await client.post("/v1/messages", json={**TEXT_MESSAGE, **change})
    assert (got.status_code, got.json()) == (
        422,
        error("header_injection", "CR, LF and NUL are not allowed here", field),
    )
    assert api.stored() == []


async def test_too_many_recipients_and_too_large(api: Api) -> None:
    async with api.client() as client:
        many = {**TEXT_MESSAGE, "to": [f"r{i}@example.net" for i in range(4)]}
        got = await client.post("/v1/messages", json=many)
        assert (got.status_code, got.json()) == (
            422,
            error("too_many_recipients", "at most 3", "to"),
        )
        # Under the body limit (4/3 of max_message_size and 64 KiB), over the message limit.
        big = {**TEXT_MESSAGE, "text": "x" * 5000}
        got = await client.post("/v1/messages", json=big)
        assert (got.status_code, got.json()) == (
            413,
            error("too_large", "the message is over 4096 bytes"),
        )
    assert api.stored() == []


async def test_an_oversized_body_is_refused_before_it_is_read(api: Api) -> None:
    limit = 4096 * 4 // 3 + 65536
    expected = error("too_large", f"the request body is over {limit} bytes")
    async with api.client() as client:
        # Content-Length says so: answered at once, the body never sent.
        got = await client.post(
            "/v1/messages",
            content=b"x" * (limit + 1),
            headers={"Content-Type": "application/json"},
        )
        assert (got.status_code, got.json()) == (413, expected)

        # Chunked, without Content-Length: counted while read, refused once past the limit.
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(limit // 16384 + 2):
                yield b"y" * 16384

        got = await client.post(
            "/v1/messages", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert (got.status_code, got.json()) == (413, expected)
    assert api.stored() == []


async def test_an_idempotent_retry_gets_the_first_answer_and_queues_once(api: Api) -> None:
    async with api.client() as client:
        headers = {"Idempotency-Key": "order-4711"}
        first = await client.post("/v1/messages", json=TEXT_MESSAGE, headers=headers)
        again = await client.post("/v1/messages", json=TEXT_MESSAGE, headers=headers)
        other = await client.post(
            "/v1/messages", json={**TEXT_MESSAGE, "subject": "other"}, headers=headers
        )
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert (other.status_code, other.json()) == (
        422,
        error(
            "idempotency_key_reused",
            "this Idempotency-Key was used with another request",
            "Idempotency-Key",
        ),
    )
    assert [m["id"] for m in api.stored()] == [first.json()["id"]]


async def test_a_raw_rfc822_message(api: Api) -> None:
    raw = (
        b"From: alice@example.org\n"
        b"To: bob@example.net\n"
        b"Bcc: dave@example.net\n"
        b"Subject: raw\n"
        b"\n"
        b"Hello Bob.\n"
    )
    async with api.client() as client:
        got = await client.post(
            "/v1/messages", content=raw, headers={"Content-Type": "message/rfc822"}
        )
        assert got.status_code == 202, got.text
        assert got.json()["recipients"] == [
            {"address": "bob@example.net", "state": "queued"},
            {"address": "dave@example.net", "state": "queued"},
        ]
        forged = raw.replace(b"alice@example.org", b"alice@other.example")
        refused = await client.post(
            "/v1/messages", content=forged, headers={"Content-Type": "message/rfc822"}
        )
    assert (refused.status_code, refused.json()) == (
        403,
        error("sender_not_allowed", "this key sends for example.org only", "from"),
    )
    [stored] = api.stored()
    data: bytes = stored["data"]
    assert b"Bcc" not in data and b"dave" not in data
    assert data.endswith(b"Subject: raw\r\n\r\nHello Bob.\r\n")


# ---- reading -------------------------------------------------------------------------------


async def test_a_message_is_shown_to_its_own_domain_only(api: Api) -> None:
    async with api.client() as client:
        sent = await client.post("/v1/messages", json=TEXT_MESSAGE)
        queue_id = sent.json()["id"]
        got = await client.get(f"/v1/messages/{queue_id}")
        assert got.status_code == 200
        shown = got.json()
        assert (shown["id"], shown["sender"], shown["auth_user"]) == (
            queue_id,
            "alice@example.org",
            f"apikey:{api.key_id}",
        )
        [rcpt] = shown["recipients"]
        assert (rcpt["address"], rcpt["state"]) == ("bob@example.net", "queued")
        assert [e["event"] for e in rcpt["events"]] == ["QUEUED"]
    _, token = api.add_key("other.example", "read")
    async with api.client(token) as other:
        got = await other.get(f"/v1/messages/{queue_id}")
    assert (got.status_code, got.json()) == (
        404,
        error("not_found", f"no message {queue_id}", "id"),
    )


async def test_openapi_document_and_framework_errors(api: Api) -> None:
    async with api.client() as client:
        got = await client.get("/v1/openapi.json")
        assert got.status_code == 200
        doc = got.json()
        # Other paths (management, webhooks) are tested where they are made.
        ours = {"/v1/messages", "/v1/messages/batch", "/v1/messages/{message_id}"}
        assert ours <= set(doc["paths"])
        assert sorted(doc["paths"]["/v1/messages"]) == ["post"]
        assert "SendRequest" in doc["components"]["schemas"]
        assert "from" in doc["components"]["schemas"]["SendRequest"]["properties"]
        missing = await client.get("/v1/nothing")
        assert (missing.status_code, missing.json()) == (404, error("not_found", "Not Found"))
        wrong = await client.delete("/v1/messages")
        assert (wrong.status_code, wrong.json()) == (
            405,
            error("method_not_allowed", "Method Not Allowed"),
        )


async def test_api_listen_empty_turns_it_off(tmp_path: Path, relay_factory: RelayFactory) -> None:
    relay = await relay_factory(make_config(tmp_path))
    assert relay.service.api is None


# ---- end to end ----------------------------------------------------------------------------


async def test_sent_over_the_api_arrives_signed_over_tls_with_the_evidence(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    async with World(tmp_path / "world", first_address="127.0.100.1") as world:
        mx = await world.add_mx("example.net", MODERN)
        api = await start_api(
            tmp_path, relay_factory, dkim_key=True, delivery=delivery_config(world)
        )
        async with api.client() as client:
            sent = await client.post("/v1/messages", json=TEXT_MESSAGE)
            assert sent.status_code == 202, sent.text
            queue_id = sent.json()["id"]
            [received] = await mx.wait_for_messages(1)
            await settled(api.relay, queue_id, lambda r: r["state"] == "sent")
            got = await client.get(f"/v1/messages/{queue_id}")
    assert received.rcpt_tos == ("bob@example.net",)
    conn = api.relay.db()
    [key] = accounts.keys(conn, "example.org", active_only=True)
    conn.close()

    def txt(name: bytes | str, timeout: float = 5) -> bytes:
        return key.public_record.encode()

    assert dkimpy.verify(received.data, dnsfunc=txt) is True
    [rcpt] = got.json()["recipients"]
    assert rcpt["state"] == "sent"
    assert [e["event"] for e in rcpt["events"]] == ["QUEUED", "DELIVERED"]
    [attempt] = rcpt["delivery_attempts"]
    assert attempt["verdict"] == "sent"
    assert attempt["tls_protocol"] == "TLSv1.3"
    assert attempt["cert_verified"] is True
    assert attempt["mx_host"] == "mx1.example.net"
