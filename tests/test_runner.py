"""The queue runner against a scripted courier: the specification of the seam between the queue,
which owns every recipient's life, and delivery, which only says how one attempt ended.

A fake courier is right here and only here: it *is* the seam. The store is the real one on disk;
the couriers' own behaviour is tested against real MX servers in test_delivery and test_session.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mailrelay.config import Config
from mailrelay.delivery.result import Evidence, Insecure, Kind, Result
from mailrelay.delivery.runner import QueueRunner
from mailrelay.metrics import Metrics
from mailrelay.store import Store, claims, connect, queue
from mailrelay.store.backend import Connection, is_url
from mailrelay.store.claims import Job
from tests.conftest import make_config

SENT = Result(
    Kind.SENT,
    "2.0.0",
    "smtp; 250 2.0.0 Message accepted",
    evidence=(Evidence(0.0, Kind.SENT, "mx1.dest.example", "127.0.0.9", "250 2.0.0 ok"),),
)
LATER = Result(Kind.TRANSIENT, "4.3.0", "smtp; 451 4.3.0 Try again later")
BODY = b"From: alice@example.org\r\nSubject: runner\r\n\r\nHello.\r\n"


def message(*recipients: str) -> queue.NewMessage:
    return queue.NewMessage(
        sender="alice@example.org",
        recipients=recipients,
        data=BODY,
        auth_user="alice@example.org",
        client_ip="127.0.0.1",
        sender_domain="example.org",
    )


@dataclass
class ScriptedCourier:
    """Answers each job with `answer(job)`; records every job it was given."""

    answer: Callable[[Job], Awaitable[list[Result]]]
    jobs: list[Job] = field(default_factory=list)
    called: asyncio.Event = field(default_factory=asyncio.Event)

    async def deliver(self, job: Job) -> list[Result]:
        self.jobs.append(job)
        self.called.set()
        return await self.answer(job)


def always(result: Result) -> Callable[[Job], Awaitable[list[Result]]]:
    async def answer(job: Job) -> list[Result]:
        return [result] * len(job.recipients)

    return answer


class Clock:
    """Wall-clock time plus an offset a test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Harness:
    config: Config
    path: str
    clock: Clock
    store: Store | None = None
    runner: QueueRunner | None = None

    async def start(self, courier: ScriptedCourier, *, busy_timeout: float = 30.0) -> None:
        """Start the store and the runner as the service does, after a (simulated) crash."""
        self.store = Store(self.path, busy_timeout=busy_timeout)
        await self.store.start()
        await self.store.write(
            lambda c: claims.release_interrupted(c, self.clock(), self.config.instance.id)
        )
        self.runner = QueueRunner(
            self.config, self.store, courier, Metrics(), asyncio.Event(), self.clock
        )
        await self.runner.start()

    async def crash(self) -> None:
        """Stop as abruptly as a killed process: attempts in flight are never recorded."""
        assert self.runner is not None and self.store is not None
        await self.runner.stop(grace=0)
        await self.store.stop()

    async def enqueue(self, msg: queue.NewMessage) -> str:
        assert self.store is not None
        return await self.store.write(
            functools.partial(queue.enqueue, message=msg, now=time.time())
        )

    def recipients(self, message_id: str) -> list[Any]:
        conn: Connection
        if is_url(self.path):
            conn = connect(self.path)
        else:
            # A plain reader: connect() would migrate, and wait for a held write lock.
            conn = sqlite3.connect(self.path)
            conn.row_factory = sqlite3.Row
        try:
            return conn.execute(
                "SELECT address, state, attempts, status, reply FROM recipients"
                " WHERE message_id = ? ORDER BY id",
                (message_id,),
            ).fetchall()
        finally:
            conn.close()

    async def until(self, message_id: str, state: str) -> list[Any]:
        async with asyncio.timeout(10.0):
            while True:
                rows = self.recipients(message_id)
                if rows and all(r["state"] == state for r in rows):
                    return rows
                await asyncio.sleep(0.02)


async def _harness(tmp_path: Path, database: str) -> AsyncIterator[Harness]:
    config = make_config(tmp_path, delivery={"hold": False, "max_queue_lifetime": "1h"})
    h = Harness(config, database, Clock())
    yield h
    if h.runner is not None:
        await h.runner.stop(grace=0)
    if h.store is not None:
        await h.store.stop()


