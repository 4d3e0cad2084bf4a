"""Users (submission credentials) and sending domains with their DKIM keys."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Literal

from mailrelay.store.backend import Connection

DomainState = Literal["unverified", "valid"]


class NotFound(LookupError):
    """The user or domain named does not exist."""


class AlreadyExists(ValueError):
    """The user or domain named exists already."""


class KeyInUse(ValueError):
    """The DKIM key named is active: it signs new mail, so it cannot be retired."""


# ---- users ---------------------------------------------------------------------------------


def add_user(conn: Connection, address: str, password_hash: str, now: float) -> None:
    address = address.lower()
    domain = address.rpartition("@")[2]
    if get_domain(conn, domain) is None:
        raise NotFound(f"domain {domain} is not set up; add it with: mailrelay domain add {domain}")
    try:
        conn.execute(
            "INSERT INTO users (address, domain, password_hash, created_at) VALUES (?, ?, ?, ?)",
            (address, domain, password_hash, now),
        )
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"user {address} exists already") from None


def set_password(conn: Connection, address: str, password_hash: str) -> None:
    cur = conn.execute(
        "UPDATE users SET password_hash = ? WHERE address = ?", (password_hash, address.lower())
    )
    if cur.rowcount == 0:
        raise NotFound(f"no user {address.lower()}")


def delete_user(conn: Connection, address: str) -> None:
    cur = conn.execute("DELETE FROM users WHERE address = ?", (address.lower(),))
    if cur.rowcount == 0:
        raise NotFound(f"no user {address.lower()}")
    # Grants go with the user (ON DELETE CASCADE); the usage counts are not tied to the row, so
    # that deleting a user mid-session cannot fail the commit of a message already accepted.
    conn.execute("DELETE FROM user_usage WHERE user_address = ?", (address.lower(),))


def password_hash(conn: Connection, address: str) -> str | None:
    row = conn.execute(
        "SELECT password_hash FROM users WHERE address = ?", (address.lower(),)
    ).fetchone()
    return None if row is None else str(row[0])


def list_users(conn: Connection) -> list[dict[str, object]]:
    return [
        dict(r)
        for r in conn.execute("SELECT address, domain, created_at FROM users ORDER BY address")
    ]


# ---- domains -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    name: str
    notify: str
    state: DomainState
    created_at: float
    checked_at: float | None


@dataclass(frozen=True)
class StoredKey:
    selector: str
    algorithm: str
    private_key_path: str
    public_record: str
    active: bool
    # Made by `rotate-dkim`, not signing yet: `activate-dkim` switches to it.
    pending: bool = False
    # On PostgreSQL: the private key itself, sealed (dkim.seal); private_key_path is then "".
    sealed_key: bytes | None = None


def add_domain(conn: Connection, name: str, notify: str, now: float) -> Domain:
    name = name.lower().rstrip(".")
    try:
        conn.execute(
            "INSERT INTO domains (name, notify, state, created_at) VALUES (?, ?, 'unverified', ?)",
            (name, notify, now),
        )
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"domain {name} exists already") from None
    return Domain(name, notify, "unverified", now, None)


def get_domain(conn: Connection, name: str) -> Domain | None:
    row = conn.execute(
        "SELECT name, notify, state, created_at, checked_at FROM domains WHERE name = ?",
        (name.lower().rstrip("."),),
    ).fetchone()
    return None if row is None else Domain(*row)


def require_domain(conn: Connection, name: str) -> Domain:
    domain = get_domain(conn, name)
    if domain is None:
        raise NotFound(f"no domain {name.lower().rstrip('.')}")
    return domain


def list_domains(conn: Connection) -> list[Domain]:
    return [
        Domain(*row)
        for row in conn.execute(
            "SELECT name, notify, state, created_at, checked_at FROM domains ORDER BY name"
        )
    ]


def set_domain_state(conn: Connection, name: str, state: DomainState, now: float) -> None:
    conn.execute(
        "UPDATE domains SET state = ?, checked_at = ? WHERE name = ?",
        (state, now, name.lower().rstrip(".")),
    )


def add_key(conn: Connection, domain: str, key: StoredKey, now: float) -> None:
    if key.active and key.pending:
        raise ValueError(f"DKIM key {key.selector}: a pending key does not sign yet")
    conn.execute(
        "INSERT INTO dkim_keys (domain, selector, algorithm, private_key_path, public_record,"
        " active, created_at, activated_at, private_key_enc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            domain.lower(),
            key.selector,
            key.algorithm,
            key.private_key_path,
            key.public_record,
            int(key.active),
            now,
            None if key.pending else now,
            key.sealed_key,
        ),
    )


def activate_pending_keys(conn: Connection, domain: str, now: float) -> None:
    """The pending keys sign from now on; the keys that signed until now stay listed."""
    domain = domain.lower().rstrip(".")
    conn.execute("UPDATE dkim_keys SET active = 0 WHERE domain = ? AND active = 1", (domain,))
    conn.execute(
        "UPDATE dkim_keys SET active = 1, activated_at = ?"
        " WHERE domain = ? AND activated_at IS NULL",
        (now, domain),
    )


def delete_key(conn: Connection, domain: str, selector: str) -> StoredKey:
    """Remove an inactive key's row and return it; an active key is refused (KeyInUse)."""
    domain = domain.lower().rstrip(".")
    row = conn.execute(
        _SELECT_KEYS + " AND selector = ?",
        (domain, selector),
    ).fetchone()
    if row is None:
        raise NotFound(f"domain {domain} has no DKIM key {selector}")
    key = _key(row)
    if key.active:
        raise KeyInUse(
            f"DKIM key {selector} of {domain} signs new mail;"
            f" first run: mailrelay domain rotate-dkim {domain}, then activate-dkim"
        )
    conn.execute("DELETE FROM dkim_keys WHERE domain = ? AND selector = ?", (domain, selector))
    return key


def keys(conn: Connection, domain: str, *, active_only: bool) -> list[StoredKey]:
    """The domain's keys in the order they were made: rotated-out, signing, then pending."""
    sql = _SELECT_KEYS
    if active_only:
        sql += " AND active = 1"
    return [_key(r) for r in conn.execute(sql + " ORDER BY id", (domain.lower(),))]


_SELECT_KEYS = (
    "SELECT selector, algorithm, private_key_path, public_record, active, activated_at,"
    " private_key_enc FROM dkim_keys WHERE domain = ?"
)


def _key(row: sqlite3.Row | tuple[object, ...]) -> StoredKey:
    sealed = None if row[6] is None else bytes(row[6])  # type: ignore[arg-type]
    return StoredKey(
        str(row[0]), str(row[1]), str(row[2]), str(row[3]), bool(row[4]), row[5] is None, sealed
    )
