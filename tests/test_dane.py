"""DANE for SMTP (RFC 7672): TLSA lookups against a real DNS server on loopback that marks
names as signed through the AD flag, and one match end to end against a real MX."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import dns.asyncresolver
import pytest

from mailrelay.delivery.dane import (
    DaneMatch,
    DaneRecords,
    DaneTrouble,
    NoDane,
    Tlsa,
    lookup_tlsa,
    reference_names,
)
from mailrelay.delivery.dane_match import match
from mailrelay.delivery.mx import MxHost, MxResolver
from mailrelay.resolver import make_resolver
from tests.world import MODERN, DnsServer, TestCA, World, tlsa_record

SHORT_TIMEOUT = 0.3
DOMAIN = "example.org"
MX = "mx1.example.org"
OWNER = "_25._tcp.mx1.example.org"
ALIAS_TARGET = "mail.provider.test"
TARGET_OWNER = "_25._tcp.mail.provider.test"

# A private trust anchor: in no ca_file, so only a TLSA record can vouch for it.
TA = TestCA("DANE trust anchor")
INTERMEDIATE = TA.intermediate("DANE intermediate")
ISSUED = INTERMEDIATE.issue([MX], chain="full")  # leaf, intermediate, trust anchor
LEAF = ISSUED.leaf
OTHER = TestCA("someone else").issue([MX]).leaf
EE = tlsa_record(LEAF, 3, 1, 1)
EE_OTHER = tlsa_record(OTHER, 3, 1, 1)


def records(*texts: str, base: str = MX) -> DaneRecords:
    return DaneRecords(base, tuple(Tlsa.from_text(t) for t in texts))


# -- lookup ----------------------------------------------------------------------------------------


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    async with DnsServer() as server:
        yield server


@pytest.fixture
def resolver(dns_server: DnsServer) -> dns.asyncresolver.Resolver:
    return make_resolver([dns_server.nameserver], SHORT_TIMEOUT)


async def only_host(dns_server: DnsServer) -> MxHost:
    result = await MxResolver([dns_server.nameserver], timeout=SHORT_TIMEOUT).resolve_mx(DOMAIN)
    assert isinstance(result, list), result
    [host] = result
    return host


def publish(dns_server: DnsServer, *tlsa: str, host: str = MX) -> None:
    dns_server.add(DOMAIN, "MX", f"10 {host}.")
    dns_server.add(host, "A", "127.0.1.1")
    for record in tlsa:
        dns_server.add(f"_25._tcp.{host}", "TLSA", record)


def publish_alias(dns_server: DnsServer) -> None:
    """mx1.example.org is an alias of mail.provider.test (RFC 7672 §2.2.3)."""
    dns_server.add(DOMAIN, "MX", f"10 {MX}.")
    dns_server.add(MX, "CNAME", f"{ALIAS_TARGET}.")
    dns_server.add(ALIAS_TARGET, "A", "127.0.1.1")


def tlsa_questions(dns_server: DnsServer) -> list[str]:
    return [q.name for q in dns_server.queries if q.rdtype == "TLSA"]


async def test_a_validated_tlsa_rrset_applies(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    publish(dns_server, EE)
    dns_server.secure(DOMAIN)

    result = await lookup_tlsa(resolver, await only_host(dns_server))

    assert result == records(EE)
    assert [(q.name, q.dnssec) for q in dns_server.queries if q.rdtype == "TLSA"] == [(OWNER, True)]


async def test_the_port_names_the_tlsa_owner(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    publish(dns_server)
    dns_server.add(f"_2525._tcp.{MX}", "TLSA", EE)
    dns_server.secure(DOMAIN)

    result = await lookup_tlsa(resolver, await only_host(dns_server), port=2525)

    assert result == DaneRecords(MX, (Tlsa.from_text(EE),), 2525)
    assert isinstance(result, DaneRecords)
    assert result.owner == f"_2525._tcp.{MX}"


async def test_an_unsigned_mx_rrset_means_no_dane_even_beside_tlsa(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    publish(dns_server, EE, host="mx.provider.test")
    dns_server.secure("provider.test")  # the host and its TLSA are signed; example.org is not

    result = await lookup_tlsa(resolver, await only_host(dns_server))

    assert result == NoDane("the MX answer naming mx.provider.test is not DNSSEC-validated")
    assert tlsa_questions(dns_server) == []


async def test_unsigned_address_records_mean_no_dane(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    publish(dns_server, EE, host="mx.provider.test")
    dns_server.secure(DOMAIN)

    result = await lookup_tlsa(resolver, await only_host(dns_server))

    assert result == NoDane("the address records of mx.provider.test are not DNSSEC-validated")
    assert tlsa_questions(dns_server) == []


async def test_an_unsigned_tlsa_rrset_means_no_dane(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    publish(dns_server, EE)
    dns_server.secure(DOMAIN)
    dns_server.insecure(OWNER)

    result = await lookup_tlsa(resolver, await only_host(dns_server))

    assert result == NoDane(f"the TLSA records at {OWNER} are not DNSSEC-validated")


@pytest.mark.parametrize("kind", ["nxdomain", "nodata"])
async def test_validated_absence_means_no_dane(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver, kind: str
) -> None:
    publish(dns_server)
    if kind == "nodata":
        dns_server.add(OWNER, "TXT", "not a TLSA record")
    dns_server.secure(DOMAIN)

    result = await lookup_tlsa(resolver, await only_host(dns_server))

    assert result == NoDane(f"no TLSA records at {OWNER}")


async def test_servfail_on_tlsa_is_trouble_not_a_downgrade(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    publish(dns_server, EE)
    dns_server.secure(DOMAIN)
    dns_server.servfail(OWNER)  # what a validating resolver answers for bogus data
    host, port = dns_server.address

    result = await lookup_tlsa(resolver, await only_host(dns_server))

    assert result == DaneTrouble(
        f"TLSA lookup for {OWNER}: no nameserver gave an answer (All nameservers failed to "
        f"answer the query {OWNER}. IN TLSA: Server Do53:{host}@{port} answered SERVFAIL)"
    )


async def test_a_tlsa_timeout_is_trouble(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    publish(dns_server, EE)
    dns_server.secure(DOMAIN)
    host = await only_host(dns_server)
    dns_server.drop(OWNER)

    assert await lookup_tlsa(resolver, host) == DaneTrouble(f"TLSA lookup for {OWNER} timed out")


async def test_only_pkix_records_leave_nothing_usable(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    pkix = (tlsa_record(LEAF, 1, 1, 1), tlsa_record(TA.certificate, 0, 0, 1))
    publish(dns_server, *pkix)
    dns_server.secure(DOMAIN)

    result = await lookup_tlsa(resolver, await only_host(dns_server))

    # DANE applies (TLS is mandatory) but nothing can authenticate the server (RFC 7672 §2.2).
    assert isinstance(result, DaneRecords)
    assert sorted(map(str, result.records)) == sorted(pkix)
    assert result.usable == ()


async def test_an_implicit_mx_looks_for_tlsa_at_the_domain(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    dns_server.add(DOMAIN, "A", "127.0.1.1")
    dns_server.add(f"_25._tcp.{DOMAIN}", "TLSA", EE)
    dns_server.secure(DOMAIN)

    result = await lookup_tlsa(resolver, await only_host(dns_server))

    assert result == records(EE, base=DOMAIN)


async def test_a_tlsa_owner_that_is_an_alias_keeps_the_base_domain(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    publish(dns_server)
    dns_server.add(OWNER, "CNAME", "_25._tcp.tlsa.provider.test.")
    dns_server.add("_25._tcp.tlsa.provider.test", "TLSA", EE)
    dns_server.secure(DOMAIN)
    dns_server.secure("provider.test")
    host = await only_host(dns_server)

    signed = await lookup_tlsa(resolver, host)
    dns_server.insecure("provider.test")
    unsigned = await lookup_tlsa(resolver, host)

    assert signed == records(EE)
    assert unsigned == NoDane(f"the TLSA records at {OWNER} are not DNSSEC-validated")


# RFC 7672 §2.2.3: an MX host name that is an alias.


async def test_an_alias_looks_at_its_target_first(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    publish_alias(dns_server)
    dns_server.add(TARGET_OWNER, "TLSA", EE)
    dns_server.add(OWNER, "TLSA", EE_OTHER)
    dns_server.secure(DOMAIN)
    dns_server.secure("provider.test")

    result = await lookup_tlsa(resolver, await only_host(dns_server))

    assert result == records(EE, base=ALIAS_TARGET)
    assert tlsa_questions(dns_server) == [TARGET_OWNER]


@pytest.mark.parametrize("at_target", ["nxdomain", "unsigned"])
async def test_an_alias_falls_back_to_its_own_name(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver, at_target: str
) -> None:
    publish_alias(dns_server)
    dns_server.add(OWNER, "TLSA", EE)
    dns_server.secure(DOMAIN)
    dns_server.secure("provider.test")
    if at_target == "unsigned":
        dns_server.add(TARGET_OWNER, "TLSA", EE_OTHER)
        dns_server.insecure(TARGET_OWNER)

    result = await lookup_tlsa(resolver, await only_host(dns_server))

    assert result == records(EE)
    assert tlsa_questions(dns_server) == [TARGET_OWNER, OWNER]


async def test_an_alias_into_an_unsigned_zone_uses_only_its_own_name(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    publish_alias(dns_server)
    dns_server.add(TARGET_OWNER, "TLSA", EE_OTHER)
    dns_server.add(OWNER, "TLSA", EE)
    dns_server.secure(DOMAIN)  # provider.test is unsigned: the addresses are not validated
    host = await only_host(dns_server)

    result = await lookup_tlsa(resolver, host)

    assert (host.dnssec, host.mx_dnssec, host.expanded_name) == (False, True, ALIAS_TARGET)
    assert result == records(EE)
    assert tlsa_questions(dns_server) == [OWNER]


async def test_an_unsigned_alias_into_an_unsigned_zone_means_no_dane(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    publish_alias(dns_server)
    dns_server.add(OWNER, "TLSA", EE)
    dns_server.secure(DOMAIN)
    dns_server.insecure(MX, subtree=False)

    result = await lookup_tlsa(resolver, await only_host(dns_server))

    assert result == NoDane(
        f"{MX} is an alias of {ALIAS_TARGET} and neither its CNAME nor the address records "
        "are DNSSEC-validated"
    )
    assert tlsa_questions(dns_server) == []


async def test_trouble_at_the_alias_target_is_not_nothing_there(
    dns_server: DnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    publish_alias(dns_server)
    dns_server.add(OWNER, "TLSA", EE)
    dns_server.secure(DOMAIN)
    dns_server.secure("provider.test")
    host = await only_host(dns_server)
    dns_server.drop(TARGET_OWNER)

    result = await lookup_tlsa(resolver, host)

    assert result == DaneTrouble(f"TLSA lookup for {TARGET_OWNER} timed out")
    assert tlsa_questions(dns_server) == [TARGET_OWNER]


def test_reference_names() -> None:
    host = MxHost(MX, 10, ("127.0.1.1",), True, True, expanded_name=ALIAS_TARGET)

    assert reference_names("Example.ORG.", host, records(EE, base=ALIAS_TARGET)) == (
        ALIAS_TARGET,
        MX,
        DOMAIN,
    )
    assert reference_names(DOMAIN, host, records(EE)) == (MX, DOMAIN)


# -- end to end: DNS, lookup, SNI, the chain as sent -----------------------------------------------


async def handshake_chain(address: tuple[str, int], sni: str) -> list[bytes]:
    """EHLO, STARTTLS, a handshake that verifies nothing (as delivery does), and the chain."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        await reader.readline()
        writer.write(b"EHLO client.test\r\n")
        while (await reader.readline())[3:4] == b"-":
            pass
        writer.write(b"STARTTLS\r\n")
        assert (await reader.readline()).startswith(b"220")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        await writer.start_tls(ctx, server_hostname=sni)
        tls = writer.get_extra_info("ssl_object")
        # Python 3.11 has the chain as sent only on the private object (3.13: public), and
        # typeshed declares neither it nor _ssl.ENCODING_DER (2).
        sent = tls._sslobj.get_unverified_chain()
        return [c.public_bytes(2) for c in sent]
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_dane_ta_end_to_end_with_a_private_trust_anchor(tmp_path: Path) -> None:
    async with World(tmp_path) as world:
        issued = INTERMEDIATE.issue([MX])  # leaf and intermediate; the anchor is in DNS only
        mx = await world.add_mx(DOMAIN, MODERN, issued=issued)
        world.dns.add(OWNER, "TLSA", tlsa_record(TA.certificate, 2, 1, 0))
        world.dns.secure(DOMAIN)
        mx_resolver = MxResolver(world.nameservers, timeout=SHORT_TIMEOUT)
        found = await mx_resolver.resolve_mx(DOMAIN)
        assert isinstance(found, list)
        [host] = found

        dane = await lookup_tlsa(make_resolver(world.nameservers, SHORT_TIMEOUT), host)
        assert isinstance(dane, DaneRecords)
        sent = await handshake_chain(mx.address, dane.base_domain)
        result = match(sent, dane, reference_names(DOMAIN, host, dane), dt.datetime.now(dt.UTC))
        await mx.wait_until(lambda s: s.connections[0].closed)

    assert mx.connections[0].sni == MX
    assert sent == issued.chain_der
    assert result == DaneMatch(
        "dane-ta", dane.records[0], f"DANE-TA {dane.records[0].brief()}: chain to a public key"
    )
