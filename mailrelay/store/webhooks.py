"""Webhook endpoints and the durable outbox of their deliveries.

An endpoint belongs to one of our sending domains and subscribes to event types. Each event is
one outbox row per subscribed endpoint, written in the transaction that records what it is
about (`enqueue_outcomes` runs inside the queue runner's record; `enqueue_suppressed` beside a
refusal), so that an outcome on disk always has its webhook on disk. The dispatcher claims due
rows with a lease (`claim_due`), posts them and settles them (`finish`). Payloads carry ids,
addresses, status, reason and TLS evidence, never the message body.
Functions take a `Connection` and run inside the caller's transaction (`Store.write`).
"""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import urllib.parse
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from mailrelay.delivery.result import Evidence, Insecure
from mailrelay.store.accounts import NotFound, get_domain
from mailrelay.store.backend import Connection, dialect
from mailrelay.store.claims import Job, RecipientUpdate
from mailrelay.store.suppressions import Suppression

EventType = Literal["delivered", "deferred", "bounced", "insecure", "suppressed"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
DeliveryState = Literal["pending", "sent", "failed"]
SECRET_PREFIX = "whsec_"  # noqa: S105 (the Standard Webhooks prefix, not a secret)
MAX_URL = 2048
_BY_STATE: dict[str, EventType] = {
    "sent": "delivered",
    "deferred": "deferred",
    "bounced": "bounced",
}


class InvalidEndpoint(ValueError):
    """An endpoint that cannot be added; the message names the field and why."""


@dataclass(frozen=True)
class Endpoint:
    id: str
    domain: str
    url: str
    events: tuple[EventType, ...]
    secret: str
    created_at: float
    disabled: bool = False

    def to_json(self, *, with_secret: bool = False) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "id": self.id,
            "domain": self.domain,
            "url": self.url,
            "events": list(self.events),
            "created_at": self.created_at,
            "disabled": self.disabled,
        }
        if with_secret:
            shown["secret"] = self.secret
        return shown


@dataclass(frozen=True)
class Delivery:
    """One outbox row: one event for one endpoint."""

    id: str  # "msg_…": the webhook-id header, the same on every retry
    endpoint_id: str
    url: str
    secret: str
    event: EventType
    payload: str  # the JSON body, exactly as posted
    attempts: int  # including the attempt a claim starts
    state: DeliveryState
    last_error: str | None
    created_at: float
    next_attempt_at: float

    def to_json(self) -> dict[str, Any]:
        """For `webhook deliveries`: everything but the endpoint's secret."""
        return {
            "id": self.id,
            "endpoint_id": self.endpoint_id,
            "url": self.url,
            "event": self.event,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "last_error": self.last_error,
            "created_at": self.created_at,
            "payload": json.loads(self.payload),
        }


# -- endpoints ---------------------------------------------------------------------------------


def parse_events(value: Iterable[str]) -> tuple[EventType, ...]:
    """Event type names, deduplicated in the canonical order; InvalidEndpoint for others."""
    names = {v.strip().lower() for v in value if v.strip()}
    unknown = sorted(names - set(EVENT_TYPES))
    if unknown:
        raise InvalidEndpoint(
            f"events: unknown {', '.join(unknown)} (one of {', '.join(EVENT_TYPES)})"
        )
    if not names:
        raise InvalidEndpoint(f"events: at least one of {', '.join(EVENT_TYPES)}")
    return tuple(e for e in get_args(EventType) if e in names)