@pytest.fixture
async def harness(tmp_path: Path, database: str) -> AsyncIterator[Harness]:
    """On each backend (SQLite and PostgreSQL, tests/conftest.py `database`)."""
    async for h in _harness(tmp_path, database):
        yield h


@pytest.fixture
async def sqlite_harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """For what only SQLite has: another process holding the file's write lock."""
    async for h in _harness(tmp_path, str(tmp_path / "queue.sqlite3")):
        yield h


async def test_commit_failure_after_remote_250_is_retried_not_redelivered(
    sqlite_harness: Harness,
) -> None:
    harness = sqlite_harness
    blocker = sqlite3.connect(harness.path, isolation_level=None)

    async def sent_then_lock(job: Job) -> list[Result]:
        # Another process takes the write lock while the MX is saying 250, and holds it far
        # longer than the store's busy timeout: the first commits of the outcome fail.
        blocker.execute("BEGIN IMMEDIATE")
        return [SENT] * len(job.recipients)

    courier = ScriptedCourier(sent_then_lock)
    await harness.start(courier, busy_timeout=0.1)
    queue_id = await harness.enqueue(message("bob@dest.example"))
    await courier.called.wait()
    await asyncio.sleep(1.0)  # several failed commits, and several scheduler polls
    [row] = harness.recipients(queue_id)
    assert row["state"] == "active"  # held by the runner, not released to be sent again
    blocker.execute("ROLLBACK")
    blocker.close()
    [row] = await harness.until(queue_id, "sent")
    assert (row["attempts"], row["status"]) == (1, "2.0.0")
    assert len(courier.jobs) == 1  # delivered once


async def test_crash_loop_counts_attempts_and_expires(harness: Harness) -> None:
    async def hang(job: Job) -> list[Result]:
        await asyncio.Event().wait()  # the process dies during every attempt
        raise AssertionError("unreachable")

    queue_id = ""
    for crash in range(2):
        courier = ScriptedCourier(hang)
        await harness.start(courier)
        if crash == 0:
            queue_id = await harness.enqueue(message("bob@dest.example"))
        await courier.called.wait()
        await harness.crash()
        [row] = harness.recipients(queue_id)
        assert (row["state"], row["attempts"]) == ("active", crash + 1)

    harness.clock.offset = 3601.0  # past max_queue_lifetime
    courier = ScriptedCourier(hang)
    await harness.start(courier)
    [row] = await harness.until(queue_id, "bounced")
    assert (row["attempts"], row["status"]) == (3, "4.4.7")
    assert row["reply"] == "message expired in the queue; last error: the attempt was interrupted"
    # Given up without trying a third time; the only delivery is the bounce to the sender.
    await courier.called.wait()
    assert [(j.domain, j.is_bounce) for j in courier.jobs] == [("example.org", True)]
    assert harness.store is not None
    bounces = await harness.store.read(
        lambda c: c.execute("SELECT sender FROM messages WHERE is_bounce = 1").fetchall()
    )
    assert [b["sender"] for b in bounces] == [""]  # the DSN, from the null sender


async def test_a_courier_bug_is_a_counted_transient_attempt(harness: Harness) -> None:
    async def broken(job: Job) -> list[Result]:
        raise RuntimeError("bug in the courier")

    courier = ScriptedCourier(broken)
    await harness.start(courier)
    queue_id = await harness.enqueue(message("bob@dest.example"))
    [row] = await harness.until(queue_id, "deferred")
    assert (row["attempts"], row["status"]) == (1, "4.3.0")
    assert "internal error during delivery" in row["reply"]


async def test_transient_past_lifetime_bounces_with_the_last_error(harness: Harness) -> None:
    courier = ScriptedCourier(always(LATER))
    await harness.start(courier)
    harness.clock.offset = 3601.0
    queue_id = await harness.enqueue(message("bob@dest.example"))
    [row] = await harness.until(queue_id, "bounced")
    assert row["status"] == "4.4.7"
    assert (
        row["reply"] == "message expired in the queue; last error: smtp; 451 4.3.0 Try again later"
    )


