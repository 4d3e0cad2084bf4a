"""A PostgreSQL server that goes away and comes back (issue 16): the writer fails what it had in
hand, answers every write at once while the server is away, connects again, and the service
goes on. Nothing accepted is lost: what got 250 is delivered once, what got 451 was never
claimed stored."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from mailrelay.store import Store, connect
from mailrelay.store.backend import Connection
from mailrelay.submission import replies
from tests.conftest import PASSWORD, Relay, RelayFactory, add_user, make_config, running_cluster
from tests.pg import Cluster
from tests.test_api import TEXT_MESSAGE, start_api
from tests.test_delivery import delivery_config, settled
from tests.test_observability import key, scrape
from tests.test_submission import MESSAGE, queued_id, send_raw
from tests.world import MODERN, World

FIRST_ADDRESS = "127.0.111.1"  # this file's own 127.0.111.x
# Bounds on waits that end as soon as their condition holds: a hang fails, a slow machine passes.
HANG = 60.0


def _terminate_others(url: str) -> int:
    """What a failover or an administrator's pg_terminate_backend does: every other connection
    to the database is cut. The number cut."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _insert(text: str) -> Callable[[Connection], None]:
    def op(conn: Connection) -> None:
        conn.execute("INSERT INTO notes (text) VALUES (?)", (text,))

    return op


