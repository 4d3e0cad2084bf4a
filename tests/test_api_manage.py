"""The API's management endpoints (issue 15) over real HTTP: domains, users, keys, the queue and
tls-check, each for the key's own domains only, with the CLI's own code behind them."""

from __future__ import annotations

import asyncio
import json
import smtplib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from mailrelay.api.app import BodyLimit
from mailrelay.store import apikeys, connect, db
from mailrelay.store.queue import transaction
from tests.conftest import RelayFactory, add_user, write_config_file
from tests.test_api import Api, error, start_api
from tests.test_api_events import enqueue
from tests.test_cli import cli
from tests.test_delivery import delivery_config
from tests.world import MODERN, World

NEW_PASSWORD = "a new password, long enough"


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path / "world", first_address="127.0.102.1") as w:
        yield w


@pytest.fixture
async def api(tmp_path: Path, relay_factory: RelayFactory, world: World) -> Api:
    # Delivery stays held: only DNS (domain check) and probes (tls-check) reach the world.
    return await start_api(
        tmp_path, relay_factory, dkim_key=True, delivery={**delivery_config(world), "hold": True}
    )


def make_key(
    api: Api, domains: str | list[str], scope: apikeys.Scope, *, new_domains: bool = False
) -> tuple[str, str]:
    conn = api.relay.db()
    try:
        with transaction(conn):
            key, token = apikeys.add(conn, domains, scope, time.time(), new_domains=new_domains)
    finally:
        conn.close()
    return key.id, token


def publish(world: World, records: list[dict[str, str]]) -> None:
    for r in records:
        world.dns.remove(r["name"], r["type"])
        world.dns.add(r["name"], r["type"], r["value"])


def domain_state(api: Api, name: str) -> str:
    conn = api.relay.db()
    try:
        return str(conn.execute("SELECT state FROM domains WHERE name = ?", (name,)).fetchone()[0])
    finally:
        conn.close()


def logs_in(api: Api, user: str, password: str) -> bool:
    """Whether SMTP AUTH with these credentials succeeds (call it off the event loop)."""
    client = api.relay.smtp()
    try:
        client.starttls(context=api.relay.client_context())
        client.login(user, password)
    except smtplib.SMTPAuthenticationError:
        return False
    finally:
        client.close()
    return True


async def logs_in_off_loop(api: Api, user: str, password: str) -> bool:
    return await asyncio.to_thread(logs_in, api, user, password)


# ---- domains -------------------------------------------------------------------------------


async def test_domain_records_and_check_against_dns(api: Api, world: World) -> None:
    conn = api.relay.db()
    with transaction(conn):
        conn.execute("UPDATE domains SET state = 'unverified' WHERE name = 'example.org'")
    conn.close()
    async with api.client() as client:
        listed = await client.get("/v1/domains")
        assert listed.json() == [
            {
                "domain": "example.org",
                "state": "unverified",
                "notify": "postmaster@example.org",
                "checked_at": listed.json()[0]["checked_at"],
            }
        ]
        got = await client.get("/v1/domains/example.org/records")
        assert got.status_code == 200, got.text
        records = got.json()
        [selector] = records["dkim"]["signing"]
        assert records["dkim"] == {"signing": [selector], "next": [], "rotated_out": []}
        assert (records["domain"], records["state"]) == ("example.org", "unverified")
        names = sorted(r["name"] for r in records["records"])
        assert names == [
            "_dmarc.example.org",
            "example.org",
            f"{selector}._domainkey.example.org",
        ]
        failed = await client.post("/v1/domains/example.org/check")
        assert (failed.status_code, failed.json()["valid"]) == (200, False)
        assert "next_dkim" not in failed.json()
        publish(world, records["records"])
        checked = await client.post("/v1/domains/EXAMPLE.org./check")
        assert checked.status_code == 200
        assert checked.json()["valid"] is True
        assert [r["valid"] for r in checked.json()["records"]] == [True, True, True]
        assert domain_state(api, "example.org") == "valid"
        # Another domain, existing or not, is not there for this key.
        for path in ("/v1/domains/other.example/records", "/v1/domains/nowhere.example/records"):
            other = await client.get(path)
            name = path.split("/")[3]
            assert (other.status_code, other.json()) == (
                404,
                error("not_found", f"no domain {name}", "domain"),
            )
        other = await client.post("/v1/domains/other.example/check")
        assert other.status_code == 404


