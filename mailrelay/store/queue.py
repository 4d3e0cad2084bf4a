"""Queue operations on a connection: enqueue, claim due work, record outcomes, list and manage.

Each function takes a `sqlite3.Connection` and runs inside the caller's transaction: the service
passes them to `Store.write` (group commit), the CLI calls them under `with transaction(conn)`.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

FinalState = Literal["sent", "bounced"]
RecipientState = Literal["queued", "active", "deferred", "sent", "bounced"]
Verdict = Literal["sent", "deferred", "bounced", "insecure"]
EventName = Literal["QUEUED", "REFUSED", "DELIVERED", "SOFT-BOUNCE", "HARD-BOUNCE"]


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT for callers outside the service (the CLI)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def new_message_id() -> str:
    # 64 random bits: unguessable, so a queue id in a bounce reveals nothing about other mail.
    return secrets.token_hex(8).upper()


@dataclass(frozen=True)
class NewMessage:
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    auth_user: str | None
    client_ip: str | None
    sender_domain: str | None
    is_bounce: bool = False


def enqueue(
    conn: sqlite3.Connection, message: NewMessage, now: float, message_id: str | None = None
) -> str:
    message_id = message_id or new_message_id()
    conn.execute(
        "INSERT INTO messages (id, sender, auth_user, client_ip, sender_domain, size, data,"
        " is_bounce, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            message_id,
            message.sender,
            message.auth_user,
            message.client_ip,
            message.sender_domain,
            len(message.data),
            message.data,
            int(message.is_bounce),
            now,
        ),
    )
    for address in message.recipients:
        domain = address.rpartition("@")[2].lower()
        conn.execute(
            "INSERT INTO recipients (message_id, address, domain, state, next_attempt_at,"
            " updated_at) VALUES (?, ?, ?, 'queued', ?, ?)",
            (message_id, address, domain, now, now),
        )
        add_event(conn, now, message_id, address, "QUEUED")
    return message_id


def add_event(
    conn: sqlite3.Connection,
    at: float,
    message_id: str,
    recipient: str,
    event: EventName,
    *,
    mx: str | None = None,
    reply: str | None = None,
    tls_protocol: str | None = None,
    tls_cipher: str | None = None,
) -> None:
    conn.execute(
        "INSERT INTO events (at, message_id, recipient, domain, event, mx, reply, tls_protocol,"
        " tls_cipher) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            at,
            message_id,
            recipient,
            recipient.rpartition("@")[2].lower(),
            event,
            mx,
            reply,
            tls_protocol,
            tls_cipher,
        ),
    )


# ---- delivery side -------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedRecipient:
    id: int
    address: str
    attempts: int


@dataclass(frozen=True)
class Job:
    """One message for one destination domain: a single SMTP transaction's worth of work."""

    message_id: str
    sender: str
    domain: str
    data: bytes
    created_at: float
    is_bounce: bool
    sender_domain: str | None
    recipients: tuple[ClaimedRecipient, ...]


def claim_due(conn: sqlite3.Connection, now: float, limit: int) -> list[Job]:
    """Mark up to `limit` due recipients active and return them grouped by message and domain."""
    rows = conn.execute(
        "SELECT r.id, r.message_id, r.address, r.domain, r.attempts FROM recipients r"
        " WHERE r.state IN ('queued', 'deferred') AND r.next_attempt_at <= ?"
        " ORDER BY r.next_attempt_at, r.message_id LIMIT ?",
        (now, limit),
    ).fetchall()
    groups: dict[tuple[str, str], list[ClaimedRecipient]] = {}
    for row in rows:
        groups.setdefault((row["message_id"], row["domain"]), []).append(
            ClaimedRecipient(row["id"], row["address"], row["attempts"])
        )
    conn.executemany(
        "UPDATE recipients SET state = 'active', updated_at = ? WHERE id = ?",
        [(now, row["id"]) for row in rows],
    )
    jobs = []
    for (message_id, domain), recipients in groups.items():
        msg = conn.execute(
            "SELECT sender, data, created_at, is_bounce, sender_domain FROM messages WHERE id = ?",
            (message_id,),
        ).fetchone()
        jobs.append(
            Job(
                message_id=message_id,
                sender=msg["sender"],
                domain=domain,
                data=bytes(msg["data"]),
                created_at=msg["created_at"],
                is_bounce=bool(msg["is_bounce"]),
                sender_domain=msg["sender_domain"],
                recipients=tuple(recipients),
            )
        )
    return jobs


