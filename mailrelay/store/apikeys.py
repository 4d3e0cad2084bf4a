"""HTTP API keys and the answers kept for Idempotency-Key retries.

A key is a random 32-byte token shown once when it is made; only its SHA-256 is stored (a token
that random needs no slow hash: nobody can guess it, and a stolen table cannot be reversed).
Each key is bound to one of our domains and one scope.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Literal, get_args

from mailrelay.store.accounts import NotFound, get_domain

Scope = Literal["send", "read", "manage"]
SCOPES: tuple[str, ...] = get_args(Scope)
# The scopes each scope includes: a manage key may also send and read.
_GRANTS: dict[str, frozenset[str]] = {
    "send": frozenset({"send"}),
    "read": frozenset({"read"}),
    "manage": frozenset({"send", "read", "manage"}),
}
TOKEN_PREFIX = "mrk_"  # noqa: S105 (what a token starts with, not a token)


@dataclass(frozen=True)
class ApiKey:
    id: str
    domain: str
    scope: Scope
    created_at: float
    revoked_at: float | None = None

    def allows(self, scope: Scope) -> bool:
        return scope in _GRANTS[self.scope]

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "domain": self.domain,
            "scope": self.scope,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def add(conn: sqlite3.Connection, domain: str, scope: Scope, now: float) -> tuple[ApiKey, str]:
    """Make a key for one of our domains; returns it and the token (never stored, never shown
    again)."""
    domain = domain.lower().rstrip(".")
    if get_domain(conn, domain) is None:
        raise NotFound(f"no domain {domain}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    key_id = "K" + secrets.token_hex(6).upper()
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO api_keys (id, domain, scope, token_sha256, created_at) VALUES (?, ?, ?, ?, ?)",
        (key_id, domain, scope, token_hash(token), now),
    )
    return ApiKey(key_id, domain, scope, now), token


def by_token(conn: sqlite3.Connection, token: str) -> ApiKey | None:
    """The key a bearer token belongs to, revoked or not (the caller refuses revoked ones)."""
    row = conn.execute(
        "SELECT id, domain, scope, created_at, revoked_at FROM api_keys WHERE token_sha256 = ?",
        (token_hash(token),),
    ).fetchone()
    return None if row is None else _key(row)


def list_keys(conn: sqlite3.Connection) -> list[ApiKey]:
    rows = conn.execute(
        "SELECT id, domain, scope, created_at, revoked_at FROM api_keys ORDER BY domain, created_at"
    )
    return [_key(r) for r in rows]


def revoke(conn: sqlite3.Connection, key_id: str, now: float) -> None:
    cur = conn.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        (now, key_id.upper()),
    )
    if cur.rowcount == 0:
        raise NotFound(f"no active API key {key_id}")


def _key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        str(row[0]),
        str(row[1]),
        row[2],
        float(row[3]),
        None if row[4] is None else float(row[4]),
    )


# ---- Idempotency-Key -----------------------------------------------------------------------


@dataclass(frozen=True)
class KeptAnswer:
    request_sha256: str
    status: int
    response: str


def kept_answer(conn: sqlite3.Connection, key_id: str, idempotency_key: str) -> KeptAnswer | None:
    row = conn.execute(
        "SELECT request_sha256, status, response FROM api_idempotency"
        " WHERE key_id = ? AND idempotency_key = ?",
        (key_id, idempotency_key),
    ).fetchone()
    return None if row is None else KeptAnswer(str(row[0]), int(row[1]), str(row[2]))


def keep_answer(
    conn: sqlite3.Connection,
    key_id: str,
    idempotency_key: str,
    answer: KeptAnswer,
    now: float,
) -> None:
    """Raises sqlite3.IntegrityError if an answer is kept already: the caller's transaction
    (which queued the message) then rolls back, and the retry gets the first answer."""
    conn.execute(
        "INSERT INTO api_idempotency (key_id, idempotency_key, request_sha256, status, response,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (key_id, idempotency_key, answer.request_sha256, answer.status, answer.response, now),
    )