async def test_rotate_activate_and_retire_dkim(api: Api, world: World) -> None:
    async with api.client() as client:
        before = (await client.get("/v1/domains/example.org/records")).json()
        [old] = before["dkim"]["signing"]
        early = await client.post("/v1/domains/example.org/activate-dkim")
        assert (early.status_code, early.json()["error"]["code"]) == (409, "rotation_refused")
        rotated = await client.post("/v1/domains/example.org/rotate-dkim")
        assert rotated.status_code == 200, rotated.text
        [new] = rotated.json()["dkim"]["next"]
        assert rotated.json()["dkim"] == {"signing": [old], "next": [new], "rotated_out": []}
        again = await client.post("/v1/domains/example.org/rotate-dkim")
        assert (again.status_code, again.json()["error"]["code"]) == (409, "rotation_refused")
        unpublished = await client.post("/v1/domains/example.org/activate-dkim")
        assert unpublished.status_code == 409
        assert unpublished.json()["error"]["message"].startswith(f"{new}._domainkey.example.org: ")
        publish(world, rotated.json()["records"])
        activated = await client.post("/v1/domains/example.org/activate-dkim", json={})
        assert activated.status_code == 200, activated.text
        assert activated.json()["dkim"] == {"signing": [new], "next": [], "rotated_out": [old]}
        in_use = await client.delete(f"/v1/domains/example.org/dkim/{new}")
        assert (in_use.status_code, in_use.json()["error"]["code"]) == (409, "key_in_use")
        retired = await client.delete(f"/v1/domains/example.org/dkim/{old}")
        assert retired.status_code == 200
        assert retired.json()["dkim"] == {"signing": [new], "next": [], "rotated_out": []}
        gone = await client.delete(f"/v1/domains/example.org/dkim/{old}")
        assert (gone.status_code, gone.json()) == (
            404,
            error("not_found", f"domain example.org has no DKIM key {old}"),
        )
        rotated_again = await client.post("/v1/domains/example.org/rotate-dkim")
        assert rotated_again.status_code == 200
        forced = await client.post("/v1/domains/example.org/activate-dkim", json={"force": True})
        assert forced.status_code == 200
        assert forced.json()["dkim"]["rotated_out"] == [new]
    # The key files are the service's own: it can read what it signs with.
    [path] = [
        p for p in (Path(api.relay.config.dkim.key_dir) / "example.org").iterdir() if new in p.name
    ]
    assert path.read_bytes().startswith(b"-----BEGIN")


async def test_a_key_adds_only_a_domain_it_lists(api: Api) -> None:
    _, token = make_key(api, ["example.org", "new.example"], "manage", new_domains=True)
    body = {"domain": "new.example", "notify": "postmaster@new.example"}
    async with api.client(token) as client:
        listed = await client.get("/v1/domains")
        assert [d["domain"] for d in listed.json()] == ["example.org"]
        added = await client.post("/v1/domains", json=body)
        assert added.status_code == 201, added.text
        assert (added.json()["domain"], added.json()["state"]) == ("new.example", "unverified")
        assert len(added.json()["dkim"]["signing"]) == 1
        twice = await client.post("/v1/domains", json=body)
        assert (twice.status_code, twice.json()) == (
            409,
            error("exists", "domain new.example exists already", "domain"),
        )
        listed = await client.get("/v1/domains")
        assert [d["domain"] for d in listed.json()] == ["example.org", "new.example"]
    async with api.client() as client:
        refused = await client.post(
            "/v1/domains", json={"domain": "third.example", "notify": "a@third.example"}
        )
        assert (refused.status_code, refused.json()) == (
            403,
            error(
                "forbidden",
                "this key may not add third.example: an operator adds it, or makes a key for it"
                " with mailrelay apikey add --domain third.example --new-domain",
                "domain",
            ),
        )
        bad = await client.post("/v1/domains", json={"domain": "no domain", "notify": "a@b.c"})
        assert (bad.status_code, bad.json()) == (
            422,
            error("invalid", "'no domain' is not a domain name", "domain"),
        )
        bad = await client.post("/v1/domains", json={"domain": "a.example", "notify": "nobody"})
        assert (bad.status_code, bad.json()) == (
            422,
            error("invalid", "'nobody' is not an e-mail address", "notify"),
        )
        missing = await client.post("/v1/domains", json={"domain": "a.example"})
        assert (missing.status_code, missing.json()) == (
            422,
            error("invalid", "Field required", "notify"),
        )


