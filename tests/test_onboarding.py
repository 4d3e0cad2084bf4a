"""Domain onboarding end to end, as an operator does it with the CLI in a separate process:
`domain add`, publish what it printed in the test world's DNS, `domain check`, send, and the
receiver's copy verifies with dkimpy and with a verifier that shares no code with it."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import re
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import authres
import dkim as dkimpy
import dns.nameserver
import dns.resolver
import pytest
from dns.rdtypes.ANY.TXT import TXT

from mailrelay import config as configmod
from mailrelay import dkim
from mailrelay.config import split_nameserver
from mailrelay.submission.tls import ensure_self_signed
from tests.conftest import PASSWORD, Relay, RelayFactory, free_port
from tests.test_cli import cli
from tests.test_delivery import settled
from tests.test_dkim import independent_verify, relaxed_body, split_message, tags
from tests.test_submission import queued_id, send_raw
from tests.world import MODERN, World
from tests.world.mx import MxServer

DOMAIN = "example.org"
NOTIFY = "postmaster@example.org"
SELECTOR = re.compile(r"mr\d{8}(-\d+)?")
SPF = "v=spf1 a:relay.test ~all"
DMARC = "v=DMARC1; p=none; rua=mailto:dmarc-reports@example.org; adkim=r; aspf=r"
DOMAIN_NOT_VERIFIED = (
    550,
    b"5.7.1 Sending domain example.org is not verified; run: mailrelay domain check example.org",
)
# Trailing spaces, a run of spaces and trailing empty lines: relaxed body canonicalization has
# something to do, so a verifier that skipped it would notice.
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@dest.example>\r\n"
    b"Subject: onboarding\r\n"
    b"\r\n"
    b"Hello  Bob, \r\n"
    b"\r\n"
    b"the figures.\r\n"
    b"\r\n"
    b"\r\n"
)

run = asyncio.to_thread


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path / "world") as w:
        await w.add_mx("dest.example", MODERN)
        yield w


def dest(world: World) -> MxServer:
    return world.servers[0]


def write_config(tmp_path: Path, world: World | None, *, algorithm: str = "rsa") -> Path:
    """A config file for both the relay under test and the CLI, delivering into `world`."""
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    ensure_self_signed(str(cert), str(key), "localhost")
    # Without a world: a port and a nameserver where nothing answers.
    smtp_port = world.smtp_port if world else free_port()
    nameservers = world.nameservers if world else [f"127.0.0.1:{free_port()}"]
    ca_file = f"ca_file = {json.dumps(str(world.ca_file))}" if world else ""
    path = tmp_path / "mailrelay.toml"
    path.write_text(
        f"""
hostname = "relay.test"
[submission]
listen = ["127.0.0.1:{free_port()}"]
implicit_tls_listen = ["127.0.0.1:{free_port()}"]
cert_file = {json.dumps(str(cert))}
key_file = {json.dumps(str(key))}
[storage]
path = "queue.sqlite3"
[dkim]
key_dir = "dkim"
algorithm = "{algorithm}"
rsa_bits = 1024  # 2048 by default (see test_onboarding_functions.py); 1024 keeps tests fast
[metrics]
listen = "127.0.0.1:{free_port()}"
[api]
listen = ""
[delivery]
hold = false
port = {smtp_port}
nameservers = {json.dumps(nameservers)}
{ca_file}
dns_timeout = 1
connect_timeout = 5
command_timeout = 10
"""
    )
    return path


async def acli(
    config: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    # Off the event loop: the world's DNS and MX servers and the relay all run on it.
    return await run(cli, config, *args, stdin=stdin)


async def ajson(config: Path, *args: str) -> Any:
    done = await acli(config, *args, "--json")
    assert (done.returncode, done.stderr) == (0, ""), done
    return json.loads(done.stdout)


async def check(config: Path) -> tuple[int, Any]:
    done = await acli(config, "domain", "check", DOMAIN, "--json")
    assert done.stderr == "", done
    return done.returncode, json.loads(done.stdout)


async def domain_state(config: Path) -> str:
    [domain] = await ajson(config, "domain", "list")
    return str(domain["state"])


async def add_user(config: Path) -> None:
    done = await acli(
        config, "user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD
    )
    assert done.returncode == 0, done


def publish(world: World, records: list[dict[str, str]]) -> None:
    for r in records:
        assert r["type"] == "TXT"
        world.dns.add(r["name"], "TXT", r["value"])


async def onboard(config: Path, world: World) -> list[dict[str, str]]:
    """The operator's steps: add the domain, publish what was printed, check, add a user."""
    added = await ajson(config, "domain", "add", DOMAIN, "--notify", NOTIFY)
    publish(world, added["records"])
    code, report = await check(config)
    assert (code, report["valid"]) == (0, True), report
    await add_user(config)
    return cast(list[dict[str, str]], added["records"])


