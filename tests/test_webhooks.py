"""Webhooks (issue 15): real relays deliver to a test world's MX servers and POST each outcome,
signed per Standard Webhooks, to HTTPS receivers on loopback that check the signature."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest

from mailrelay import config as configmod
from mailrelay.config import Config
from mailrelay.metrics import Metrics
from mailrelay.store import Store, accounts, apikeys, connect, suppressions
from mailrelay.store import webhooks as store
from mailrelay.store.queue import transaction
from mailrelay.webhooks import signature
from mailrelay.webhooks.dispatcher import RETRY_FOR, SCHEDULE, Dispatcher, next_delay
from tests.conftest import Relay, RelayFactory, add_user, make_config, write_config_file
from tests.test_api import TEXT_MESSAGE, start_api
from tests.test_cli import cli, ok, user_error
from tests.test_delivery import delivery_config, settled
from tests.test_submission import MESSAGE, queued_id, send_raw
from tests.world import MODERN, NO_STARTTLS, World
from tests.world.https import PolicyServer, Reply, Request, serve_collector
from tests.world.mx import MxServer

FIRST_ADDRESS = "127.0.101.1"  # this file's world: MX servers from here up
RECEIVER_ADDRESS = "127.0.101.200"
OTHER_RECEIVER_ADDRESS = "127.0.101.201"
RECEIVER = "hooks.example.org"
OTHER_RECEIVER = "hooks.other.example"
BODY_MARKER = b"Hello Bob."
WAIT_SECONDS = 30.0
ALL_EVENTS = ["delivered", "deferred", "bounced", "insecure", "suppressed"]
ALL = ", ".join(ALL_EVENTS)


@dataclass
class Receiver:
    """An HTTPS webhook endpoint that answers `statuses` in turn (then 200) and keeps what it
    was sent, with whether each signature verified under `secret`."""

    server: PolicyServer
    host: str
    secret: str = ""
    statuses: list[int] = field(default_factory=list)
    verified: list[bool] = field(default_factory=list)

    def respond(self, request: Request) -> Reply:
        h = request.headers
        ok = signature.verify(
            self.secret,
            h.get("webhook-id", ""),
            h.get("webhook-timestamp", "0"),
            request.body,
            h.get("webhook-signature", ""),
        )
        self.verified.append(ok)
        return Reply(status=self.statuses.pop(0) if self.statuses else 200, content_type=None)

    def url(self, path: str = "/hooks") -> str:
        return f"https://{self.host}:{self.server.port}{path}"

    @property
    def requests(self) -> list[Request]:
        return self.server.requests

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in self.requests]

    async def wait_for(self, n: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + WAIT_SECONDS
        while len(self.requests) < n:
            assert time.monotonic() < deadline, self.events()
            await asyncio.sleep(0.05)
        return self.events()


async def receiver(world: World, host: str, address: str) -> Receiver:
    got = Receiver(await serve_collector(world, host, address=address), host)
    got.server.respond = got.respond
    return got


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path / "world", first_address=FIRST_ADDRESS) as w:
        await w.add_mx("example.org", MODERN)  # the sender's domain: bounces come here
        yield w


@pytest.fixture
async def hooks(world: World) -> AsyncIterator[Receiver]:
    got = await receiver(world, RECEIVER, RECEIVER_ADDRESS)
    yield got
    await got.server.stop()


def subscribe(cfg: Config, domain: str, url: str, events: list[str], into: Receiver) -> str:
    conn = connect(cfg.storage.path)
    try:
        with transaction(conn):
            endpoint = store.add_endpoint(conn, domain, url, events, time.time())
    finally:
        conn.close()
    into.secret = endpoint.secret
    return endpoint.id


def webhook_config() -> dict[str, Any]:
    # A short first retry, so that a retry test does not wait the default 5 s; the receivers
    # here are on loopback, which the relay refuses to POST to unless told.
    return {"first_retry": "0.2s", "allow_private_addresses": True}


async def relay_with_hook(
    tmp_path: Path,
    relay_factory: RelayFactory,
    world: World,
    hooks: Receiver,
    events: list[str] | None = None,
) -> tuple[Relay, str]:
    cfg = make_config(tmp_path, delivery=delivery_config(world), webhooks=webhook_config())
    add_user(cfg, "alice@example.org")
    endpoint = subscribe(cfg, "example.org", hooks.url(), events or ALL_EVENTS, hooks)
    return await relay_factory(cfg), endpoint


def submit(relay: Relay, rcpts: list[str], message: bytes = MESSAGE) -> str:
    client = relay.session()
    try:
        return queued_id(send_raw(client, "alice@example.org", rcpts, message + b".\r\n"))
    finally:
        client.quit()


def outbox(relay: Relay) -> list[dict[str, Any]]:
    conn = relay.db()
    try:
        rows = conn.execute(
            "SELECT id, endpoint_id, event, state, attempts, last_error FROM webhook_deliveries"
            " ORDER BY created_at, id"
        )
        return [dict(r) for r in rows]
    finally:
        conn.close()


async def outbox_settled(relay: Relay, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        rows = outbox(relay)
        if len(rows) >= n and all(r["state"] != "pending" for r in rows):
            return rows
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.05)


def attempts_of(relay: Relay, queue_id: str, recipient: str) -> list[dict[str, Any]]:
    conn = relay.db()
    try:
        rows = conn.execute(
            "SELECT at, verdict, mx_host, mx_address, tls_protocol, tls_cipher, cert_fingerprint,"
            " cert_verified, policy, policy_detail FROM attempts"
            " WHERE message_id = ? AND recipient = ? ORDER BY id",
            (queue_id, recipient),
        )
        return [dict(r) for r in rows]
    finally:
        conn.close()


def as_evidence(row: dict[str, Any]) -> dict[str, Any]:
    """An attempts row as a webhook's evidence shows it."""
    return {
        "at": store._iso(row["at"]),
        "verdict": row["verdict"],
        "mx_host": row["mx_host"],
        "mx_address": row["mx_address"],
        "tls_protocol": row["tls_protocol"],
        "tls_cipher": row["tls_cipher"],
        "cert_fingerprint": row["cert_fingerprint"],
        "cert_verified": None if row["cert_verified"] is None else bool(row["cert_verified"]),
        "policy": row["policy"],
        "policy_detail": row["policy_detail"],
    }