def check_url(url: str) -> str:
    """An https:// URL with a host and no credentials, or InvalidEndpoint. Plain http is refused:
    the events name recipients and the signature does not hide them."""
    if len(url) > MAX_URL or not url.isprintable() or any(c.isspace() for c in url):
        raise InvalidEndpoint("url: not a URL (printable, no spaces, at most 2048 characters)")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError as exc:
        raise InvalidEndpoint(f"url: {exc}") from None
    if parts.scheme.lower() != "https":
        raise InvalidEndpoint("url: only https:// URLs are allowed")
    if not parts.hostname:
        raise InvalidEndpoint("url: no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidEndpoint("url: credentials in the URL are not allowed")
    if parts.fragment:
        raise InvalidEndpoint("url: a fragment is never sent")
    return url


def new_secret() -> str:
    """A Standard Webhooks secret: whsec_ and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def add_endpoint(
    conn: Connection, domain: str, url: str, events: Iterable[str], now: float
) -> Endpoint:
    domain = domain.lower().rstrip(".")
    if get_domain(conn, domain) is None:
        raise NotFound(f"no domain {domain}")
    endpoint = Endpoint(
        "ep_" + secrets.token_hex(8),
        domain,
        check_url(url),
        parse_events(events),
        new_secret(),
        now,
    )
    conn.execute(
        "INSERT INTO webhook_endpoints (id, domain, url, events, secret, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (endpoint.id, domain, endpoint.url, ",".join(endpoint.events), endpoint.secret, now),
    )
    return endpoint


def list_endpoints(conn: Connection, domain: str | None = None) -> list[Endpoint]:
    sql = "SELECT id, domain, url, events, secret, created_at, disabled FROM webhook_endpoints"
    rows = (
        conn.execute(sql + " WHERE domain = ? ORDER BY created_at, id", (domain,))
        if domain is not None
        else conn.execute(sql + " ORDER BY domain, created_at, id")
    )
    return [_endpoint(r) for r in rows]


def remove_endpoint(
    conn: Connection, endpoint_id: str, domains: Collection[str] | None = None
) -> None:
    """Remove an endpoint (of one of `domains`, if given) and its deliveries, pending ones
    included."""
    row = conn.execute(
        "SELECT domain FROM webhook_endpoints WHERE id = ?", (endpoint_id.lower(),)
    ).fetchone()
    if row is None or (domains is not None and row[0] not in domains):
        raise NotFound(f"no webhook {endpoint_id}")
    conn.execute("DELETE FROM webhook_endpoints WHERE id = ?", (endpoint_id.lower(),))


def _endpoint(row: sqlite3.Row) -> Endpoint:
    return Endpoint(
        str(row["id"]),
        str(row["domain"]),
        str(row["url"]),
        tuple(e for e in str(row["events"]).split(",") if e in EVENT_TYPES),  # type: ignore[misc]
        str(row["secret"]),
        float(row["created_at"]),
        bool(row["disabled"]),
    )


# -- producing events --------------------------------------------------------------------------


def event_type(update: RecipientUpdate, insecure: Insecure | None) -> EventType:
    """What one recipient's outcome is called: `insecure` wins over the state it led to."""
    return "insecure" if insecure is not None else _BY_STATE[update.state]


def enqueue_outcomes(
    conn: Connection,
    job: Job,
    updates: Iterable[RecipientUpdate],
    insecure: Mapping[int, Insecure],
    now: float,
) -> int:
    """One outbox row per (subscribed endpoint, recipient outcome) of a message of one of our
    sending domains; our own bounces and reports have none. Returns how many."""
    if job.is_bounce or not job.sender_domain:
        return 0
    endpoints = _subscribed(conn, job.sender_domain)
    if not endpoints:
        return 0
    attempts = {r.id: r.attempts for r in job.recipients}
    written = 0
    for u in updates:
        why = insecure.get(u.recipient_id)
        kind = event_type(u, why)
        data: dict[str, Any] = {
            "message_id": job.message_id,
            "recipient": u.address,
            "domain": job.sender_domain,
            "state": u.state,
            "status": u.status,
            "reason": u.diagnostic,
            "insecure": why.value if why is not None else None,
            "attempts": attempts.get(u.recipient_id, 0),
            "evidence": [evidence_json(e) for e in u.evidence],
        }
        written += _enqueue(conn, endpoints, kind, data, now)
    return written


def enqueue_suppressed(
    conn: Connection, entry: Suppression, message_id: str | None, now: float
) -> int:
    """A `suppressed` event: submission refused `entry.address` for `entry.domain` (SMTP RCPT
    or the HTTP API). `message_id` is the queue id the message has or would have had."""
    endpoints = _subscribed(conn, entry.domain)
    data: dict[str, Any] = {
        "message_id": message_id,
        "recipient": entry.address,
        "domain": entry.domain,
        "state": "refused",
        "status": "5.7.1",
        "reason": entry.describe(),
        "insecure": None,
        "attempts": 0,
        "evidence": [],
    }
    return _enqueue(conn, endpoints, "suppressed", data, now)


def evidence_json(e: Evidence) -> dict[str, Any]:
    return {
        "at": _iso(e.at),
        "verdict": e.kind.value,
        "mx_host": e.mx_host,
        "mx_address": e.mx_address,
        "tls_protocol": e.tls_protocol,
        "tls_cipher": e.tls_cipher,
        "cert_fingerprint": e.cert_fingerprint,
        "cert_verified": e.cert_verified,
        "policy": e.policy,
        "policy_detail": e.policy_detail,
    }


def _subscribed(conn: Connection, domain: str) -> list[tuple[str, frozenset[str]]]:
    rows = conn.execute(
        "SELECT id, events FROM webhook_endpoints WHERE domain = ? AND disabled = 0 ORDER BY id",
        (domain.lower(),),
    )
    return [(str(r[0]), frozenset(str(r[1]).split(","))) for r in rows]


def _enqueue(
    conn: Connection,
    endpoints: list[tuple[str, frozenset[str]]],
    kind: EventType,
    data: dict[str, Any],
    now: float,
) -> int:
    payload = json.dumps(
        {"type": f"message.{kind}", "timestamp": _iso(now), "data": data},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    rows = [
        ("msg_" + secrets.token_hex(12), endpoint_id, kind, payload, now, now, now)
        for endpoint_id, events in endpoints
        if kind in events
    ]
    conn.executemany(
        "INSERT INTO webhook_deliveries (id, endpoint_id, event, payload, next_attempt_at,"
        " state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
        rows,
    )
    return len(rows)


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- dispatching -------------------------------------------------------------------------------

_DELIVERY = (
    "SELECT d.id, d.endpoint_id, e.url, e.secret, d.event, d.payload, d.attempts, d.state,"
    " d.last_error, d.created_at, d.next_attempt_at"
    " FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id"
)


def claim_due(conn: Connection, now: float, lease: float, limit: int) -> list[Delivery]:
    """Claim up to `limit` due deliveries: each attempt is counted and the row is not due again
    for `lease` seconds, so that another process (or a pass after a crash) never posts it
    while this one does. `finish` settles it."""
    # PostgreSQL, where several instances dispatch at once: lock the rows claimed, and skip
    # those another transaction holds (its claim), so that no delivery is taken twice; a row it
    # claimed and committed since this statement began is re-checked under the lock and is no
    # longer due. SQLite's single writer needs none of this.
    lock = " FOR UPDATE SKIP LOCKED" if dialect(conn) == "postgresql" else ""
    ids = [
        str(r[0])
        for r in conn.execute(
            "SELECT id FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= ?"  # noqa: S608
            f" ORDER BY next_attempt_at, id LIMIT ?{lock}",
            (now, limit),
        )
    ]
    conn.executemany(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_at = ?,"
        " updated_at = ? WHERE id = ?",
        [(now + lease, now, i) for i in ids],
    )
    return [_delivery(conn.execute(_DELIVERY + " WHERE d.id = ?", (i,)).fetchone()) for i in ids]


def finish(
    conn: Connection,
    delivery_id: str,
    state: DeliveryState,
    now: float,
    *,
    error: str | None = None,
    next_attempt_at: float | None = None,
) -> None:
    """Settle a claimed delivery: sent, failed for good, or pending again at `next_attempt_at`."""
    conn.execute(
        "UPDATE webhook_deliveries SET state = ?, last_error = ?,"
        " next_attempt_at = coalesce(?, next_attempt_at), updated_at = ? WHERE id = ?",
        (state, error, next_attempt_at, now, delivery_id),
    )


def next_due(conn: Connection) -> float | None:
    row = conn.execute(
        "SELECT min(next_attempt_at) FROM webhook_deliveries WHERE state = 'pending'"
    ).fetchone()
    return None if row[0] is None else float(row[0])


def recent(conn: Connection, limit: int = 50, domain: str | None = None) -> list[Delivery]:
    """The latest deliveries, newest first."""
    where = " WHERE e.domain = ?" if domain is not None else ""
    args: tuple[Any, ...] = (domain, limit) if domain is not None else (limit,)
    rows = conn.execute(_DELIVERY + where + " ORDER BY d.created_at DESC, d.id LIMIT ?", args)
    return [_delivery(r) for r in rows]


def prune(conn: Connection, before: float) -> int:
    """Forget settled deliveries created before `before`."""
    cur = conn.execute(
        "DELETE FROM webhook_deliveries WHERE state IN ('sent', 'failed') AND created_at < ?",
        (before,),
    )
    return cur.rowcount


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        id=str(row["id"]),
        endpoint_id=str(row["endpoint_id"]),
        url=str(row["url"]),
        secret=str(row["secret"]),
        event=row["event"],
        payload=str(row["payload"]),
        attempts=int(row["attempts"]),
        state=row["state"],
        last_error=row["last_error"],
        created_at=float(row["created_at"]),
        next_attempt_at=float(row["next_attempt_at"]),
    )
