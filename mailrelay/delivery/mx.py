"""MX resolution: the hosts to try for a recipient domain, best first, or why there are none,
with the DNSSEC status of each answer that DANE (RFC 7672 §2.2) needs."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.resolver

from mailrelay.resolver import authenticated, make_resolver

DEFAULT_TIMEOUT = 5.0
# Used when a negative answer carries no SOA to take a negative TTL from (RFC 2308 §5).
_NEGATIVE_TTL_WITHOUT_SOA = 60


@dataclass(frozen=True)
class MxHost:
    """One host to deliver to; `addresses` are IPv4 then IPv6, in the order DNS gave them.

    DNSSEC status comes from the AD flag of the configured validating resolver:
    `dnssec`: the MX RRset that named this host and the host's address records were all
    validated; for an implicit MX (the domain has no MX records), its address records alone.
    `mx_dnssec`: the MX answer was validated, whatever the address records were.
    `expanded_name`: where `name` is an alias, the name its CNAME chain ends at, which is the
    first place to look for TLSA records (RFC 7672 §2.2.3); None where `name` is no alias.
    """

    name: str  # A-label form, without the final dot
    preference: int
    addresses: tuple[str, ...]
    dnssec: bool = False
    mx_dnssec: bool = False
    expanded_name: str | None = None  # lowercase A-labels, without the final dot


@dataclass(frozen=True)
class MxFailure:
    """Why a domain has no host to deliver to. `status` is the RFC 3463 code for the DSN."""

    domain: str
    detail: str  # for the bounce or the log, e.g. "SERVFAIL for MX example.org"
    permanent: ClassVar[bool]
    status: ClassVar[str]


@dataclass(frozen=True)
class NullMx(MxFailure):
    """The domain publishes "MX 0 ." (RFC 7505): it accepts no mail, ever."""

    permanent: ClassVar[bool] = True
    status: ClassVar[str] = "5.1.10"


@dataclass(frozen=True)
class NoSuchDomain(MxFailure):
    """NXDOMAIN for the domain itself (or a name that cannot exist)."""

    permanent: ClassVar[bool] = True
    status: ClassVar[str] = "5.1.2"


@dataclass(frozen=True)
class TemporaryDnsFailure(MxFailure):
    """SERVFAIL, a timeout, no nameserver answering, or no MX host with an address."""

    permanent: ClassVar[bool] = False
    status: ClassVar[str] = "4.4.3"


MxResult = list[MxHost] | NullMx | NoSuchDomain | TemporaryDnsFailure


# One DNS question's outcome, before it means anything for mail.
@dataclass(frozen=True)
class _Records:
    rdatas: tuple[dns.rdata.Rdata, ...]  # empty: the name exists without this type (NODATA)
    ttl: int
    secure: bool  # the resolver set AD: every RRset in the answer, CNAMEs included, validated
    canonical: dns.name.Name  # the name at the end of any CNAME chain


@dataclass(frozen=True)
class _NxDomain:
    ttl: int
    secure: bool


@dataclass(frozen=True)
class _Trouble:
    detail: str


_Lookup = _Records | _NxDomain | _Trouble


@dataclass(frozen=True)
class _Addresses:
    """One host's A and AAAA answers taken together."""

    addresses: tuple[str, ...]  # IPv4 then IPv6
    ttl: float  # the shortest seen
    trouble: str | None  # a lookup that failed
    secure: bool
    canonical: dns.name.Name


# Hosts sorted by preference only; shuffling among equals happens on every answer, cached or not.
_Outcome = tuple[MxHost, ...] | NullMx | NoSuchDomain | TemporaryDnsFailure


@dataclass(frozen=True)
class _Cached:
    expires: float
    result: _Outcome


def _negative_ttl(response: dns.message.Message | None) -> int:
    for rrset in response.authority if response is not None else []:
        if rrset.rdtype == dns.rdatatype.SOA:
            return min(rrset.ttl, cast(int, rrset[0].minimum))
    return _NEGATIVE_TTL_WITHOUT_SOA