async def test_read_keys_read_and_only_manage_keys_change(api: Api) -> None:
    _, token = make_key(api, "example.org", "read")
    async with api.client(token) as reader:
        assert (await reader.get("/v1/domains/example.org/records")).status_code == 200
        for method, path in [
            ("POST", "/v1/domains/example.org/check"),
            ("POST", "/v1/domains/example.org/rotate-dkim"),
            ("GET", "/v1/users"),
            ("GET", "/v1/keys"),
            # The key is checked before the body: these bodies are missing, yet it is a 403.
            ("POST", "/v1/users"),
            ("POST", "/v1/keys"),
            ("POST", "/v1/domains"),
            ("POST", "/v1/messages/0123456789ABCDEF/retry"),
            ("DELETE", "/v1/messages/0123456789ABCDEF"),
        ]:
            got = await reader.request(method, path)
            assert (got.status_code, got.json()) == (
                403,
                error("forbidden", "the key's scope 'read' does not allow manage"),
            ), path
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        got = await anonymous.post("/v1/users", json={})
    assert (got.status_code, got.json()) == (
        401,
        error("unauthorized", "an API key is required: Authorization: Bearer KEY"),
    )


# ---- users ---------------------------------------------------------------------------------


async def test_a_user_added_over_the_api_logs_in_over_smtp(api: Api) -> None:
    add_user(api.relay.config, "zed@other.example")
    async with api.client() as client:
        added = await client.post(
            "/v1/users",
            json={
                "address": "Alice@example.org",
                "password": NEW_PASSWORD,
                "may_send_as": ["@Example.org", "info@example.org"],
            },
        )
        assert added.status_code == 201, added.text
        assert added.json() == {
            "address": "alice@example.org",
            "domain": "example.org",
            "created_at": added.json()["created_at"],
            "may_send_as": ["alice@example.org", "@example.org", "info@example.org"],
        }
        assert NEW_PASSWORD not in added.text
        assert await logs_in_off_loop(api, "alice@example.org", NEW_PASSWORD)
        listed = await client.get("/v1/users")
        assert [u["address"] for u in listed.json()] == ["alice@example.org"]
        twice = await client.post(
            "/v1/users", json={"address": "alice@example.org", "password": NEW_PASSWORD}
        )
        assert (twice.status_code, twice.json()) == (
            409,
            error("exists", "user alice@example.org exists already", "address"),
        )
        modified = await client.patch(
            "/v1/users/alice@example.org",
            json={"may_not_send_as": ["info@example.org"], "may_send_as": ["sales@example.org"]},
        )
        assert modified.status_code == 200, modified.text
        assert modified.json()["may_send_as"] == [
            "alice@example.org",
            "@example.org",
            "sales@example.org",
        ]
        not_granted = await client.patch(
            "/v1/users/alice@example.org", json={"may_not_send_as": ["info@example.org"]}
        )
        assert (not_granted.status_code, not_granted.json()) == (
            422,
            error(
                "invalid",
                "user alice@example.org has no --may-send-as info@example.org",
                "may_not_send_as[0]",
            ),
        )
        changed = await client.put(
            "/v1/users/alice@example.org/password", json={"password": "another long password"}
        )
        assert changed.status_code == 204
        assert not await logs_in_off_loop(api, "alice@example.org", NEW_PASSWORD)
        assert await logs_in_off_loop(api, "alice@example.org", "another long password")
        deleted = await client.delete("/v1/users/alice@example.org")
        assert deleted.status_code == 204
        assert not await logs_in_off_loop(api, "alice@example.org", "another long password")
        assert (await client.get("/v1/users")).json() == []


