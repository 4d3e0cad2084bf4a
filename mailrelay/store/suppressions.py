"""The suppression list: recipients a sending domain of ours no longer mails, after a hard bounce
or by hand, until the entry expires.

A hard bounce of a real message (not one of our bounces, not a TLS report) adds its recipient to
the list of the message's sending domain, in the transaction that records the bounce
(`add_from_bounces`); submission then refuses that recipient at RCPT (`lookup`). The CLI and the
HTTP API manage entries with `add`, `remove` and `list_suppressions`. Addresses and domains are
kept lowercase. Like the rest of the store, each function takes a connection and runs inside the
caller's transaction; `now` is passed in, so the clock is the caller's.

Which bounces are hard: the RFC 3463 statuses that say the address itself is bad, which
sending again cannot change (`HARD_STATUSES`):

- 5.1.1 bad destination mailbox (unknown user), 5.1.6 mailbox moved without forwarding;
- 5.1.2 bad destination system: the domain does not exist (NXDOMAIN), 5.1.10 null MX (RFC
  7505): the domain takes no mail;
- 5.2.1 mailbox disabled.

Not hard: 5.2.2 mailbox full (it empties), every 5.7.x (refused by policy, or ours for TLS the
recipient may yet fix), 4.x.x (transient), 4.4.7 expired in the queue, and a 5xx reply without
an enhanced status (5.0.0: we cannot tell an unknown user from a spam refusal).
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from mailrelay.store.accounts import NotFound, get_domain
from mailrelay.store.backend import Connection, greatest

if TYPE_CHECKING:
    from mailrelay.store.claims import Job, RecipientUpdate

Source = Literal["bounce", "manual"]

HARD_STATUSES = frozenset({"5.1.1", "5.1.2", "5.1.6", "5.1.10", "5.2.1"})
"""RFC 3463 statuses of a bounce that suppress its recipient (see the module's docstring)."""

REASON_MAX = 200
"""A reason is kept as one printable line of at most this many characters: it is quoted in an
SMTP reply, which must stay one line of at most 512 octets."""

MANUAL_REASON = "added by an operator"

# Printable ASCII without "<", ">" or a second "@" before it; a host name after it.
_ADDRESS = re.compile(r"[\x21-\x3b=?\x41-\x7e]{1,64}@[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
_COLUMNS = "domain, address, reason, source, message_id, created_at, expires_at"


@dataclass(frozen=True)
class Suppression:
    domain: str
    """The sending domain (ours) that does not mail `address`."""
    address: str
    reason: str
    """Why: the bounce's reply, e.g. "550 5.1.1 user unknown", or an operator's text."""
    source: Source
    message_id: str | None
    """The message whose bounce added the entry (None for a manual one)."""
    created_at: float
    expires_at: float | None
    """None: never."""

    @property
    def since(self) -> str:
        """The day it was added, UTC: '2026-11-30'."""
        return time.strftime("%Y-%m-%d", time.gmtime(self.created_at))

    def describe(self) -> str:
        """'suppressed for example.org since 2026-11-30 (550 5.1.1 user unknown)': what a refusal
        (SMTP or API) tells the submitter. One printable line, as the reason is."""
        return f"suppressed for {self.domain} since {self.since} ({self.reason})"

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "address": self.address,
            "reason": self.reason,
            "source": self.source,
            "message_id": self.message_id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }


def is_hard(status: str) -> bool:
    """Whether a bounce with this RFC 3463 status suppresses its recipient."""
    return status in HARD_STATUSES


def lookup(conn: Connection, domain: str, address: str, now: float) -> Suppression | None:
    """The entry that stops `domain` from mailing `address` at `now`, or None. An expired entry
    is ignored (and pruned at the next add)."""
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM suppressions"  # noqa: S608 -- a fixed column list
        " WHERE domain = ? AND address = ? AND (expires_at IS NULL OR expires_at > ?)",
        (_domain(domain), _address(address), now),
    ).fetchone()
    return None if row is None else _entry(row)


def list_suppressions(
    conn: Connection,
    now: float,
    *,
    domain: str | None = None,
    limit: int | None = None,
    after: tuple[str, str] | None = None,
) -> list[Suppression]:
    """The entries in force at `now`, by domain and address; only `domain`'s where given. Pages:
    at most `limit`, starting after the (domain, address) `after` (the last one of the page
    before)."""
    where = ["(expires_at IS NULL OR expires_at > ?)"]
    params: list[object] = [now]
    if domain is not None:
        where.append("domain = ?")
        params.append(_domain(domain))
    if after is not None:
        where.append("(domain, address) > (?, ?)")
        params += [_domain(after[0]), _address(after[1])]
    sql = f"SELECT {_COLUMNS} FROM suppressions WHERE {' AND '.join(where)}"  # noqa: S608
    sql += " ORDER BY domain, address"
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        sql += " LIMIT ?"
        params.append(limit)
    return [_entry(row) for row in conn.execute(sql, params)]


