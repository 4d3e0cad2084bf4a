"""TLS reporting in the store: delivery's sessions aggregated per policy domain and UTC day, the
daily reports made from them, and each report's delivery to every rua URI.

`record_sessions` runs inside the delivery runner's commit, so it only upserts aggregates: one
statement per distinct policy and failure in the batch, however many sessions there were. The
other functions serve the daily report task and the CLI; like the rest of the store they take a
connection and run inside the caller's transaction.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mailrelay.store.backend import Connection, dialect
from mailrelay.tlsrpt.model import RESULT_TYPES, Session

log = logging.getLogger("mailrelay.tlsrpt")

Method = Literal["mailto", "https"]
DeliveryState = Literal["pending", "queued", "sent", "failed"]
# What a session is filed under: policy domain, day, type, strings and mx patterns (as JSON).
_PolicyKey = tuple[str, str, str, str, str]
# And a failure within it: result type, sending IP, receiving MX, receiving IP.
_FailureKey = tuple[_PolicyKey, str, str, str, str]


def utc_day(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


# ---- recording (the delivery side) ----------------------------------------------------------


def record_sessions(conn: Connection, sessions: Sequence[Session]) -> None:
    """Add `sessions` to their day's aggregates. Cheap enough for the delivery commit: the batch
    is counted here first, then one upsert per distinct policy and per distinct failure."""
    successes: Counter[_PolicyKey] = Counter()
    failures: Counter[_PolicyKey] = Counter()
    seen: dict[_PolicyKey, None] = {}  # first occurrence order: the report lists them so
    details: Counter[_FailureKey] = Counter()
    reasons: dict[_FailureKey, str] = {}
    for s in sessions:
        domain = s.policy.domain
        try:
            # §4.4: the policy domain in A-labels, whatever delivery was given.
            domain = domain.rstrip(".").encode("idna").decode("ascii").lower()
            key: _PolicyKey = (
                domain,
                utc_day(s.at),
                s.policy.type,
                json.dumps(list(s.policy.strings)),
                json.dumps(list(s.policy.mx_hosts)),
            )
        except (ValueError, OverflowError, TypeError) as exc:
            # Never let a malformed session fail the delivery commit this runs in: the
            # delivery's outcome matters more than one session in a report.
            log.warning("event=tlsrpt_session_dropped domain=%s why=%r", domain, str(exc))
            continue
        if not domain:
            continue
        seen[key] = None
        if s.result_type is None:
            successes[key] += 1
            continue
        failures[key] += 1
        result_type = s.result_type
        if result_type not in RESULT_TYPES:
            # A report must only name the registered types; the session still counts.
            log.warning("event=tlsrpt_unknown_result_type result_type=%r", result_type)
            result_type = "validation-failure"
        failure: _FailureKey = (
            key,
            result_type,
            s.sending_ip or "",
            (s.receiving_mx_hostname or "").lower().rstrip("."),
            s.receiving_ip or "",
        )
        details[failure] += 1
        if s.failure_reason_code:
            reasons[failure] = s.failure_reason_code
    policy_ids: dict[_PolicyKey, int] = {}
    for key in seen:
        (policy_id,) = conn.execute(
            "INSERT INTO tlsrpt_policies (domain, day, policy_type, policy_strings, mx_hosts,"
            " successful, failed) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (domain, day, policy_type, policy_strings, mx_hosts) DO UPDATE SET"
            # Qualified: PostgreSQL finds a bare name ambiguous beside `excluded`.
            " successful = tlsrpt_policies.successful + excluded.successful,"
            " failed = tlsrpt_policies.failed + excluded.failed"
            " RETURNING id",
            (*key, successes[key], failures[key]),
        ).fetchone()
        policy_ids[key] = int(policy_id)
    for failure, count in details.items():
        key, result_type, sending_ip, receiving_mx, receiving_ip = failure
        conn.execute(
            "INSERT INTO tlsrpt_failures (policy_id, result_type, sending_ip, receiving_mx,"
            " receiving_ip, sessions, reason) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (policy_id, result_type, sending_ip, receiving_mx, receiving_ip)"
            " DO UPDATE SET sessions = tlsrpt_failures.sessions + excluded.sessions,"
            " reason = coalesce(excluded.reason, tlsrpt_failures.reason)",
            (
                policy_ids[key],
                result_type,
                sending_ip,
                receiving_mx,
                receiving_ip,
                count,
                reasons.get(failure),
            ),
        )


def is_report_message(conn: Connection, message_id: str) -> bool:
    """Whether the message is a TLS-RPT report we queued: its delivery sessions are not
    recorded (RFC 8460 §3), so a failing report never reports about itself."""
    row = conn.execute("SELECT tlsrpt_report FROM messages WHERE id = ?", (message_id,)).fetchone()
    return row is not None and bool(row[0])


def mark_report_message(conn: Connection, message_id: str) -> None:
    conn.execute("UPDATE messages SET tlsrpt_report = 1 WHERE id = ?", (message_id,))


# ---- the daily report -------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureAggregate:
    result_type: str
    sending_ip: str | None
    receiving_mx: str | None
    receiving_ip: str | None
    sessions: int
    reason: str | None


@dataclass(frozen=True)
class PolicyAggregate:
    policy_type: str
    strings: tuple[str, ...]
    mx_hosts: tuple[str, ...]
    successful: int
    failed: int
    failures: tuple[FailureAggregate, ...]


def days_with_sessions(conn: Connection, before_day: str) -> list[tuple[str, str]]:
    """(domain, day) with aggregates for a day before `before_day`, oldest day first."""
    return [
        (str(r[0]), str(r[1]))
        for r in conn.execute(
            "SELECT DISTINCT domain, day FROM tlsrpt_policies WHERE day < ? ORDER BY day, domain",
            (before_day,),
        )
    ]


def aggregates(conn: Connection, domain: str, day: str) -> list[PolicyAggregate]:
    result = []
    for p in conn.execute(
        "SELECT id, policy_type, policy_strings, mx_hosts, successful, failed"
        " FROM tlsrpt_policies WHERE domain = ? AND day = ? ORDER BY id",
        (domain, day),
    ).fetchall():
        failures = tuple(
            FailureAggregate(
                str(f["result_type"]),
                f["sending_ip"] or None,
                f["receiving_mx"] or None,
                f["receiving_ip"] or None,
                int(f["sessions"]),
                f["reason"],
            )
            for f in conn.execute(
                "SELECT result_type, sending_ip, receiving_mx, receiving_ip, sessions, reason"
                " FROM tlsrpt_failures WHERE policy_id = ?"
                " ORDER BY result_type, receiving_mx, receiving_ip, sending_ip",
                (p["id"],),
            )
        )
        result.append(
            PolicyAggregate(
                str(p["policy_type"]),
                tuple(json.loads(p["policy_strings"])),
                tuple(json.loads(p["mx_hosts"])),
                int(p["successful"]),
                int(p["failed"]),
                failures,
            )
        )
    return result


def drop_aggregates(conn: Connection, domain: str, day: str) -> None:
    conn.execute("DELETE FROM tlsrpt_policies WHERE domain = ? AND day = ?", (domain, day))


def has_report(conn: Connection, domain: str, day: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM tlsrpt_reports WHERE domain = ? AND day = ?", (domain, day)
    ).fetchone()
    return row is not None


def add_report(
    conn: Connection,
    *,
    report_key: str,
    report_id: str,
    domain: str,
    day: str,
    report_json: str,
    destinations: Sequence[tuple[str, Method]],
    now: float,
) -> None:
    """Keep the report, make one pending delivery per destination (uri, method), and drop the
    day's aggregates, which the report now holds."""
    conn.execute(
        "INSERT INTO tlsrpt_reports (id, report_id, domain, day, created_at, report_json)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (report_key, report_id, domain, day, now, report_json),
    )
    conn.executemany(
        "INSERT INTO tlsrpt_deliveries (report_key, uri, method, state, next_attempt_at,"
        " updated_at) VALUES (?, ?, ?, 'pending', ?, ?)",
        [(report_key, uri, method, now, now) for uri, method in destinations],
    )
    drop_aggregates(conn, domain, day)


