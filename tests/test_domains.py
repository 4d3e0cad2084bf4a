"""The records a domain must publish, checked against a real DNS server on loopback."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest

from mailrelay import dkim, domains
from mailrelay.dkim import DkimKey
from mailrelay.domains import Record
from tests.world.dns import DnsServer

DOMAIN = "example.org"
RELAY = "a:relay.example.net"
SPF = f"v=spf1 {RELAY} ~all"
DMARC = "v=DMARC1; p=none; rua=mailto:dmarc-reports@example.org; adkim=r; aspf=r"
RSA_NAME = "mr20261122._domainkey.example.org"
ED_NAME = "mr20261122e._domainkey.example.org"
DMARC_NAME = "_dmarc.example.org"
NOT_PUBLISHED = "not published"
TIMEOUT = 2.0
WRONG_KEY = "public key (p=) differs from this relay's key"
BAD_POLICY = "no valid p= policy (none, quarantine, reject)"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[DkimKey]:
    # 2048 bits, so the RSA record is longer than one 255-byte TXT string, as in real life.
    directory = tmp_path_factory.mktemp("dkim")
    return dkim.generate_keys(DOMAIN, str(directory), "rsa+ed25519", 2048, datetime(2026, 11, 22))


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> DkimKey:
    directory = tmp_path_factory.mktemp("other")
    return dkim.generate_keys(DOMAIN, str(directory), "rsa", 1024, datetime(2026, 11, 22))[0]


@pytest.fixture
def expected(keys: list[DkimKey]) -> list[Record]:
    return domains.expected_records(DOMAIN, keys, spf_mechanisms=(RELAY,), dmarc_rua="")


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    async with DnsServer() as s:
        yield s


async def run_check(server: DnsServer, expected: list[Record], lifetime: float = TIMEOUT) -> Any:
    report = await domains.check(
        DOMAIN, expected, nameservers=(server.nameserver,), timeout=lifetime
    )
    return report.to_json()


def row(record: Record, found: list[str], valid: bool, reason: str | None = None) -> dict[str, Any]:
    return {
        "type": "TXT",
        "name": record.name,
        "expected": record.value,
        "found": found,
        "valid": valid,
        "reason": reason,
    }


def publish_all(server: DnsServer, keys: list[DkimKey]) -> None:
    server.add(RSA_NAME, "TXT", keys[0].public_record)
    server.add(ED_NAME, "TXT", keys[1].public_record)
    server.add(DOMAIN, "TXT", SPF)
    server.add(DMARC_NAME, "TXT", DMARC)


# -- the records to publish ------------------------------------------------------------------


def test_expected_records(keys: list[DkimKey]) -> None:
    records = domains.expected_records(
        "Example.ORG.", keys, spf_mechanisms=(RELAY, "ip4:192.0.2.0/24"), dmarc_rua=""
    )
    assert records == [
        Record("TXT", RSA_NAME, keys[0].public_record, "dkim"),
        Record("TXT", ED_NAME, keys[1].public_record, "dkim"),
        Record("TXT", DOMAIN, "v=spf1 a:relay.example.net ip4:192.0.2.0/24 ~all", "spf"),
        Record("TXT", DMARC_NAME, DMARC, "dmarc"),
    ]


@pytest.mark.parametrize(
    ("rua", "value"),
    [
        ("postmaster@example.net", "mailto:postmaster@example.net"),
        ("mailto:reports@example.org", "mailto:reports@example.org"),
    ],
)
def test_dmarc_rua(rua: str, value: str) -> None:
    [dmarc] = domains.expected_records(DOMAIN, [], spf_mechanisms=(RELAY,), dmarc_rua=rua)[1:]
    assert dmarc.value == f"v=DMARC1; p=none; rua={value}; adkim=r; aspf=r"


def test_zone_line_splits_long_values(keys: list[DkimKey]) -> None:
    record = domains.expected_records(DOMAIN, keys, spf_mechanisms=(RELAY,), dmarc_rua="")[0]
    line = record.zone_line()
    assert line.startswith(f'{RSA_NAME}. 3600 IN TXT ( "v=DKIM1; k=rsa; " "p=')
    assert line.endswith('" )')
    strings = re.findall(r'"([^"]*)"', line)
    # 2048 bits: the tags, then 394 characters of p= in two strings.
    assert [len(s) for s in strings] == [16, 255, len(record.value) - 16 - 255]
    assert "".join(strings) == record.value
    assert record.zone_line(ttl=None).startswith(f'{RSA_NAME}. IN TXT ( "v=DKIM1; k=rsa; " "p=')
    spf = domains.Record("TXT", DOMAIN, "v=spf1 a:relay.test ~all", "spf")
    assert spf.zone_line() == f'{DOMAIN}. 3600 IN TXT "v=spf1 a:relay.test ~all"'
    assert domains.txt_strings("x" * 600) == ["x" * 255, "x" * 255, "x" * 90]


# -- checking what is published --------------------------------------------------------------


async def test_nothing_published(server: DnsServer, expected: list[Record]) -> None:
    assert await run_check(server, expected) == {
        "domain": DOMAIN,
        "valid": False,
        "records": [row(r, [], False, NOT_PUBLISHED) for r in expected],
    }
    assert {q.name for q in server.queries} == {RSA_NAME, ED_NAME, DOMAIN, DMARC_NAME}


async def test_partly_published(
    server: DnsServer, keys: list[DkimKey], expected: list[Record]
) -> None:
    server.add(RSA_NAME, "TXT", keys[0].public_record)
    server.add(DOMAIN, "TXT", SPF)
    rsa, ed, spf, dmarc = expected
    assert await run_check(server, expected) == {
        "domain": DOMAIN,
        "valid": False,
        "records": [
            row(rsa, [keys[0].public_record], True),
            row(ed, [], False, NOT_PUBLISHED),
            row(spf, [SPF], True),
            row(dmarc, [], False, NOT_PUBLISHED),
        ],
    }


async def test_wrong_records(
    server: DnsServer, keys: list[DkimKey], other_key: DkimKey, expected: list[Record]
) -> None:
    ed_as_rsa = keys[1].public_record.replace("k=ed25519", "k=rsa")
    server.add(RSA_NAME, "TXT", other_key.public_record)
    server.add(ED_NAME, "TXT", ed_as_rsa)
    server.add(DOMAIN, "TXT", "v=spf1 mx ~all")
    server.add(DMARC_NAME, "TXT", "v=DMARC1; p=monitor")
    rsa, ed, spf, dmarc = expected
    assert await run_check(server, expected) == {
        "domain": DOMAIN,
        "valid": False,
        "records": [
            row(rsa, [other_key.public_record], False, WRONG_KEY),
            row(ed, [ed_as_rsa], False, "k=rsa, expected k=ed25519"),
            row(spf, ["v=spf1 mx ~all"], False, f"does not authorize {RELAY}"),
            row(dmarc, ["v=DMARC1; p=monitor"], False, BAD_POLICY),
        ],
    }


async def test_fully_published(
    server: DnsServer, keys: list[DkimKey], expected: list[Record]
) -> None:
    rsa_record = keys[0].public_record
    # Several strings split at arbitrary points, with folding whitespace inside p= (RFC 6376
    # §3.6.1): what a DNS provider's form or a hand-written zone may produce.
    strings = [rsa_record[:100], rsa_record[100:300] + " ", rsa_record[300:]]
    server.add_txt(RSA_NAME, [s.encode() for s in strings])
    # The Ed25519 key delegated by CNAME, as when a provider hosts the record.
    server.add(ED_NAME, "CNAME", "ed.keys.example.net")
    server.add("ed.keys.example.net", "TXT", keys[1].public_record.replace("; ", ";"))
    spf = f"v=spf1 mx include:_spf.example.com +{RELAY} ip4:192.0.2.0/24 -all"
    server.add(DOMAIN, "TXT", "site-verification=abc123")
    server.add(DOMAIN, "TXT", spf)
    dmarc = "v=DMARC1; p=reject; rua=mailto:elsewhere@example.com"
    server.add(DMARC_NAME, "TXT", dmarc)
    rsa, ed, spf_record, dmarc_record = expected
    assert await run_check(server, expected) == {
        "domain": DOMAIN,
        "valid": True,
        "records": [
            row(rsa, ["".join(strings)], True),
            row(ed, [keys[1].public_record.replace("; ", ";")], True),
            row(spf_record, [spf], True),
            row(dmarc_record, [dmarc], True),
        ],
    }


@pytest.mark.parametrize(
    ("published", "reason"),
    [
        ([SPF, "v=spf1 include:_spf.example.com ~all"],
         "2 SPF records; RFC 7208 §3.2 forbids that (a permerror)"),
        ([f"v=spf1 {RELAY} +all"], "+all authorizes every server on the internet"),
        ([f"v=spf1 {RELAY} all"], "+all authorizes every server on the internet"),
        ([f"v=spf1 ~{RELAY} ~all"], f"does not authorize {RELAY}"),
        ([f"v=spf1 mx -all {RELAY}"], f"does not authorize {RELAY}"),
        (["v=spf1 include:relay.example.net ~all"], f"does not authorize {RELAY}"),
    ],
)  # fmt: skip
async def test_spf_that_does_not_authorize_the_relay(
    server: DnsServer, keys: list[DkimKey], published: list[str], reason: str
) -> None:
    publish_all(server, keys)
    server.remove(DOMAIN, "TXT")
    for value in published:
        server.add(DOMAIN, "TXT", value)
    report = await run_check(server, domains.expected_records(
        DOMAIN, keys, spf_mechanisms=(RELAY,), dmarc_rua=""
    ))  # fmt: skip
    assert report["valid"] is False
    spf_row = report["records"][2]
    assert sorted(spf_row["found"]) == sorted(published)
    assert (spf_row["valid"], spf_row["reason"]) == (False, reason)
    assert [r["valid"] for r in report["records"]] == [True, True, False, True]


@pytest.mark.parametrize(
    ("ours", "published", "valid"),
    [
        ("ip4:192.0.2.7", "v=spf1 ip4:192.0.2.0/24 -all", True),
        ("ip4:192.0.2.0/24", "v=spf1 ip4:192.0.2.0/25 -all", False),
        ("ip6:2001:db8::7", "v=spf1 ip6:2001:db8::/32 ip4:192.0.2.7 -all", True),
        ("a:relay.example.net", "v=spf1 A:Relay.Example.NET. ?all", True),
    ],
)
async def test_spf_mechanism_matching(
    server: DnsServer, ours: str, published: str, valid: bool
) -> None:
    server.add(DOMAIN, "TXT", published)
    expected = domains.expected_records(DOMAIN, [], spf_mechanisms=(ours,), dmarc_rua="")
    report = await run_check(server, expected[:1])
    assert report["records"][0]["valid"] is valid


async def test_dkim_several_records_and_revoked_key(
    server: DnsServer, keys: list[DkimKey], other_key: DkimKey, expected: list[Record]
) -> None:
    server.add(RSA_NAME, "TXT", keys[0].public_record)
    server.add(RSA_NAME, "TXT", other_key.public_record)
    server.add(ED_NAME, "TXT", "v=DKIM1; k=ed25519; p=")
    report = await run_check(server, expected[:2])
    assert [(r["valid"], r["reason"]) for r in report["records"]] == [
        (False, "2 TXT records; publish exactly one"),
        (False, "no public key (p= missing or empty: revoked)"),
    ]


async def test_two_dmarc_records(
    server: DnsServer, keys: list[DkimKey], expected: list[Record]
) -> None:
    publish_all(server, keys)
    server.add(DMARC_NAME, "TXT", "v=DMARC1; p=reject")
    server.add(DMARC_NAME, "TXT", "unrelated text")
    dmarc_row = (await run_check(server, expected))["records"][3]
    # "unrelated text" is not a DMARC record, so it is neither counted nor shown.
    assert sorted(dmarc_row["found"]) == sorted([DMARC, "v=DMARC1; p=reject"])
    assert (dmarc_row["valid"], dmarc_row["reason"]) == (False, "2 DMARC records; publish one")


async def test_servfail_is_a_lookup_failure_not_absence(
    server: DnsServer, keys: list[DkimKey], expected: list[Record]
) -> None:
    publish_all(server, keys)
    server.servfail(DMARC_NAME)
    rsa, ed, spf, dmarc = expected
    assert await run_check(server, expected) == {
        "domain": DOMAIN,
        "valid": False,
        "records": [
            row(rsa, [keys[0].public_record], True),
            row(ed, [keys[1].public_record], True),
            row(spf, [SPF], True),
            row(dmarc, [], False, "DNS lookup failed: SERVFAIL"),
        ],
    }


async def test_timeout_is_a_lookup_failure(
    server: DnsServer, keys: list[DkimKey], expected: list[Record]
) -> None:
    publish_all(server, keys)
    server.drop(ED_NAME)
    report = await run_check(server, expected, lifetime=0.3)
    assert [(r["valid"], r["reason"]) for r in report["records"]] == [
        (True, None),
        (False, "DNS lookup failed: timed out after 0.3s"),
        (True, None),
        (True, None),
    ]


async def test_nothing_expected_is_not_valid() -> None:
    report = await domains.check(DOMAIN, [], nameservers=("127.0.0.1:9",), timeout=0.1)
    assert report.to_json() == {"domain": DOMAIN, "valid": False, "records": []}


async def test_lookup_failure_makes_the_report_inconclusive(
    server: DnsServer, keys: list[DkimKey], expected: list[Record]
) -> None:
    publish_all(server, keys)
    report = await domains.check(DOMAIN, expected, nameservers=(server.nameserver,), timeout=2.0)
    assert (report.valid, report.conclusive) == (True, True)
    server.servfail(DMARC_NAME)
    report = await domains.check(DOMAIN, expected, nameservers=(server.nameserver,), timeout=2.0)
    # `domain check` leaves the domain's state alone when the answer is not known.
    assert (report.valid, report.conclusive) == (False, False)
    assert [r.lookup_failed for r in report.records] == [False, False, False, True]