def next_due(conn: sqlite3.Connection) -> float | None:
    row = conn.execute(
        "SELECT min(next_attempt_at) FROM recipients WHERE state IN ('queued', 'deferred')"
    ).fetchone()
    return None if row[0] is None else float(row[0])


def release_active(conn: sqlite3.Connection, now: float) -> int:
    """At start: work that was in flight when the process died is due again at once."""
    cur = conn.execute(
        "UPDATE recipients SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END,"
        " next_attempt_at = ?, updated_at = ? WHERE state = 'active'",
        (now, now),
    )
    return cur.rowcount


def release(conn: sqlite3.Connection, recipient_ids: list[int], when: float) -> None:
    """Return claimed recipients to the queue, due at `when`, without counting an attempt."""
    conn.executemany(
        "UPDATE recipients SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END,"
        " next_attempt_at = ?, updated_at = ? WHERE id = ? AND state = 'active'",
        [(when, when, rid) for rid in recipient_ids],
    )


@dataclass(frozen=True)
class Attempt:
    """What happened on one connection for one recipient: the operator's evidence."""

    at: float
    mx_host: str | None
    mx_address: str | None
    reply: str | None
    tls_protocol: str | None
    tls_cipher: str | None
    cert_fingerprint: str | None
    cert_verified: bool | None
    verdict: Verdict


@dataclass(frozen=True)
class Outcome:
    recipient_id: int
    address: str
    state: Literal["sent", "deferred", "bounced"]
    status: str  # RFC 3463, e.g. "2.0.0", "4.4.1", "5.7.10"
    reply: str
    next_attempt_at: float | None
    attempts: tuple[Attempt, ...]


def record_outcomes(
    conn: sqlite3.Connection, message_id: str, outcomes: list[Outcome], now: float
) -> None:
    for outcome in outcomes:
        conn.execute(
            "UPDATE recipients SET state = ?, attempts = attempts + 1, status = ?, reply = ?,"
            " next_attempt_at = coalesce(?, next_attempt_at), updated_at = ? WHERE id = ?",
            (
                outcome.state,
                outcome.status,
                outcome.reply,
                outcome.next_attempt_at,
                now,
                outcome.recipient_id,
            ),
        )
        for a in outcome.attempts:
            conn.execute(
                "INSERT INTO attempts (at, message_id, recipient, mx_host, mx_address, reply,"
                " tls_protocol, tls_cipher, cert_fingerprint, cert_verified, verdict)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    a.at,
                    message_id,
                    outcome.address,
                    a.mx_host,
                    a.mx_address,
                    a.reply,
                    a.tls_protocol,
                    a.tls_cipher,
                    a.cert_fingerprint,
                    None if a.cert_verified is None else int(a.cert_verified),
                    a.verdict,
                ),
            )
        last = outcome.attempts[-1] if outcome.attempts else None
        event: EventName = {
            "sent": "DELIVERED",
            "deferred": "SOFT-BOUNCE",
            "bounced": "HARD-BOUNCE",
        }[outcome.state]  # type: ignore[assignment]
        add_event(
            conn,
            now,
            message_id,
            outcome.address,
            event,
            mx=last.mx_host if last else None,
            reply=f"{outcome.status} {outcome.reply}",
            tls_protocol=last.tls_protocol if last else None,
            tls_cipher=last.tls_cipher if last else None,
        )
    purge_if_done(conn, message_id)


def purge_if_done(conn: sqlite3.Connection, message_id: str) -> None:
    """Drop the body once every recipient is final: the queue keeps no personal data it no
    longer needs. Envelope, attempts and events stay as the delivery record."""
    pending = conn.execute(
        "SELECT count(*) FROM recipients WHERE message_id = ? AND state NOT IN ('sent', 'bounced')",
        (message_id,),
    ).fetchone()[0]
    if pending == 0:
        conn.execute("UPDATE messages SET data = NULL WHERE id = ?", (message_id,))


# ---- operator side -------------------------------------------------------------------------


