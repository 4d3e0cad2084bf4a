"""Two instances' writers racing on one PostgreSQL (issue 16): groups that take the same rows in
opposite orders deadlock; PostgreSQL fails one statement, and the writer runs that whole group
again rather than fail an operation (a submission's 451) over a race it did not lose on its
merits."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable

import pytest

from mailrelay.store import Store, connect
from mailrelay.store.backend import Connection

HANG = 60.0  # a bound on waits that end as soon as their condition holds


def _counters(url: str) -> None:
    conn = connect(url)
    conn.execute("CREATE TABLE counters (k TEXT PRIMARY KEY, n BIGINT NOT NULL)")
    conn.execute("INSERT INTO counters (k, n) VALUES ('x', 0), ('y', 0)")
    conn.close()


def _bump(key: str, then: Callable[[], None] = lambda: None) -> Callable[[Connection], str]:
    """An operation that locks row `key` (as a rate counter's upsert does), then calls `then`."""

    def op(conn: Connection) -> str:
        conn.execute("UPDATE counters SET n = n + 1 WHERE k = ?", (key,))
        then()
        return key

    return op


def _wait(gate: threading.Event, conn: Connection) -> None:
    gate.wait(HANG)


async def test_groups_that_deadlock_across_writers_both_commit(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    _counters(pg_url)
    one, two = Store(pg_url), Store(pg_url)
    await one.start()
    await two.start()
    both_hold_one_row = threading.Barrier(2, timeout=HANG)
    passed = {"one": False, "two": False}

    def meet(name: str) -> Callable[[], None]:
        def wait() -> None:
            if not passed[name]:  # the group's second run goes straight through
                passed[name] = True
                both_hold_one_row.wait()

        return wait

    # Each writer is held on a first operation, so that the two after it form one group.
    gates = [threading.Event(), threading.Event()]
    try:
        held = [
            store.submit(functools.partial(_wait, gate))
            for store, gate in zip((one, two), gates, strict=True)
        ]
        await asyncio.sleep(0.2)  # both writers are in their first group
        # One: x, then y. Two: y, then x. Each takes its first row, waits for the other to
        # take its own, then asks for the other's: a deadlock PostgreSQL must break.
        groups = [
            [one.submit(_bump("x", meet("one"))), one.submit(_bump("y"))],
            [two.submit(_bump("y", meet("two"))), two.submit(_bump("x"))],
        ]
        with caplog.at_level(logging.WARNING, logger="mailrelay.store.writer"):
            for gate in gates:
                gate.set()
            await asyncio.wait_for(asyncio.gather(*held), HANG)
            results = await asyncio.wait_for(
                asyncio.gather(*(asyncio.gather(*group) for group in groups)), HANG
            )
        assert results == [["x", "y"], ["y", "x"]]
        rows = await one.read(lambda c: dict(c.execute("SELECT k, n FROM counters").fetchall()))
        assert rows == {"x": 2, "y": 2}
        logged = [r.getMessage() for r in caplog.records]
        retried = [line for line in logged if "store_group_retried" in line]
        assert len(retried) == 1 and "deadlock detected" in retried[0]
    finally:
        for gate in gates:
            gate.set()
        await one.stop()
        await two.stop()
