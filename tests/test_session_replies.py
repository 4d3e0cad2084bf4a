"""The delivery session against real receiving servers on loopback: how their replies,
silences and hang-ups become a result for each recipient."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailrelay.delivery.reply import Reply
from mailrelay.delivery.result import Kind, Result
from mailrelay.delivery.session import StaleSession, open_session
from tests.test_session import (
    EHLO_NAME,
    MESSAGE,
    SENDER,
    assert_envelope_never_sent,
    checked_world,
    failure,
    requirement,
    server_reply,
    session,
)
from tests.world import GARBAGE_AFTER_STARTTLS, MODERN, STARTTLS_454, Behaviour, World

FIRST_ADDRESS = "127.0.27.1"  # this file's MX servers: 127.0.27.x
SILENT_ADDRESS = "127.0.27.250"  # a server that never speaks, outside the world


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with checked_world(tmp_path, FIRST_ADDRESS) as w:
        yield w


# -- transient trouble: retry later, never without TLS ------------------------------------------


async def test_starttls_454_is_transient(world: World) -> None:
    server = await world.add_mx("dest.test", STARTTLS_454)
    result = await failure(world, server)
    assert result.kind is Kind.TRANSIENT
    assert result.insecure is None
    assert server_reply(result) == "454 4.7.0 TLS not available due to temporary reason"
    assert result.status == "4.7.0"
    assert result.diagnostic == "smtp; 454 4.7.0 TLS not available due to temporary reason"
    assert_envelope_never_sent(server)


async def test_garbage_after_starttls_is_transient(world: World) -> None:
    server = await world.add_mx("dest.test", GARBAGE_AFTER_STARTTLS)
    result = await failure(world, server)
    assert (result.kind, result.insecure, result.status) == (Kind.TRANSIENT, None, "4.7.5")
    assert "TLS handshake broke off" in result.diagnostic
    assert_envelope_never_sent(server)


async def test_connection_refused_is_transient(world: World) -> None:
    server = await world.add_mx("dest.test", MODERN)
    await server.stop()
    result = await failure(world, server)
    assert (result.kind, result.status) == (Kind.TRANSIENT, "4.4.1")


async def test_silent_server_times_out_as_transient(world: World) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    silent_server = await asyncio.start_server(silent, SILENT_ADDRESS, world.smtp_port)
    try:
        result = await open_session(
            "silent.dest.test",
            SILENT_ADDRESS,
            requirement("silent.dest.test", "encrypt"),
            port=world.smtp_port,
            ehlo_name=EHLO_NAME,
            connect_timeout=0.3,
            command_timeout=0.3,
        )
    finally:
        silent_server.close()
        await silent_server.wait_closed()
    assert isinstance(result, Result)
    assert (result.kind, result.status) == (Kind.TRANSIENT, "4.4.1")


@pytest.mark.parametrize(
    ("greeting", "kind", "status"),
    [
        ("421 4.3.2 {hostname} going down", Kind.TRANSIENT, "4.3.2"),
        ("554 5.7.1 {hostname} no service for you", Kind.PERMANENT, "5.7.1"),
    ],
)
async def test_greeting_refusals(world: World, greeting: str, kind: Kind, status: str) -> None:
    server = await world.add_mx("dest.test", Behaviour(greeting=greeting))
    result = await failure(world, server)
    assert (result.kind, result.status, result.insecure) == (kind, status, None)
    assert result.diagnostic.startswith(f"smtp; {greeting[:3]} ")
    assert_envelope_never_sent(server)


# -- per-recipient and per-message results ---------------------------------------------------


async def test_recipient_replies_are_kept_per_recipient(world: World) -> None:
    behaviour = Behaviour(
        rcpt_replies={
            "later@dest.test": "451 4.3.0 Try again later",
            "nobody@dest.test": "550 5.1.1 No such user",
        }
    )
    server = await world.add_mx("dest.test", behaviour)
    async with await session(world, server) as s:
        result = await s.send(
            SENDER, ["bob@dest.test", "later@dest.test", "nobody@dest.test"], MESSAGE
        )
    bob, later, nobody = result
    assert (bob.kind, bob.status) == (Kind.SENT, "2.0.0")
    assert (later.kind, later.status) == (Kind.TRANSIENT, "4.3.0")
    assert server_reply(later) == "451 4.3.0 Try again later"
    assert (nobody.kind, nobody.status) == (Kind.PERMANENT, "5.1.1")
    assert nobody.diagnostic == "smtp; 550 5.1.1 No such user"
    assert [r for r in result if r.kind is Kind.SENT] == [bob]
    (message,) = await server.wait_for_messages()
    assert message.rcpt_tos == ("bob@dest.test",)


async def test_no_recipient_accepted_sends_no_data(world: World) -> None:
    server = await world.add_mx("dest.test", Behaviour(rcpt_reply="550 5.1.1 No such user"))
    async with await session(world, server) as s:
        result = await s.send(SENDER, ["a@dest.test", "b@dest.test"], MESSAGE)
        assert s.alive
    assert [r.kind for r in result] == [Kind.PERMANENT] * 2
    assert "DATA" not in [c.line for c in server.commands]


@pytest.mark.parametrize(
    ("data_reply", "kind", "status"),
    [
        ("554 5.6.0 Content rejected", Kind.PERMANENT, "5.6.0"),
        ("451 4.3.0 Queue full", Kind.TRANSIENT, "4.3.0"),
    ],
)
async def test_data_reply_applies_to_every_accepted_recipient(
    world: World, data_reply: str, kind: Kind, status: str
) -> None:
    behaviour = Behaviour(
        data_reply=data_reply, rcpt_replies={"nobody@dest.test": "550 5.1.1 No such user"}
    )
    server = await world.add_mx("dest.test", behaviour)
    async with await session(world, server) as s:
        result = await s.send(SENDER, ["a@dest.test", "nobody@dest.test", "b@dest.test"], MESSAGE)
        again = await s.send(SENDER, ["c@dest.test"], MESSAGE)  # RSET, then a clean transaction
    a, nobody, b = result
    assert (a.kind, a.status, b.kind, b.status) == (kind, status, kind, status)
    assert server_reply(a) == data_reply
    assert nobody.status == "5.1.1"
    assert again[0].kind is kind


async def test_mail_from_refused_decides_every_recipient(world: World) -> None:
    server = await world.add_mx("dest.test", Behaviour(mail_reply="550 5.7.1 Sender rejected"))
    async with await session(world, server) as s:
        result = await s.send(SENDER, ["a@dest.test", "b@dest.test"], MESSAGE)
    assert [(r.kind, r.status) for r in result] == [(Kind.PERMANENT, "5.7.1")] * 2
    assert not [c for c in server.commands if c.line.startswith("RCPT")]


async def test_hang_up_after_data_is_transient_and_ends_the_session(world: World) -> None:
    server = await world.add_mx("dest.test", Behaviour(data_reply=None))
    s = await session(world, server)
    result = await s.send(SENDER, ["a@dest.test"], MESSAGE)
    (rcpt,) = result
    assert (rcpt.kind, rcpt.status) == (Kind.TRANSIENT, "4.4.2")
    assert not rcpt.diagnostic.startswith("smtp;")  # no reply came: our own diagnostic
    assert "DATA" in rcpt.diagnostic
    assert not s.alive
    # The next transaction finds the session dead before sending anything: the courier's cue
    # to go again on a fresh connection.
    with pytest.raises(StaleSession):
        await s.send(SENDER, ["b@dest.test"], MESSAGE)
    await s.close()  # a dead peer is no error


async def test_close_tolerates_a_server_that_went_away(world: World) -> None:
    server = await world.add_mx("dest.test", MODERN)
    s = await session(world, server)
    await server.stop()
    await s.close()
    await s.close()


async def test_extensions_used_only_as_offered(world: World) -> None:
    server = await world.add_mx("dest.test", MODERN)  # offers SIZE and 8BITMIME, not SMTPUTF8
    eight_bit = MESSAGE.replace(b"Personal data.", "Persönliche Daten.".encode())
    async with await session(world, server) as s:
        result = await s.send(SENDER, ["bob@dest.test", "jürgen@dest.test"], eight_bit)
    bob, jurgen = result
    assert bob.kind is Kind.SENT
    assert (jurgen.kind, jurgen.status) == (Kind.PERMANENT, "5.6.7")
    (mail,) = [c.line for c in server.commands if c.line.startswith("MAIL")]
    assert mail == f"MAIL FROM:<{SENDER}> SIZE={len(eight_bit)} BODY=8BITMIME"
    (message,) = await server.wait_for_messages()
    assert message.rcpt_tos == ("bob@dest.test",)
    assert message.data == eight_bit


async def test_eight_bit_body_is_not_sent_to_a_seven_bit_server(world: World) -> None:
    server = await world.add_mx("dest.test", Behaviour(eight_bit_mime=False))
    eight_bit = MESSAGE.replace(b"Personal data.", "Persönliche Daten.".encode())
    async with await session(world, server) as s:
        refused = await s.send(SENDER, ["bob@dest.test"], eight_bit)
        plain = await s.send(SENDER, ["carol@dest.test"], MESSAGE)
    # RFC 6152: no 8-bit data without 8BITMIME; converting it would break the DKIM signature.
    [bob] = refused
    assert (bob.kind, bob.status) == (Kind.PERMANENT, "5.6.3")
    assert bob.diagnostic.endswith(
        "the message has 8-bit content and the server does not offer 8BITMIME"
    )
    assert plain[0].kind is Kind.SENT
    (message,) = await server.wait_for_messages()
    assert message.rcpt_tos == ("carol@dest.test",)
    mails = [c.line for c in server.commands if c.line.startswith("MAIL")]
    assert mails == [f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}"]


def test_reply_parsing() -> None:
    assert Reply.parse(250, "2.1.5 Ok") == Reply(250, "2.1.5", "Ok")
    assert Reply.parse(550, "5.1.1 No such user\n5.1.1 Try another") == Reply(
        550, "5.1.1", "No such user\nTry another"
    )
    assert Reply.parse(550, "No enhanced code") == Reply(550, None, "No enhanced code")
    assert str(Reply(550, "5.1.1", "No such\nuser")) == "550 5.1.1 No such user"
    assert Reply(451, "5.1.1", "inconsistent").status == "4.0.0"
    assert Reply(354, None, "go on").kind is Kind.PERMANENT
