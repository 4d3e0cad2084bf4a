"""Password checking for SMTP AUTH: argon2 hashes verified off the event loop on a bounded pool
of their own, a short-lived cache of successful checks, and a tarpit that slows down a client
address after repeated failures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import hmac
import secrets
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


# argon2 verification costs ~0.15 s of CPU and 64 MiB of memory each. On their own pool, at
# most this many run at once: a burst of logins (or of guesses) waits its turn there instead of
# taking every thread of the default executor, which the store's reads and DATA's work share,
# and instead of multiplying the 64 MiB by the number of threads.
MAX_PARALLEL_CHECKS = 2
# A login that succeeded is not hashed again for this long: applications that open one session
# per message (common for the users we replace hosted APIs for) would otherwise pay argon2 on
# every message. Only successes are remembered, keyed by an HMAC with a per-process secret over
# the login, the stored hash and the password, so a changed or deleted password misses at once
# and no password is kept.
SUCCESS_TTL = 300.0
SUCCESS_CACHE_MAX = 10_000


class PasswordChecker:
    """Checks a login against the stored hash without stalling the event loop."""

    def __init__(
        self,
        lookup_hash: Callable[[str], Awaitable[str | None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup_hash = lookup_hash
        self._clock = clock
        self._pool = concurrent.futures.ThreadPoolExecutor(
            MAX_PARALLEL_CHECKS, thread_name_prefix="mailrelay-argon2"
        )
        self._secret = secrets.token_bytes(32)
        self._recent: dict[bytes, float] = {}
        self.hashed = 0  # argon2 verifications run, for tests and curiosity

    async def check(self, login: str, password: str) -> bool:
        login = login.lower()
        stored = await self._lookup_hash(login)
        key = self._key(login, stored, password) if stored is not None else None
        now = self._clock()
        if key is not None and self._recent.get(key, 0.0) > now:
            return True
        self.hashed += 1
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._pool, _verify, stored, password)
        if ok and key is not None:
            if len(self._recent) >= SUCCESS_CACHE_MAX:
                self._recent = {k: t for k, t in self._recent.items() if t > now}
                if len(self._recent) >= SUCCESS_CACHE_MAX:
                    self._recent.clear()
            self._recent[key] = now + SUCCESS_TTL
        return ok

    def _key(self, login: str, stored: str, password: str) -> bytes:
        material = b"\0".join(s.encode("utf-8", "surrogatepass") for s in (login, stored, password))
        return hmac.new(self._secret, material, hashlib.sha256).digest()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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
