"""Every recipient's story in the events table: refusals at submission, and the log queries.

Events are written by `queue.enqueue` and `claims.record` (QUEUED, DELIVERED, SOFT-BOUNCE,
HARD-BOUNCE) and by the submission handler through `record_refused` (REFUSED). Like `queue`, each
function takes a connection and runs inside the caller's transaction.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, get_args

from mailrelay.store import queue
from mailrelay.store.backend import Connection, dialect
from mailrelay.store.queue import EventName

EVENTS: tuple[str, ...] = get_args(EventName)

_COLUMNS = (
    "id, at, message_id, recipient, domain, event, mx, reply, tls_protocol, tls_cipher, policy,"
    " policy_detail"
)
_STORY = ("at", "event", "mx", "reply", "tls_protocol", "tls_cipher", "policy", "policy_detail")
_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def record_refused(
    conn: Connection, at: float, queue_id: str, recipients: list[str], reply: str
) -> None:
    """One REFUSED event per recipient the submission server turned away.

    `queue_id` is the id the transaction was given at MAIL FROM: the id its message gets if DATA
    is accepted later, so `queue show ID` tells a message's refused recipients beside its
    delivered ones; for a transaction that never got that far, it groups its refusals.
    """
    for address in recipients:
        queue.add_event(conn, at, queue_id, storable(address), "REFUSED", reply=storable(reply))


def storable(text: str) -> str:
    """`text` as valid UTF-8, which SQLite must be given. A refused address is kept as the client
    wrote it, and aiosmtpd hands on bytes that are not UTF-8 as lone surrogates
    (surrogateescape): those become backslash escapes (\\xff)."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no byte was escaped to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Page:
    events: list[dict[str, Any]]
    next_cursor: str | None  # pass back, with the same filters, for the next (older) page

    def to_json(self) -> dict[str, Any]:
        return {"events": self.events, "next_cursor": self.next_cursor}


def query(
    conn: Connection,
    *,
    domain: str | None = None,
    since: float | None = None,
    status: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
    sender_domains: Collection[str] | None = None,
) -> Page:
    """Events newest first, `limit` at a time.

    The cursor names the last event returned, opaque to callers. Each page gives each event
    once, and never one that commits later below the cursor, however many arrive while someone
    pages: on SQLite, one writer at a time assigns ids in commit order, so the cursor is an id;
    on PostgreSQL several instances write at once and an id can commit after a larger one, so
    events are ordered by (transaction id, id) and a page shows only those whose transaction,
    and every earlier one, has ended (below the snapshot's xmin): whatever commits later has a
    larger transaction id than anything already shown.

    `sender_domains` keeps the events of messages those domains sent (an API key's view): the
    refusals of a transaction that queued nothing, and a deleted message's events, are left out.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    where: list[str] = []
    params: list[object] = []
    shared = dialect(conn) == "postgresql"
    if shared:
        where.append("txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
    if cursor is not None:
        txid, event_id = _parse_cursor(cursor, shared)
        if shared:
            where.append("(txid, id) < (?, ?)")
            params.extend((txid, event_id))
        else:
            where.append("id < ?")
            params.append(event_id)
    if domain is not None:
        where.append("domain = ?")
        params.append(domain.lower().rstrip("."))
    if since is not None:
        where.append("at >= ?")
        params.append(since)
    if status is not None:
        where.append("event = ?")
        params.append(parse_status(status))
    if sender_domains is not None:
        marks = ", ".join("?" * len(sender_domains))
        where.append(
            f"message_id IN (SELECT id FROM messages WHERE sender_domain IN ({marks}))"  # noqa: S608 -- placeholders only
        )
        params.extend(sender_domains)
    sql = f"SELECT {_COLUMNS}, txid FROM events"  # noqa: S608 -- only fixed clauses are joined in
    if where:
        sql += " WHERE " + " AND ".join(where)
    order = " ORDER BY txid DESC, id DESC" if shared else " ORDER BY id DESC"
    rows = conn.execute(sql + order + " LIMIT ?", (*params, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([_event(r) for r in rows], _cursor(rows[-1]) if more else None)


def _event(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "at": row["at"],
        "queue_id": row["message_id"],
        "recipient": row["recipient"],
        "domain": row["domain"],
        "event": row["event"],
        "mx": row["mx"],
        "reply": row["reply"],
        "tls_protocol": row["tls_protocol"],
        "tls_cipher": row["tls_cipher"],
        "policy": row["policy"],
        "policy_detail": row["policy_detail"],
    }


def _cursor(row: sqlite3.Row) -> str:
    # An id alone where the transaction id is 0: SQLite, and events moved from SQLite by
    # `storage migrate`, whose cursors then go on working on PostgreSQL.
    return str(row["id"]) if row["txid"] == 0 else f"{row['txid']}-{row['id']}"


def _parse_cursor(cursor: str, shared: bool) -> tuple[int, int]:
    """(transaction id, event id) from a cursor `query` made."""
    txid, dash, event_id = cursor.partition("-")
    if not dash:
        txid, event_id = "0", txid
    if not (txid.isdigit() and event_id.isdigit()) or (dash and not shared):
        raise ValueError(f"not a cursor from this command: {cursor!r}")
    return int(txid), int(event_id)


def parse_status(text: str) -> str:
    """'soft-bounce', 'Soft_Bounce' -> 'SOFT-BOUNCE'."""
    name = text.strip().upper().replace("_", "-")
    if name not in EVENTS:
        raise ValueError(f"unknown status {text!r}; one of: {', '.join(EVENTS)}")
    return name


def parse_since(text: str, now: float | None = None) -> float:
    """An ISO 8601 date or date-time ('2025-03-01', '2025-03-01T09:30', '...Z', '...+01:00'),
    or a duration back from now ('90m', '1h', '2d', '1w'). Times without a zone are local, as
    every time the CLI prints is."""
    now = time.time() if now is None else now
    text = text.strip()
    if match := _DURATION.fullmatch(text):
        return now - int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        return datetime.fromisoformat(text).timestamp()  # naive: local time
    except ValueError:
        raise ValueError(
            f"--since: {text!r} is neither an ISO 8601 time nor a duration like 1h or 2d"
        ) from None


def story(conn: Connection, queue_id: str) -> dict[str, Any] | None:
    """Everything known about one queue id: `queue.show` plus the recipients refused in its
    transaction; from the events alone when the message was deleted or never accepted."""
    queue_id = queue_id.strip().upper()
    msg = queue.show(conn, queue_id)
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM events WHERE message_id = ? ORDER BY id",  # noqa: S608
        (queue_id,),
    ).fetchall()
    if msg is None and not rows:
        return None
    refused = _by_recipient([r for r in rows if r["event"] == "REFUSED"])
    if msg is not None:
        return {**msg, "removed": False, "refused": refused}
    recipients = _by_recipient([r for r in rows if r["event"] != "REFUSED"])
    # A QUEUED event without a message row: it was accepted, then `queue delete`d.
    return {
        "id": queue_id,
        "removed": bool(recipients),
        "recipients": recipients,
        "refused": refused,
    }


def _by_recipient(rows: list[sqlite3.Row]) -> list[dict[str, Any]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault(r["recipient"], []).append({k: r[k] for k in _STORY})
    return [{"address": a, "events": e} for a, e in grouped.items()]