def mx_of(world: World, domain: str) -> MxServer:
    [mx] = [m for m in world.servers if m.hostname.endswith("." + domain)]
    return mx


def fingerprint(world: World, mx: MxServer) -> str:
    """SHA-256 of the DER leaf certificate the MX serves, lowercase hex."""
    pem = (world.directory / "certs" / f"{mx.hostname}.crt").read_text()
    leaf = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(leaf)).hexdigest()


async def counted_until(relay: Relay, result: str, value: float) -> None:
    """The counter is bumped just after the commit the test saw: wait for it, briefly."""
    deadline = time.monotonic() + WAIT_SECONDS
    while counted(relay, result) != value:
        assert time.monotonic() < deadline, (result, counted(relay, result))
        await asyncio.sleep(0.02)


def counted(relay: Relay, result: str) -> float | None:
    return relay.service.metrics.registry.get_sample_value(
        "mailrelay_webhook_deliveries_total", {"result": result}
    )


# ---- events ---------------------------------------------------------------------------------


async def test_delivered_event_is_signed_and_carries_the_tls_evidence_not_the_body(
    tmp_path: Path, relay_factory: RelayFactory, world: World, hooks: Receiver
) -> None:
    mx = await world.add_mx("example.net", MODERN)
    relay, endpoint = await relay_with_hook(tmp_path, relay_factory, world, hooks)
    queue_id = await asyncio.to_thread(submit, relay, ["bob@example.net"])
    [received] = await mx.wait_for_messages(1)
    [event] = await hooks.wait_for(1)
    [row] = await outbox_settled(relay, 1)

    [request] = hooks.requests
    assert hooks.verified == [True]
    assert request.method == "POST"
    assert request.path == "/hooks"
    assert request.sni == RECEIVER
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == row["id"]
    assert row["id"].startswith("msg_")
    assert request.headers["webhook-signature"] == signature.sign(
        hooks.secret, row["id"], int(request.headers["webhook-timestamp"]), request.body
    )
    assert BODY_MARKER in received.data
    assert BODY_MARKER not in request.body
    assert b"Subject" not in request.body

    [attempt] = attempts_of(relay, queue_id, "bob@example.net")
    assert event["type"] == "message.delivered"
    assert event["data"] == {
        "message_id": queue_id,
        "recipient": "bob@example.net",
        "domain": "example.org",
        "state": "sent",
        "status": "2.0.0",
        "reason": event["data"]["reason"],
        "insecure": None,
        "attempts": 1,
        "evidence": [as_evidence(attempt)],
    }
    assert event["data"]["reason"].startswith("smtp; 250")
    [evidence] = event["data"]["evidence"]
    assert evidence["tls_protocol"] == "TLSv1.3"
    assert evidence["mx_host"] == mx.hostname
    assert evidence["cert_verified"] is True
    assert evidence["policy"] == "encrypt"
    assert evidence["verdict"] == "sent"
    assert evidence["cert_fingerprint"] == fingerprint(world, mx)
    assert row == {
        "id": row["id"],
        "endpoint_id": endpoint,
        "event": "delivered",
        "state": "sent",
        "attempts": 1,
        "last_error": None,
    }
    await counted_until(relay, "sent", 1)
    assert counted(relay, "retried") == 0
    assert counted(relay, "failed") == 0


