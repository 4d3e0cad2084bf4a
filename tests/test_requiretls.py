"""REQUIRETLS (RFC 8689) end to end: offered only under TLS, kept with the message across a
restart, delivered only over authenticated TLS to a server that offers REQUIRETLS itself (and
passed on), bounced with 5.7.30 otherwise; and "TLS-Required: No", which changes nothing unless
the operator lets it for the recipient's domain."""

from __future__ import annotations

import asyncio
import dataclasses
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mailrelay.config import Config
from tests.conftest import Relay, RelayFactory, add_user, make_config
from tests.test_delivery import BODY_MARKER, dsn_status, dsns, settled, untouched
from tests.test_submission import MESSAGE, queued_id
from tests.world import MODERN, World, tlsa_record
from tests.world.https import policy_text, serve_policy
from tests.world.mx import MxServer

FIRST_ADDRESS = "127.0.96.1"  # this file's MX servers: 127.0.96.x
CAPABLE = dataclasses.replace(MODERN, requiretls=True)


@dataclasses.dataclass
class Env:
    tmp_path: Path
    world: World
    relay_factory: RelayFactory

    async def dane_mx(self, domain: str, behaviour: Any = CAPABLE, *, tlsa: str = "") -> MxServer:
        """An MX for `domain` whose DNSSEC-signed TLSA record matches its key (or says `tlsa`)."""
        hostname = f"mx.{domain}"
        issued = self.world.ca.issue([hostname])
        mx = await self.world.add_mx(domain, behaviour, hostname=hostname, issued=issued)
        self.world.dns.add(
            f"_25._tcp.{hostname}", "TLSA", tlsa or tlsa_record(issued.leaf, 3, 1, 1)
        )
        self.world.dns.secure(domain)
        return mx

    def config(self, **delivery: Any) -> Config:
        return make_config(
            self.tmp_path,
            delivery={
                "hold": False,
                "port": self.world.smtp_port,
                "nameservers": self.world.nameservers,
                "ca_file": str(self.world.ca_file),
                "dns_timeout": 1,
                "connect_timeout": 2,
                "command_timeout": 5,
                **delivery,
            },
        )

    async def relay(self, **delivery: Any) -> Relay:
        cfg = self.config(**delivery)
        add_user(cfg, "alice@example.org")
        return await self.relay_factory(cfg)


@pytest.fixture
async def env(tmp_path: Path, relay_factory: RelayFactory) -> AsyncIterator[Env]:
    async with World(tmp_path / "world", first_address=FIRST_ADDRESS) as world:
        e = Env(tmp_path, world, relay_factory)
        # The sender's own domain receives the bounces; a bounce of a REQUIRETLS message is
        # held to REQUIRETLS too, so its MX is one that can take it.
        await e.dane_mx("example.org")
        yield e


def submit(relay: Relay, rcpt: str, *, requiretls: bool, message: bytes = MESSAGE) -> str:
    client = relay.session()
    try:
        options = ["REQUIRETLS"] if requiretls else []
        assert client.mail("alice@example.org", options)[0] == 250
        assert client.rcpt(rcpt)[0] == 250
        client.send(b"DATA\r\n")
        assert client.getreply()[0] == 354
        client.send(message + b".\r\n")
        return queued_id(client.getreply())
    finally:
        client.quit()


def mail_lines(mx: MxServer) -> list[str]:
    return [c.line for conn in mx.connections for c in conn.commands if c.line.startswith("MAIL")]


def flag(relay: Relay, queue_id: str) -> tuple[int, int]:
    row = (
        relay.db()
        .execute("SELECT requiretls, tls_optional FROM messages WHERE id = ?", (queue_id,))
        .fetchone()
    )
    return int(row[0]), int(row[1])


async def test_offered_under_tls_only_and_kept_with_the_message(relay: Relay) -> None:
    def check() -> tuple[str, str]:
        plain = relay.smtp()
        plain.ehlo()
        assert plain.has_extn("starttls") and not plain.has_extn("requiretls")
        plain.quit()
        implicit = smtplib.SMTP_SSL(
            "127.0.0.1", relay.implicit_port, context=relay.client_context(), timeout=10
        )
        implicit.ehlo()
        assert implicit.has_extn("requiretls")
        implicit.quit()
        client = relay.session()
        assert client.has_extn("requiretls")
        assert client.docmd("MAIL", "FROM:<alice@example.org> REQUIRETLS=YES") == (
            501,
            b"5.5.4 REQUIRETLS takes no value",
        )
        client.quit()
        return (
            submit(relay, "bob@example.net", requiretls=True),
            submit(relay, "bob@example.net", requiretls=False),
        )

    demanded, ordinary = await asyncio.to_thread(check)
    assert flag(relay, demanded) == (1, 0)
    assert flag(relay, ordinary) == (0, 0)


async def test_delivered_over_dane_to_a_requiretls_server_after_a_restart(env: Env) -> None:
    mx = await env.dane_mx("secure.example")
    held = await env.relay(hold=True)
    queue_id = await asyncio.to_thread(submit, held, "bob@secure.example", requiretls=True)
    plain_id = await asyncio.to_thread(submit, held, "carol@secure.example", requiretls=False)
    await held.service.stop()  # the flag is in the database, not in this process

    relay = await env.relay_factory(env.config())  # the same database, delivering now
    for qid in (queue_id, plain_id):
        msg = await settled(relay, qid, lambda r: r["state"] in ("sent", "bounced"))
        [row] = msg["recipients"]
        assert row["state"] == "sent", row
    # Passed on for the one message that asked for it, and only for it.
    demanded, ordinary = sorted(mail_lines(mx), key=lambda line: "REQUIRETLS" not in line)
    assert demanded.startswith("MAIL FROM:<alice@example.org> ") and demanded.endswith(
        " REQUIRETLS"
    )
    assert ordinary.startswith("MAIL FROM:<alice@example.org> ") and "REQUIRETLS" not in ordinary
    assert len(mx.messages) == 2 and all(m.tls for m in mx.messages)


