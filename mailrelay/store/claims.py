"""The delivery side of the queue: claim due recipients, record what became of them, and put
back what a stopped process left claimed.

A claim counts the attempt and stamps `claimed_at` in the same transaction that marks the
recipients active; recording the result clears the stamp. A recipient that is found active
at start was therefore being delivered when the process died: its attempt is already counted
(so a crash loop still ages the message towards expiry) and the stamp says it was interrupted.
Several instances on one PostgreSQL database (issue 16): a claim also records who holds it
(`claimed_by`, the `[instance] id`) and until when (`lease_until`). At start an instance
releases only its own claims (and those from before claims carried an id); what an instance
that died holds (kill -9, power off) another one takes back once the lease has run out, as an
interrupted attempt. The lease outlasts delivery.attempt_deadline, at which the runner gives up,
so a live instance's recipients are never taken from it while it delivers them.
Functions take a `Connection` and run inside the caller's transaction (`Store.write`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mailrelay.delivery.result import Evidence
from mailrelay.store.backend import Connection, Cursor, batch, dialect
from mailrelay.store.queue import EventName, add_event

AttemptState = Literal["sent", "deferred", "bounced"]  # a recipient's state after an attempt


@dataclass(frozen=True)
class ClaimedRecipient:
    id: int
    address: str
    attempts: int  # including the attempt this claim starts
    interrupted: bool  # the previous attempt was claimed and never recorded
    last_diagnostic: str | None  # what the previous recorded attempt ended with


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
    requiretls: bool = False  # RFC 8689: authenticated TLS to a REQUIRETLS server, or no delivery
    tls_optional: bool = False  # "TLS-Required: No": may set recipient policies aside, if allowed


def claim_due(
    conn: Connection,
    now: float,
    limit: int,
    instance: str | None = None,
    lease_until: float | None = None,
) -> list[Job]:
    """Claim up to `limit` jobs (not recipient rows: a message with 100 recipients at one
    domain is one job, claimed whole in this one transaction), the longest-due first, for
    `instance` until `lease_until`."""
    if dialect(conn) == "postgresql":
        groups = _claim_postgresql(conn, now, limit, instance, lease_until)
    else:
        groups = _claim_sqlite(conn, now, limit, instance, lease_until)
    if not groups:
        return []
    message_ids = list(dict.fromkeys(message_id for message_id, _ in groups))
    messages = {
        row["id"]: row
        for row in conn.execute(
            "SELECT id, sender, data, created_at, is_bounce, sender_domain, requiretls,"  # noqa: S608
            f" tls_optional FROM messages WHERE id IN ({', '.join('?' * len(message_ids))})",
            message_ids,
        )
    }
    jobs = []
    for (message_id, domain), rows in groups.items():
        msg = messages[message_id]
        recipients = tuple(
            ClaimedRecipient(
                row["id"],
                row["address"],
                row["attempts"] + 1,
                row["claimed_at"] is not None,
                row["reply"],
            )
            for row in rows
        )
        jobs.append(
            Job(
                message_id=message_id,
                sender=msg["sender"],
                domain=domain,
                data=bytes(msg["data"]),
                created_at=msg["created_at"],
                is_bounce=bool(msg["is_bounce"]),
                sender_domain=msg["sender_domain"],
                recipients=recipients,
                requiretls=bool(msg["requiretls"]),
                tls_optional=bool(msg["tls_optional"]),
            )
        )
    return jobs


# A claim's recipient rows by (message id, domain), in claim order; each row has the
# recipient's id, address, attempts, claimed_at and reply as they were before this claim.
_Groups = dict[tuple[str, str], list[Any]]


def _claim_sqlite(
    conn: Connection, now: float, limit: int, instance: str | None, lease_until: float | None
) -> _Groups:
    # INDEXED BY: with many recipients per message SQLite's planner prefers walking the
    # message index, which reads every queued row; the due index reads only the due ones, so a
    # claim costs the same with a million recipients deferred to later as with none.
    # SQLite's single writer needs no row locks: nothing else claims during this transaction.
    groups = conn.execute(
        "SELECT message_id, domain, min(next_attempt_at) AS due"
        " FROM recipients INDEXED BY recipients_due"
        " WHERE state IN ('queued', 'deferred') AND next_attempt_at <= ?"
        " GROUP BY message_id, domain ORDER BY due, message_id LIMIT ?",
        (now, limit),
    ).fetchall()
    claimed: _Groups = {}
    for group in groups:
        rows = conn.execute(
            "SELECT id, address, attempts, claimed_at, reply FROM recipients"
            " WHERE message_id = ? AND domain = ? AND state IN ('queued', 'deferred')"
            " AND next_attempt_at <= ? ORDER BY id",
            (group["message_id"], group["domain"], now),
        ).fetchall()
        if not rows:
            continue
        conn.executemany(
            "UPDATE recipients SET state = 'active', attempts = attempts + 1, claimed_at = ?,"
            " claimed_by = ?, lease_until = ?, updated_at = ? WHERE id = ?",
            [(now, instance, lease_until, now, row["id"]) for row in rows],
        )
        claimed[(group["message_id"], group["domain"])] = rows
    return claimed


# PostgreSQL, where several instances may claim at once: the whole batch in one statement.
# `due` locks the rows of the first `limit` due groups and skips those another transaction
# holds (its claim); a row it claimed and committed since this statement began is re-checked
# under the lock and no longer matches. No recipient is ever claimed twice. `due` keeps the
# values from before the claim (the previous claimed_at says the last attempt was interrupted),
# and `group_due` orders the jobs as SQLite's path does. PostgreSQL has no INDEXED BY, and its
# planner uses the partial index by itself.
_CLAIM_POSTGRESQL = """
WITH groups AS (
    SELECT message_id, domain, min(next_attempt_at) AS group_due FROM recipients
    WHERE state IN ('queued', 'deferred') AND next_attempt_at <= ?
    GROUP BY message_id, domain ORDER BY group_due, message_id LIMIT ?
), due AS (
    SELECT r.id, r.attempts, r.claimed_at, g.group_due FROM recipients r
    JOIN groups g ON g.message_id = r.message_id AND g.domain = r.domain
    WHERE r.state IN ('queued', 'deferred') AND r.next_attempt_at <= ?
    FOR UPDATE OF r SKIP LOCKED
), claimed AS (
    UPDATE recipients r SET state = 'active', attempts = r.attempts + 1, claimed_at = ?,
        claimed_by = ?, lease_until = ?, updated_at = ?
    FROM due WHERE r.id = due.id
    RETURNING r.id, r.message_id, r.domain, r.address, due.attempts, due.claimed_at, r.reply,
        due.group_due
)
SELECT id, message_id, domain, address, attempts, claimed_at, reply FROM claimed
ORDER BY group_due, message_id, domain, id
"""


def _claim_postgresql(
    conn: Connection, now: float, limit: int, instance: str | None, lease_until: float | None
) -> _Groups:
    claimed: _Groups = {}
    for row in conn.execute(
        _CLAIM_POSTGRESQL, (now, limit, now, now, instance, lease_until, now)
    ).fetchall():
        claimed.setdefault((row["message_id"], row["domain"]), []).append(row)
    return claimed


def release_interrupted(conn: Connection, now: float, instance: str | None = None) -> int:
    """At start: what this instance had in flight when it stopped is due again at once, and so
    is what was claimed before claims named their instance. The attempt stays counted and
    `claimed_at` stays set, so the next claim knows it was interrupted. Other instances' claims
    are theirs (they are alive, or their leases run out: `recover_expired`). On SQLite every
    claim is ours whatever id it names: one service per file (the lock beside it), so a
    changed [instance] id (a container's new host name) strands nothing until a lease ends."""
    mine = "" if dialect(conn) == "sqlite" else " AND (claimed_by IS NULL OR claimed_by = ?)"
    cur = conn.execute(
        "UPDATE recipients SET state = 'deferred', next_attempt_at = ?, claimed_by = NULL,"  # noqa: S608
        f" lease_until = NULL, updated_at = ? WHERE state = 'active'{mine}",
        (now, now) if not mine else (now, now, instance),
    )
    return cur.rowcount


def recover_expired(conn: Connection, now: float, instance: str) -> int:
    """Make due again what another instance claimed and whose lease has run out: that instance
    died during the attempt (a live one gives up at the deadline, before its lease ends). Its
    attempt stays counted and `claimed_at` set, as at a restart. Our own claims are never taken
    back here: we may still be recording them; our next start releases them."""
    # PostgreSQL: skip rows another transaction holds (an instance recovering or recording them
    # at this moment) rather than wait for it and risk a deadlock between two recoverers.
    lock = " FOR UPDATE SKIP LOCKED" if dialect(conn) == "postgresql" else ""
    cur = conn.execute(
        "UPDATE recipients SET state = 'deferred', next_attempt_at = ?, claimed_by = NULL,"  # noqa: S608
        " lease_until = NULL, updated_at = ? WHERE id IN (SELECT id FROM recipients"
        " WHERE state = 'active' AND lease_until < ? AND claimed_by <> ?"
        f"{lock})",
        (now, now, now, instance),
    )
    return cur.rowcount


@dataclass(frozen=True)
class RecipientUpdate:
    """What the queue runner decided for one claimed recipient after an attempt."""

    recipient_id: int
    address: str
    state: AttemptState
    status: str  # RFC 3463
    diagnostic: str
    next_attempt_at: float | None  # set when deferred
    evidence: tuple[Evidence, ...]


_EVENT: dict[str, EventName] = {
    "sent": "DELIVERED",
    "deferred": "SOFT-BOUNCE",
    "bounced": "HARD-BOUNCE",
}


def record(
    conn: Connection,
    message_id: str,
    updates: list[RecipientUpdate],
    now: float,
    holder: str | None = None,
) -> list[int]:
    """Record the runner's decisions and their evidence; drop the body once all are final.

    Only a recipient still claimed by `holder` (the instance whose attempt this was) takes the
    decision. One that another instance has taken back since (our lease ran out while the
    database would not take our record, say) is that instance's now: its state is left alone,
    so that it is never made due while the other delivers it, and its id is returned. Its
    attempt and event are recorded all the same: they happened (an MX may have said 250).
    """
    with batch(conn):  # on PostgreSQL one round trip; the counts are read after it
        taken = [_record_one(conn, message_id, u, now, holder or "") for u in updates]
        purge_if_done(conn, message_id)
    return [
        u.recipient_id for u, cursor in zip(updates, taken, strict=True) if cursor.rowcount == 0
    ]


def _record_one(
    conn: Connection, message_id: str, u: RecipientUpdate, now: float, holder: str
) -> Cursor:
    taken = conn.execute(
        "UPDATE recipients SET state = ?, status = ?, reply = ?, claimed_at = NULL,"
        " claimed_by = NULL, lease_until = NULL,"
        " next_attempt_at = coalesce(?, next_attempt_at), updated_at = ?"
        " WHERE id = ? AND state = 'active' AND coalesce(claimed_by, '') = ?",
        (u.state, u.status, u.diagnostic, u.next_attempt_at, now, u.recipient_id, holder),
    )
    conn.executemany(
        "INSERT INTO attempts (at, message_id, recipient, mx_host, mx_address, reply,"
        " tls_protocol, tls_cipher, cert_fingerprint, cert_verified, policy, policy_detail,"
        " verdict) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                e.at,
                message_id,
                u.address,
                e.mx_host,
                e.mx_address,
                e.reply,
                e.tls_protocol,
                e.tls_cipher,
                e.cert_fingerprint,
                None if e.cert_verified is None else int(e.cert_verified),
                e.policy,
                e.policy_detail,
                e.kind.value,
            )
            for e in u.evidence
        ],
    )
    last = u.evidence[-1] if u.evidence else None
    add_event(
        conn,
        now,
        message_id,
        u.address,
        _EVENT[u.state],
        mx=last.mx_host if last else None,
        reply=f"{u.status} {u.diagnostic}",
        tls_protocol=last.tls_protocol if last else None,
        tls_cipher=last.tls_cipher if last else None,
        policy=last.policy if last else None,
        policy_detail=last.policy_detail if last else None,
    )
    return taken


def purge_if_done(conn: Connection, message_id: str) -> None:
    """Drop the body once every recipient is final: the queue keeps no personal data it no
    longer needs. Envelope, attempts and events stay as the delivery record."""
    if dialect(conn) == "postgresql":
        # The check and the update as one statement: one round trip to the server, not two.
        conn.execute(
            "UPDATE messages SET data = NULL WHERE id = ? AND NOT EXISTS (SELECT 1 FROM recipients"
            " WHERE message_id = ? AND state NOT IN ('sent', 'bounced'))",
            (message_id, message_id),
        )
        return
    pending = conn.execute(
        "SELECT count(*) FROM recipients WHERE message_id = ? AND state NOT IN ('sent', 'bounced')",
        (message_id,),
    ).fetchone()[0]
    if pending == 0:
        conn.execute("UPDATE messages SET data = NULL WHERE id = ?", (message_id,))


def next_due(conn: Connection) -> float | None:
    row = conn.execute(
        "SELECT min(next_attempt_at) FROM recipients WHERE state IN ('queued', 'deferred')"
    ).fetchone()
    return None if row[0] is None else float(row[0])