async def test_bounced_and_insecure_events_and_only_to_their_subscribers(
    tmp_path: Path, relay_factory: RelayFactory, world: World, hooks: Receiver
) -> None:
    await world.add_mx(
        "r550.example", dataclasses.replace(MODERN, rcpt_reply="550 5.1.1 No such user")
    )
    plain = await world.add_mx("plain.example", NO_STARTTLS)
    await world.add_mx(
        "r451.example", dataclasses.replace(MODERN, rcpt_reply="451 4.3.0 Try again later")
    )
    other = await receiver(world, OTHER_RECEIVER, OTHER_RECEIVER_ADDRESS)
    cfg = make_config(tmp_path, delivery=delivery_config(world), webhooks=webhook_config())
    add_user(cfg, "alice@example.org")
    add_user(cfg, "carol@other.example")
    mine = subscribe(cfg, "example.org", hooks.url(), ALL_EVENTS, hooks)
    # Ours, but for other events; and every event, but of another sending domain.
    delivered_only = subscribe(cfg, "example.org", other.url("/delivered"), ["delivered"], other)
    other_domain = subscribe(cfg, "other.example", other.url("/other"), ALL_EVENTS, other)
    relay = await relay_factory(cfg)

    rcpts = ["bob@r550.example", "dave@plain.example", "erin@r451.example"]
    queue_id = await asyncio.to_thread(submit, relay, rcpts)
    await settled(relay, queue_id, lambda r: r["state"] in ("bounced", "deferred"))
    await mx_of(world, "example.org").wait_for_messages(
        2
    )  # the two bounces: messages of ours, with no webhooks
    events = await hooks.wait_for(3)
    rows = await outbox_settled(relay, 3)

    by_type = {e["type"]: e["data"] for e in events}
    assert sorted(by_type) == ["message.bounced", "message.deferred", "message.insecure"]
    deferred = by_type["message.deferred"]
    assert (deferred["recipient"], deferred["state"], deferred["status"]) == (
        "erin@r451.example",
        "deferred",
        "4.3.0",
    )
    bounced = by_type["message.bounced"]
    assert (bounced["recipient"], bounced["state"], bounced["status"]) == (
        "bob@r550.example",
        "bounced",
        "5.1.1",
    )
    assert "550 5.1.1 No such user" in bounced["reason"]
    assert bounced["insecure"] is None
    assert [e["tls_protocol"] for e in bounced["evidence"]] == ["TLSv1.3"]
    insecure = by_type["message.insecure"]
    assert (insecure["recipient"], insecure["state"], insecure["insecure"]) == (
        "dave@plain.example",
        "bounced",
        "no_starttls",
    )
    [evidence] = insecure["evidence"]
    assert evidence == as_evidence(attempts_of(relay, queue_id, "dave@plain.example")[0])
    assert (evidence["mx_host"], evidence["tls_protocol"], evidence["verdict"]) == (
        plain.hostname,
        None,
        "insecure",
    )
    assert hooks.verified == [True, True, True]
    assert [(r["endpoint_id"], r["state"]) for r in rows] == [(mine, "sent")] * 3
    assert other.requests == []
    assert {delivered_only, other_domain}.isdisjoint(r["endpoint_id"] for r in rows)
    await other.server.stop()