def _notes(conn: Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT text FROM notes ORDER BY id")]


def _make_notes(url: str) -> None:
    conn = connect(url)
    conn.execute("CREATE TABLE notes (id BIGINT GENERATED ALWAYS AS IDENTITY, text TEXT)")
    conn.close()


async def test_a_cut_connection_fails_the_write_in_hand_and_the_next_one_commits(
    pg_url: str,
) -> None:
    _make_notes(pg_url)
    store = Store(pg_url)
    await store.start()
    try:
        await store.write(_insert("before"))
        assert await asyncio.to_thread(_terminate_others, pg_url) >= 2  # the writer, a reader
        # The write in hand meets the dead connection: it fails, as a full disk does.
        with pytest.raises(sqlite3.OperationalError):
            await asyncio.wait_for(store.write(_insert("lost")), HANG)
        # The writer connected again at once: the next write commits, the readers too.
        await asyncio.wait_for(store.write(_insert("after")), HANG)
        assert await store.read(_notes) == ["before", "after"]
        assert store.failure is None
    finally:
        await store.stop()


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A server of this test's own, to stop and start again without disturbing other tests."""
    with running_cluster() as cluster:
        yield cluster


async def test_writes_fail_at_once_while_the_server_is_down_and_commit_once_it_is_back(
    own_cluster: Cluster,
) -> None:
    url = own_cluster.new_database()
    _make_notes(url)
    store = Store(url)
    await store.start()
    try:
        await store.write(_insert("before"))
        await asyncio.to_thread(own_cluster.shut_down)
        # Down: each write and read is answered (an error, never a hang), and the store stays
        # usable.
        for n in range(3):
            with pytest.raises(sqlite3.OperationalError):
                await asyncio.wait_for(store.write(_insert(f"down {n}")), HANG)
        with pytest.raises(sqlite3.OperationalError):
            await asyncio.wait_for(store.read(_notes), HANG)
        assert store.failure is None
        await asyncio.to_thread(own_cluster.launch)
        # Back: the writer's next attempt to connect succeeds (it backs off up to 5 s).
        deadline = asyncio.get_running_loop().time() + HANG
        while True:
            try:
                await store.write(_insert("back"))
                break
            except sqlite3.OperationalError:
                assert asyncio.get_running_loop().time() < deadline, "the writer never came back"
                await asyncio.sleep(0.2)
        # The readers' pool connects again in the background, backing off on its own.
        while True:
            try:
                assert await store.read(_notes) == ["before", "back"]
                break
            except sqlite3.OperationalError:
                assert asyncio.get_running_loop().time() < deadline, "the readers never came back"
                await asyncio.sleep(0.2)
        assert store.failure is None
    finally:
        await store.stop()


def _submit_once(relay: Relay, label: str) -> tuple[int, bytes]:
    client = relay.session()
    try:
        message = MESSAGE.replace(b"Subject: ", f"Subject: {label} ".encode(), 1)
        return send_raw(client, "alice@example.org", ["bob@dest.example"], message + b".\r\n")
    finally:
        client.quit()


async def test_a_relay_keeps_serving_through_a_cut_connection_and_loses_nothing(
    tmp_path: Path, relay_factory: RelayFactory, pg_url: str
) -> None:
    """Mail in every state when the connections are cut: delivered and recorded, at the MX
    awaiting its 250 (the record fails and is retried), and being submitted (451 or 250).
    Afterwards every message that got 250 is delivered exactly once, and the service runs on."""
    async with World(tmp_path / "world", first_address=FIRST_ADDRESS) as world:
        await world.add_mx("example.org", MODERN)
        mx = await world.add_mx("dest.example", MODERN)
        cfg = make_config(tmp_path, storage={"url": pg_url}, delivery=delivery_config(world))
        add_user(cfg, "alice@example.org")
        relay = await relay_factory(cfg)

        first = queued_id(await asyncio.to_thread(_submit_once, relay, "first"))
        await settled(relay, first, lambda r: r["state"] == "sent")
        # The next one is held at the final dot for a while: its outcome comes back to a
        # writer whose connection is gone.
        mx.behaviour = dataclasses.replace(MODERN, data_stall=2.0)
        held = queued_id(await asyncio.to_thread(_submit_once, relay, "held"))
        await mx.wait_until(lambda s: len(s.all_messages) >= 2)
        assert await asyncio.to_thread(_terminate_others, pg_url) >= 2
        mx.behaviour = MODERN

        # Submissions go on: each is answered 250 or, while the writer connects again, with the
        # exact 451 that tells the client to keep the message; never anything else.
        after: list[str] = []
        for n in range(50):
            reply = await asyncio.to_thread(_submit_once, relay, f"after {n}")
            if reply[0] == 250:
                after.append(queued_id(reply))
            else:
                assert f"{reply[0]} {reply[1].decode()}" == replies.NOT_QUEUED
            if n >= 2 and after:
                break
        assert after
        accepted = [first, held, *after]

        for queue_id in accepted:
            await settled(relay, queue_id, lambda r: r["state"] == "sent")
        subjects = [m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for m in mx.messages]
        assert len(subjects) == len(accepted) == len(set(subjects))  # each once, none twice
        # The metrics' own connection was cut too: the scrape after connects again.
        samples = await scrape(relay)
        assert samples[key("mailrelay_queue_recipients", state="queued")] == 0
        assert samples[key("mailrelay_queue_oldest_age_seconds")] == 0
        assert not relay.service.failed.is_set()
        assert relay.service.store.failure is None


async def test_the_api_answers_503_while_the_database_is_down(
    tmp_path: Path, relay_factory: RelayFactory, own_cluster: Cluster
) -> None:
    api = await start_api(tmp_path, relay_factory, storage={"url": own_cluster.new_database()})
    async with api.client() as client:
        assert (await client.post("/v1/messages", json=TEXT_MESSAGE)).status_code == 202
        await asyncio.to_thread(own_cluster.shut_down)
        # A read (the key, then the log) and a write: each the same 503, telling when to come
        # back; never a 500, never a hang.
        for method, path, body in (
            ("GET", "/v1/events", None),
            ("POST", "/v1/messages", TEXT_MESSAGE),
        ):
            got = await client.request(method, path, json=body)
            assert (got.status_code, got.headers["retry-after"]) == (503, "5"), got.text
            assert got.json()["error"]["code"] == "unavailable"
        await asyncio.to_thread(own_cluster.launch)
        deadline = asyncio.get_running_loop().time() + HANG
        while (got := await client.post("/v1/messages", json=TEXT_MESSAGE)).status_code != 202:
            assert got.status_code == 503, got.text
            assert asyncio.get_running_loop().time() < deadline, "the API never came back"
            await asyncio.sleep(0.2)
    assert len(api.stored()) == 2


async def test_smtp_sessions_hear_4xx_while_the_database_is_down(
    tmp_path: Path, relay_factory: RelayFactory, own_cluster: Cluster
) -> None:
    cfg = make_config(tmp_path, storage={"url": own_cluster.new_database()})
    add_user(cfg, "alice@example.org")
    relay = await relay_factory(cfg)
    ready = await asyncio.to_thread(relay.session)  # logged in while the database was up
    try:
        await asyncio.to_thread(own_cluster.shut_down)

        def log_in() -> tuple[int, bytes]:
            client = relay.smtp()
            try:
                client.starttls(context=relay.client_context())
                client.ehlo()
                return client.docmd("AUTH", "PLAIN " + _plain("alice@example.org", PASSWORD))
            finally:
                client.close()

        # AUTH: RFC 4954's temporary failure; MAIL in the logged-in session: the database's 451.
        code, text = await asyncio.to_thread(log_in)
        assert f"{code} {text.decode()}" == replies.AUTH_TEMPORARY_FAILURE
        code, text = await asyncio.to_thread(ready.docmd, "MAIL", "FROM:<alice@example.org>")
        assert f"{code} {text.decode()}" == replies.STORE_UNAVAILABLE
        await asyncio.to_thread(own_cluster.launch)
        deadline = asyncio.get_running_loop().time() + HANG
        while True:
            code, text = await asyncio.to_thread(ready.docmd, "MAIL", "FROM:<alice@example.org>")
            if code == 250:
                break
            assert f"{code} {text.decode()}" == replies.STORE_UNAVAILABLE
            assert asyncio.get_running_loop().time() < deadline, "the reads never came back"
            await asyncio.sleep(0.2)
    finally:
        ready.close()
    assert not relay.service.failed.is_set()


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()