async def test_users_of_other_domains_are_out_of_reach(api: Api) -> None:
    add_user(api.relay.config, "zed@other.example")
    async with api.client() as client:
        other = await client.post(
            "/v1/users", json={"address": "eve@other.example", "password": NEW_PASSWORD}
        )
        assert (other.status_code, other.json()) == (
            403,
            error("forbidden", "this key manages example.org only", "address"),
        )
        grant = await client.post(
            "/v1/users",
            json={
                "address": "bob@example.org",
                "password": NEW_PASSWORD,
                "may_send_as": ["@other.example"],
            },
        )
        assert (grant.status_code, grant.json()) == (
            403,
            error("forbidden", "this key manages example.org only", "may_send_as[0]"),
        )
        for method, path, body in [
            ("DELETE", "/v1/users/zed@other.example", None),
            ("PUT", "/v1/users/zed@other.example/password", {"password": NEW_PASSWORD}),
            ("PATCH", "/v1/users/zed@other.example", {"may_send_as": ["a@example.org"]}),
        ]:
            got = await client.request(method, path, json=body)
            assert (got.status_code, got.json()) == (
                404,
                error("not_found", "no user zed@other.example", "address"),
            ), path
        short = await client.post(
            "/v1/users", json={"address": "bob@example.org", "password": "short"}
        )
        assert (short.status_code, short.json()) == (
            422,
            error("invalid", "String should have at least 8 characters", "password"),
        )
        assert "short" not in short.text.replace("String should", "")
        bad = await client.post(
            "/v1/users", json={"address": "not an address", "password": NEW_PASSWORD}
        )
        assert (bad.status_code, bad.json()) == (
            422,
            error("invalid_address", "'not an address' is not an e-mail address", "address"),
        )
    assert await logs_in_off_loop(api, "zed@other.example", "correct horse battery staple")


# ---- keys ----------------------------------------------------------------------------------


async def test_keys_are_made_listed_and_revoked_within_the_keys_domains(api: Api) -> None:
    other_id, _ = make_key(api, "other.example", "manage")
    both_id, _ = make_key(api, ["example.org", "other.example"], "read")
    async with api.client() as client:
        made = await client.post("/v1/keys", json={"scope": "send"})
        assert made.status_code == 201, made.text
        new = made.json()
        assert new == {
            "id": new["id"],
            "domains": ["example.org"],
            "scope": "send",
            "created_at": new["created_at"],
            "revoked_at": None,
            "token": new["token"],
        }
        assert new["token"].startswith("mrk_")
        listed = await client.get("/v1/keys")
        assert sorted(k["id"] for k in listed.json()) == sorted([api.key_id, new["id"]])
        assert all("token" not in k for k in listed.json())
        async with api.client(new["token"]) as sender:
            refused = await sender.get("/v1/keys")
            assert (refused.status_code, refused.json()) == (
                403,
                error("forbidden", "the key's scope 'send' does not allow manage"),
            )
        revoked = await client.delete(f"/v1/keys/{new['id']}")
        assert revoked.status_code == 204
        async with api.client(new["token"]) as sender:
            after = await sender.post("/v1/messages", json={})
            assert (after.status_code, after.json()) == (
                401,
                error("unauthorized", "the API key is not valid"),
            )
        for key_id in (other_id, both_id, new["id"], "KNOSUCHKEY"):
            got = await client.delete(f"/v1/keys/{key_id}")
            assert (got.status_code, got.json()) == (
                404,
                error("not_found", f"no active API key {key_id}", "id"),
            )
        foreign = await client.post(
            "/v1/keys", json={"scope": "read", "domains": ["example.org", "other.example"]}
        )
        assert (foreign.status_code, foreign.json()) == (
            403,
            error("forbidden", "this key manages example.org only", "domains[1]"),
        )
        bad = await client.post("/v1/keys", json={"scope": "admin"})
        assert bad.status_code == 422
        assert (bad.json()["error"]["code"], bad.json()["error"]["field"]) == ("invalid", "scope")
        empty = await client.post("/v1/keys", json={"scope": "read", "domains": []})
        assert (empty.status_code, empty.json()["error"]["field"]) == (422, "domains")