async def test_a_failed_post_is_retried_with_the_same_id_then_sent(
    tmp_path: Path, relay_factory: RelayFactory, world: World, hooks: Receiver
) -> None:
    await world.add_mx("example.net", MODERN)
    hooks.statuses = [500]
    relay, _ = await relay_with_hook(tmp_path, relay_factory, world, hooks)
    await asyncio.to_thread(submit, relay, ["bob@example.net"])
    first, second = await hooks.wait_for(2)
    [row] = await outbox_settled(relay, 1)

    assert first == second
    assert [r.headers["webhook-id"] for r in hooks.requests] == [row["id"], row["id"]]
    assert hooks.verified == [True, True]
    assert (row["state"], row["attempts"], row["last_error"]) == ("sent", 2, None)
    assert counted(relay, "retried") == 1
    await counted_until(relay, "sent", 1)


async def test_delivery_in_its_own_process_posts_webhooks_and_forwards_the_count(
    tmp_path: Path, relay_factory: RelayFactory, world: World, hooks: Receiver
) -> None:
    await world.add_mx("example.net", MODERN)
    cfg = make_config(
        tmp_path,
        delivery={**delivery_config(world), "separate_process": True},
        webhooks=webhook_config(),
    )
    add_user(cfg, "alice@example.org")
    subscribe(cfg, "example.org", hooks.url(), ["delivered"], hooks)
    relay = await relay_factory(cfg)
    queue_id = await asyncio.to_thread(submit, relay, ["bob@example.net"])
    [event] = await hooks.wait_for(1)
    await counted_until(relay, "sent", 1)  # the child's snapshot, served by the parent

    assert hooks.verified == [True]
    assert (event["type"], event["data"]["message_id"]) == ("message.delivered", queue_id)
    assert event["data"]["evidence"][0]["tls_protocol"] == "TLSv1.3"


async def test_suppressed_recipient_refused_at_rcpt_is_an_event(
    tmp_path: Path, relay_factory: RelayFactory, world: World, hooks: Receiver
) -> None:
    relay, _ = await relay_with_hook(tmp_path, relay_factory, world, hooks, ["suppressed"])
    conn = relay.db()
    with transaction(conn):
        entry = suppressions.add(
            conn, "example.org", "carol@example.net", time.time(), reason="550 5.1.1 gone"
        )
    conn.close()

    def refused() -> int:
        client = relay.session()
        try:
            assert client.mail("alice@example.org")[0] == 250
            return client.rcpt("carol@example.net")[0]
        finally:
            client.quit()

    code = await asyncio.to_thread(refused)
    [event] = await hooks.wait_for(1)

    assert code == 550
    assert event["type"] == "message.suppressed"
    data = event["data"]
    assert data == {
        "message_id": data["message_id"],
        "recipient": "carol@example.net",
        "domain": "example.org",
        "state": "refused",
        "status": "5.7.1",
        "reason": entry.describe(),
        "insecure": None,
        "attempts": 0,
        "evidence": [],
    }
    assert len(data["message_id"]) == 16
    assert hooks.verified == [True]


# ---- the dispatcher on its own ----------------------------------------------------------------


