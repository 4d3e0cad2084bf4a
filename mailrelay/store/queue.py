"""Queue operations on a connection: enqueue, and what the operator lists and manages.
(The delivery side's claims and results are in `claims.py`.)

Each function takes a `Connection` and runs inside the caller's transaction: the service
passes them to `Store.write` (group commit), the CLI calls them under `with transaction(conn)`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from mailrelay.store.backend import Connection, begin, dialect

RecipientState = Literal["queued", "active", "deferred", "sent", "bounced"]
EventName = Literal["QUEUED", "REFUSED", "DELIVERED", "SOFT-BOUNCE", "HARD-BOUNCE"]


@contextmanager
def transaction(conn: Connection) -> Iterator[Connection]:
    """BEGIN IMMEDIATE ... COMMIT for callers outside the service (the CLI)."""
    begin(conn)
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
    requiretls: bool = False  # MAIL FROM:<...> REQUIRETLS (RFC 8689)
    tls_optional: bool = False  # a "TLS-Required: No" header, and no REQUIRETLS


_INSERT_MESSAGE = (
    "INSERT INTO messages (id, sender, auth_user, client_ip, sender_domain, size, data,"
    " is_bounce, requiretls, tls_optional, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _message_row(message: NewMessage, message_id: str, now: float) -> tuple[object, ...]:
    return (
        message_id,
        message.sender,
        message.auth_user,
        message.client_ip,
        message.sender_domain,
        len(message.data),
        message.data,
        int(message.is_bounce),
        int(message.requiretls),
        int(message.tls_optional),
        now,
    )


def enqueue(
    conn: Connection, message: NewMessage, now: float, message_id: str | None = None
) -> str:
    message_id = message_id or new_message_id()
    if dialect(conn) == "postgresql":
        _enqueue_postgresql(conn, message, now, message_id)
        return message_id
    conn.execute(_INSERT_MESSAGE, _message_row(message, message_id, now))
    for address in unique_recipients(message.recipients):
        domain = address.rpartition("@")[2].lower()
        conn.execute(
            "INSERT INTO recipients (message_id, address, domain, state, next_attempt_at,"
            " updated_at) VALUES (?, ?, ?, 'queued', ?, ?)",
            (message_id, address, domain, now, now),
        )
        add_event(conn, now, message_id, address, "QUEUED")
    return message_id


# PostgreSQL: the message, its recipients and their QUEUED events in one statement, not 1 + 2n:
# each statement is a round trip to the server, and the writer's group commit waits on them.
# The recipients keep their order (their ids, and their events', ascend with it); the foreign key
# from recipients to messages is checked at the end of the statement, when the message is there.
# `woke` notifies mailrelay_queue, which wakes every instance's runner once this commits
# (store/listen.py); PostgreSQL sends one per transaction however many messages it queues.
_ENQUEUE_POSTGRESQL = f"""
WITH message AS (
    {_INSERT_MESSAGE}
    RETURNING id
), listed AS (
    SELECT address, domain, n
    FROM unnest(?::text[], ?::text[]) WITH ORDINALITY AS r (address, domain, n)
), queued AS (
    INSERT INTO recipients (message_id, address, domain, state, next_attempt_at, updated_at)
    SELECT message.id, listed.address, listed.domain, 'queued', ?, ? FROM message, listed
    ORDER BY listed.n
), woke AS (
    SELECT pg_notify('mailrelay_queue', '')
)
INSERT INTO events (at, message_id, recipient, domain, event)
SELECT ?, message.id, listed.address, listed.domain, 'QUEUED' FROM message, listed, woke
ORDER BY listed.n
"""  # noqa: S608 -- only this module's constant is put in


def _enqueue_postgresql(conn: Connection, message: NewMessage, now: float, message_id: str) -> None:
    addresses = unique_recipients(message.recipients)
    domains = [address.rpartition("@")[2].lower() for address in addresses]
    conn.execute(
        _ENQUEUE_POSTGRESQL,
        (*_message_row(message, message_id, now), addresses, domains, now, now, now),
    )


def unique_recipients(addresses: tuple[str, ...]) -> list[str]:
    """Each recipient once (RFC 5321 §3.3 lets a client repeat RCPT TO; the message must still
    arrive once). Domains compare case-insensitively; local parts as given (§2.4)."""
    seen: dict[str, str] = {}
    for address in addresses:
        local, at, domain = address.rpartition("@")
        seen.setdefault(f"{local}{at}{domain.lower()}", address)
    return list(seen.values())


def add_event(
    conn: Connection,
    at: float,
    message_id: str,
    recipient: str,
    event: EventName,
    *,
    mx: str | None = None,
    reply: str | None = None,
    tls_protocol: str | None = None,
    tls_cipher: str | None = None,
    policy: str | None = None,
    policy_detail: str | None = None,
) -> None:
    conn.execute(
        "INSERT INTO events (at, message_id, recipient, domain, event, mx, reply, tls_protocol,"
        " tls_cipher, policy, policy_detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            policy,
            policy_detail,
        ),
    )


# ---- operator side -------------------------------------------------------------------------


def list_queue(
    conn: Connection,
    limit: int | None = None,
    after: str | None = None,
    *,
    detail: bool = False,
) -> list[dict[str, object]]:
    """Messages with at least one recipient not yet final, oldest first: up to `limit`, starting
    after the message `after` (the last id of the previous page). Each recipient has its address
    and state; with `detail`, also its attempts so far, next attempt time, and the status and
    reply (or diagnostic) of its last attempt: why a deferred recipient waits.

    Walks messages in (created_at, id) order and keeps those with a pending recipient, so a page
    costs the same with a million recipients queued as with ten.
    """
    sql = (
        "SELECT m.id, m.sender, m.size, m.created_at, m.is_bounce FROM messages m"
        " WHERE EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
        " AND r.state IN ('queued', 'active', 'deferred'))"
    )
    params: list[object] = []
    if after is not None:
        sql += " AND (m.created_at, m.id) > (SELECT created_at, id FROM messages WHERE id = ?)"
        params.append(after.upper())
    sql += " ORDER BY m.created_at, m.id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    columns = "address, state" + (", attempts, next_attempt_at, status, reply" if detail else "")
    result: list[dict[str, object]] = []
    for row in conn.execute(sql, params).fetchall():
        recipients = [
            _listed(dict(r))
            for r in conn.execute(
                f"SELECT {columns}, claimed_by, lease_until FROM recipients"  # noqa: S608
                " WHERE message_id = ? ORDER BY id",
                (row["id"],),
            )
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


def _listed(recipient: dict[str, object]) -> dict[str, object]:
    """An active recipient keeps which instance ([instance] id) holds its claim, and until
    when (None: claimed before claims named their instance); the others have no claim."""
    if recipient["state"] != "active":
        del recipient["claimed_by"], recipient["lease_until"]
    return recipient


def show(conn: Connection, message_id: str) -> dict[str, object] | None:
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
                "SELECT at, event, mx, reply, tls_protocol, tls_cipher, policy, policy_detail"
                " FROM events"
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
                " cert_fingerprint, cert_verified, policy, policy_detail, verdict FROM attempts"
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


def delete(conn: Connection, message_id: str) -> bool:
    """Remove a message from the queue; its events stay, as the record of what happened."""
    cur = conn.execute("DELETE FROM messages WHERE id = ?", (message_id.upper(),))
    return cur.rowcount > 0


def retry(conn: Connection, message_id: str | None, now: float) -> int:
    """Make deferred recipients (of one message, or all) due now; returns how many."""
    sql = (
        "UPDATE recipients SET next_attempt_at = ?, updated_at = ?"
        " WHERE state IN ('queued', 'deferred')"
    )
    params: tuple[object, ...] = (now, now)
    if message_id is not None:
        sql += " AND message_id = ?"
        params += (message_id.upper(),)
    count = conn.execute(sql, params).rowcount
    if count and dialect(conn) == "postgresql":
        conn.execute("NOTIFY mailrelay_queue")  # the instances try them now, not at their poll
    return count


def state_counts(conn: Connection) -> dict[str, int]:
    counts = {"queued": 0, "active": 0, "deferred": 0}
    for row in conn.execute(
        "SELECT state, count(*) FROM recipients"
        " WHERE state IN ('queued', 'active', 'deferred') GROUP BY state"
    ):
        counts[row[0]] = row[1]
    return counts


def oldest_pending(conn: Connection) -> float | None:
    row = conn.execute(
        "SELECT min(m.created_at) FROM recipients r JOIN messages m ON m.id = r.message_id"
        " WHERE r.state IN ('queued', 'active', 'deferred')"
    ).fetchone()
    return None if row[0] is None else float(row[0])