async def test_a_key_of_two_domains_manages_both(api: Api) -> None:
    mine = enqueue(api, "alice@example.org", ("bob@example.net",))
    theirs = enqueue(api, "zed@other.example", ("bob@example.net",))
    both_id, token = make_key(api, ["other.example", "Example.ORG"], "manage")
    single_id, _ = make_key(api, "other.example", "read")
    async with api.client(token) as client:
        domains = await client.get("/v1/domains")
        assert [d["domain"] for d in domains.json()] == ["example.org", "other.example"]
        for queue_id in (mine, theirs):
            got = await client.post(f"/v1/messages/{queue_id}/retry")
            assert (got.status_code, got.json()) == (200, {"id": queue_id, "due": 1})
        keys = await client.get("/v1/keys")
        assert sorted(k["id"] for k in keys.json()) == sorted([api.key_id, both_id, single_id])
        [both] = [k for k in keys.json() if k["id"] == both_id]
        assert both["domains"] == ["example.org", "other.example"]
        made = await client.post("/v1/keys", json={"scope": "send", "domains": ["other.example"]})
        assert made.json()["domains"] == ["other.example"]
    # The key of one of them cannot touch the key of both.
    async with api.client() as client:
        got = await client.delete(f"/v1/keys/{both_id}")
        assert got.status_code == 404


# ---- queue ---------------------------------------------------------------------------------


async def test_retry_and_delete_only_messages_of_the_keys_domains(api: Api) -> None:
    mine = enqueue(api, "alice@example.org", ("bob@example.net", "carol@example.net"))
    theirs = enqueue(api, "zed@other.example", ("bob@example.net",))
    async with api.client() as client:
        retried = await client.post(f"/v1/messages/{mine.lower()}/retry")
        assert (retried.status_code, retried.json()) == (200, {"id": mine, "due": 2})
        for method, path in [
            ("POST", f"/v1/messages/{theirs}/retry"),
            ("DELETE", f"/v1/messages/{theirs}"),
        ]:
            got = await client.request(method, path)
            assert (got.status_code, got.json()) == (
                404,
                error("not_found", f"no message {theirs}", "id"),
            ), path
        deleted = await client.delete(f"/v1/messages/{mine}")
        assert deleted.status_code == 204
        gone = await client.get(f"/v1/messages/{mine}")
        assert gone.status_code == 404
        again = await client.delete(f"/v1/messages/{mine}")
        assert (again.status_code, again.json()) == (
            404,
            error("not_found", f"no message {mine}", "id"),
        )
    conn = api.relay.db()
    ids = [r[0] for r in conn.execute("SELECT id FROM messages")]
    conn.close()
    assert ids == [theirs]


async def test_retry_of_a_message_with_nothing_pending_is_409(api: Api) -> None:
    done = enqueue(api, "alice@example.org", ("bob@example.net",))
    conn = api.relay.db()
    with transaction(conn):
        conn.execute("UPDATE recipients SET state = 'sent' WHERE message_id = ?", (done,))
    conn.close()
    async with api.client() as client:
        got = await client.post(f"/v1/messages/{done}/retry")
    assert (got.status_code, got.json()) == (
        409,
        error("not_pending", f"no queued recipients for message {done}", "id"),
    )


# ---- tls-check -----------------------------------------------------------------------------


async def test_tls_check_reports_any_domain_as_the_cli_does(api: Api, world: World) -> None:
    mx = await world.add_mx("dest.example", MODERN)
    _, token = make_key(api, "example.org", "read")
    async with api.client(token) as client:
        got = await client.get("/v1/tls-check/Dest.Example")
        assert got.status_code == 200, got.text
        report = got.json()
        assert (report["domain"], report["verdict"]) == ("dest.example", "secure")
        [probed] = report["mx"]
        assert (probed["host"], probed["address"], probed["verdict"]) == (
            mx.hostname,
            mx.address[0],
            "secure",
        )
        assert (probed["protocol"], probed["certificate_verified"]) == ("TLSv1.3", True)
        bad = await client.get("/v1/tls-check/not a domain")
        assert (bad.status_code, bad.json()) == (
            422,
            error("invalid", "'not a domain' is not a domain name", "domain"),
        )
    assert mx.all_messages == []
    _, sender = make_key(api, "example.org", "send")
    async with api.client(sender) as client:
        refused = await client.get("/v1/tls-check/dest.example")
        assert refused.status_code == 403


