"""Domain onboarding as the CLI runs it: create a domain with its DKIM keys, list the records it
must publish, check them in DNS (moving the domain to `valid`), rotate its DKIM key in two steps
(make the next key, then switch to it once its record is published), and retire a rotated-out
key once its record may leave DNS."""

from __future__ import annotations

import os
import pwd
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mailrelay import dkim, domains
from mailrelay.config import Config
from mailrelay.signing import signing_key
from mailrelay.store import accounts
from mailrelay.store.backend import Connection, dialect
from mailrelay.store.queue import transaction

# The user the systemd unit runs the service as; MAILRELAY_SERVICE_USER names another.
SERVICE_USER = "mailrelay"


class RotationError(ValueError):
    """A rotation step that cannot be taken now; the message says what to do instead."""


class WrongUser(PermissionError):
    """Run as root, the CLI would make files the service user cannot read."""


@dataclass(frozen=True)
class DomainReport:
    domain: accounts.Domain
    records: list[domains.Record]
    # Selectors of the DKIM keys by role: "signing", "next" (not signing yet), "rotated_out".
    dkim: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "domain": self.domain.name,
            "state": self.domain.state,
            "notify": self.domain.notify,
            # The value unsplit; `Record.zone_line` splits it for zone files.
            "records": [{"type": r.type, "name": r.name, "value": r.value} for r in self.records],
            "dkim": self.dkim,
        }

    def role(self, record: domains.Record) -> str | None:
        """The DKIM record's key role ("signing", "next", "rotated_out"); None for others."""
        if record.purpose != "dkim":
            return None
        selector = record.name.split(".", 1)[0]
        return next((role for role, sels in self.dkim.items() if selector in sels), None)


def key_owner(config: Config, environ: dict[str, str] | None = None) -> dkim.Owner | None:
    """Who new DKIM key files must belong to, so that the service can read them.

    Not root: None (the files are the caller's, who is then the service user). Root: the owner of
    the key directory or the database, when that is not root (the service made it). With neither
    to follow, root-owned keys are only right where the service runs as root, that is where the
    service user does not exist; otherwise WrongUser names the user to run as.
    """
    if os.geteuid() != 0:
        return None
    for path in (Path(config.dkim.key_dir), Path(config.storage.path)):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_uid != 0:
            return st.st_uid, st.st_gid
    user = (environ if environ is not None else os.environ).get(
        "MAILRELAY_SERVICE_USER", SERVICE_USER
    )
    try:
        pwd.getpwnam(user)
    except KeyError:
        return None
    raise WrongUser(
        f"run as root, this would make DKIM keys under {config.dkim.key_dir} that the service user"
        f" {user} cannot read; run it as that user: sudo -u {user} mailrelay ..."
    )


def add(
    conn: Connection,
    config: Config,
    name: str,
    notify: str,
    owner: dkim.Owner | None = None,
) -> DomainReport:
    name = name.lower().rstrip(".")
    if accounts.get_domain(conn, name) is not None:
        raise accounts.AlreadyExists(f"domain {name} exists already")
    # Keys first, outside the transaction: a failure leaves at worst an unused key file.
    keys = _new_keys(conn, config, name, owner)
    now = time.time()
    with transaction(conn):
        domain = accounts.add_domain(conn, name, notify, now)
        for key in keys:
            accounts.add_key(conn, name, _stored(key, active=True), now)
    assert domain.name == name
    return records(conn, config, name)


def _new_keys(
    conn: Connection, config: Config, name: str, owner: dkim.Owner | None
) -> list[dkim.DkimKey]:
    """A new key set: files in dkim.key_dir on SQLite (one machine), sealed for the database on
    PostgreSQL, where every instance must read them (raises dkim.MasterKeyError without the
    master key)."""
    if dialect(conn) == "postgresql":
        master = dkim.read_master_key(config.dkim.master_key_file)
        taken = {k.selector for k in accounts.keys(conn, name, active_only=False)}
        return dkim.new_sealed_keys(
            name, master, taken, config.dkim.algorithm, config.dkim.rsa_bits, datetime.now(UTC)
        )
    return dkim.generate_keys(
        name,
        config.dkim.key_dir,
        config.dkim.algorithm,
        config.dkim.rsa_bits,
        datetime.now(UTC),
        owner,
    )


def _stored(key: dkim.DkimKey, *, active: bool) -> accounts.StoredKey:
    return accounts.StoredKey(
        key.selector,
        key.algorithm,
        key.private_key_path,
        key.public_record,
        active,
        not active,
        key.sealed_key,
    )


def records(conn: Connection, config: Config, name: str) -> DomainReport:
    """Every record to publish: the signing keys', the next key's (once `rotate-dkim` made one),
    and rotated-out keys' until they are retired."""
    domain = accounts.require_domain(conn, name)
    stored = accounts.keys(conn, domain.name, active_only=False)
    roles: dict[str, list[str]] = {"signing": [], "next": [], "rotated_out": []}
    for k in stored:
        role = "signing" if k.active else "next" if k.pending else "rotated_out"
        roles[role].append(k.selector)
    return DomainReport(domain, _expected(config, domain, stored), roles)


