"""Password checks: argon2 on a bounded pool of its own, and successful logins remembered briefly
without remembering any password."""

from __future__ import annotations

import asyncio
import smtplib
import threading

from mailrelay.submission.auth import MAX_PARALLEL_CHECKS, SUCCESS_TTL, PasswordChecker
from mailrelay.submission.auth import hash_password as make_hash
from tests.conftest import PASSWORD, Relay

HASH = make_hash(PASSWORD)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def checker_for(stored: dict[str, str], clock: Clock | None = None) -> PasswordChecker:
    async def lookup(login: str) -> str | None:
        return stored.get(login)

    return PasswordChecker(lookup, clock or Clock())


async def test_a_success_is_remembered_and_nothing_else() -> None:
    clock = Clock()
    stored = {"alice@example.org": HASH}
    checker = checker_for(stored, clock)
    try:
        assert await checker.check("Alice@example.org", PASSWORD)
        assert await checker.check("alice@example.org", PASSWORD)
        assert checker.hashed == 1  # the second login cost no argon2
        # A wrong password is checked in full every time, and never remembered.
        assert not await checker.check("alice@example.org", "wrong")
        assert not await checker.check("alice@example.org", "wrong")
        assert checker.hashed == 3
        # A changed password misses at once: the stored hash is part of the key.
        stored["alice@example.org"] = make_hash("the new one")
        assert not await checker.check("alice@example.org", PASSWORD)
        assert await checker.check("alice@example.org", "the new one")
        assert checker.hashed == 5
        # A deleted user, too.
        del stored["alice@example.org"]
        assert not await checker.check("alice@example.org", "the new one")
        # And a success is forgotten after SUCCESS_TTL.
        stored["alice@example.org"] = HASH
        assert await checker.check("alice@example.org", PASSWORD)
        clock.now += SUCCESS_TTL + 1
        hashed = checker.hashed
        assert await checker.check("alice@example.org", PASSWORD)
        assert checker.hashed == hashed + 1
    finally:
        checker.close()


async def test_checks_run_on_a_bounded_pool_of_their_own() -> None:
    checker = checker_for({f"u{n}@example.org": HASH for n in range(8)})
    try:
        results = await asyncio.gather(
            *(checker.check(f"u{n}@example.org", PASSWORD) for n in range(8))
        )
        assert results == [True] * 8
        pool = [t for t in threading.enumerate() if t.name.startswith("mailrelay-argon2")]
        assert 1 <= len(pool) <= MAX_PARALLEL_CHECKS
    finally:
        checker.close()


def login(relay: Relay, password: str) -> bool:
    client = relay.smtp()
    try:
        client.starttls(context=relay.client_context())
        client.ehlo()
        # One AUTH PLAIN: smtplib's login() would try LOGIN as well after a refusal.
        client.user, client.password = "alice@example.org", password
        client.auth("PLAIN", client.auth_plain)
        return True
    except smtplib.SMTPAuthenticationError:
        return False
    finally:
        client.close()


async def test_a_client_that_logs_in_per_message_pays_argon2_once(relay: Relay) -> None:
    checker = relay.service.submission.checker
    assert [await asyncio.to_thread(login, relay, PASSWORD) for _ in range(3)] == [True] * 3
    assert await asyncio.to_thread(login, relay, "not the password") is False
    assert checker.hashed == 2
