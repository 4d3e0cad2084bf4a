"""Password checking for SMTP AUTH: argon2 hashes verified off the event loop, and a tarpit
that slows down a client address after repeated failures."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verifying against this when the user does not exist costs the same time as a real check,
    so response timing does not tell an attacker which addresses have accounts. Made on first
    use, not at import: every CLI command imports this module."""
    return _hasher.hash("not a password of anyone")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def _verify(stored_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _dummy_hash(), password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


class PasswordChecker:
    """Checks a login against the stored hash; argon2 costs ~50 ms of CPU, so it runs in a
    thread and never stalls other sessions."""

    def __init__(self, lookup_hash: Callable[[str], Awaitable[str | None]]) -> None:
        self._lookup_hash = lookup_hash

    async def check(self, login: str, password: str) -> bool:
        stored = await self._lookup_hash(login.lower())
        return await asyncio.to_thread(_verify, stored, password)


@dataclass
class FailureThrottle:
    """Remembers recent AUTH failures per client address and says how long to wait before
    answering the next attempt from it: nothing for the first failure, then doubling to a cap.

    In memory only: a restart forgets, which is acceptable for a tarpit whose purpose is to make
    guessing slow, not to ban.
    """

    window: float = 900.0
    base_delay: float = 0.5
    max_delay: float = 16.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, list[float]] = field(default_factory=dict)

    def delay(self, client: str) -> float:
        recent = self._recent(client)
        if len(recent) < 2:
            return 0.0
        return float(min(self.max_delay, self.base_delay * 2 ** (len(recent) - 2)))

    def failed(self, client: str) -> None:
        self._recent(client).append(self.clock())
        if len(self._failures) > 100_000:  # bound memory under a distributed attack
            self._failures.clear()

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

    def _recent(self, client: str) -> list[float]:
        cutoff = self.clock() - self.window
        recent = [t for t in self._failures.get(client, []) if t > cutoff]
        self._failures[client] = recent
        return recent
