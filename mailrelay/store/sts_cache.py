"""The MTA-STS policy cache (RFC 8461 §5.1) on a connection: one row per policy domain.

A cached policy must outlive a restart: otherwise an attacker who can block the policy fetch
only has to wait for the relay to restart to downgrade delivery. Each function takes a
`Connection` and runs inside the caller's transaction (the service passes them to
`Store.read` / `Store.write`; the CLI calls them on its own connection, where each statement
commits by itself). The rows are plain data: what a policy means is `delivery.mta_sts`'s concern.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Literal, cast

from mailrelay.store.backend import Connection

StsMode = Literal["enforce", "testing", "none"]
_MODES: frozenset[str] = frozenset({"enforce", "testing", "none"})


@dataclass(frozen=True)
class CachedStsPolicy:
    """One row of `sts_policies`. `domain` is lowercase A-labels without the final dot."""

    domain: str
    policy_id: str  # the id of the _mta-sts TXT record the policy was fetched under
    mode: StsMode
    mx_patterns: tuple[str, ...]
    max_age: int  # seconds, already capped at 31557600
    fetched_at: float
    expires_at: float
    body: str  # the policy file as fetched, for the record


def get_policy(conn: Connection, domain: str) -> CachedStsPolicy | None:
    """The cached policy for `domain`, expired or not (the caller knows the time)."""
    row = conn.execute(
        "SELECT domain, policy_id, mode, mx_patterns, max_age, fetched_at, expires_at, body"
        " FROM sts_policies WHERE domain = ?",
        (domain,),
    ).fetchone()
    return None if row is None else _from_row(row)


def put_policy(conn: Connection, policy: CachedStsPolicy) -> None:
    """Store `policy`, replacing whatever was cached for its domain."""
    if policy.mode not in _MODES:
        raise ValueError(f"unknown MTA-STS mode {policy.mode!r}")
    if any("\n" in pattern for pattern in policy.mx_patterns):
        raise ValueError("an mx pattern cannot contain a line break")
    conn.execute(
        "INSERT INTO sts_policies (domain, policy_id, mode, mx_patterns, max_age, fetched_at,"
        " expires_at, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (domain) DO UPDATE SET policy_id = excluded.policy_id,"
        " mode = excluded.mode, mx_patterns = excluded.mx_patterns, max_age = excluded.max_age,"
        " fetched_at = excluded.fetched_at, expires_at = excluded.expires_at,"
        " body = excluded.body",
        (
            policy.domain,
            policy.policy_id,
            policy.mode,
            "\n".join(policy.mx_patterns),
            policy.max_age,
            policy.fetched_at,
            policy.expires_at,
            policy.body,
        ),
    )


def delete_policy(conn: Connection, domain: str) -> bool:
    """Forget the policy for `domain`; True if there was one."""
    cursor = conn.execute("DELETE FROM sts_policies WHERE domain = ?", (domain,))
    return cursor.rowcount > 0


def list_policies(conn: Connection) -> list[CachedStsPolicy]:
    """Every cached policy, by domain: for reports and for refreshing them ahead of expiry."""
    rows = conn.execute(
        "SELECT domain, policy_id, mode, mx_patterns, max_age, fetched_at, expires_at, body"
        " FROM sts_policies ORDER BY domain"
    ).fetchall()
    return [_from_row(row) for row in rows]


def _from_row(row: sqlite3.Row | tuple[object, ...]) -> CachedStsPolicy:
    domain, policy_id, mode, patterns, max_age, fetched_at, expires_at, body = tuple(row)
    return CachedStsPolicy(
        domain=str(domain),
        policy_id=str(policy_id),
        # The table's CHECK constraint admits only the three modes.
        mode=cast(StsMode, mode),
        mx_patterns=tuple(p for p in str(patterns).split("\n") if p),
        max_age=int(cast(int, max_age)),
        fetched_at=float(cast(float, fetched_at)),
        expires_at=float(cast(float, expires_at)),
        body=str(body),
    )
