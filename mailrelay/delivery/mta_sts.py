"""MTA-STS (RFC 8461): which MX hosts a recipient domain allows, and whether it demands
authenticated TLS to them, from its published policy and the policy cache in the store.

`MtaSts.lookup(domain)` follows §5.1: look up the `_mta-sts` TXT record; fetch the policy when
its id differs from the cached policy's, when the cached one has expired or is due for a refresh,
or when nothing is cached; keep using an unexpired cached policy when the record is gone or the
fetch fails. It never raises for the network or for what the domain publishes: those become a
lookup result whose `error` names the failure as TLS-RPT (RFC 8460) does. Fetching and parsing
are in `sts_fetch`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import dns.asyncresolver
import dns.exception
import dns.name

from mailrelay.delivery.sts_fetch import (
    MAX_AGE_CAP,
    StsError,
    StsFailure,
    discover,
    fetch_policy_text,
    parse_policy,
)
from mailrelay.store import Store, sts_cache
from mailrelay.store.backend import Connection
from mailrelay.store.sts_cache import CachedStsPolicy, StsMode

__all__ = [
    "MAX_AGE_CAP",
    "ConnectionStsCache",
    "MtaSts",
    "StoreStsCache",
    "StsCache",
    "StsError",
    "StsLookup",
    "StsMode",
    "StsPolicy",
    "StsSource",
    "mx_matches",
    "normalize_domain",
]

log = logging.getLogger(__name__)

StsSource = Literal["fresh", "cache", "none"]

# §3.3 suggests refreshing cached policies about once a day, so that a policy is renewed long
# before it expires and an attacker blocking one refresh gains nothing. A short-lived policy is
# refreshed at half its life instead.
REFRESH_INTERVAL = 86400.0
# §3.3: after a failed fetch, wait "five minutes or longer per version ID" before trying again,
# so that a struggling policy host is not hammered by every queued message.
RETRY_AFTER = 300.0


@dataclass(frozen=True)
class StsPolicy:
    """A valid policy for `domain`, as fetched under the TXT record id `policy_id`.

    Mode "none" is a real policy (it replaces a cached one, §8.3) that imposes nothing.
    """

    domain: str  # lowercase A-labels, no final dot
    policy_id: str
    mode: StsMode
    mx: tuple[str, ...]  # patterns: "mx.example.org" or "*.example.org", lowercase
    max_age: int  # seconds, at most MAX_AGE_CAP
    fetched_at: float
    expires_at: float  # fetched_at + max_age
    body: str = field(default="", repr=False, compare=False)  # as served, for the record

    def matches(self, mx_host: str) -> bool:
        """Whether `mx_host` is one of the policy's MX patterns (§4.1)."""
        return any(mx_matches(pattern, mx_host) for pattern in self.mx)

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def refresh_due(self, now: float) -> bool:
        return now >= self.fetched_at + min(REFRESH_INTERVAL, self.max_age / 2)


@dataclass(frozen=True)
class StsLookup:
    """What `MtaSts.lookup` found.

    `policy` is the policy to apply, None when the domain has none (or only an expired one).
    `source` says where it came from: "fresh" (fetched just now), "cache", or "none".
    `error` is set when discovery or a fetch failed, even if a cached policy still applies;
    `detail` is the human reason (host, address, status, certificate problem).
    """

    policy: StsPolicy | None
    source: StsSource
    error: StsError | None = None
    detail: str = ""