def list_queue(conn: sqlite3.Connection) -> list[dict[str, object]]:
    """Messages with at least one recipient not yet final, oldest first."""
    rows = conn.execute(
        "SELECT m.id, m.sender, m.size, m.created_at, m.is_bounce,"
        " group_concat(r.address || ' ' || r.state, char(10)) AS rcpts"
        " FROM messages m JOIN recipients r ON r.message_id = m.id"
        " WHERE m.id IN (SELECT message_id FROM recipients"
        "                WHERE state IN ('queued', 'active', 'deferred'))"
        " GROUP BY m.id ORDER BY m.created_at, m.id"
    ).fetchall()
    result: list[dict[str, object]] = []
    for row in rows:
        recipients = [
            {"address": line.rsplit(" ", 1)[0], "state": line.rsplit(" ", 1)[1]}
            for line in str(row["rcpts"]).split("\n")
        ]
        result.append(
            {
                "id": row["id"],
                "sender": row["sender"],
                "size": row["size"],
                "created_at": row["created_at"],
                "bounce": bool(row["is_bounce"]),
                "recipients": recipients,
            }
        )
    return result


def show(conn: sqlite3.Connection, message_id: str) -> dict[str, object] | None:
    msg = conn.execute(
        "SELECT id, sender, auth_user, client_ip, size, created_at, is_bounce,"
        " data IS NOT NULL AS body_kept FROM messages WHERE id = ?",
        (message_id.upper(),),
    ).fetchone()
    if msg is None:
        return None
    recipients = []
    for r in conn.execute(
        "SELECT address, state, attempts, next_attempt_at, status, reply FROM recipients"
        " WHERE message_id = ? ORDER BY id",
        (msg["id"],),
    ):
        events = [
            dict(e)
            for e in conn.execute(
                "SELECT at, event, mx, reply, tls_protocol, tls_cipher FROM events"
                " WHERE message_id = ? AND recipient = ? ORDER BY id",
                (msg["id"], r["address"]),
            )
        ]
        attempts = [
            {
                **dict(a),
                "cert_verified": None if a["cert_verified"] is None else bool(a["cert_verified"]),
            }
            for a in conn.execute(
                "SELECT at, mx_host, mx_address, reply, tls_protocol, tls_cipher,"
                " cert_fingerprint, cert_verified, verdict FROM attempts"
                " WHERE message_id = ? AND recipient = ? ORDER BY id",
                (msg["id"], r["address"]),
            )
        ]
        recipients.append({**dict(r), "events": events, "delivery_attempts": attempts})
    return {
        **{k: msg[k] for k in ("id", "sender", "auth_user", "client_ip", "size", "created_at")},
        "bounce": bool(msg["is_bounce"]),
        "body_kept": bool(msg["body_kept"]),
        "recipients": recipients,
    }


def delete(conn: sqlite3.Connection, message_id: str) -> bool:
    """Remove a message from the queue; its events stay, as the record of what happened."""
    cur = conn.execute("DELETE FROM messages WHERE id = ?", (message_id.upper(),))
    return cur.rowcount > 0


def retry(conn: sqlite3.Connection, message_id: str | None, now: float) -> int:
    """Make deferred recipients (of one message, or all) due now; returns how many."""
    sql = (
        "UPDATE recipients SET next_attempt_at = ?, updated_at = ?"
        " WHERE state IN ('queued', 'deferred')"
    )
    params: tuple[object, ...] = (now, now)
    if message_id is not None:
        sql += " AND message_id = ?"
        params += (message_id.upper(),)
    return conn.execute(sql, params).rowcount


def state_counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = {"queued": 0, "active": 0, "deferred": 0}
    for row in conn.execute(
        "SELECT state, count(*) FROM recipients"
        " WHERE state IN ('queued', 'active', 'deferred') GROUP BY state"
    ):
        counts[row[0]] = row[1]
    return counts


def oldest_pending(conn: sqlite3.Connection) -> float | None:
    row = conn.execute(
        "SELECT min(m.created_at) FROM recipients r JOIN messages m ON m.id = r.message_id"
        " WHERE r.state IN ('queued', 'active', 'deferred')"
    ).fetchone()
    return None if row[0] is None else float(row[0])
