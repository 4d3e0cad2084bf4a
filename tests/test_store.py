"""The store: group commit, one failed operation not sinking its group (on SQLite and on
PostgreSQL), a full disk answered with 451 so the client keeps the message, a dead writer, and
fsync at every commit."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest

from mailrelay.store import Store, queue
from mailrelay.store.backend import Connection
from mailrelay.store.writer import StoreFailed
from tests.conftest import Relay
from tests.test_submission import MESSAGE, queued_id, send_raw


def insert(n: int) -> queue.NewMessage:
    return queue.NewMessage(
        sender="alice@example.org",
        recipients=(f"r{n}@example.net",),
        data=MESSAGE,
        auth_user="alice@example.org",
        client_ip="127.0.0.1",
        sender_domain="example.org",
    )


async def test_concurrent_writes_share_commits(database: str) -> None:
    store = Store(database)
    await store.start()
    try:
        ops = [functools.partial(queue.enqueue, message=insert(n), now=0.0) for n in range(200)]
        ids = await asyncio.gather(*(store.write(op) for op in ops))
        assert len(set(ids)) == 200
        # Operations that arrived while a commit was in progress rode on the next one.
        assert store.commits < 200
        count = await store.read(lambda c: c.execute("SELECT count(*) FROM messages").fetchone())
        assert count[0] == 200
    finally:
        await store.stop()


async def test_a_failing_operation_is_rolled_back_alone(database: str) -> None:
    store = Store(database)
    await store.start()

    def broken(conn: Connection) -> str:
        queue.enqueue(conn, insert(0), 0.0)
        raise ValueError("half done")

    try:
        results = await asyncio.gather(
            store.write(lambda c: queue.enqueue(c, insert(1), 0.0)),
            store.write(broken),
            store.write(lambda c: queue.enqueue(c, insert(2), 0.0)),
            return_exceptions=True,
        )
        assert isinstance(results[1], ValueError)
        rcpts = await store.read(
            lambda c: [r[0] for r in c.execute("SELECT address FROM recipients ORDER BY id")]
        )
        assert rcpts == ["r1@example.net", "r2@example.net"]
    finally:
        await store.stop()


async def test_full_disk_is_a_451_and_nothing_is_half_queued(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    store = relay.service.store
    pages = await store.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    # SQLite's own "database or disk is full" (SQLITE_FULL), on the writer's connection.
    await store.write(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 1}"))

    def submit() -> tuple[int, bytes]:
        client = relay.session()
        big = MESSAGE + (b"z" * 998 + b"\r\n") * 64 + b".\r\n"
        reply = send_raw(client, "alice@example.org", ["bob@example.net"], big)
        client.quit()
        return reply

    assert await asyncio.to_thread(submit) == (
        451,
        b"4.3.0 Local error: message not queued, try again later",
    )
    assert queue.list_queue(relay.db()) == []
    # The log names the real cause, not the savepoint SQLite had already rolled back.
    failures = [r.getMessage() for r in caplog.records if "store commit failed" in r.getMessage()]
    assert failures and all("full" in m and "savepoint" not in m for m in failures), failures
    await store.write(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
    queued_id(await asyncio.to_thread(submit))


class WriterKilled(BaseException):
    """Stands for what kills a writer thread for good (ROLLBACK itself failing, say)."""


def kill_writer(conn: Connection) -> None:
    raise WriterKilled("the writer's connection broke")


async def test_a_dead_writer_fails_every_commit_at_once(tmp_path: Path) -> None:
    failures: list[BaseException] = []
    told = asyncio.Event()

    def on_failure(error: BaseException) -> None:
        failures.append(error)
        told.set()

    store = Store(str(tmp_path / "q.sqlite3"), on_failure=on_failure)
    await store.start()
    try:
        waiting: list[asyncio.Future[None]] = [
            asyncio.ensure_future(store.write(kill_writer)),
            *(asyncio.ensure_future(store.write(lambda c: None)) for _ in range(3)),
        ]
        results = await asyncio.wait_for(
            asyncio.gather(*waiting, return_exceptions=True), timeout=5
        )
        assert all(isinstance(r, StoreFailed) for r in results), results
        with pytest.raises(StoreFailed, match="the writer's connection broke"):
            await store.write(lambda c: None)
        await asyncio.wait_for(told.wait(), timeout=5)  # called on the event loop, once
        assert [type(f) for f in failures] == [WriterKilled]
    finally:
        await asyncio.wait_for(store.stop(), timeout=5)


async def test_a_dead_writer_refuses_mail_and_stops_the_service(relay: Relay) -> None:
    with pytest.raises(StoreFailed):
        await relay.service.store.write(kill_writer)
    await asyncio.wait_for(relay.service.failed.wait(), timeout=5)

    def submit() -> tuple[int, bytes]:
        client = relay.session()
        reply = send_raw(client, "alice@example.org", ["bob@example.net"], MESSAGE + b".\r\n")
        client.quit()
        return reply

    assert await asyncio.to_thread(submit) == (
        451,
        b"4.3.0 Local error: message not queued, try again later",
    )


async def test_every_commit_is_fsynced(tmp_path: Path) -> None:
    """The kill -9 test cannot see a missing fsync (the page cache outlives the process), so
    the settings that make SQLite fsync the WAL at each commit are checked on the connection
    that commits: WAL with synchronous = FULL (2), which `connect` reads back and enforces."""
    store = Store(str(tmp_path / "q.sqlite3"))
    await store.start()
    try:
        mode, synchronous = await store.write(
            lambda c: (
                c.execute("PRAGMA journal_mode").fetchone()[0],
                c.execute("PRAGMA synchronous").fetchone()[0],
            )
        )
        assert (mode, synchronous) == ("wal", 2)
    finally:
        await store.stop()