# ---- delivering reports -------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    report_key: str
    report_id: str
    domain: str
    day: str
    report_json: str
    uri: str
    method: Method
    attempts: int  # including the one this claim starts
    first_attempt_at: float


def waiting(conn: Connection, now: float) -> tuple[bool, bool]:
    """(whether a delivery is due at `now`, whether a mailed report is in the queue): a read,
    so that an idle pass commits nothing (every commit is an fsync)."""
    due = conn.execute(
        "SELECT 1 FROM tlsrpt_deliveries WHERE state = 'pending' AND next_attempt_at <= ? LIMIT 1",
        (now,),
    ).fetchone()
    queued = conn.execute(
        "SELECT 1 FROM tlsrpt_deliveries WHERE state = 'queued' LIMIT 1"
    ).fetchone()
    return due is not None, queued is not None


def claim_due(conn: Connection, now: float, lease: float) -> list[Delivery]:
    """Pending deliveries due at `now`, claimed: the attempt is counted and the next one put
    `lease` seconds off, so another process (`tlsrpt send-now` beside the service) or a task
    that dies half way does not send the same report twice at once."""
    # PostgreSQL, where several instances send at once: lock the deliveries claimed (not their
    # reports, which two deliveries share), skipping those another transaction holds, so that
    # none is taken twice; one it claimed and committed meanwhile is re-checked under the lock
    # and is no longer due. SQLite's single writer needs none of this.
    lock = " FOR UPDATE OF d SKIP LOCKED" if dialect(conn) == "postgresql" else ""
    rows = conn.execute(
        "SELECT d.report_key, d.uri, d.method, d.attempts, d.first_attempt_at, r.report_id,"  # noqa: S608
        " r.domain, r.day, r.report_json FROM tlsrpt_deliveries d"
        " JOIN tlsrpt_reports r ON r.id = d.report_key"
        " WHERE d.state = 'pending' AND d.next_attempt_at <= ?"
        f" ORDER BY d.next_attempt_at, d.report_key, d.uri{lock}",
        (now,),
    ).fetchall()
    claimed = []
    for row in rows:
        first = row["first_attempt_at"] if row["first_attempt_at"] is not None else now
        conn.execute(
            "UPDATE tlsrpt_deliveries SET attempts = attempts + 1, first_attempt_at = ?,"
            " next_attempt_at = ?, updated_at = ? WHERE report_key = ? AND uri = ?",
            (first, now + lease, now, row["report_key"], row["uri"]),
        )
        claimed.append(
            Delivery(
                str(row["report_key"]),
                str(row["report_id"]),
                str(row["domain"]),
                str(row["day"]),
                str(row["report_json"]),
                str(row["uri"]),
                row["method"],
                int(row["attempts"]) + 1,
                float(first),
            )
        )
    return claimed