def selector_of(record: dict[str, str]) -> str:
    name = record["name"]
    assert name.endswith(f"._domainkey.{DOMAIN}"), name
    return name.removesuffix(f"._domainkey.{DOMAIN}")


def key_file(config: Path, selector: str) -> Path:
    return Path(configmod.load(config).dkim.key_dir) / DOMAIN / f"{selector}.pem"


def submit(relay: Relay, rcpt: str = "bob@dest.example") -> str:
    client = relay.session()
    try:
        return queued_id(send_raw(client, "alice@example.org", [rcpt], MESSAGE + b".\r\n"))
    finally:
        client.quit()


def mail_from(relay: Relay) -> tuple[int, bytes]:
    client = relay.session()
    try:
        return client.docmd("MAIL", "FROM:<alice@example.org>")
    finally:
        client.quit()


# ---- checking what the receiver got ------------------------------------------------------------


def txt_lookup(world: World) -> Callable[..., bytes | None]:
    """dkimpy's `dnsfunc`, asking the world's DNS server over the wire (call it off the loop)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [
        dns.nameserver.Do53Nameserver(*split_nameserver(ns)) for ns in world.nameservers
    ]
    resolver.lifetime = 5

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode("ascii") if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(qname, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        [rdata] = list(answer)
        assert isinstance(rdata, TXT)
        return b"".join(rdata.strings)

    return lookup


def signatures(data: bytes) -> list[dict[str, bytes]]:
    fields, _body = split_message(data)
    return [tags(value) for name, value in fields if name.lower() == b"dkim-signature"]


def dkimpy_results(data: bytes, world: World) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature, top down."""
    lookup = txt_lookup(world)
    return [
        bool(dkimpy.DKIM(data).verify(idx=i, dnsfunc=lookup)) for i in range(len(signatures(data)))
    ]


def independent_results(data: bytes, published: list[dict[str, str]]) -> list[str]:
    """Check every signature without dkimpy's verifier against the records the CLI printed;
    returns the signing selectors, top down."""
    values = {r["name"]: r["value"] for r in published}
    _fields, body = split_message(data)
    selectors = []
    for idx, sig in enumerate(signatures(data)):
        selector = sig["s"].decode()
        assert (sig["v"], sig["d"], sig["c"]) == (b"1", DOMAIN.encode(), b"relaxed/relaxed")
        assert base64.b64decode(sig["bh"]) == hashlib.sha256(relaxed_body(body)).digest()
        signed = sig["h"].lower().split(b":")
        assert signed.count(b"from") == 2  # one From in the message, signed once more
        assert {b"to", b"subject", b"date", b"message-id"} <= set(signed)
        algorithm = cast(dkim.SignatureAlgorithm, sig["a"].decode())
        key = dkim.DkimKey(selector, algorithm, "", values[f"{selector}._domainkey.{DOMAIN}"])
        assert independent_verify(data, key, idx), f"signature {idx} ({selector}) does not verify"
        selectors.append(selector)
    return selectors


def authentication_results(data: bytes) -> Any:
    fields, _body = split_message(data)
    [value] = [v for name, v in fields if name.lower() == b"authentication-results"]
    unfolded = value.replace(b"\r\n", b"").decode("ascii")
    return authres.AuthenticationResultsHeader.parse(f"Authentication-Results:{unfolded}")


# ---- the story ---------------------------------------------------------------------------------