class MxResolver:
    """Resolves and caches MX answers; one per process, shared by delivery workers.

    `timeout` bounds each DNS question; the address questions for all MX hosts are asked
    together, so one resolution takes at most about twice `timeout`. `failure_ttl` is how long
    a TemporaryDnsFailure is remembered: 0 (the default) asks again on the next attempt, which
    the retry schedule already spaces out. Concurrent misses for one domain each ask the DNS;
    the cache only spares later attempts.
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        failure_ttl: float = 0.0,
        max_ttl: float = 3600.0,
        max_entries: int = 10_000,
    ) -> None:
        self._resolver = make_resolver(nameservers, timeout)
        self._timeout = timeout
        self._clock = clock
        self._rng = rng or random.Random()
        self._failure_ttl = failure_ttl
        # Honour short TTLs exactly, but look again at least hourly: a long-running relay should
        # notice a moved MX even where its owner published a TTL of days.
        self._max_ttl = max_ttl
        self._max_entries = max_entries
        self._cache: dict[str, _Cached] = {}

    async def resolve_mx(self, domain: str) -> MxResult:
        """The hosts to try for `domain`, best first, or why there are none."""
        try:
            name = dns.name.from_text(domain, origin=dns.name.root)
        except (dns.exception.DNSException, UnicodeError) as e:
            return NoSuchDomain(domain, f"{domain!r} is not a valid domain name: {e}")
        key = name.to_text(omit_final_dot=True).lower()
        if name == dns.name.root:
            return NoSuchDomain(domain, f"{domain!r} is not a valid domain name: empty")
        now = self._clock()
        cached = self._cache.get(key)
        if cached is None or cached.expires <= now:
            result, ttl = await self._resolve(key, name)
            if isinstance(result, TemporaryDnsFailure):
                ttl = self._failure_ttl
            cached = _Cached(now + min(ttl, self._max_ttl), result)
            self._store(key, cached, now)
        return self._ordered(cached.result)

    def _store(self, key: str, entry: _Cached, now: float) -> None:
        if entry.expires <= now:
            self._cache.pop(key, None)
            return
        self._cache[key] = entry
        if len(self._cache) > self._max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v.expires > now}
            while len(self._cache) > self._max_entries:
                del self._cache[next(iter(self._cache))]  # the oldest entry

    def _ordered(self, result: _Outcome) -> MxResult:
        if not isinstance(result, tuple):
            return result
        # RFC 5321 §5.1: hosts of equal preference are tried in random order, spreading load.
        ordered: list[MxHost] = []
        for _, group in itertools.groupby(result, key=lambda h: h.preference):
            same = list(group)
            self._rng.shuffle(same)
            ordered.extend(same)
        return ordered

    async def _resolve(self, domain: str, name: dns.name.Name) -> tuple[_Outcome, float]:
        mx = await self._lookup(name, "MX")
        if isinstance(mx, _NxDomain):
            return NoSuchDomain(domain, f"{domain}: no such domain (NXDOMAIN)"), mx.ttl
        if isinstance(mx, _Trouble):
            return TemporaryDnsFailure(domain, f"MX lookup for {domain}: {mx.detail}"), 0
        implicit = not mx.rdatas
        if implicit:
            # RFC 5321 §5.1: no MX records means the domain itself is the only host (implicit MX).
            targets = [(0, name)]
        else:
            records = [cast(dns.rdtypes.ANY.MX.MX, rd) for rd in mx.rdatas]
            if len(records) == 1 and records[0].exchange == dns.name.root:
                return NullMx(domain, f"{domain} accepts no mail (null MX, RFC 7505)"), mx.ttl
            # A "." among real MX hosts breaks RFC 7505; it names no host, so it is skipped.
            targets = sorted(
                {(r.preference, r.exchange) for r in records if r.exchange != dns.name.root},
                key=lambda t: t[0],
            )
        found = await asyncio.gather(*(self._addresses(target) for _, target in targets))
        hosts: list[MxHost] = []
        ttl = float(mx.ttl)
        troubles: list[str] = []
        for (preference, target), host in zip(targets, found, strict=True):
            ttl = min(ttl, host.ttl)
            if host.trouble is not None:
                troubles.append(host.trouble)
                ttl = min(ttl, self._failure_ttl)
            if host.addresses:
                hosts.append(
                    MxHost(
                        _text(target),
                        preference,
                        host.addresses,
                        # RFC 7672 §2.2.2: without MX records only the address records count.
                        dnssec=host.secure and (mx.secure or implicit),
                        mx_dnssec=mx.secure,
                        expanded_name=_text(host.canonical) if host.canonical != target else None,
                    )
                )
        if hosts:
            return tuple(hosts), ttl
        # No host has an address. The DNS answered, so this may look permanent, but it is
        # usually a record being moved, and a bounce cannot be taken back: defer, and let
        # max_queue_lifetime bounce the message if the domain stays broken.
        names = ", ".join(t.to_text(omit_final_dot=True) for _, t in targets)
        why = "; ".join(troubles) or "no A or AAAA records"
        return TemporaryDnsFailure(
            domain, f"no address for any MX host of {domain} ({names}): {why}"
        ), ttl

    async def _addresses(self, host: dns.name.Name) -> _Addresses:
        a, aaaa = await asyncio.gather(self._lookup(host, "A"), self._lookup(host, "AAAA"))
        addresses: list[str] = []
        ttl = float("inf")
        trouble: str | None = None
        canonical: dns.name.Name | None = None
        # Secure when every answer the addresses (or their absence) came from was validated; a
        # failed lookup contributes no address, so it does not count against the others.
        answered: list[bool] = []
        for rdtype, outcome in (("A", a), ("AAAA", aaaa)):
            match outcome:
                case _Records(rdatas, rr_ttl, secure, rr_canonical):
                    addresses.extend(rd.to_text() for rd in rdatas)
                    ttl = min(ttl, rr_ttl)
                    answered.append(secure)
                    if canonical is None:
                        canonical = rr_canonical
                case _NxDomain(nx_ttl, secure):
                    ttl = min(ttl, nx_ttl)
                    answered.append(secure)
                case _Trouble(detail):
                    trouble = f"{rdtype} lookup for {host.to_text(omit_final_dot=True)}: {detail}"
        secure = bool(answered) and all(answered)
        return _Addresses(tuple(addresses), ttl, trouble, secure, canonical or host)

    async def _lookup(self, name: dns.name.Name, rdtype: str) -> _Lookup:
        try:
            answer = await self._resolver.resolve(
                name, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as e:
            responses: dict[dns.name.Name, dns.message.Message] = e.kwargs.get("responses", {})
            response = next(iter(responses.values()), None)
            return _NxDomain(_negative_ttl(response), authenticated(response))
        except dns.exception.Timeout:
            return _Trouble(f"timed out after {self._timeout:g} s")
        except dns.resolver.NoNameservers as e:
            return _Trouble(f"no nameserver gave an answer ({e})")
        except (dns.exception.DNSException, OSError) as e:
            return _Trouble(f"{type(e).__name__}: {e}")
        # For NODATA the minimum TTL is the negative TTL from the SOA, as for NXDOMAIN.
        ttl = int(answer.chaining_result.minimum_ttl)
        return _Records(
            tuple(answer.rrset) if answer.rrset is not None else (),
            ttl,
            authenticated(answer.response),
            answer.canonical_name,
        )


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()