async def test_bounced_5_7_30_where_the_server_does_not_offer_requiretls(env: Env) -> None:
    mx = await env.dane_mx("plain.example", MODERN)  # DANE-authenticated, no REQUIRETLS
    relay = await env.relay()
    queue_id = await asyncio.to_thread(submit, relay, "bob@plain.example", requiretls=True)
    msg = await settled(relay, queue_id, lambda r: r["state"] in ("sent", "bounced", "deferred"))
    [row] = msg["recipients"]
    assert row["state"] == "bounced" and row["status"] == "5.7.30", row
    assert "mx.plain.example[" in row["reply"]
    assert "REQUIRETLS: the server does not offer REQUIRETLS" in row["reply"]
    untouched(mx)
    home = env.world.servers[0]
    await home.wait_for_messages(1)
    [bounce] = dsns(home)
    assert [s["Status"] for s in dsn_status(bounce)] == ["5.7.30"]
    assert "REQUIRETLS" in bounce.as_string()
    # The bounce quotes the message's headers: it travelled under REQUIRETLS as well.
    [bounce_mail] = mail_lines(home)
    assert bounce_mail.startswith("MAIL FROM:<> ") and bounce_mail.endswith(" REQUIRETLS")
    assert BODY_MARKER not in home.messages[0].data


async def test_no_connection_at_all_without_an_authenticated_policy(env: Env) -> None:
    mx = await env.world.add_mx("unsigned.example", CAPABLE)  # REQUIRETLS, but no DANE/MTA-STS
    relay = await env.relay()
    queue_id = await asyncio.to_thread(submit, relay, "bob@unsigned.example", requiretls=True)
    msg = await settled(relay, queue_id, lambda r: r["state"] in ("sent", "bounced", "deferred"))
    [row] = msg["recipients"]
    assert row["state"] == "bounced" and row["status"] == "5.7.30", row
    assert row["reply"] == (
        f"{mx.hostname}: REQUIRETLS: no authenticated TLS for this MX"
        " (no DANE, no MTA-STS enforce, security_level encrypt)"
    )
    assert mx.connections == []
    metric = relay.service.metrics.smtp_insecure_refusals.labels(reason="requiretls")
    assert metric._value.get() == 1


async def test_tls_required_no_relaxes_only_where_the_operator_allows(env: Env) -> None:
    wrong = "3 1 1 " + "00" * 32  # a TLSA record that matches no key: DANE refuses, and defers
    allowed = await env.dane_mx("allowed.example", MODERN, tlsa=wrong)
    strict = await env.dane_mx("strict.example", MODERN, tlsa=wrong)
    relay = await env.relay(domains={"allowed.example": {"honour_tls_required_no": True}})
    relaxed_msg = MESSAGE.replace(b"Subject:", b"TLS-Required: No\r\nSubject:")
    ids = [
        await asyncio.to_thread(submit, relay, rcpt, requiretls=False, message=relaxed_msg)
        for rcpt in ("bob@allowed.example", "bob@strict.example")
    ]
    assert flag(relay, ids[0]) == (0, 1)
    states = []
    for qid in ids:
        msg = await settled(relay, qid, lambda r: r["state"] in ("sent", "bounced", "deferred"))
        [row] = msg["recipients"]
        states.append((row["state"], row["status"]))
    assert states == [("sent", "2.0.0"), ("deferred", "4.7.5")]
    [message] = allowed.messages
    assert message.tls and b"TLS-Required: No" in message.data
    untouched(strict)
    # With REQUIRETLS too, the header is ignored (RFC 8689 §4.1): authenticated TLS or nothing.
    both = await asyncio.to_thread(
        submit, relay, "carol@allowed.example", requiretls=True, message=relaxed_msg
    )
    assert flag(relay, both) == (1, 0)
    msg = await settled(relay, both, lambda r: r["state"] in ("sent", "bounced", "deferred"))
    [row] = msg["recipients"]
    assert row["state"] == "deferred" and row["status"] == "4.7.5", row
    assert len(allowed.messages) == 1


async def test_mta_sts_enforce_authenticates_and_testing_does_not(env: Env) -> None:
    enforce = await env.world.add_mx("enforce.example", CAPABLE, hostname="mx.enforce.example")
    testing = await env.world.add_mx("testing.example", CAPABLE, hostname="mx.testing.example")
    first = await serve_policy(
        env.world,
        "enforce.example",
        policy_text("enforce", ("mx.enforce.example",)),
        address="127.0.98.1",
    )
    second = await serve_policy(
        env.world,
        "testing.example",
        policy_text("testing", ("mx.testing.example",)),
        address="127.0.98.2",
        port=first.port,
    )
    try:
        relay = await env.relay(mta_sts_port=first.port, mta_sts_timeout=2)
        states = []
        for rcpt in ("bob@enforce.example", "bob@testing.example"):
            qid = await asyncio.to_thread(submit, relay, rcpt, requiretls=True)
            msg = await settled(relay, qid, lambda r: r["state"] in ("sent", "bounced", "deferred"))
            [row] = msg["recipients"]
            states.append((row["state"], row["status"]))
    finally:
        await first.stop()
        await second.stop()
    assert states == [("sent", "2.0.0"), ("bounced", "5.7.30")]
    [demanded] = mail_lines(enforce)
    assert demanded.endswith(" REQUIRETLS")
    assert testing.connections == []  # a testing policy authenticates nothing: not dialled