async def test_operator_onboards_a_domain_and_its_mail_verifies(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    config = write_config(tmp_path, world)
    relay = await relay_factory(configmod.load(config))

    added = await ajson(config, "domain", "add", DOMAIN, "--notify", NOTIFY)
    assert list(added) == ["domain", "state", "notify", "records", "dkim"]
    assert (added["domain"], added["state"], added["notify"]) == (DOMAIN, "unverified", NOTIFY)
    records = added["records"]
    assert [list(r) for r in records] == [["type", "name", "value"]] * 3
    selector = selector_of(records[0])
    assert SELECTOR.fullmatch(selector)
    key_path = key_file(config, selector)
    assert records == [
        {
            "type": "TXT",
            "name": f"{selector}._domainkey.example.org",
            # The key on disk is the one the record publishes.
            "value": dkim.public_record(str(key_path)),
        },
        {"type": "TXT", "name": "example.org", "value": SPF},
        {"type": "TXT", "name": "_dmarc.example.org", "value": DMARC},
    ]
    assert records[0]["value"].startswith("v=DKIM1; k=rsa; p=")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700

    # Nothing published yet: every record is missing, and the domain may not send.
    assert await check(config) == (
        1,
        {
            "domain": DOMAIN,
            "valid": False,
            "records": [
                {
                    "type": "TXT",
                    "name": r["name"],
                    "expected": r["value"],
                    "found": [],
                    "valid": False,
                    "reason": "not published",
                }
                for r in records
            ],
        },
    )
    assert await domain_state(config) == "unverified"
    await add_user(config)
    assert await run(mail_from, relay) == DOMAIN_NOT_VERIFIED

    def verdicts(report: Any) -> list[tuple[bool, list[str], str | None]]:
        return [(r["valid"], r["found"], r["reason"]) for r in report["records"]]

    # Partly published: the DKIM record only.
    publish(world, records[:1])
    code, report = await check(config)
    assert (code, report["valid"]) == (1, False)
    assert verdicts(report) == [
        (True, [records[0]["value"]], None),
        (False, [], "not published"),
        (False, [], "not published"),
    ]

    # Wrong: an SPF record that does not name the relay (DMARC now right).
    world.dns.add("example.org", "TXT", "v=spf1 a:other.example ~all")
    publish(world, records[2:])
    code, report = await check(config)
    assert (code, report["valid"]) == (1, False)
    assert verdicts(report)[1:] == [
        (False, ["v=spf1 a:other.example ~all"], "does not authorize a:relay.test"),
        (True, [DMARC], None),
    ]
    assert await domain_state(config) == "unverified"

    # Fully published, as printed.
    world.dns.remove("example.org", "TXT")
    publish(world, records[1:2])
    code, report = await check(config)
    assert (code, report["valid"]) == (0, True)
    assert verdicts(report) == [(True, [r["value"]], None) for r in records]
    [listed] = await ajson(config, "domain", "list")
    assert (listed["state"], type(listed["checked_at"])) == ("valid", float)
    assert await ajson(config, "domain", "records", DOMAIN) == {**added, "state": "valid"}

    # The next message leaves signed, and the receiver's copy verifies.
    queue_id = await run(submit, relay)
    [received] = await dest(world).wait_for_messages(1)
    assert received.rcpt_tos == ("bob@dest.example",)
    assert (await settled(relay, queue_id, lambda r: r["state"] == "sent"))["id"] == queue_id
    data = received.data
    assert await run(dkimpy.verify, data, dnsfunc=txt_lookup(world)) is True
    # The verifier is not trivially satisfied: a changed body fails.
    forged = data.replace(b"the figures.", b"the numbers.")
    assert await run(dkimpy.verify, forged, dnsfunc=txt_lookup(world)) is False
    assert independent_results(data, records) == [selector]

    results = authentication_results(data)
    assert results.authserv_id == "relay.test"
    [auth] = results.results
    assert (auth.method, auth.result, auth.smtp_auth) == ("auth", "pass", "alice@example.org")
    assert (
        str(results) == f"Authentication-Results: relay.test; auth=pass smtp.auth={auth.smtp_auth}"
    )


@pytest.mark.parametrize("command", ["check", "records", "rotate-dkim"])
def test_unknown_domain_is_a_one_line_error(tmp_path: Path, command: str) -> None:
    done = cli(write_config(tmp_path, None), "domain", command, "nosuch.example", "--json")
    assert (done.returncode, done.stdout, done.stderr) == (
        1,
        "",
        "mailrelay: no domain nosuch.example\n",
    )


async def test_a_retried_message_is_signed_once(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    flaky = await world.add_mx(
        "flaky.example", dataclasses.replace(MODERN, rcpt_reply="451 4.3.0 Try again later")
    )
    config = write_config(tmp_path, world)
    relay = await relay_factory(configmod.load(config))
    records = await onboard(config, world)

    queue_id = await run(submit, relay, "bob@flaky.example")
    await settled(relay, queue_id, lambda r: r["state"] == "deferred")
    assert flaky.all_messages == []
    [[stored]] = relay.db().execute("SELECT data FROM messages WHERE id = ?", (queue_id,))
    assert len(signatures(stored)) == 1

    flaky.behaviour = MODERN
    retried = await acli(config, "queue", "retry", queue_id)
    assert (retried.returncode, retried.stdout) == (0, "1 recipient(s) due now\n")
    msg = await settled(relay, queue_id, lambda r: r["state"] == "sent")
    assert [r["attempts"] for r in msg["recipients"]] == [2]
    [received] = flaky.messages
    # Byte for byte what was accepted: the retry neither signed again nor changed anything.
    assert received.data == stored
    assert len(signatures(received.data)) == 1
    assert await run(dkimpy_results, received.data, world) == [True]
    assert independent_results(received.data, records) == [selector_of(records[0])]


async def test_rsa_and_ed25519_sign_side_by_side(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    config = write_config(tmp_path, world, algorithm="rsa+ed25519")
    relay = await relay_factory(configmod.load(config))
    added = await ajson(config, "domain", "add", DOMAIN, "--notify", NOTIFY)
    rsa_record, ed_record, spf, dmarc = added["records"]
    rsa_selector, ed_selector = selector_of(rsa_record), selector_of(ed_record)
    assert ed_selector == f"{rsa_selector}e"
    assert rsa_record["value"].startswith("v=DKIM1; k=rsa; p=")
    assert ed_record["value"].startswith("v=DKIM1; k=ed25519; p=")
    for selector in (rsa_selector, ed_selector):
        assert stat.S_IMODE(key_file(config, selector).stat().st_mode) == 0o600
    assert (spf["value"], dmarc["value"]) == (SPF, DMARC)

    # The domain had an SPF record already; adding our mechanism to it is enough.
    publish(world, [rsa_record, ed_record, dmarc])
    merged = "v=spf1 ip4:192.0.2.0/24 a:relay.test mx -all"
    world.dns.add("example.org", "TXT", merged)
    code, report = await check(config)
    assert (code, report["valid"]) == (0, True)
    assert report["records"][2]["found"] == [merged]
    await add_user(config)

    await run(submit, relay)
    [received] = await dest(world).wait_for_messages(1)
    assert [s["a"] for s in signatures(received.data)] == [b"rsa-sha256", b"ed25519-sha256"]
    assert await run(dkimpy_results, received.data, world) == [True, True]
    assert independent_results(received.data, added["records"]) == [rsa_selector, ed_selector]


async def test_rotation_signs_with_the_new_key_and_lists_the_old(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    config = write_config(tmp_path, world)
    relay = await relay_factory(configmod.load(config))
    records = await onboard(config, world)
    old_record = records[0]
    old = selector_of(old_record)

    await run(submit, relay)
    [first] = await dest(world).wait_for_messages(1)
    assert independent_results(first.data, records) == [old]

    rotated = await ajson(config, "domain", "rotate-dkim", DOMAIN)
    assert rotated["state"] == "valid"
    listed_old, new_record, spf, dmarc = rotated["records"]
    assert [listed_old, spf, dmarc] == records  # the old record stays listed
    new = selector_of(new_record)
    assert SELECTOR.fullmatch(new) and new != old
    assert stat.S_IMODE(key_file(config, new).stat().st_mode) == 0o600
    assert await ajson(config, "domain", "records", DOMAIN) == rotated

    publish(world, [new_record])
    activated = await ajson(config, "domain", "activate-dkim", DOMAIN)
    assert activated["records"] == rotated["records"]
    await run(submit, relay)
    second = (await dest(world).wait_for_messages(2))[1]
    assert independent_results(second.data, rotated["records"]) == [new]
    assert await run(dkimpy_results, second.data, world) == [True]

    # The old record leaves DNS: the old key signs nothing now, so the domain stays valid.
    world.dns.remove(old_record["name"], "TXT")
    code, report = await check(config)
    assert (code, report["valid"]) == (0, True)
    assert [r["name"] for r in report["records"]] == [r["name"] for r in (new_record, spf, dmarc)]

    # The new record leaves too: the domain is unverified again, and its mail is refused.
    world.dns.remove(new_record["name"], "TXT")
    code, report = await check(config)
    assert code == 1
    assert report["records"][0] == {
        "type": "TXT",
        "name": new_record["name"],
        "expected": new_record["value"],
        "found": [],
        "valid": False,
        "reason": "not published",
    }
    assert await domain_state(config) == "unverified"
    assert await run(mail_from, relay) == DOMAIN_NOT_VERIFIED