def _expected(
    config: Config, domain: accounts.Domain, keys: list[accounts.StoredKey]
) -> list[domains.Record]:
    return domains.expected_records(
        domain.name,
        [signing_key(k) for k in keys],
        spf_mechanisms=config.spf_mechanisms,
        dmarc_rua=config.records.dmarc_rua,
    )


def _next_records(domain: str, keys: list[accounts.StoredKey]) -> tuple[domains.Record, ...]:
    return tuple(
        domains.Record("TXT", f"{k.selector}._domainkey.{domain}", k.public_record, "dkim")
        for k in keys
        if k.pending
    )


async def check(conn: Connection, config: Config, name: str) -> domains.CheckReport:
    """Check the published records; a fully valid report marks the domain `valid`.

    A later failing check moves it back to `unverified`: a domain whose DKIM record vanished
    would have its mail fail DMARC, and we would rather stop it than send it to spam. A check
    whose lookups failed (SERVFAIL, timeout) changes nothing: a resolver outage must not stop
    a domain's mail.

    Only the signing keys' DKIM records decide. A rotated-out key signs nothing new, so its
    record leaving DNS must not stop the domain's mail; `records` lists it until it is retired.
    The next key's record is checked and reported apart (`next_dkim`): it is what
    `activate-dkim` waits for, and not yet needed for the domain to send.
    """
    domain = accounts.require_domain(conn, name)
    stored = accounts.keys(conn, domain.name, active_only=False)
    result = await domains.check(
        domain.name,
        _expected(config, domain, [k for k in stored if k.active]),
        nameservers=config.delivery.nameservers,
        timeout=config.delivery.dns_timeout,
        next_dkim=_next_records(domain.name, stored),
    )
    if result.conclusive:
        with transaction(conn):
            accounts.set_domain_state(
                conn, domain.name, "valid" if result.valid else "unverified", time.time()
            )
    return result


def rotate(
    conn: Connection, config: Config, name: str, owner: dkim.Owner | None = None
) -> DomainReport:
    """Make the next key set; it signs nothing until `activate` (the first step of two).

    Receivers can only verify with a key whose record they can look up, so signing with a new
    key waits for its record to be published. One rotation at a time: a second is refused
    while a next key waits.
    """
    domain = accounts.require_domain(conn, name)
    waiting = [k.selector for k in accounts.keys(conn, domain.name, active_only=False) if k.pending]
    if waiting:
        raise RotationError(
            f"domain {domain.name} has a next DKIM key already ({', '.join(waiting)});"
            f" publish its record and run: mailrelay domain activate-dkim {domain.name}"
        )
    keys = _new_keys(conn, config, domain.name, owner)
    now = time.time()
    with transaction(conn):
        for key in keys:
            accounts.add_key(conn, domain.name, _stored(key, active=False), now)
    return records(conn, config, domain.name)


async def activate(
    conn: Connection, config: Config, name: str, *, force: bool = False
) -> DomainReport:
    """Sign with the next key set from now on (the second step); the old keys stay listed.

    Refused (RotationError, naming the record) unless the next keys' records are published and
    match, as `check` judges them; `force` skips the check.
    """
    domain = accounts.require_domain(conn, name)
    stored = accounts.keys(conn, domain.name, active_only=False)
    pending = _next_records(domain.name, stored)
    if not pending:
        raise RotationError(
            f"domain {domain.name} has no next DKIM key; first run:"
            f" mailrelay domain rotate-dkim {domain.name}"
        )
    if not force:
        report = await domains.check(
            domain.name,
            [],
            nameservers=config.delivery.nameservers,
            timeout=config.delivery.dns_timeout,
            next_dkim=pending,
        )
        for r in report.next_dkim:
            if not r.valid:
                raise RotationError(
                    f"{r.record.name}: {r.reason}; publish the TXT record"
                    f" `mailrelay domain records {domain.name}` shows for it, then run this again"
                    " (--force switches without checking)"
                )
    with transaction(conn):
        accounts.activate_pending_keys(conn, domain.name, time.time())
    return records(conn, config, domain.name)


def retire_key(conn: Connection, name: str, selector: str) -> accounts.StoredKey:
    """Stop listing a rotated-out DKIM key; returns it, so the caller can name its record.

    An active key is refused (accounts.KeyInUse): rotate first. The private key file stays on
    disk: `dkim.generate_keys` claims selectors by file name, and a selector must never name a
    second key while receivers may still cache the first one's record.
    """
    domain = accounts.require_domain(conn, name)
    with transaction(conn):
        return accounts.delete_key(conn, domain.name, selector)
