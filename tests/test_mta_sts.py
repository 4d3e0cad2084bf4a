"""MTA-STS (RFC 8461) against a real DNS server, a real HTTPS policy host and a real store:
finding, fetching and parsing a policy, and matching MX names against it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailrelay.delivery.mta_sts import (
    MAX_AGE_CAP,
    MtaSts,
    StoreStsCache,
    StsError,
    StsLookup,
    StsPolicy,
    mx_matches,
)
from mailrelay.delivery.sts_fetch import policy_id_from_txt
from mailrelay.resolver import make_resolver
from mailrelay.store import Store, connect, sts_cache
from mailrelay.store.sts_cache import CachedStsPolicy
from tests.world import Issued, World, self_signed
from tests.world.https import PolicyServer, Reply, policy_text, redirect, serve_policy

ADDRESS = "127.0.84.1"  # the policy host; this file's own 127.0.84.x
DOMAIN = "example.org"
HOST = "mta-sts.example.org"
WHERE = f"{HOST}[{ADDRESS}]"
TIMEOUT = 0.5
START = 1_700_000_000.0
DAY = 86400
ENFORCE = policy_text("enforce", ("mx1.example.org", "*.mail.example.org"), 7 * DAY)
FETCH_ERROR: StsError = "sts-policy-fetch-error"
INVALID: StsError = "sts-policy-invalid"
WEBPKI: StsError = "sts-webpki-invalid"


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    world: World
    store: Store
    clock: Clock
    db_path: str
    address: str  # the policy host's
    servers: list[PolicyServer] = field(default_factory=list)

    def sts(self, port: int, store: Store | None = None) -> MtaSts:
        resolver = make_resolver(self.world.nameservers, TIMEOUT)
        return MtaSts(
            StoreStsCache(store or self.store),
            resolver,
            ca_file=str(self.world.ca_file),
            port=port,
            timeout=TIMEOUT,
            clock=self.clock,
        )

    async def serve(
        self, reply: Reply | str, *, policy_id: str | None = "1", cert: Issued | None = None
    ) -> PolicyServer:
        server = await serve_policy(
            self.world, DOMAIN, reply, address=self.address, policy_id=policy_id, cert=cert
        )
        self.servers.append(server)
        return server

    def cached(self) -> CachedStsPolicy | None:
        conn = connect(self.db_path)
        try:
            return sts_cache.get_policy(conn, DOMAIN)
        finally:
            conn.close()


@contextlib.asynccontextmanager
async def open_env(tmp_path: Path, address: str, database: str | None = None) -> AsyncIterator[Env]:
    """A started store (on `database`, by default a SQLite file) and a world whose policy host
    will be on `address`."""
    db_path = database or str(tmp_path / "queue.sqlite3")
    store = Store(db_path)
    await store.start()
    async with World(tmp_path / "world") as world:
        e = Env(world, store, Clock(), db_path, address)
        yield e
        for server in e.servers:
            await server.stop()
    await store.stop()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with open_env(tmp_path, ADDRESS) as e:
        yield e


def enforce_policy(policy_id: str = "1", at: float = START) -> StsPolicy:
    return StsPolicy(
        DOMAIN, policy_id, "enforce", ("mx1.example.org", "*.mail.example.org"), 7 * DAY, at,
        at + 7 * DAY,
    )  # fmt: skip


# -- a policy is fetched, parsed and kept ----------------------------------------------------------


async def test_enforce_policy_is_fetched_over_https_and_cached(env: Env) -> None:
    server = await env.serve(ENFORCE)
    result = await env.sts(server.port).lookup(DOMAIN)

    assert result == StsLookup(enforce_policy(), "fresh", None, "")
    assert result.policy is not None and result.policy.body == ENFORCE
    [request] = server.requests
    assert (request.method, request.path) == ("GET", "/.well-known/mta-sts.txt")
    assert request.host == f"{HOST}:{server.port}"
    assert request.sni == HOST  # dialled by address, verified and introduced by name
    assert env.cached() == CachedStsPolicy(
        DOMAIN, "1", "enforce", ("mx1.example.org", "*.mail.example.org"), 7 * DAY, START,
        START + 7 * DAY, ENFORCE,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "mode", "mx"),
    [
        (policy_text("testing", ("mx.example.org",)), "testing", ("mx.example.org",)),
        (policy_text("none", ()), "none", ()),
        (policy_text("none", ("mx.example.org",)), "none", ("mx.example.org",)),
        # Upper case and a final dot are how some operators write host names.
        (policy_text("enforce", ("MX.Example.ORG.",)), "enforce", ("mx.example.org",)),
    ],
)
async def test_modes(env: Env, body: str, mode: str, mx: tuple[str, ...]) -> None:
    server = await env.serve(body)
    result = await env.sts(server.port).lookup(DOMAIN)
    assert result.policy is not None
    assert (result.source, result.policy.mode, result.policy.mx) == ("fresh", mode, mx)


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
async def test_lf_and_crlf_line_endings(env: Env, eol: str) -> None:
    server = await env.serve(
        policy_text("enforce", ("mx1.example.org", "*.mail.example.org"), 7 * DAY, eol=eol)
    )
    assert await env.sts(server.port).lookup(DOMAIN) == StsLookup(enforce_policy(), "fresh")


async def test_unknown_keys_are_ignored_and_the_first_of_a_repeated_key_counts(env: Env) -> None:
    body = (
        "version: STSv1\nmode: testing\nmode: enforce\nmx: a.example.org\n"
        "x-comment: anything at all: even colons\nmax_age: 600\nmax_age: 9\nmx: b.example.org\n\n"
    )
    server = await env.serve(body)
    result = await env.sts(server.port).lookup(DOMAIN)
    assert result.policy is not None
    assert (result.policy.mode, result.policy.mx, result.policy.max_age) == (
        "testing",
        ("a.example.org", "b.example.org"),
        600,
    )


async def test_absurd_max_age_is_capped_at_one_year(env: Env) -> None:
    server = await env.serve(policy_text("enforce", ("mx.example.org",), 9999999999))
    result = await env.sts(server.port).lookup(DOMAIN)
    assert result.policy is not None
    assert (result.policy.max_age, result.policy.expires_at) == (MAX_AGE_CAP, START + 31557600)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ("mode: enforce\nmx: mx.example.org\nmax_age: 86400\n", "version is None, not 'STSv1'"),
        (policy_text().replace("STSv1", "STSv2"), "version is 'STSv2', not 'STSv1'"),
        (policy_text("report"), "mode is 'report', not enforce, testing or none"),
        (policy_text("Enforce"), "mode is 'Enforce', not enforce, testing or none"),
        (policy_text("enforce", ()), "a policy in mode enforce must name at least one mx"),
        (policy_text("testing", ()), "a policy in mode testing must name at least one mx"),
        (policy_text(max_age=-1), "max_age is '-1', not a number of seconds"),
        (policy_text(max_age="1w"), "max_age is '1w', not a number of seconds"),
        (policy_text(max_age=10**10), "max_age is '10000000000', not a number of seconds"),
        (policy_text(mx=("mail_1.example.org",)), "mx 'mail_1.example.org' is not a host name"
         " or *.pattern"),
        (policy_text(mx=("mx.*.example.org",)), "mx 'mx.*.example.org' is not a host name or"
         " *.pattern"),
        ("<html>\nversion: STSv1\n", "line 1 is not 'key: value': '<html>'"),
    ],
)  # fmt: skip
async def test_invalid_policy_is_no_policy(env: Env, body: str, detail: str) -> None:
    server = await env.serve(body)
    result = await env.sts(server.port).lookup(DOMAIN)
    assert result == StsLookup(None, "none", INVALID, detail)
    assert env.cached() is None


# -- what the HTTPS answer must be -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "error", "detail"),
    [
        (Reply(status=404, body="not here\n"), FETCH_ERROR, f"{WHERE}: HTTP status 404, not 200"),
        (Reply(status=500, body=ENFORCE), FETCH_ERROR, f"{WHERE}: HTTP status 500, not 200"),
        (
            redirect("https://policies.example.net/example.org.txt"),
            FETCH_ERROR,
            f"{WHERE}: HTTP 302 redirect to 'https://policies.example.net/example.org.txt'"
            " refused (RFC 8461 §3.3)",
        ),
        (
            Reply(body=ENFORCE, content_type="text/html"),
            INVALID,
            f"{WHERE}: Content-Type 'text/html', not text/plain",
        ),
        (
            Reply(body=ENFORCE, content_type=None),
            INVALID,
            f"{WHERE}: Content-Type '', not text/plain",
        ),
        (
            Reply(body=ENFORCE, headers=(("Content-Encoding", "gzip"),)),
            FETCH_ERROR,
            f"{WHERE}: Content-Encoding 'gzip'",
        ),
        (
            Reply(body=b"version: STSv1\nmode: enforce\nmx: \xff\n"),
            INVALID,
            f"{WHERE}: the policy is not UTF-8",
        ),
    ],
)
async def test_bad_answers(env: Env, reply: Reply, error: StsError, detail: str) -> None:
    server = await env.serve(reply)
    assert await env.sts(server.port).lookup(DOMAIN) == StsLookup(None, "none", error, detail)
    assert len(server.requests) == 1  # and a redirect is not followed


@pytest.mark.parametrize(
    "content_type", ["text/plain; charset=utf-8", "Text/Plain;charset=US-ASCII"]
)
async def test_content_type_parameters_are_allowed(env: Env, content_type: str) -> None:
    server = await env.serve(Reply(body=ENFORCE, content_type=content_type))
    assert await env.sts(server.port).lookup(DOMAIN) == StsLookup(enforce_policy(), "fresh")


@pytest.mark.parametrize("content_length", [True, False])
async def test_oversized_policy_is_refused(env: Env, content_length: bool) -> None:
    # A valid policy padded with an extension line past 64 KiB: announced, or only read.
    body = ENFORCE + "x-padding: " + "p" * 65536 + "\n"
    server = await env.serve(Reply(body=body, content_length=content_length))
    assert await env.sts(server.port).lookup(DOMAIN) == StsLookup(
        None, "none", FETCH_ERROR, f"{WHERE}: policy larger than 65536 bytes"
    )


async def test_policy_just_under_the_cap_is_accepted(env: Env) -> None:
    body = ENFORCE + "x-padding: " + "p" * (65536 - len(ENFORCE) - 12) + "\n"
    assert len(body) == 65536
    server = await env.serve(Reply(body=body, content_length=False))
    result = await env.sts(server.port).lookup(DOMAIN)
    assert (result.source, result.error) == ("fresh", None)


@pytest.mark.parametrize(
    "reply",
    [Reply(body=ENFORCE, delay=5.0), Reply(body=ENFORCE, trickle=0.05)],
    ids=["silent", "trickling"],  # the second never trips a per-read timeout, only the deadline
)
async def test_slow_policy_host_times_out(env: Env, reply: Reply) -> None:
    server = await env.serve(reply)
    started = asyncio.get_running_loop().time()
    result = await env.sts(server.port).lookup(DOMAIN)
    assert result == StsLookup(None, "none", FETCH_ERROR, f"no policy from {HOST} within 0.5 s")
    assert asyncio.get_running_loop().time() - started < 2 * TIMEOUT


async def test_certificate_for_another_host_is_refused(env: Env) -> None:
    server = await env.serve(ENFORCE, cert=env.world.ca.issue(["mta-sts.example.net"]))
    assert await env.sts(server.port).lookup(DOMAIN) == StsLookup(
        None,
        "none",
        WEBPKI,
        f"{WHERE}: certificate not valid: Hostname mismatch, certificate is not valid for"
        f" '{HOST}'.",
    )
    assert server.requests == []  # nothing was asked of a host that could not prove its name


async def test_untrusted_certificate_is_refused(env: Env) -> None:
    server = await env.serve(ENFORCE, cert=self_signed(HOST))
    assert await env.sts(server.port).lookup(DOMAIN) == StsLookup(
        None, "none", WEBPKI, f"{WHERE}: certificate not valid: self-signed certificate"
    )


async def test_policy_host_without_address(env: Env) -> None:
    env.world.dns.add(f"_mta-sts.{DOMAIN}", "TXT", "v=STSv1; id=1")
    assert await env.sts(443).lookup(DOMAIN) == StsLookup(
        None, "none", FETCH_ERROR, f"{HOST} does not exist (NXDOMAIN)"
    )


async def test_policy_host_refusing_connections(env: Env) -> None:
    server = await env.serve(ENFORCE)
    await server.stop()
    result = await env.sts(server.port).lookup(DOMAIN)
    assert (result.policy, result.source, result.error) == (None, "none", FETCH_ERROR)
    assert result.detail.startswith(f"{WHERE}: cannot connect: ")


# -- the TXT record --------------------------------------------------------------------------------


async def test_no_txt_record_means_no_policy_and_no_fetch(env: Env) -> None:
    server = await env.serve(ENFORCE, policy_id=None)
    assert await env.sts(server.port).lookup(DOMAIN) == StsLookup(None, "none")
    assert server.requests == []


async def test_two_sts_txt_records_mean_no_policy(env: Env) -> None:
    server = await env.serve(ENFORCE, policy_id="1")
    env.world.dns.add(f"_mta-sts.{DOMAIN}", "TXT", "v=STSv1; id=2")
    assert await env.sts(server.port).lookup(DOMAIN) == StsLookup(None, "none")
    assert server.requests == []


async def test_other_txt_records_beside_the_sts_record_are_ignored(env: Env) -> None:
    server = await env.serve(ENFORCE, policy_id="1")
    env.world.dns.add(f"_mta-sts.{DOMAIN}", "TXT", "v=spf1 -all")
    env.world.dns.add(f"_mta-sts.{DOMAIN}", "TXT", "some verification token")
    assert await env.sts(server.port).lookup(DOMAIN) == StsLookup(enforce_policy(), "fresh")


async def test_txt_record_in_several_strings_is_concatenated(env: Env) -> None:
    server = await env.serve(ENFORCE, policy_id=None)
    env.world.dns.add_txt(f"_mta-sts.{DOMAIN}", ["v=STSv1; ", "id=20240101T000000"])
    result = await env.sts(server.port).lookup(DOMAIN)
    assert result.policy is not None and result.policy.policy_id == "20240101T000000"


async def test_txt_lookup_failure(env: Env) -> None:
    server = await env.serve(ENFORCE)
    env.world.dns.servfail(f"_mta-sts.{DOMAIN}")
    assert await env.sts(server.port).lookup(DOMAIN) == StsLookup(
        None, "none", FETCH_ERROR, f"TXT lookup for _mta-sts.{DOMAIN}. failed: SERVFAIL"
    )
    assert server.requests == []


@pytest.mark.parametrize(
    ("records", "policy_id"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=1"], "1"),
        (["v=STSv1 ; id=abc ; "], "abc"),
        (["v=STSv1; id=1; ext_1=value.with-chars!"], "1"),
        (["v=STSv1; x=y; id=2; id=3"], "2"),  # the first of a repeated field counts
        (["v=STSv1; id=" + "a" * 32], "a" * 32),
        (["v=STSv1; id=" + "a" * 33], None),  # 1 to 32 alphanumerics
        (["v=STSv1; id=a-b"], None),
        (["v=STSv1; id="], None),
        (["v=STSv1;"], None),  # no id
        (["v=STSv1"], None),
        (["v=STSv1; id=1;; x=y"], None),
        (["v=STSv1; id=1; x=a b"], None),
        (["V=STSv1; id=1"], None),  # case-sensitive
        (["v=STSv2; id=1"], None),
        (["id=1; v=STSv1"], None),  # the version comes first
        (["v=STSv10; id=1"], None),
        (["v=STSv1; id=1", "v=STSv1; id=1"], None),  # two records: none
        (["v=STSv1; id=1", "v=spf1 -all", ""], "1"),
        ([], None),
    ],
)
def test_txt_record_parsing(records: list[str], policy_id: str | None) -> None:
    assert policy_id_from_txt(records) == policy_id


# -- the domain asked about ------------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["Example.ORG.", "example.org"])
async def test_domain_is_normalised(env: Env, domain: str) -> None:
    server = await env.serve(ENFORCE)
    assert await env.sts(server.port).lookup(domain) == StsLookup(enforce_policy(), "fresh")


@pytest.mark.parametrize("domain", ["", "localhost", "exa mple.org", "a..b", "_x.example.org"])
async def test_not_a_domain(env: Env, domain: str) -> None:
    assert await env.sts(443).lookup(domain) == StsLookup(
        None, "none", None, f"{domain!r} is not a domain name"
    )


# -- MX matching (§4.1) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mx.example.org", "mx.example.org", True),
        ("mx.example.org", "MX.Example.Org", True),
        ("mx.example.org", "mx.example.org.", True),
        ("mx.example.org.", "mx.example.org", True),
        ("mx.example.org", "mx2.example.org", False),
        ("mx.example.org", "a.mx.example.org", False),
        ("*.example.org", "mx.example.org", True),
        ("*.example.org", "MX.EXAMPLE.ORG.", True),
        ("*.Example.Org", "mx.example.org", True),
        ("*.example.org", "example.org", False),  # exactly one label, not zero
        ("*.example.org", "a.b.example.org", False),  # nor two
        ("*.example.org", ".example.org", False),
        ("*.example.org", "mx.example.org.evil.test", False),
        ("*.example.org", "mxexample.org", False),
        ("*.mail.example.org", "mx1.mail.example.org", True),
        ("*.mail.example.org", "mx1.example.org", False),
        ("mx.example.org", "", False),
    ],
)
def test_mx_matching(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


def test_policy_matches_any_of_its_patterns() -> None:
    policy = enforce_policy()
    assert [policy.matches(h) for h in ("mx1.example.org", "a.mail.example.org", "x.org")] == [
        True,
        True,
        False,
    ]