def test_retry_schedule() -> None:
    def middle() -> float:
        return 0.5

    assert [next_delay(n, rand=middle) for n in range(1, 9)] == [
        5.0,
        300.0,
        1800.0,
        7200.0,
        18000.0,
        36000.0,
        36000.0,
        36000.0,
    ]
    assert next_delay(1, first=0.2, rand=middle) == 0.2
    assert next_delay(3, rand=lambda: 0.0) == SCHEDULE[2] * 0.9
    assert next_delay(3, rand=lambda: 1.0) == SCHEDULE[2] * 1.1


async def test_a_delivery_is_failed_a_day_after_its_event(
    tmp_path: Path, world: World, hooks: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    hooks.statuses = [503] * 3
    cfg = make_config(tmp_path, delivery=delivery_config(world), webhooks=webhook_config())
    add_user(cfg, "alice@example.org")
    subscribe(cfg, "example.org", hooks.url(), ["suppressed"], hooks)
    created = 1_000_000.0
    entry = suppressions.Suppression(
        "example.org", "carol@example.net", "manual", "manual", None, created, None
    )
    conn = connect(cfg.storage.path)
    with transaction(conn):
        assert store.enqueue_suppressed(conn, entry, "0123456789ABCDEF", created) == 1
    conn.close()
    clock = [created]
    db = Store(cfg.storage.path)
    await db.start()
    metrics = Metrics()
    dispatcher = Dispatcher(cfg, db, metrics, clock=lambda: clock[0])
    try:
        first = await dispatcher.run_once()
        clock[0] = created + RETRY_FOR - 1
        second = await dispatcher.run_once()
        clock[0] = created + RETRY_FOR
        third = await dispatcher.run_once()
        [row] = await db.read(lambda c: store.recent(c))
    finally:
        await db.stop()

    assert (first.retried, first.failed, first.sent) == (1, 0, 0)
    assert (second.retried, second.failed, second.sent) == (1, 0, 0)
    assert (third.retried, third.failed, third.sent) == (0, 1, 0)
    assert len(hooks.requests) == 3
    assert hooks.verified == [True, True, True]
    assert (row.state, row.attempts) == ("failed", 3)
    assert row.last_error == f"{RECEIVER}[{RECEIVER_ADDRESS}]:{hooks.server.port}: HTTP status 503"
    failed = [r for r in caplog.records if "event=webhook_failed" in r.getMessage()]
    assert [r.levelno for r in failed] == [logging.WARNING]
    assert (
        metrics.registry.get_sample_value(
            "mailrelay_webhook_deliveries_total", {"result": "failed"}
        )
        == 1
    )


# ---- management -------------------------------------------------------------------------------


def test_endpoints_must_be_https_with_known_events(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    add_user(cfg, "alice@example.org")
    conn = connect(cfg.storage.path)
    try:
        for url, events, why in [
            ("http://hooks.example.org/", ["delivered"], "url: only https:// URLs are allowed"),
            ("https:///x", ["delivered"], "url: no host"),
            (
                "https://u:p@hooks.example.org/",
                ["delivered"],
                "url: credentials in the URL are not allowed",
            ),
            (
                "https://hooks.example.org/",
                ["opened"],
                "events: unknown opened (one of " + ALL + ")",
            ),
            (
                "https://hooks.example.org/",
                [],
                "events: at least one of " + ALL,
            ),
        ]:
            with pytest.raises(store.InvalidEndpoint) as caught:
                store.add_endpoint(conn, "example.org", url, events, time.time())
            assert str(caught.value) == why
        with pytest.raises(accounts.NotFound):
            store.add_endpoint(conn, "nowhere.example", "https://h.example/", ["bounced"], 0.0)
        endpoint = store.add_endpoint(
            conn, "Example.ORG", "https://h.example/", ["bounced", "delivered", "bounced"], 0.0
        )
    finally:
        conn.close()
    assert endpoint.events == ("delivered", "bounced")
    assert endpoint.domain == "example.org"
    assert endpoint.secret.startswith("whsec_")
    assert len(signature.key(endpoint.secret)) == 32


def test_webhook_cli(tmp_path: Path) -> None:
    path, _ = write_config_file(tmp_path)
    cfg = configmod.load(path)
    add_user(cfg, "alice@example.org")
    added = json.loads(
        ok(
            path,
            "webhook",
            "add",
            "--domain",
            "example.org",
            "--url",
            "https://hooks.example.org/in",
            "--events",
            "delivered,bounced",
            "--json",
        )
    )
    assert added["secret"].startswith("whsec_")
    listed = json.loads(ok(path, "webhook", "list", "--json"))
    assert listed == [
        {
            "id": added["id"],
            "domain": "example.org",
            "url": "https://hooks.example.org/in",
            "events": ["delivered", "bounced"],
            "created_at": added["created_at"],
            "disabled": False,
        }
    ]
    assert "whsec_" not in ok(path, "webhook", "list")
    assert json.loads(ok(path, "webhook", "deliveries", "--json")) == []
    refused = cli(
        path,
        "webhook",
        "add",
        "--domain",
        "example.org",
        "--url",
        "http://h.example/",
        "--events",
        "bounced",
    )
    assert user_error(refused) == "url: only https:// URLs are allowed"
    assert ok(path, "webhook", "remove", added["id"]) == (
        f"webhook {added['id']} removed, with its pending deliveries\n"
    )
    assert user_error(cli(path, "webhook", "remove", added["id"])) == f"no webhook {added['id']}"
    assert ok(path, "webhook", "list") == "no webhooks\n"


# ---- the HTTP API -----------------------------------------------------------------------------


async def test_webhooks_api_manages_the_keys_domain_only(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    api = await start_api(tmp_path, relay_factory)
    _, other_token = api.add_key("other.example", "manage")
    _, read_token = api.add_key("example.org", "read")
    async with (
        api.client() as client,
        api.client(other_token) as other,
        api.client(read_token) as reader,
    ):
        made = await client.post(
            "/v1/webhooks", json={"url": "https://hooks.example.org/in", "events": ["bounced"]}
        )
        plain = await client.post(
            "/v1/webhooks", json={"url": "http://hooks.example.org/in", "events": ["bounced"]}
        )
        unknown = await client.post(
            "/v1/webhooks", json={"url": "https://hooks.example.org/in", "events": ["opened"]}
        )
        forbidden = await reader.get("/v1/webhooks")
        listed = await client.get("/v1/webhooks")
        listed_other = await other.get("/v1/webhooks")
        removed_other = await other.delete(f"/v1/webhooks/{made.json()['id']}")
        removed = await client.delete(f"/v1/webhooks/{made.json()['id']}")
        after = await client.get("/v1/webhooks")

    assert made.status_code == 201, made.text
    shown = made.json()
    assert shown["secret"].startswith("whsec_")
    assert (shown["domain"], shown["url"], shown["events"]) == (
        "example.org",
        "https://hooks.example.org/in",
        ["bounced"],
    )
    assert (plain.status_code, plain.json()) == (
        422,
        {"error": {"code": "invalid", "message": "only https:// URLs are allowed", "field": "url"}},
    )
    assert unknown.status_code == 422
    assert unknown.json()["error"]["field"] == "events"
    assert forbidden.status_code == 403
    assert listed.json() == {"webhooks": [{k: v for k, v in shown.items() if k != "secret"}]}
    assert listed_other.json() == {"webhooks": []}
    assert removed_other.status_code == 404
    assert removed.status_code == 204
    assert after.json() == {"webhooks": []}


async def test_a_key_of_several_domains_names_the_webhooks_domain(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    api = await start_api(tmp_path, relay_factory)
    conn = connect(api.relay.config.storage.path)
    with transaction(conn):
        _, token = apikeys.add(conn, ["example.org", "other.example"], "manage", time.time())
    conn.close()
    hook = {"url": "https://hooks.example.org/in", "events": ["delivered"]}
    async with api.client(token) as client, api.client() as one_domain:
        unnamed = await client.post("/v1/webhooks", json=hook)
        named = await client.post("/v1/webhooks", json={**hook, "domain": "Other.Example"})
        foreign = await one_domain.post("/v1/webhooks", json={**hook, "domain": "other.example"})
        listed = await client.get("/v1/webhooks")
        listed_one = await one_domain.get("/v1/webhooks")

    assert (unnamed.status_code, unnamed.json()["error"]["field"]) == (422, "domain")
    assert named.status_code == 201, named.text
    assert named.json()["domain"] == "other.example"
    assert (foreign.status_code, foreign.json()["error"]["code"]) == (403, "forbidden")
    assert [w["id"] for w in listed.json()["webhooks"]] == [named.json()["id"]]
    assert listed_one.json() == {"webhooks": []}


async def test_sent_over_the_api_the_webhook_and_the_status_show_the_tls_evidence(
    tmp_path: Path, relay_factory: RelayFactory, world: World, hooks: Receiver
) -> None:
    """The issue's done-when line: a message sent over HTTP arrives DKIM-signed at a test MX
    over TLS, and its status and its webhook both show the TLS evidence."""
    mx = await world.add_mx("example.net", MODERN)
    api = await start_api(
        tmp_path,
        relay_factory,
        dkim_key=True,
        delivery=delivery_config(world),
        webhooks=webhook_config(),
    )
    async with api.client() as client:
        made = await client.post(
            "/v1/webhooks", json={"url": hooks.url(), "events": ["delivered", "bounced"]}
        )
        assert made.status_code == 201, made.text
        hooks.secret = made.json()["secret"]
        sent = await client.post("/v1/messages", json=TEXT_MESSAGE)
        assert sent.status_code == 202, sent.text
        queue_id = sent.json()["id"]
        [received] = await mx.wait_for_messages(1)
        [event] = await hooks.wait_for(1)
        await settled(api.relay, queue_id, lambda r: r["state"] == "sent")
        status = await client.get(f"/v1/messages/{queue_id}")
    conn = api.relay.db()
    [key] = accounts.keys(conn, "example.org", active_only=True)
    conn.close()

    def txt(name: bytes | str, timeout: float = 5) -> bytes:
        return key.public_record.encode()

    assert dkimpy.verify(received.data, dnsfunc=txt) is True
    assert mx.tls_sessions[0].version == "TLSv1.3"
    assert not mx.received_message_bytes_before_tls
    assert hooks.verified == [True]
    [attempt] = status.json()["recipients"][0]["delivery_attempts"]
    [evidence] = event["data"]["evidence"]
    assert event["type"] == "message.delivered"
    assert (event["data"]["message_id"], event["data"]["recipient"]) == (
        queue_id,
        "bob@example.net",
    )
    fields = ["mx_host", "mx_address", "tls_protocol", "tls_cipher", "cert_fingerprint"]
    fields += ["cert_verified", "policy", "policy_detail"]
    assert {f: evidence[f] for f in fields} == {f: attempt[f] for f in fields}
    assert (evidence["tls_protocol"], evidence["cert_verified"], evidence["mx_host"]) == (
        "TLSv1.3",
        True,
        mx.hostname,
    )
    assert evidence["cert_fingerprint"] == fingerprint(world, mx)


async def test_an_endpoint_on_a_private_address_is_refused_unless_allowed(
    tmp_path: Path, relay_factory: RelayFactory, world: World, hooks: Receiver
) -> None:
    await world.add_mx("example.net", MODERN)
    cfg = make_config(tmp_path, delivery=delivery_config(world), webhooks={"first_retry": "0.2s"})
    add_user(cfg, "alice@example.org")
    subscribe(cfg, "example.org", hooks.url(), ["delivered"], hooks)
    relay = await relay_factory(cfg)
    await asyncio.to_thread(submit, relay, ["bob@example.net"])
    deadline = time.monotonic() + WAIT_SECONDS
    while not (rows := outbox(relay)) or rows[0]["last_error"] is None:
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.05)
    [row] = rows
    assert row["last_error"] == (
        f"{RECEIVER} resolves only to non-public addresses ({RECEIVER_ADDRESS}); refused"
        " (webhooks.allow_private_addresses)"
    )
    assert hooks.requests == []  # not even a connection carried it
