"""DKIM signing at acceptance: the domain's active keys, read from the store, applied once."""

from __future__ import annotations

import logging
from typing import cast

from mailrelay import dkim
from mailrelay.store import Store, accounts

log = logging.getLogger("mailrelay.dkim")


class Signer:
    def __init__(self, store: Store) -> None:
        self.store = store

    def sign(self, message: bytes, domain: str) -> bytes:
        """`message` signed with `domain`'s active keys. Blocking (a store read, then CPU): the
        caller runs it in a worker thread with the rest of the message's work.

        The keys are read for each message, so a rotation made by the CLI in another process
        applies to the next message; the parsed keys themselves are cached (`dkim.signing_key`).
        """
        stored = self.store.read_blocking(lambda c: accounts.keys(c, domain, active_only=True))
        if not stored:
            # Only possible in development (allow_unverified_domains) or for a domain added by
            # hand: a domain added by the CLI always has a key.
            log.warning("event=unsigned domain=%s reason=no_active_key", domain)
            return message
        return dkim.sign(message, domain=domain, keys=[signing_key(k) for k in stored])


def signing_key(key: accounts.StoredKey) -> dkim.DkimKey:
    """A key as the store keeps it, as the signer takes it."""
    algorithm = cast(dkim.SignatureAlgorithm, key.algorithm)
    return dkim.DkimKey(
        key.selector, algorithm, key.private_key_path, key.public_record, key.sealed_key
    )


def authentication_results(hostname: str, user: str) -> str:
    """The header line without its CRLF; the client's address is left out (personal data)."""
    return dkim.authentication_results(hostname, user, None).rstrip("\r\n")