def mx_matches(pattern: str, mx_host: str) -> bool:
    """§4.1: an exact match, or "*.rest" matching exactly one left-most label before "rest";
    case-insensitive, a final dot on either side ignored."""
    pattern = pattern.lower().removesuffix(".")
    host = mx_host.lower().removesuffix(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return bool(host) and host == pattern


# -- the cache -------------------------------------------------------------------------------------


class StsCache(Protocol):
    """Where policies are kept between lookups and across restarts."""

    async def get(self, domain: str) -> StsPolicy | None: ...

    async def put(self, policy: StsPolicy) -> None: ...

    async def delete(self, domain: str) -> None: ...


class StoreStsCache:
    """The service's cache: the `sts_policies` table through the store's reader and writer."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def get(self, domain: str) -> StsPolicy | None:
        row = await self._store.read(lambda conn: sts_cache.get_policy(conn, domain))
        return None if row is None else _from_row(row)

    async def put(self, policy: StsPolicy) -> None:
        row = _to_row(policy)
        await self._store.write(lambda conn: sts_cache.put_policy(conn, row))

    async def delete(self, domain: str) -> None:
        await self._store.write(lambda conn: sts_cache.delete_policy(conn, domain))


class ConnectionStsCache:
    """The CLI's cache (`tls-check`): the same table on a connection from `store.connect`,
    opened in autocommit mode, so each statement commits by itself."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def get(self, domain: str) -> StsPolicy | None:
        row = sts_cache.get_policy(self._conn, domain)
        return None if row is None else _from_row(row)

    async def put(self, policy: StsPolicy) -> None:
        sts_cache.put_policy(self._conn, _to_row(policy))

    async def delete(self, domain: str) -> None:
        sts_cache.delete_policy(self._conn, domain)


def _to_row(policy: StsPolicy) -> CachedStsPolicy:
    return CachedStsPolicy(
        domain=policy.domain,
        policy_id=policy.policy_id,
        mode=policy.mode,
        mx_patterns=policy.mx,
        max_age=policy.max_age,
        fetched_at=policy.fetched_at,
        expires_at=policy.expires_at,
        body=policy.body,
    )


def _from_row(row: CachedStsPolicy) -> StsPolicy:
    return StsPolicy(
        domain=row.domain,
        policy_id=row.policy_id,
        mode=row.mode,
        mx=row.mx_patterns,
        max_age=row.max_age,
        fetched_at=row.fetched_at,
        expires_at=row.expires_at,
        body=row.body,
    )


# -- lookups ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    policy_id: str
    until: float
    error: StsError
    detail: str


@dataclass
class _Flight:
    task: asyncio.Task[StsLookup]
    waiters: int = 0


class MtaSts:
    """Policy lookups for recipient domains, cached in `cache`.

    `resolver` answers the TXT record and the policy host's address (the configured
    nameservers); `ca_file` adds trust anchors to the system's for the policy host's
    certificate; `port` is the HTTPS port (443 but in tests); `timeout` bounds one fetch.
    Concurrent lookups for one domain share one discovery and fetch.
    """

    def __init__(
        self,
        cache: StsCache,
        resolver: dns.asyncresolver.Resolver,
        *,
        ca_file: str = "",
        port: int = 443,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        retry_after: float = RETRY_AFTER,
    ) -> None:
        self._cache = cache
        self._resolver = resolver
        self._ca_file = ca_file
        self._port = port
        self._timeout = timeout
        self._clock = clock
        self._retry_after = retry_after
        self._flights: dict[str, _Flight] = {}
        self._failures: dict[str, _Failure] = {}

    async def lookup(self, domain: str) -> StsLookup:
        """The policy that applies to mail for `domain` now (see the module's docstring).

        Raises only on cancellation, programming errors, and store errors (a relay that
        cannot read its own cache must not guess that no policy applies).
        """
        name = normalize_domain(domain)
        if name is None:
            return StsLookup(None, "none", detail=f"{domain!r} is not a domain name")
        flight = self._flights.get(name)
        if flight is None:
            flight = _Flight(asyncio.create_task(self._lookup(name), name=f"mta-sts {name}"))
            self._flights[name] = flight
            flight.task.add_done_callback(lambda _task: self._land(name, flight))
        flight.waiters += 1
        try:
            # Shielded so that one caller giving up does not cancel the others' lookup.
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            if flight.waiters == 1:
                # Nobody else wants it; a lookup arriving from now on starts afresh.
                self._land(name, flight)
                flight.task.cancel()
            raise
        finally:
            flight.waiters -= 1

    def _land(self, name: str, flight: _Flight) -> None:
        if self._flights.get(name) is flight:
            del self._flights[name]

    async def _lookup(self, domain: str) -> StsLookup:
        now = self._clock()
        cached = await self._cache.get(domain)
        expired = cached is not None and cached.expired(now)
        if expired:
            cached = None  # §5.1: an expired policy is no policy; a fresh fetch replaces it
        try:
            policy_id = await discover(self._resolver, domain)
        except StsFailure as failure:
            log.info("event=mta_sts_txt_failed domain=%s detail=%r", domain, failure.detail)
            return _fallback(cached, failure.error, failure.detail)
        if policy_id is None:
            # §5.1: no usable record does not remove a cached policy, or removing the record
            # (or an attacker suppressing it) would be a downgrade. Only an expired one goes.
            if expired:
                await self._forget(domain)
            return _fallback(cached, None, "")
        if cached is not None and cached.policy_id == policy_id and not cached.refresh_due(now):
            return StsLookup(cached, "cache")
        failed = self._failures.get(domain)
        if failed is not None and failed.policy_id == policy_id and now < failed.until:
            return _fallback(cached, failed.error, failed.detail)
        try:
            policy = await self._fetch(domain, policy_id, now)
        except StsFailure as failure:
            # Forget lapsed failures first, so that the map holds only domains failing now.
            self._failures = {d: f for d, f in self._failures.items() if now < f.until}
            self._failures[domain] = _Failure(
                policy_id, now + self._retry_after, failure.error, failure.detail
            )
            log.warning(
                "event=mta_sts_fetch_failed domain=%s id=%s error=%s detail=%r cached=%s",
                domain,
                policy_id,
                failure.error,
                failure.detail,
                "none" if cached is None else cached.policy_id,
            )
            return _fallback(cached, failure.error, failure.detail)
        self._failures.pop(domain, None)
        await self._remember(policy)
        return StsLookup(policy, "fresh")

    async def _fetch(self, domain: str, policy_id: str, now: float) -> StsPolicy:
        text = await fetch_policy_text(
            self._resolver,
            domain,
            ca_file=self._ca_file,
            port=self._port,
            time_limit=self._timeout,
        )
        parsed = parse_policy(text)
        return StsPolicy(
            domain=domain,
            policy_id=policy_id,
            mode=parsed.mode,
            mx=parsed.mx,
            max_age=parsed.max_age,
            fetched_at=now,
            expires_at=now + parsed.max_age,
            body=text,
        )

    async def _remember(self, policy: StsPolicy) -> None:
        log.info(
            "event=mta_sts_policy domain=%s id=%s mode=%s max_age=%d mx=%s",
            policy.domain,
            policy.policy_id,
            policy.mode,
            policy.max_age,
            ",".join(policy.mx),
        )
        try:
            await self._cache.put(policy)
        except (sqlite3.Error, RuntimeError) as exc:  # RuntimeError: the store is closing
            # The policy is valid and applies now; failing to keep it only costs a refetch.
            log.error("event=mta_sts_cache_failed domain=%s error=%r", policy.domain, str(exc))

    async def _forget(self, domain: str) -> None:
        try:
            await self._cache.delete(domain)
        except (sqlite3.Error, RuntimeError) as exc:
            log.error("event=mta_sts_cache_failed domain=%s error=%r", domain, str(exc))


def _fallback(cached: StsPolicy | None, error: StsError | None, detail: str) -> StsLookup:
    if cached is not None:
        return StsLookup(cached, "cache", error, detail)
    return StsLookup(None, "none", error, detail)


def normalize_domain(domain: str) -> str | None:
    """Lowercase A-labels without the final dot, or None if `domain` cannot be a host name
    (it goes into a DNS question, a URL and a certificate check)."""
    try:
        name = dns.name.from_text(domain.strip().removesuffix("."))
        text = name.to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None
    labels = text.split(".")
    ok = all(
        label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    )
    return text if ok and len(labels) >= 2 else None
