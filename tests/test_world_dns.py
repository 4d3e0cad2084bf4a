"""The test world's DNS server: exact authoritative answers over UDP and TCP, the failures
tests ask for, and DNSSEC status through the AD flag."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.nameserver
import dns.rcode
import dns.rrset
import pytest

from tests.world import DnsServer, Query
from tests.world.dns import Transport

DKIM_KEY = "v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" * 9  # ~420 chars


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    async with DnsServer() as server:
        yield server


async def ask(
    server: DnsServer, name: str, rdtype: str, *, tcp: bool = False
) -> dns.message.Message:
    host, port = server.address
    query = dns.message.make_query(name, rdtype)
    if tcp:
        return await dns.asyncquery.tcp(query, host, port=port, timeout=2)
    return await dns.asyncquery.udp(query, host, port=port, timeout=2)


# -- DNS -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True])
async def test_dns_answers_exactly_and_authoritatively(dns_server: DnsServer, tcp: bool) -> None:
    dns_server.add("example.org", "MX", "10 mx1.example.org")  # no final dot: still absolute
    dns_server.add("mx1.example.org", "A", "127.0.1.1", ttl=60)
    dns_server.add("mx1.example.org", "A", "127.0.1.2", ttl=60)

    mx = await ask(dns_server, "example.org", "MX", tcp=tcp)
    a = await ask(dns_server, "MX1.Example.Org", "A", tcp=tcp)

    assert mx.rcode() == dns.rcode.NOERROR
    assert mx.flags & dns.flags.AA
    assert mx.answer == [
        dns.rrset.from_text("example.org.", 300, "IN", "MX", "10 mx1.example.org.")
    ]
    assert a.answer == [
        dns.rrset.from_text("mx1.example.org.", 60, "IN", "A", "127.0.1.1", "127.0.1.2")
    ]
    transport: Transport = "tcp" if tcp else "udp"
    assert dns_server.queries == [
        Query("example.org", "MX", transport),
        Query("mx1.example.org", "A", transport),
    ]


async def test_nxdomain_nodata_and_empty_non_terminal(dns_server: DnsServer) -> None:
    dns_server.add("sel._domainkey.example.org", "TXT", "v=DKIM1; p=")

    missing = await ask(dns_server, "nowhere.example.org", "A")
    nodata = await ask(dns_server, "sel._domainkey.example.org", "A")
    empty_non_terminal = await ask(dns_server, "_domainkey.example.org", "TXT")

    assert (missing.rcode(), missing.answer) == (dns.rcode.NXDOMAIN, [])
    assert (nodata.rcode(), nodata.answer) == (dns.rcode.NOERROR, [])
    assert (empty_non_terminal.rcode(), empty_non_terminal.answer) == (dns.rcode.NOERROR, [])
    # The SOA in negative answers gives resolvers a negative-caching TTL.
    assert [rrset.rdtype for rrset in missing.authority] == [dns.rdatatype.SOA]
    assert missing.flags & dns.flags.AA


async def test_remove_makes_a_name_disappear(dns_server: DnsServer) -> None:
    dns_server.add("mx1.example.org", "A", "127.0.1.1")
    dns_server.remove("mx1.example.org", "A")

    assert (await ask(dns_server, "mx1.example.org", "A")).rcode() == dns.rcode.NXDOMAIN


async def test_long_txt_is_split_into_255_byte_strings(dns_server: DnsServer) -> None:
    dns_server.add("sel._domainkey.example.org", "TXT", DKIM_KEY)
    dns_server.add_txt("example.org", ["v=spf1 ", "-all"])

    dkim = await ask(dns_server, "sel._domainkey.example.org", "TXT", tcp=True)
    spf = await ask(dns_server, "example.org", "TXT")

    strings = next(iter(dkim.answer[0])).strings
    assert [len(s) for s in strings] == [255, len(DKIM_KEY) - 255]
    assert b"".join(strings).decode() == DKIM_KEY
    assert next(iter(spf.answer[0])).strings == (b"v=spf1 ", b"-all")


async def test_udp_answer_too_big_is_truncated_and_resolver_retries_over_tcp(
    dns_server: DnsServer,
) -> None:
    for i in range(3):
        dns_server.add("big.example.org", "TXT", f"{i}" * 300)
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(*dns_server.address)]

    udp = await ask(dns_server, "big.example.org", "TXT")
    answer = await resolver.resolve("big.example.org", "TXT")

    assert udp.flags & dns.flags.TC
    assert udp.answer == []
    assert answer.rrset is not None
    assert sorted(b"".join(rd.strings) for rd in answer.rrset) == [
        b"0" * 300,
        b"1" * 300,
        b"2" * 300,
    ]
    assert [q.transport for q in dns_server.queries] == ["udp", "udp", "tcp"]


async def test_cname_is_followed_inside_the_server(dns_server: DnsServer) -> None:
    dns_server.add("sel._domainkey.example.org", "CNAME", "sel.dkim.provider.test.")
    dns_server.add("sel.dkim.provider.test", "TXT", "v=DKIM1; p=")

    response = await ask(dns_server, "sel._domainkey.example.org", "TXT")

    assert [rrset.rdtype for rrset in response.answer] == [dns.rdatatype.CNAME, dns.rdatatype.TXT]


@pytest.mark.parametrize("tcp", [False, True])
async def test_servfail_then_heal(dns_server: DnsServer, tcp: bool) -> None:
    dns_server.add("example.org", "MX", "10 mx1.example.org.")
    dns_server.servfail("example.org")
    failed = await ask(dns_server, "example.org", "MX", tcp=tcp)
    dns_server.heal("example.org")
    healed = await ask(dns_server, "example.org", "MX", tcp=tcp)

    assert (failed.rcode(), failed.answer) == (dns.rcode.SERVFAIL, [])
    assert healed.rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize("tcp", [False, True])
async def test_dropped_name_times_out(dns_server: DnsServer, tcp: bool) -> None:
    dns_server.add("example.org", "MX", "10 mx1.example.org.")
    dns_server.drop("example.org")
    host, port = dns_server.address
    query = dns.message.make_query("example.org", "MX")

    with pytest.raises(dns.exception.Timeout):
        if tcp:
            await dns.asyncquery.tcp(query, host, port=port, timeout=0.2)
        else:
            await dns.asyncquery.udp(query, host, port=port, timeout=0.2)


# -- DNS: DNSSEC status (the AD flag) ----------------------------------------------------------


async def ask_ad(
    server: DnsServer, name: str, rdtype: str, *, ad: bool = True, do: bool = False
) -> dns.message.Message:
    host, port = server.address
    query = dns.message.make_query(name, rdtype, want_dnssec=do)
    if ad:
        query.flags |= dns.flags.AD
    return await dns.asyncquery.udp(query, host, port=port, timeout=2)


def ad(response: dns.message.Message) -> bool:
    return bool(response.flags & dns.flags.AD)


async def test_secure_names_get_ad_only_when_the_query_asks(dns_server: DnsServer) -> None:
    dns_server.add("mx1.example.org", "A", "127.0.1.1")
    dns_server.secure("example.org")

    asked_ad = await ask_ad(dns_server, "mx1.example.org", "A")
    asked_do = await ask_ad(dns_server, "mx1.example.org", "A", ad=False, do=True)
    asked_neither = await ask_ad(dns_server, "mx1.example.org", "A", ad=False)

    assert (ad(asked_ad), ad(asked_do), ad(asked_neither)) == (True, True, False)
    assert [q.dnssec for q in dns_server.queries] == [True, True, False]


async def test_unmarked_names_never_get_ad(dns_server: DnsServer) -> None:
    dns_server.add("mx1.example.org", "A", "127.0.1.1")

    assert not ad(await ask_ad(dns_server, "mx1.example.org", "A", do=True))


async def test_negative_answers_carry_ad_for_secure_names(dns_server: DnsServer) -> None:
    dns_server.add("mx1.example.org", "A", "127.0.1.1")
    dns_server.secure("example.org")

    nxdomain = await ask_ad(dns_server, "_25._tcp.mx1.example.org", "TLSA")
    nodata = await ask_ad(dns_server, "mx1.example.org", "TLSA")

    assert (nxdomain.rcode(), ad(nxdomain)) == (dns.rcode.NXDOMAIN, True)
    assert (nodata.rcode(), nodata.answer, ad(nodata)) == (dns.rcode.NOERROR, [], True)


async def test_the_nearest_mark_wins(dns_server: DnsServer) -> None:
    for name in ("mx1.example.org", "mx2.unsigned.example.org", "one.example.net"):
        dns_server.add(name, "A", "127.0.1.1")
    dns_server.add("two.example.net", "A", "127.0.1.2")
    dns_server.secure("example.org")
    dns_server.insecure("unsigned.example.org")  # an unsigned delegation below a signed zone
    dns_server.secure("one.example.net", subtree=False)

    answers = [
        ad(await ask_ad(dns_server, name, "A"))
        for name in ("mx1.example.org", "mx2.unsigned.example.org", "one.example.net")
    ]
    answers.append(ad(await ask_ad(dns_server, "two.example.net", "A")))

    assert answers == [True, False, True, False]
    assert dns_server.is_secure("example.org")
    assert not dns_server.is_secure("x.one.example.net")


@pytest.mark.parametrize(
    ("secure_target", "expected"), [(True, True), (False, False)], ids=["signed", "unsigned"]
)
async def test_a_cname_chain_is_secure_only_if_every_name_is(
    dns_server: DnsServer, secure_target: bool, expected: bool
) -> None:
    dns_server.add("mx1.example.org", "CNAME", "mail.provider.test.")
    dns_server.add("mail.provider.test", "A", "127.0.1.1")
    dns_server.secure("example.org")
    if secure_target:
        dns_server.secure("provider.test")

    response = await ask_ad(dns_server, "mx1.example.org", "A")

    assert [rrset.rdtype for rrset in response.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert ad(response) is expected


async def test_a_cname_to_a_missing_name_needs_the_missing_name_secure(
    dns_server: DnsServer,
) -> None:
    dns_server.add("mx1.example.org", "CNAME", "gone.provider.test.")
    dns_server.secure("example.org")

    unsigned = await ask_ad(dns_server, "mx1.example.org", "A")
    dns_server.secure("provider.test")
    signed = await ask_ad(dns_server, "mx1.example.org", "A")

    assert (unsigned.rcode(), ad(unsigned)) == (dns.rcode.NXDOMAIN, False)
    assert (signed.rcode(), ad(signed)) == (dns.rcode.NXDOMAIN, True)


async def test_servfail_never_carries_ad(dns_server: DnsServer) -> None:
    dns_server.add("mx1.example.org", "A", "127.0.1.1")
    dns_server.secure("example.org")
    dns_server.servfail("mx1.example.org")

    response = await ask_ad(dns_server, "mx1.example.org", "A")

    assert (response.rcode(), ad(response)) == (dns.rcode.SERVFAIL, False)


async def test_dns_stop_closes_idle_tcp_connections() -> None:
    server = DnsServer()
    await server.start()
    reader, writer = await asyncio.open_connection(*server.address)

    async with asyncio.timeout(2):
        await server.stop()
        assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