def finish(
    conn: Connection,
    report_key: str,
    uri: str,
    state: DeliveryState,
    now: float,
    *,
    detail: str | None = None,
    next_attempt_at: float | None = None,
    message_id: str | None = None,
) -> None:
    """Record how a delivery attempt went: sent or failed for good, queued (as a message), or
    pending again at `next_attempt_at`."""
    conn.execute(
        "UPDATE tlsrpt_deliveries SET state = ?, detail = ?, updated_at = ?,"
        " next_attempt_at = coalesce(?, next_attempt_at), message_id = coalesce(?, message_id)"
        " WHERE report_key = ? AND uri = ?",
        (state, detail, now, next_attempt_at, message_id, report_key, uri),
    )


@dataclass(frozen=True)
class QueuedOutcome:
    report_key: str
    uri: str
    state: Literal["sent", "failed"]
    detail: str | None


def settle_queued(conn: Connection, now: float) -> list[QueuedOutcome]:
    """Mailed reports whose message reached its end since the last look: sent when the
    recipient was delivered, failed when it bounced or the message was deleted."""
    outcomes = []
    for d in conn.execute(
        "SELECT report_key, uri, message_id FROM tlsrpt_deliveries WHERE state = 'queued'"
    ).fetchall():
        row = conn.execute(
            "SELECT state, reply FROM recipients WHERE message_id = ? ORDER BY id LIMIT 1",
            (d["message_id"],),
        ).fetchone()
        outcome: QueuedOutcome | None = None
        if row is None:
            outcome = QueuedOutcome(d["report_key"], d["uri"], "failed", "removed from the queue")
        elif row["state"] == "sent":
            outcome = QueuedOutcome(d["report_key"], d["uri"], "sent", None)
        elif row["state"] == "bounced":
            outcome = QueuedOutcome(d["report_key"], d["uri"], "failed", row["reply"])
        if outcome is not None:
            finish(conn, outcome.report_key, outcome.uri, outcome.state, now, detail=outcome.detail)
            outcomes.append(outcome)
    return outcomes


def prune(conn: Connection, *, reports_before_day: str, aggregates_before_day: str) -> None:
    """Forget reports of days before `reports_before_day` once no delivery of theirs is still
    under way, and aggregates of days before `aggregates_before_day` that never became a
    report (reporting off, or the domain's record could not be looked up for days)."""
    conn.execute(
        "DELETE FROM tlsrpt_reports WHERE day < ? AND NOT EXISTS (SELECT 1 FROM"
        " tlsrpt_deliveries d WHERE d.report_key = tlsrpt_reports.id"
        " AND d.state IN ('pending', 'queued'))",
        (reports_before_day,),
    )
    conn.execute("DELETE FROM tlsrpt_policies WHERE day < ?", (aggregates_before_day,))


# ---- the operator's view --------------------------------------------------------------------


def list_reports(conn: Connection, limit: int = 100) -> list[dict[str, object]]:
    """The newest reports first, each with its deliveries and an overall state: pending while a
    delivery is under way, else sent if any destination took it (RFC 8460 §3: a report counts
    as delivered once one rua accepted it), else failed."""
    result: list[dict[str, object]] = []
    for r in conn.execute(
        "SELECT id, report_id, domain, day, created_at FROM tlsrpt_reports"
        " ORDER BY day DESC, created_at DESC, id LIMIT ?",
        (limit,),
    ).fetchall():
        deliveries = [
            dict(d)
            for d in conn.execute(
                "SELECT uri, method, state, attempts, message_id, detail, updated_at"
                " FROM tlsrpt_deliveries WHERE report_key = ? ORDER BY uri",
                (r["id"],),
            )
        ]
        states = {d["state"] for d in deliveries}
        if states & {"pending", "queued"}:
            state = "pending"
        elif "sent" in states:
            state = "sent"
        else:
            state = "failed"
        result.append({**dict(r), "state": state, "deliveries": deliveries})
    return result


def get_report(conn: Connection, key: str) -> str | None:
    """A report's JSON by its id, or by its full report-id (id@hostname)."""
    row = conn.execute(
        "SELECT report_json FROM tlsrpt_reports WHERE id = ? OR report_id = ?",
        (key.upper(), key),
    ).fetchone()
    return None if row is None else str(row[0])
