"""MX resolution against a real authoritative DNS server on loopback."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import dns.nameserver
import pytest

from mailrelay.delivery.mx import (
    MxHost,
    MxResolver,
    NoSuchDomain,
    NullMx,
    TemporaryDnsFailure,
)
from mailrelay.resolver import make_resolver
from tests.world import DnsServer, Query

DOMAIN = "example.org"
MX1 = MxHost("mx1.example.org", 10, ("127.0.1.1",))
MX2 = MxHost("mx2.example.org", 10, ("127.0.1.2",))
MX3 = MxHost("mx3.example.org", 20, ("127.0.1.3",))
NO_MX_ADDRESS = TemporaryDnsFailure(
    DOMAIN, "no address for any MX host of example.org (mx1.example.org): no A or AAAA records"
)
SHORT_TIMEOUT = 0.3


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    async with DnsServer() as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def resolver(dns_server: DnsServer, clock: Clock) -> MxResolver:
    return MxResolver([dns_server.nameserver], timeout=SHORT_TIMEOUT, clock=clock)


def publish(dns: DnsServer, host: MxHost, ttl: int = 300) -> None:
    dns.add(DOMAIN, "MX", f"{host.preference} {host.name}.", ttl)
    for address in host.addresses:
        dns.add(host.name, "AAAA" if ":" in address else "A", address, ttl)


async def hosts(resolver: MxResolver) -> list[MxHost]:
    result = await resolver.resolve_mx(DOMAIN)
    assert isinstance(result, list), result
    return result


async def test_hosts_come_in_preference_order(dns_server: DnsServer, resolver: MxResolver) -> None:
    publish(dns_server, MX3)
    publish(dns_server, MxHost("mx0.example.org", 5, ("127.0.1.9",)))
    publish(dns_server, MX1)

    assert await resolver.resolve_mx(DOMAIN) == [
        MxHost("mx0.example.org", 5, ("127.0.1.9",)),
        MX1,
        MX3,
    ]


async def test_addresses_are_ipv4_then_ipv6(dns_server: DnsServer, resolver: MxResolver) -> None:
    publish(dns_server, MxHost("mx1.example.org", 10, ("::1", "127.0.1.1", "127.0.1.2")))

    [host] = await hosts(resolver)

    # Within one type the order is the server's (dnspython, like BIND, shuffles RRsets).
    assert (set(host.addresses[:2]), host.addresses[2]) == ({"127.0.1.1", "127.0.1.2"}, "::1")


async def test_equal_preferences_come_in_random_order(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    for host in (MX1, MX2, MX3):
        publish(dns_server, host)

    orders = {tuple(await hosts(resolver)) for _ in range(64)}

    # Both orders of the two preference-10 hosts, and the preference-20 host always last;
    # the chance of missing an order by bad luck is 2**-63.
    assert orders == {(MX1, MX2, MX3), (MX2, MX1, MX3)}


async def test_the_random_source_can_be_injected(dns_server: DnsServer) -> None:
    publish(dns_server, MX1)
    publish(dns_server, MX2)

    async def order(seed: int) -> object:
        resolver = MxResolver([dns_server.nameserver], rng=random.Random(seed))
        return [await resolver.resolve_mx(DOMAIN) for _ in range(8)]

    assert await order(7) == await order(7)


async def test_no_mx_but_an_address_is_an_implicit_mx(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    dns_server.add(DOMAIN, "A", "127.0.1.5")
    dns_server.add(DOMAIN, "TXT", "v=spf1 -all")

    assert await resolver.resolve_mx(DOMAIN) == [MxHost(DOMAIN, 0, ("127.0.1.5",))]


async def test_null_mx(dns_server: DnsServer, resolver: MxResolver) -> None:
    dns_server.add(DOMAIN, "MX", "0 .")
    dns_server.add(DOMAIN, "A", "127.0.1.5")  # must not turn into an implicit MX

    result = await resolver.resolve_mx(DOMAIN)

    assert result == NullMx(DOMAIN, "example.org accepts no mail (null MX, RFC 7505)")
    assert (result.permanent, result.status) == (True, "5.1.10")


async def test_null_mx_beside_real_hosts_is_skipped(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    dns_server.add(DOMAIN, "MX", "0 .")
    publish(dns_server, MX1)

    assert await resolver.resolve_mx(DOMAIN) == [MX1]


async def test_nxdomain(dns_server: DnsServer, resolver: MxResolver) -> None:
    result = await resolver.resolve_mx("nowhere.example.org")

    assert result == NoSuchDomain(
        "nowhere.example.org", "nowhere.example.org: no such domain (NXDOMAIN)"
    )
    assert (result.permanent, result.status) == (True, "5.1.2")


@pytest.mark.parametrize("domain", ["exa..mple.org", "", ".", "a" * 64 + ".org"])
async def test_a_name_that_cannot_exist(resolver: MxResolver, domain: str) -> None:
    result = await resolver.resolve_mx(domain)

    assert isinstance(result, NoSuchDomain)
    assert result.detail.startswith(f"{domain!r} is not a valid domain name")


async def test_servfail_is_temporary(dns_server: DnsServer, resolver: MxResolver) -> None:
    publish(dns_server, MX1)
    dns_server.servfail(DOMAIN)

    result = await resolver.resolve_mx(DOMAIN)

    assert isinstance(result, TemporaryDnsFailure)
    assert (result.permanent, result.status) == (False, "4.4.3")
    assert result.detail.startswith("MX lookup for example.org: no nameserver gave an answer")
    assert "SERVFAIL" in result.detail


async def test_timeout_is_temporary(dns_server: DnsServer, resolver: MxResolver) -> None:
    publish(dns_server, MX1)
    dns_server.drop(DOMAIN)

    started = time.monotonic()
    result = await resolver.resolve_mx(DOMAIN)

    assert result == TemporaryDnsFailure(DOMAIN, "MX lookup for example.org: timed out after 0.3 s")
    assert time.monotonic() - started < SHORT_TIMEOUT + 0.5


async def test_mx_host_without_address_is_skipped(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    publish(dns_server, MX1)
    dns_server.add(DOMAIN, "MX", "5 gone.example.org.")  # NXDOMAIN for its addresses
    dns_server.add(DOMAIN, "MX", "6 broken.example.org.")
    dns_server.servfail("broken.example.org")

    assert await resolver.resolve_mx(DOMAIN) == [MX1]


async def test_no_mx_host_with_an_address_is_temporary(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    dns_server.add(DOMAIN, "MX", "10 mx1.example.org.")
    dns_server.add("mx1.example.org", "TXT", "no address here")

    assert await resolver.resolve_mx(DOMAIN) == NO_MX_ADDRESS


async def test_no_mx_and_no_address_is_temporary(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    dns_server.add(DOMAIN, "TXT", "v=spf1 -all")

    assert await resolver.resolve_mx(DOMAIN) == TemporaryDnsFailure(
        DOMAIN, "no address for any MX host of example.org (example.org): no A or AAAA records"
    )


async def test_answers_are_cached_for_their_ttl(
    dns_server: DnsServer, resolver: MxResolver, clock: Clock
) -> None:
    publish(dns_server, MX1, ttl=60)
    first = await resolver.resolve_mx(DOMAIN)
    asked = len(dns_server.queries)
    dns_server.remove(DOMAIN, "MX")
    publish(dns_server, MX3, ttl=60)

    clock.now += 59
    cached = await resolver.resolve_mx(DOMAIN)
    assert len(dns_server.queries) == asked
    clock.now += 1
    fresh = await resolver.resolve_mx(DOMAIN)

    assert (first, cached, fresh) == ([MX1], [MX1], [MX3])
    assert dns_server.queries[asked:] == [
        Query(DOMAIN, "MX", "udp"),
        Query("mx3.example.org", "A", "udp"),
        Query("mx3.example.org", "AAAA", "udp"),
    ]


async def test_the_shortest_ttl_wins(
    dns_server: DnsServer, resolver: MxResolver, clock: Clock
) -> None:
    dns_server.add(DOMAIN, "MX", "10 mx1.example.org.", ttl=300)
    dns_server.add("mx1.example.org", "A", "127.0.1.1", ttl=30)
    await resolver.resolve_mx(DOMAIN)
    dns_server.remove("mx1.example.org", "A")
    dns_server.add("mx1.example.org", "A", "127.0.1.7", ttl=30)

    clock.now += 30

    assert await resolver.resolve_mx(DOMAIN) == [MxHost("mx1.example.org", 10, ("127.0.1.7",))]


async def test_nxdomain_is_cached_for_the_negative_ttl(
    dns_server: DnsServer, resolver: MxResolver, clock: Clock
) -> None:
    # DnsServer's SOA gives a negative TTL of 60 s.
    assert isinstance(await resolver.resolve_mx(DOMAIN), NoSuchDomain)
    publish(dns_server, MX1)

    clock.now += 59
    assert isinstance(await resolver.resolve_mx(DOMAIN), NoSuchDomain)
    clock.now += 1
    assert await resolver.resolve_mx(DOMAIN) == [MX1]


async def test_temporary_failures_are_not_cached(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    publish(dns_server, MX1)
    dns_server.servfail(DOMAIN)
    assert isinstance(await resolver.resolve_mx(DOMAIN), TemporaryDnsFailure)

    dns_server.heal(DOMAIN)

    assert await resolver.resolve_mx(DOMAIN) == [MX1]


async def test_domain_names_are_case_insensitive_and_may_end_in_a_dot(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    publish(dns_server, MX1)

    assert await resolver.resolve_mx("Example.ORG.") == [MX1]
    assert await resolver.resolve_mx("example.org") == [MX1]
    assert len([q for q in dns_server.queries if q.rdtype == "MX"]) == 1


def test_nameservers_take_ports() -> None:
    resolver = make_resolver(["127.0.0.1:5353", "[::1]:5300", "127.0.0.53"], timeout=2.0)

    servers = [ns for ns in resolver.nameservers if isinstance(ns, dns.nameserver.Do53Nameserver)]
    assert [(ns.address, ns.port) for ns in servers] == [
        ("127.0.0.1", 5353),
        ("::1", 5300),
        ("127.0.0.53", 53),
    ]
    assert (resolver.timeout, resolver.lifetime) == (2.0, 2.0)


# -- DNSSEC status, from the AD flag of the (validating) resolver ---------------------------------


async def test_every_query_asks_for_the_dnssec_status(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    publish(dns_server, MX1)

    await resolver.resolve_mx(DOMAIN)

    assert [(q.rdtype, q.dnssec) for q in dns_server.queries] == [
        ("MX", True),
        ("A", True),
        ("AAAA", True),
    ]


async def test_unsigned_answers_are_insecure(dns_server: DnsServer, resolver: MxResolver) -> None:
    publish(dns_server, MX1)

    [host] = await hosts(resolver)

    assert (host.dnssec, host.mx_dnssec, host.expanded_name) == (False, False, None)


async def test_a_validated_mx_and_address_are_secure(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    publish(dns_server, MX1)
    dns_server.secure(DOMAIN)

    assert await hosts(resolver) == [replace(MX1, dnssec=True, mx_dnssec=True)]


async def test_an_mx_host_in_an_unsigned_zone_is_insecure(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    dns_server.add(DOMAIN, "MX", "10 mx.provider.test.")
    dns_server.add("mx.provider.test", "A", "127.0.1.1")
    dns_server.secure(DOMAIN)

    assert await hosts(resolver) == [
        MxHost("mx.provider.test", 10, ("127.0.1.1",), dnssec=False, mx_dnssec=True)
    ]


async def test_an_unsigned_mx_rrset_makes_a_signed_host_insecure(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    dns_server.add(DOMAIN, "MX", "10 mx.provider.test.")
    dns_server.add("mx.provider.test", "A", "127.0.1.1")
    dns_server.secure("provider.test")

    assert await hosts(resolver) == [MxHost("mx.provider.test", 10, ("127.0.1.1",))]


@pytest.mark.parametrize("target_signed", [True, False], ids=["signed", "unsigned"])
async def test_an_mx_host_that_is_an_alias_names_its_target(
    dns_server: DnsServer, resolver: MxResolver, target_signed: bool
) -> None:
    dns_server.add(DOMAIN, "MX", "10 mx1.example.org.")
    dns_server.add("mx1.example.org", "CNAME", "mail.provider.test.")
    dns_server.add("mail.provider.test", "A", "127.0.1.1")
    dns_server.secure(DOMAIN)
    if target_signed:
        dns_server.secure("provider.test")

    assert await hosts(resolver) == [
        MxHost(
            "mx1.example.org",
            10,
            ("127.0.1.1",),
            dnssec=target_signed,
            mx_dnssec=True,
            expanded_name="mail.provider.test",
        )
    ]


async def test_an_implicit_mx_counts_its_address_records(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    dns_server.add(DOMAIN, "A", "127.0.1.5")
    dns_server.secure(DOMAIN)

    assert await hosts(resolver) == [MxHost(DOMAIN, 0, ("127.0.1.5",), dnssec=True, mx_dnssec=True)]


async def test_the_dnssec_status_is_cached_with_the_answer(
    dns_server: DnsServer, resolver: MxResolver, clock: Clock
) -> None:
    publish(dns_server, MX1, ttl=60)
    dns_server.secure(DOMAIN)
    first = await hosts(resolver)
    dns_server.insecure(DOMAIN)

    clock.now += 59
    cached = await hosts(resolver)
    clock.now += 1
    fresh = await hosts(resolver)

    secure = [replace(MX1, dnssec=True, mx_dnssec=True)]
    assert (first, cached, fresh) == (secure, secure, [MX1])
