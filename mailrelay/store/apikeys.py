"""HTTP API keys and the answers kept for Idempotency-Key retries.

A key is a random 32-byte token shown once when it is made; only its SHA-256 is stored (a token
that random needs no slow hash: nobody can guess it, and a stolen table cannot be reversed).
Each key holds one scope and one or more of our domains: it sees and acts on those only.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from mailrelay.store.accounts import NotFound, get_domain
from mailrelay.store.backend import Connection, dialect

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
    domains: tuple[str, ...]
    """Sorted, lowercase, at least one."""
    scope: Scope
    created_at: float
    revoked_at: float | None = None

    @property
    def domain(self) -> str:
        """The first of `domains`: what a key of one domain has (callers that know one)."""
        return self.domains[0]

    def owns(self, domain: str | None) -> bool:
        """Whether `domain` is one of the key's (case and a final dot do not matter)."""
        return domain is not None and domain.lower().rstrip(".") in self.domains

    def allows(self, scope: Scope) -> bool:
        return scope in _GRANTS[self.scope]

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "domains": list(self.domains),
            "scope": self.scope,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def normalize_domains(domains: str | Iterable[str]) -> tuple[str, ...]:
    """'Example.ORG.' or several -> sorted, lowercase, without final dots, each once."""
    names = (domains,) if isinstance(domains, str) else tuple(domains)
    return tuple(sorted({d.strip().lower().rstrip(".") for d in names}))


def add(
    conn: Connection,
    domains: str | Iterable[str],
    scope: Scope,
    now: float,
    *,
    new_domains: bool = False,
) -> tuple[ApiKey, str]:
    """Make a key for one or more of our domains; returns it and the token (never stored, never
    shown again). With `new_domains`, a domain not added yet is allowed too: the key may then
    add it (`POST /v1/domains`), which is how a domain is handed to an API client."""
    names = normalize_domains(domains)
    if not names or "" in names:
        raise ValueError("a key needs at least one domain")
    if not new_domains:
        for name in names:
            if get_domain(conn, name) is None:
                raise NotFound(f"no domain {name}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    key_id = "K" + secrets.token_hex(6).upper()
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO api_keys (id, scope, token_sha256, created_at) VALUES (?, ?, ?, ?)",
        (key_id, scope, token_hash(token), now),
    )
    conn.executemany(
        "INSERT INTO api_key_domains (key_id, domain) VALUES (?, ?)",
        [(key_id, name) for name in names],
    )
    return ApiKey(key_id, names, scope, now), token


_SELECT = (
    "SELECT k.id, {domains}, k.scope, k.created_at, k.revoked_at"
    " FROM api_keys k JOIN api_key_domains d ON d.key_id = k.id"
)
_DOMAINS = {"sqlite": "group_concat(d.domain, ' ')", "postgresql": "string_agg(d.domain, ' ')"}


def _select(conn: Connection) -> str:
    return _SELECT.format(domains=_DOMAINS[dialect(conn)])


def by_token(conn: Connection, token: str) -> ApiKey | None:
    """The key a bearer token belongs to, revoked or not (the caller refuses revoked ones)."""
    row = conn.execute(
        _select(conn) + " WHERE k.token_sha256 = ? GROUP BY k.id", (token_hash(token),)
    ).fetchone()
    return None if row is None else _key(row)


def get(conn: Connection, key_id: str) -> ApiKey | None:
    row = conn.execute(
        _select(conn) + " WHERE k.id = ? GROUP BY k.id", (key_id.upper(),)
    ).fetchone()
    return None if row is None else _key(row)


def list_keys(conn: Connection, within: Iterable[str] | None = None) -> list[ApiKey]:
    """Every key, by first domain and age; with `within`, only the keys whose domains are all
    among those (what a key that manages them may see)."""
    keys = sorted(
        (_key(r) for r in conn.execute(_select(conn) + " GROUP BY k.id")),
        key=lambda k: (k.domains, k.created_at),
    )
    if within is None:
        return keys
    allowed = set(normalize_domains(within))
    return [k for k in keys if allowed.issuperset(k.domains)]


def revoke(conn: Connection, key_id: str, now: float) -> None:
    cur = conn.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        (now, key_id.upper()),
    )
    if cur.rowcount == 0:
        raise NotFound(f"no active API key {key_id}")


def _key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        str(row[0]),
        normalize_domains(str(row[1]).split(" ")),
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


def kept_answer(conn: Connection, key_id: str, idempotency_key: str) -> KeptAnswer | None:
    row = conn.execute(
        "SELECT request_sha256, status, response FROM api_idempotency"
        " WHERE key_id = ? AND idempotency_key = ?",
        (key_id, idempotency_key),
    ).fetchone()
    return None if row is None else KeptAnswer(str(row[0]), int(row[1]), str(row[2]))


def keep_answer(
    conn: Connection,
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
