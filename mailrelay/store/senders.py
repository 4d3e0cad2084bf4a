"""Who each user may send as: Postfix's smtpd_sender_login_maps, kept in the store.

A user may always send as their own address. Each grant adds one more address, or every address
of one of our domains (written `@example.org`). The submission handler asks `send_as` once at
MAIL and once for the header section at DATA; the CLI grants and revokes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailrelay.store.accounts import NotFound, get_domain
from mailrelay.store.backend import Connection


@dataclass(frozen=True)
class SendAs:
    user: str
    grants: tuple[str, ...]
    """Sorted; each a lower-case address or '@domain'. The user's own address is not among them:
    it is always allowed, granted or not."""

    def allows(self, address: str) -> bool:
        address = address.lower()
        domain = address.rpartition("@")[2]
        return address == self.user or address in self.grants or f"@{domain}" in self.grants

    @property
    def addresses(self) -> list[str]:
        """Everything the user may send as, their own address first: what `user list` shows."""
        return [self.user, *self.grants]


def normalize(sender: str) -> str:
    """'Bob@Example.ORG' -> 'bob@example.org'; '@Example.ORG.' -> '@example.org'."""
    return sender.strip().lower().rstrip(".")


def send_as(conn: Connection, user: str) -> SendAs:
    user = user.lower()
    rows = conn.execute(
        "SELECT sender FROM sender_grants WHERE user_address = ? ORDER BY sender", (user,)
    )
    return SendAs(user, tuple(str(r[0]) for r in rows))


def all_send_as(conn: Connection) -> dict[str, SendAs]:
    """Every user's, by address (users without grants included)."""
    grants: dict[str, list[str]] = {}
    for user, sender in conn.execute(
        "SELECT user_address, sender FROM sender_grants ORDER BY user_address, sender"
    ):
        grants.setdefault(str(user), []).append(str(sender))
    return {
        str(address): SendAs(str(address), tuple(grants.get(str(address), ())))
        for (address,) in conn.execute("SELECT address FROM users ORDER BY address")
    }


def grant(conn: Connection, user: str, sender: str, now: float) -> None:
    """Let `user` send as `sender` (an address, or '@domain' for all of a domain). The domain
    must be one of ours. Granting what is granted already changes nothing."""
    user, sender = user.lower(), normalize(sender)
    _require_user(conn, user)
    domain = sender.rpartition("@")[2]
    if get_domain(conn, domain) is None:
        raise NotFound(
            f"domain {domain} is not one of ours; first run: mailrelay domain add {domain}"
            " --notify ADDRESS"
        )
    if sender == user:
        return  # always allowed: a row would only make `--may-not-send-as` seem to take it away
    conn.execute(
        "INSERT INTO sender_grants (user_address, sender, created_at) VALUES (?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (user, sender, now),
    )


def revoke(conn: Connection, user: str, sender: str) -> None:
    """Take back a grant. Only a grant made before can be taken back: a typo must not pass for
    a narrowing that did not happen."""
    user, sender = user.lower(), normalize(sender)
    _require_user(conn, user)
    cur = conn.execute(
        "DELETE FROM sender_grants WHERE user_address = ? AND sender = ?", (user, sender)
    )
    if cur.rowcount == 0:
        raise NotFound(f"user {user} has no --may-send-as {sender}")


def _require_user(conn: Connection, user: str) -> None:
    if conn.execute("SELECT 1 FROM users WHERE address = ?", (user,)).fetchone() is None:
        raise NotFound(f"no user {user}")
