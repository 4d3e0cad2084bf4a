"""The `_smtp._tls` record (RFC 8460 §3): which records count, which rua URIs are used, and what a
hostile or broken record gets (nothing, or at most `max_rua` destinations); then the lookup over
real DNS, where an unanswered question is "later", not "no"."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mailrelay.resolver import make_resolver
from mailrelay.tlsrpt.record import Destination, Lookup, lookup, parse_records
from tests.world.dns import DnsServer

MAILTO = Destination("mailto:tlsrpt@rpt.example", "mailto", "tlsrpt@rpt.example")
HTTPS = Destination("https://rpt.example/v1", "https", "https://rpt.example/v1")


def destinations(*records: str, max_rua: int = 5) -> tuple[Destination, ...]:
    return parse_records(list(records), max_rua).destinations


def test_one_record_with_both_kinds_of_uri() -> None:
    assert destinations("v=TLSRPTv1; rua=mailto:tlsrpt@rpt.example,https://rpt.example/v1") == (
        MAILTO,
        HTTPS,
    )


@pytest.mark.parametrize(
    ("text", "uri"),
    [
        ("v=TLSRPTv1;rua=mailto:tlsrpt@rpt.example", MAILTO.uri),
        # *WSP around ";", and a trailing ";"
        ("v=TLSRPTv1 ; rua=mailto:tlsrpt@rpt.example ;", MAILTO.uri),
        ("v=TLSRPTv1; rua=mailto:tlsrpt@rpt.example; ext-1=value", MAILTO.uri),  # ignored
        # hfields are not ours to follow
        (
            "v=TLSRPTv1; rua=mailto:tlsrpt@rpt.example?subject=x",
            "mailto:tlsrpt@rpt.example?subject=x",
        ),
        ("v=TLSRPTv1; rua=mailto:tlsrpt@RPT.example.", "mailto:tlsrpt@RPT.example."),
        ("v=TLSRPTv1; rua=mailto:tlsrpt@rpt.example, mailto:tlsrpt@rpt.example", MAILTO.uri),
    ],
)
def test_well_formed_variants(text: str, uri: str) -> None:
    assert destinations(text) == (Destination(uri, "mailto", MAILTO.target),)


def test_records_of_other_kinds_are_passed_over() -> None:
    found = destinations(
        "v=spf1 -all",
        "v=TLSRPTv2; rua=mailto:other@rpt.example",  # an unknown version is not ours
        "v=TLSRPTv10; rua=mailto:other@rpt.example",
        "rua=mailto:other@rpt.example; v=TLSRPTv1",  # the version must come first
        "v=TLSRPTv1; rua=mailto:tlsrpt@rpt.example",
    )
    assert found == (MAILTO,)


@pytest.mark.parametrize(
    "records",
    [
        [],
        ["v=spf1 -all"],
        # §3: more than one TLSRPTv1 record means the domain does not take reports.
        ["v=TLSRPTv1; rua=mailto:tlsrpt@rpt.example", "v=TLSRPTv1; rua=https://rpt.example/v1"],
        ["v=TLSRPTv1; rua=mailto:tlsrpt@rpt.example", "v=TLSRPTv1; rua=mailto:tlsrpt@rpt.example"],
        ["v=TLSRPTv1"],  # no rua
        ["v=TLSRPTv1;"],
        ["v=TLSRPTv1; rua="],
        ["v=TLSRPTv1; rua=mailto:tlsrpt@rpt.example,"],
        ["v=TLSRPTv1; rua=mailto:tlsrpt@rpt.example; not a field"],
    ],
)
def test_no_usable_record_means_no_report(records: list[str]) -> None:
    assert destinations(*records) == ()


@pytest.mark.parametrize(
    "uri",
    [
        "http://rpt.example/v1",  # never in the clear
        "ftp://rpt.example/v1",
        "mailto:",
        "mailto:tlsrpt",
        "mailto:a@rpt.example%2Cb@rpt.example",  # one address per URI
        "mailto:tls%20rpt@rpt.example",
        "mailto:tlsrpt@rpt_example",
        "https://",
        "https://user:pw@rpt.example/",
        "https://rpt.example:0/",
        "https://rpt.example:99999/",
        "https://rpt.example/a b",
        "https://rpt/",  # not a domain name
        "tlsrpt@rpt.example",
    ],
)
def test_bad_uris_are_left_out_and_the_good_ones_kept(uri: str) -> None:
    found = parse_records([f"v=TLSRPTv1; rua={uri},mailto:tlsrpt@rpt.example"], 5)
    assert found.destinations == (MAILTO,)
    assert found.ignored == (f"{uri}: not a mailto: address or https: URL",)


def test_a_long_rua_list_is_capped() -> None:
    uris = [f"mailto:r{i}@rpt.example" for i in range(1000)]
    found = parse_records(["v=TLSRPTv1; rua=" + ",".join(uris)], 5)
    assert [d.target for d in found.destinations] == [f"r{i}@rpt.example" for i in range(5)]
    assert len(found.ignored) == 995
    assert found.ignored[0] == "mailto:r5@rpt.example: more than 5 (tlsrpt.max_rua)"


def test_https_urls_keep_port_path_and_query() -> None:
    [d] = destinations("v=TLSRPTv1; rua=https://c.rpt.example:8443/in?k=v")
    assert (d.method, d.target) == ("https", "https://c.rpt.example:8443/in?k=v")
    [d] = destinations("v=TLSRPTv1; rua=https://c.rpt.example")
    assert d.target == "https://c.rpt.example/"


# ---- over DNS ------------------------------------------------------------------------------


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    server = DnsServer()
    await server.start()
    yield server
    await server.stop()


async def test_lookup_reads_the_record_and_joins_its_strings(dns_server: DnsServer) -> None:
    resolver = make_resolver([dns_server.nameserver], 1.0)
    dns_server.add_txt(
        "_smtp._tls.split.example", ["v=TLSRPTv1; rua=mailto:tls", "rpt@rpt.example"]
    )
    dns_server.add("_smtp._tls.two.example", "TXT", "v=TLSRPTv1; rua=mailto:a@rpt.example")
    dns_server.add("_smtp._tls.two.example", "TXT", "v=TLSRPTv1; rua=mailto:b@rpt.example")
    dns_server.add("two.example", "A", "127.0.90.1")
    dns_server.servfail("_smtp._tls.broken.example")

    assert await lookup(resolver, "split.example", 5) == Lookup(destinations=(MAILTO,))
    assert await lookup(resolver, "two.example", 5) == Lookup()
    assert await lookup(resolver, "nxdomain.example", 5) == Lookup()
    broken = await lookup(resolver, "broken.example", 5)
    assert broken == Lookup(
        temporary="TXT lookup for _smtp._tls.broken.example. failed: NoNameservers"
    )