def add(
    conn: Connection,
    domain: str,
    address: str,
    now: float,
    *,
    reason: str = MANUAL_REASON,
    expires_at: float | None = None,
) -> Suppression:
    """Suppress `address` for `domain` (one of ours) by hand, until `expires_at` (None: never).
    An entry there already is replaced: the operator's word wins, a shorter expiry included.

    Raises NotFound for a domain that is not ours, ValueError for an address that is none or an
    expiry not after `now`.
    """
    domain, address = _domain(domain), _address(address)
    if get_domain(conn, domain) is None:
        raise NotFound(f"domain {domain} is not one of ours")
    if not _ADDRESS.fullmatch(address):
        raise ValueError(f"{address!r} is not an e-mail address")
    if expires_at is not None and expires_at <= now:
        raise ValueError("the expiry must be in the future")
    prune(conn, now)
    entry = Suppression(domain, address, clean_reason(reason), "manual", None, now, expires_at)
    conn.execute(
        f"INSERT INTO suppressions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
        " ON CONFLICT (domain, address) DO UPDATE SET"
        "  reason = excluded.reason, source = excluded.source,"
        "  message_id = excluded.message_id, created_at = excluded.created_at,"
        "  expires_at = excluded.expires_at",
        _row(entry),
    )
    return entry


def remove(conn: Connection, domain: str, address: str) -> None:
    """Mail from `domain` to `address` is accepted again. Raises NotFound if it was not
    suppressed: a typo must not pass for a removal that did not happen."""
    domain, address = _domain(domain), _address(address)
    cur = conn.execute(
        "DELETE FROM suppressions WHERE domain = ? AND address = ?", (domain, address)
    )
    if cur.rowcount == 0:
        raise NotFound(f"{address} is not suppressed for {domain}")


def add_from_bounces(
    conn: Connection,
    job: Job,
    updates: list[RecipientUpdate],
    now: float,
    expiry: float,
) -> int:
    """In the transaction that records a delivery attempt: suppress each recipient that bounced
    hard, for the message's sending domain, for `expiry` seconds (0: never). Our own bounces and
    TLS reports (no sending domain) add nothing. Returns how many entries were added or renewed.

    A recipient that is suppressed already is renewed: the new bounce's reason and day, and the
    later expiry of the two. Recording again (a retried commit) changes nothing more.
    """
    sender_domain = job.sender_domain
    if job.is_bounce or not sender_domain:
        return 0
    hard = [u for u in updates if u.state == "bounced" and is_hard(u.status)]
    if not hard:
        return 0
    prune(conn, now)
    expires_at = now + expiry if expiry > 0 else None
    for u in hard:
        entry = Suppression(
            _domain(sender_domain),
            _address(u.address),
            bounce_reason(u.status, u.diagnostic),
            "bounce",
            job.message_id,
            now,
            expires_at,
        )
        conn.execute(
            f"INSERT INTO suppressions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
            " ON CONFLICT (domain, address) DO UPDATE SET"
            "  reason = excluded.reason, source = excluded.source,"
            "  message_id = excluded.message_id, created_at = excluded.created_at,"
            "  expires_at = CASE WHEN suppressions.expires_at IS NULL"
            "   OR excluded.expires_at IS NULL THEN NULL"
            f"   ELSE {greatest(conn)}(suppressions.expires_at, excluded.expires_at) END",
            _row(entry),
        )
    return len(hard)


def prune(conn: Connection, now: float) -> int:
    """Drop the entries that expired by `now` (an indexed range: cheap); returns how many."""
    cur = conn.execute("DELETE FROM suppressions WHERE expires_at <= ?", (now,))
    return cur.rowcount


def bounce_reason(status: str, diagnostic: str) -> str:
    """The reason a bounce gives: its remote reply ('smtp; 550 5.1.1 user unknown' becomes
    '550 5.1.1 user unknown'), or our own diagnostic with its status in front."""
    text = diagnostic.removeprefix("smtp;").strip()
    if status not in text.split():
        text = f"{status} {text}"
    return clean_reason(text)


def clean_reason(text: str) -> str:
    """One printable line of at most REASON_MAX characters: a remote server's reply may hold
    several lines and control characters, and an operator's text anything at all."""
    text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split()) or MANUAL_REASON
    if len(text) > REASON_MAX:
        text = text[: REASON_MAX - 3].rstrip() + "..."
    return text


def _domain(domain: str) -> str:
    return domain.strip().lower().rstrip(".")


def _address(address: str) -> str:
    return address.strip().lower()


def _row(e: Suppression) -> tuple[object, ...]:
    return (e.domain, e.address, e.reason, e.source, e.message_id, e.created_at, e.expires_at)


def _entry(row: sqlite3.Row) -> Suppression:
    return Suppression(
        row["domain"],
        row["address"],
        row["reason"],
        row["source"],
        row["message_id"],
        row["created_at"],
        row["expires_at"],
    )