async def test_one_tls_check_at_a_time_per_key(api: Api) -> None:
    # A probe under way for this key, as the endpoint marks it while it runs.
    server = api.relay.service.api
    assert server is not None
    limited = server.config.app
    assert isinstance(limited, BodyLimit) and isinstance(limited.app, FastAPI)
    limited.app.state.tls_probes = {api.key_id}
    async with api.client() as client:
        got = await client.get("/v1/tls-check/dest.example")
    assert (got.status_code, got.json()) == (
        429,
        error("busy", "this key has a tls-check under way; try again when it ends"),
    )


# ---- the store and the CLI -----------------------------------------------------------------


def test_keys_of_one_domain_keep_working_after_the_migration(tmp_path: Path) -> None:
    path = str(tmp_path / "old.sqlite3")
    mine = next(i for i, m in enumerate(db.MIGRATIONS) if "api_key_domains" in m)
    old = sqlite3.connect(path, isolation_level=None)
    for script in db.MIGRATIONS[:mine]:
        for statement in db._statements(script):
            old.execute(statement)
    old.execute(f"PRAGMA user_version = {mine}")
    token = apikeys.TOKEN_PREFIX + "old-token"
    old.execute(
        "INSERT INTO api_keys (id, domain, scope, token_sha256, created_at)"
        " VALUES ('KOLD', 'example.org', 'send', ?, 1.0)",
        (apikeys.token_hash(token),),
    )
    old.close()
    conn = connect(path)
    try:
        key = apikeys.by_token(conn, token)
    finally:
        conn.close()
    assert key == apikeys.ApiKey("KOLD", ("example.org",), "send", 1.0)
    assert (key.domain, key.owns("Example.ORG."), key.owns("other.example")) == (
        "example.org",
        True,
        False,
    )


def test_apikey_add_takes_several_domains(tmp_path: Path) -> None:
    config, _ = write_config_file(tmp_path)
    for domain in ("a.example", "b.example"):
        done = cli(config, "domain", "add", domain, "--notify", f"postmaster@{domain}", "--json")
        assert done.returncode == 0, done
    done = cli(
        config,
        "apikey",
        "add",
        "--domain",
        "b.example",
        "--domain",
        "A.example",
        "--scope",
        "manage",
        "--json",
    )
    assert (done.returncode, done.stderr) == (0, ""), done
    made = json.loads(done.stdout)
    assert (made["domains"], made["scope"]) == (["a.example", "b.example"], "manage")
    refused = cli(config, "apikey", "add", "--domain", "new.example", "--scope", "manage")
    assert (refused.returncode, refused.stderr) == (1, "mailrelay: no domain new.example\n")
    done = cli(
        config,
        "apikey",
        "add",
        "--domain",
        "new.example",
        "--new-domain",
        "--scope",
        "manage",
        "--json",
    )
    assert (done.returncode, json.loads(done.stdout)["domains"]) == (0, ["new.example"])
    listed = cli(config, "apikey", "list")
    assert listed.returncode == 0
    assert [line.split()[1] for line in listed.stdout.splitlines()] == [
        "a.example,b.example",
        "new.example",
    ]


async def test_the_openapi_document_describes_the_management_endpoints(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        doc = (await client.get("/v1/openapi.json")).json()
    paths: dict[str, Any] = doc["paths"]
    assert sorted(paths["/v1/events"]) == ["get"]
    assert sorted(paths["/v1/domains"]) == ["get", "post"]
    assert sorted(paths["/v1/users/{address}"]) == ["delete", "patch"]
    assert sorted(paths["/v1/keys"]) == ["get", "post"]
    assert sorted(paths["/v1/messages/{message_id}"]) == ["delete", "get"]
    assert sorted(paths["/v1/tls-check/{domain}"]) == ["get"]
    schemas = doc["components"]["schemas"]
    for name in ("EventPage", "DomainRecords", "DomainCheck", "User", "NewUser", "MadeKey"):
        assert name in schemas, name
