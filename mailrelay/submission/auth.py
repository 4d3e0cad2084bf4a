"""Password checking for SMTP AUTH: argon2 hashes verified off the event loop on a bounded pool
of their own, a short-lived cache of successful checks, and a back-off that slows down guessing
per client address and per login name, across sessions."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

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


def backoff_delay(failures: int, cap: float, base: float = 0.5) -> float:
    """How long to hold back the next AUTH attempt after `failures` recent failures: nothing
    after the first (a typo), then `base`, doubling, up to `cap`."""
    if failures < 2:
        return 0.0
    return float(min(cap, base * 2.0 ** min(failures - 2, 64)))


# A client address and login that authenticated together are trusted for this long: the login's
# own back-off (which guesses from anywhere raise) does not hold them up, so that a brute force
# against one login cannot lock its owner out. Their address's back-off still applies.
TRUSTED_FOR = 86400.0
# Bounds memory under a guessing attack from many addresses or at many logins.
MAX_REMEMBERED = 100_000


class AuthBackoff:
    """AUTH failures remembered per client address and per login name, across sessions.

    Each attempt waits its turn: attempts from one address are answered one at a time, and so
    are attempts at one login (except from an address it recently authenticated from). Once it
    is its turn, it waits `backoff_delay` of the larger of its address's and its login's recent
    failures, then its password is checked. Forty parallel connections from one address are
    thereby as slow as one, and guesses at one login spread over many addresses queue up too.

    A success forgets only the failures of that login from that address (the user's own typos):
    an attacker who logs in as themselves between guesses resets nothing of the other logins'.

    In memory only: a restart forgets, which is acceptable for a tarpit whose purpose is to make
    guessing slow, not to ban.
    """

    def __init__(
        self,
        max_delay: float,
        *,
        window: float = 900.0,
        base_delay: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        on_delay: Callable[[float], None] = lambda _delay: None,
    ) -> None:
        self.max_delay = max_delay
        self.window = window
        self.base_delay = base_delay
        self._clock = clock
        self._on_delay = on_delay
        # Recent failures, (time, login) by address and (time, address) by login. The login may
        # be a mistyped password: it is kept here only, never logged.
        self._by_client: dict[str, list[tuple[float, str]]] = {}
        self._by_login: dict[str, list[tuple[float, str]]] = {}
        self._trusted: dict[tuple[str, str], float] = {}
        self._turns = _Turns()

    def delay(self, client: str, login: str) -> float:
        """What the next attempt from `client` at `login` would wait once it is its turn."""
        login = login.lower()
        failures = len(self._recent(self._by_client, client))
        if not self._is_trusted(client, login):
            failures = max(failures, len(self._recent(self._by_login, login)))
        return backoff_delay(failures, self.max_delay, self.base_delay)

    async def attempt(self, client: str, login: str, check: Callable[[], Awaitable[bool]]) -> bool:
        """Wait for this attempt's turn and back-off, run `check`, and remember a failure.

        An exception from `check` (the store is down) records nothing: not the client's fault.
        """
        login = login.lower()
        async with self._turns.hold(("client", client)):
            if self._is_trusted(client, login):
                return await self._run(client, login, check)
            async with self._turns.hold(("login", login)):
                return await self._run(client, login, check)

    async def _run(self, client: str, login: str, check: Callable[[], Awaitable[bool]]) -> bool:
        # Computed now, after the attempts ahead of this one have ended and been counted.
        delay = self.delay(client, login)
        if delay:
            self._on_delay(delay)
            await asyncio.sleep(delay)
        ok = await check()
        if ok:
            self._succeeded(client, login)
        else:
            self._failed(client, login)
        return ok

    def _failed(self, client: str, login: str) -> None:
        now = self._clock()
        self._by_client[client] = [*self._recent(self._by_client, client), (now, login)]
        self._by_login[login] = [*self._recent(self._by_login, login), (now, client)]
        if len(self._by_client) + len(self._by_login) > MAX_REMEMBERED:
            self._forget_old()

    def _succeeded(self, client: str, login: str) -> None:
        for table, key, other in (
            (self._by_client, client, login),
            (self._by_login, login, client),
        ):
            table[key] = [f for f in table.get(key, ()) if f[1] != other]
            self._recent(table, key)  # drops the key if nothing is left
        if len(self._trusted) >= MAX_REMEMBERED:
            now = self._clock()
            self._trusted = {k: t for k, t in self._trusted.items() if t > now}
            if len(self._trusted) >= MAX_REMEMBERED:
                self._trusted.clear()
        self._trusted[(client, login)] = self._clock() + TRUSTED_FOR

    def _is_trusted(self, client: str, login: str) -> bool:
        return self._trusted.get((client, login), 0.0) > self._clock()

    def _recent(
        self, table: dict[str, list[tuple[float, str]]], key: str
    ) -> list[tuple[float, str]]:
        """The failures of `key` within the window; a key with none is dropped (memory)."""
        cutoff = self._clock() - self.window
        recent = [f for f in table.get(key, ()) if f[0] > cutoff]
        if recent:
            table[key] = recent
        else:
            table.pop(key, None)
        return recent

    def _forget_old(self) -> None:
        for table in (self._by_client, self._by_login):
            for key in list(table):
                self._recent(table, key)
        if len(self._by_client) + len(self._by_login) > MAX_REMEMBERED:
            # Still too many: a distributed attack. Forgetting is the lesser harm than memory.
            self._by_client.clear()
            self._by_login.clear()


class _Turns:
    """One lock per key, kept only while an attempt holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, str]) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