async def test_an_outcome_recorded_after_another_instance_took_it_back_changes_nothing(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """While the MX answers, our lease runs out and another instance takes the recipient back
    (our database connection was gone for longer than the lease margin, say). Our bounce then
    makes no DSN and leaves the state to the instance that now holds it."""
    bounced = Result(Kind.PERMANENT, "5.1.1", "smtp; 550 5.1.1 no such user")

    async def taken_back_meanwhile(job: Job) -> list[Result]:
        conn = connect(harness.path)
        try:
            later = harness.clock() + 3600
            with queue.transaction(conn):
                claims.recover_expired(conn, later, "relay-b")
                [theirs] = claims.claim_due(conn, later, 10, "relay-b", later + 660)
            assert theirs.message_id == job.message_id
        finally:
            conn.close()
        return [bounced] * len(job.recipients)

    courier = ScriptedCourier(taken_back_meanwhile)
    await harness.start(courier)
    with caplog.at_level(logging.WARNING, logger="mailrelay.delivery"):
        queue_id = await harness.enqueue(message("bob@dest.example"))
        await courier.called.wait()
        async with asyncio.timeout(10):
            while True:  # until the outcome is recorded
                if any("record_after_lease" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.02)
    [row] = harness.recipients(queue_id)
    assert row["state"] == "active"  # relay-b's
    conn = connect(harness.path)
    try:
        assert [m["id"] for m in queue.list_queue(conn)] == [queue_id]  # no DSN was queued
        attempts = conn.execute("SELECT verdict FROM attempts").fetchall()
        assert [a[0] for a in attempts] == []  # the courier gave no evidence; nothing to keep
        events = conn.execute("SELECT event FROM events ORDER BY id").fetchall()
        assert [e[0] for e in events] == ["QUEUED", "HARD-BOUNCE"]
    finally:
        conn.close()


async def test_one_hundred_recipients_are_one_claim(harness: Harness) -> None:
    store = Store(harness.path)
    await store.start()
    try:
        rcpts = [f"user{n}@dest.example" for n in range(100)]
        await store.write(functools.partial(queue.enqueue, message=message(*rcpts), now=0.0))
        before = store.commits
        jobs = await store.write(functools.partial(claims.claim_due, now=1.0, limit=1))
        assert store.commits - before == 1
        [job] = jobs
        assert [r.address for r in job.recipients] == rcpts
        assert {r.attempts for r in job.recipients} == {1}
    finally:
        await store.stop()


async def test_runner_hands_a_whole_message_to_one_courier_call(harness: Harness) -> None:
    courier = ScriptedCourier(always(SENT))
    await harness.start(courier)
    rcpts = [f"user{n}@dest.example" for n in range(100)]
    queue_id = await harness.enqueue(message(*rcpts, "carol@other.example"))
    rows = await harness.until(queue_id, "sent")
    assert len(rows) == 101
    by_domain = {j.domain: len(j.recipients) for j in courier.jobs}
    assert by_domain == {"dest.example": 100, "other.example": 1}


async def test_duplicate_recipients_are_collapsed(harness: Harness) -> None:
    courier = ScriptedCourier(always(SENT))
    await harness.start(courier)
    queue_id = await harness.enqueue(
        message("bob@dest.example", "bob@DEST.example", "Bob@dest.example", "bob@dest.example")
    )
    rows = await harness.until(queue_id, "sent")
    # Domains are case-insensitive; local parts are not (RFC 5321 §2.4).
    assert [r["address"] for r in rows] == ["bob@dest.example", "Bob@dest.example"]
    [job] = courier.jobs
    assert len(job.recipients) == 2


@pytest.mark.parametrize(("action", "state"), [("bounce", "bounced"), ("defer", "deferred")])
async def test_insecure_follows_insecure_action(tmp_path: Path, action: str, state: str) -> None:
    config = make_config(tmp_path, delivery={"hold": False, "insecure_action": action})
    harness = Harness(config, config.storage.path, Clock())
    insecure = Result(
        Kind.INSECURE,
        "5.7.10",
        "mx1.dest.example[127.0.0.9]: negotiated TLSv1.0",
        Insecure.PROTOCOL,
    )
    await harness.start(ScriptedCourier(always(insecure)))
    try:
        queue_id = await harness.enqueue(message("bob@dest.example"))
        [row] = await harness.until(queue_id, state)
        assert row["status"] == ("5.7.10" if action == "bounce" else "4.7.10")
        assert row["reply"] == "mx1.dest.example[127.0.0.9]: negotiated TLSv1.0"
    finally:
        await harness.crash()
