"""Domain onboarding as the CLI runs it: create a domain with its DKIM keys, list the records it
must publish, check them in DNS (moving the domain to `valid`), rotate its DKIM key, and retire
a rotated-out key once its record may leave DNS."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from mailrelay import dkim, domains
from mailrelay.config import Config
from mailrelay.store import accounts
from mailrelay.store.queue import transaction


@dataclass(frozen=True)
class DomainReport:
    domain: accounts.Domain
    records: list[domains.Record]

    def to_json(self) -> dict[str, object]:
        return {
            "domain": self.domain.name,
            "state": self.domain.state,
            "notify": self.domain.notify,
            "records": [{"type": r.type, "name": r.name, "value": r.value} for r in self.records],
        }


def _to_dkim(key: accounts.StoredKey) -> dkim.DkimKey:
    algorithm = cast(dkim.SignatureAlgorithm, key.algorithm)
    return dkim.DkimKey(key.selector, algorithm, key.private_key_path, key.public_record)


def add(conn: sqlite3.Connection, config: Config, name: str, notify: str) -> DomainReport:
    name = name.lower().rstrip(".")
    if accounts.get_domain(conn, name) is not None:
        raise accounts.AlreadyExists(f"domain {name} exists already")
    # Keys first, outside the transaction: a failure leaves at worst an unused key file.
    keys = dkim.generate_keys(
        name, config.dkim.key_dir, config.dkim.algorithm, config.dkim.rsa_bits, datetime.now(UTC)
    )
    now = time.time()
    with transaction(conn):
        domain = accounts.add_domain(conn, name, notify, now)
        for key in keys:
            accounts.add_key(conn, name, _stored(key, active=True), now)
    assert domain.name == name
    return records(conn, config, name)


def _stored(key: dkim.DkimKey, *, active: bool) -> accounts.StoredKey:
    return accounts.StoredKey(
        key.selector, key.algorithm, key.private_key_path, key.public_record, active
    )


def records(conn: sqlite3.Connection, config: Config, name: str) -> DomainReport:
    """Every record to publish, rotated-out DKIM keys included until they are retired."""
    domain = accounts.require_domain(conn, name)
    return DomainReport(domain, _expected(conn, config, domain, active_only=False))


def _expected(
    conn: sqlite3.Connection, config: Config, domain: accounts.Domain, *, active_only: bool
) -> list[domains.Record]:
    keys = [_to_dkim(k) for k in accounts.keys(conn, domain.name, active_only=active_only)]
    return domains.expected_records(
        domain.name,
        keys,
        spf_mechanisms=config.spf_mechanisms,
        dmarc_rua=config.records.dmarc_rua,
    )


async def check(conn: sqlite3.Connection, config: Config, name: str) -> domains.CheckReport:
    """Check the published records; a fully valid report marks the domain `valid`.

    A later failing check moves it back to `unverified`: a domain whose DKIM record vanished
    would have its mail fail DMARC, and we would rather stop it than send it to spam. A check
    whose lookups failed (SERVFAIL, timeout) changes nothing: a resolver outage must not stop
    a domain's mail.

    Only the active keys' DKIM records are checked. A rotated-out key signs nothing new, so its
    record leaving DNS must not stop the domain's mail; `records` lists it until it is retired.
    """
    domain = accounts.require_domain(conn, name)
    result = await domains.check(
        domain.name,
        _expected(conn, config, domain, active_only=True),
        nameservers=config.delivery.nameservers,
        timeout=config.delivery.dns_timeout,
    )
    if result.conclusive:
        with transaction(conn):
            accounts.set_domain_state(
                conn, domain.name, "valid" if result.valid else "unverified", time.time()
            )
    return result


def rotate(conn: sqlite3.Connection, config: Config, name: str) -> DomainReport:
    """A new key set signs from now on; old keys stay listed until the operator removes them."""
    domain = accounts.require_domain(conn, name)
    keys = dkim.generate_keys(
        domain.name,
        config.dkim.key_dir,
        config.dkim.algorithm,
        config.dkim.rsa_bits,
        datetime.now(UTC),
    )
    now = time.time()
    with transaction(conn):
        accounts.deactivate_keys(conn, domain.name)
        for key in keys:
            accounts.add_key(conn, domain.name, _stored(key, active=True), now)
    return records(conn, config, domain.name)


def retire_key(conn: sqlite3.Connection, name: str, selector: str) -> accounts.StoredKey:
    """Stop listing a rotated-out DKIM key; returns it, so the caller can name its record.

    An active key is refused (accounts.KeyInUse): rotate first. The private key file stays on
    disk: `dkim.generate_keys` claims selectors by file name, and a selector must never name a
    second key while receivers may still cache the first one's record.
    """
    domain = accounts.require_domain(conn, name)
    with transaction(conn):
        return accounts.delete_key(conn, domain.name, selector)
