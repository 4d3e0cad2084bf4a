"""The delivery log's pages with several writers (issue 16): on PostgreSQL two instances write
events at once, and an event id can commit after a larger one. A page must never show an event
that a later commit then lands below; what is shown stays as it was, and everything new
appears above it. On SQLite one writer at a time keeps ids in commit order."""

from __future__ import annotations

import pytest

from mailrelay.store import connect, events, queue
from mailrelay.store.backend import Connection, begin


def _event(conn: Connection, recipient: str) -> None:
    queue.add_event(conn, 1.0, "Q" + recipient[:6].upper(), f"{recipient}@dest.example", "QUEUED")


def _recipients(page: events.Page) -> list[str]:
    return [e["recipient"].split("@")[0] for e in page.events]


def _walk(conn: Connection, limit: int) -> list[str]:
    """Every page, oldest last, as `log --cursor` and the API page."""
    seen: list[str] = []
    cursor = None
    while True:
        page = events.query(conn, cursor=cursor, limit=limit)
        seen += _recipients(page)
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


def test_an_event_that_commits_late_never_lands_below_what_was_shown(pg_url: str) -> None:
    reader, first, second = connect(pg_url), connect(pg_url), connect(pg_url)
    try:
        for name in ("old1", "old2", "old3"):
            _event(reader, name)  # autocommit: each its own transaction
        # The first instance's transaction writes (the smaller id) and stays open; the second
        # instance's writes a larger id and commits.
        begin(first)
        _event(first, "late")
        begin(second)
        _event(second, "early")
        second.execute("COMMIT")

        # Neither shows while the first transaction is open: "early" has the larger id, and
        # were it shown, "late" would commit below it, under a page someone already read.
        shown = events.query(reader, limit=2)
        assert _recipients(shown) == ["old3", "old2"]
        assert shown.next_cursor is not None
        first.execute("COMMIT")

        # A walk begun before that commit goes on with its cursor: each older event once.
        rest = events.query(reader, cursor=shown.next_cursor, limit=2)
        assert _recipients(rest) == ["old1"] and rest.next_cursor is None
        # Now both show, above everything shown before, in commit order's stand-in: the
        # transactions' ids. What was shown is unchanged below them.
        assert _walk(reader, 2) == ["early", "late", "old3", "old2", "old1"]
    finally:
        for conn in (reader, first, second):
            conn.close()


def test_cursors_are_opaque_and_refused_when_foreign(database: str) -> None:
    conn = connect(database)
    try:
        for n in range(5):
            _event(conn, f"r{n}")
        assert _walk(conn, 2) == ["r4", "r3", "r2", "r1", "r0"]
        # A plain id is a cursor on both (on PostgreSQL, for events moved from SQLite by
        # `storage migrate`, whose transaction id is 0, it goes on working).
        with pytest.raises(ValueError, match="not a cursor from this command"):
            events.query(conn, cursor="12x")
        with pytest.raises(ValueError, match="not a cursor from this command"):
            events.query(conn, cursor="-3")
    finally:
        conn.close()


def test_a_sqlite_cursor_goes_on_after_storage_migrate(pg_url: str) -> None:
    conn = connect(pg_url)
    try:
        # Rows as `storage migrate` copies them: their ids, transaction id 0.
        for n in range(1, 5):
            conn.execute(
                "INSERT INTO events (id, at, message_id, recipient, domain, event, txid)"
                " VALUES (?, 1.0, 'Q', ?, 'dest.example', 'QUEUED', 0)",
                (n, f"m{n}@dest.example"),
            )
        conn.execute("SELECT setval(pg_get_serial_sequence('events', 'id'), 4)")
        _event(conn, "new")
        assert _recipients(events.query(conn, cursor="3", limit=10)) == ["m2", "m1"]
        page = events.query(conn, limit=2)
        assert _recipients(page) == ["new", "m4"] and page.next_cursor == "4"
        assert _recipients(events.query(conn, cursor=page.next_cursor)) == ["m3", "m2", "m1"]
    finally:
        conn.close()
