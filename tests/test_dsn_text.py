"""What a bounce says in words, exactly, and what a hostile receiving server can put into a
bounce, the store and the log: the bounces come from the real runner, delivering to the MX
servers of a test world."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import email
import email.message
import email.policy
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mailrelay.delivery.dsn import RecipientStatus, build_dsn
from mailrelay.delivery.reply import Reply
from mailrelay.delivery.result import Insecure
from mailrelay.logs import JsonFormatter, KeyValueFormatter
from mailrelay.store import queue
from tests.conftest import RelayFactory
from tests.test_delivery import by_address, dsn_status, dsns, settled, start_relay, submit
from tests.world import MODERN, TLS10_ONLY, World

FIRST_ADDRESS = "127.0.43.1"  # this file's MX servers: 127.0.43.x
TRIED = dt.datetime(2025, 3, 4, 10, 5, 30, tzinfo=dt.UTC)
UNTIL = dt.datetime(2025, 3, 9, 10, 0, 0, tzinfo=dt.UTC)
CAP = 512  # the most characters of a server's reply text that are kept, "..." included
RETRY_LATER = "451 4.3.0 Try again later"
# A receiving server that paints the operator's terminal, hides text behind NUL and CR, fakes a
# second line, reverses the text direction and sends 5,000 characters more.
HOSTILE_REPLY = (
    "550 5.1.1 <bob@hostile.example>: \x1b[2J\x1b[31mNo such user\x1b[0m\x00\rRCPT accepted"
    "\x85\u202eevil\x07 " + "A" * 5000
)
# What is left of it: printable, one line, cut at CAP.
HOSTILE_START = "<bob@hostile.example>: No such user RCPT accepted evil "
HOSTILE_TEXT = HOSTILE_START + "A" * (CAP - len(HOSTILE_START) - 3) + "..."
# A reply whose second line is not a reply line at all: aiosmtplib's error quotes it.
GARBLED_REPLY = "550-5.1.1 first line\nEVIL\x1b]0;pwned\x07 \x00" + "B" * 5000
HOME = "example.org"  # the sender's domain: the bounces go to its MX


def human_text(rcpt: RecipientStatus) -> str:
    raw = build_dsn(
        reporting_mta="relay.test",
        original_envelope_from="alice@sender.example",
        original_headers=b"Subject: x\r\n",
        recipients=[rcpt],
        arrival_date=TRIED,
        to=["alice@sender.example"],
        message_id_domain="relay.test",
    )
    return dsn_human_text(email.message_from_bytes(raw, policy=email.policy.default))


def dsn_human_text(msg: email.message.Message) -> str:
    part = next(p for p in msg.walk() if p.get_content_type() == "text/plain")
    text = part.get_payload(decode=True)
    assert isinstance(text, bytes)
    return text.decode()


def lines(*text: str) -> str:
    return "\r\n".join(text) + "\r\n"


FAILED_INTRO = (
    "This is the mail system at relay.test.",
    "",
    "Your message from <alice@sender.example> could not be delivered to one or",
    "more recipients. Nothing was sent to the recipients listed below.",
    "",
)
OUTRO = ("", "The original message's headers are attached; its content is not.")


# -- the words, exactly ------------------------------------------------------------------------


def test_permanent_failure_text() -> None:
    rcpt = RecipientStatus(
        "carol@dest.example",
        "failed",
        "5.1.1",
        "smtp; 550 5.1.1 <carol@dest.example>: Recipient address rejected",
        "mx1.dest.example",
        TRIED,
    )
    assert human_text(rcpt) == lines(
        *FAILED_INTRO,
        "<carol@dest.example>:",
        "    The receiving server says this address does not exist or cannot receive",
        "    mail.",
        "    Technical detail from mx1.dest.example: smtp; 550 5.1.1",
        "    <carol@dest.example>: Recipient address rejected",
        *OUTRO,
    )


def test_expiry_text_says_given_up_not_retried() -> None:
    rcpt = RecipientStatus(
        "bob@slow.example",
        "failed",
        "4.4.7",
        f"message expired in the queue; last error: smtp; {RETRY_LATER}",
        "mx1.slow.example",
        TRIED,
    )
    assert human_text(rcpt) == lines(
        *FAILED_INTRO,
        "<bob@slow.example>:",
        "    The message could not be delivered within the maximum time this relay",
        "    keeps trying, and was given up. It will not be retried.",
        "    Technical detail from mx1.slow.example: message expired in the queue;",
        "    last error: smtp; 451 4.3.0 Try again later",
        *OUTRO,
    )


def test_insecure_refusal_text_says_not_sent_because_of_the_policy() -> None:
    rcpt = RecipientStatus(
        "bob@old.example",
        "failed",
        "5.7.10",
        "mx1.old.example[192.0.2.1]: negotiated TLSv1.0",
        "mx1.old.example",
        TRIED,
        insecure=Insecure.PROTOCOL,
    )
    assert human_text(rcpt) == lines(
        *FAILED_INTRO,
        "<bob@old.example>:",
        "    The message was not sent: no receiving server (MX) for this address met",
        "    the transport security policy this relay requires. The receiving",
        "    server's encryption (TLS protocol version or cipher) was below that",
        "    policy.",
        "    Technical detail from mx1.old.example: mx1.old.example[192.0.2.1]:",
        "    negotiated TLSv1.0",
        *OUTRO,
    )


def test_delay_text() -> None:
    rcpt = RecipientStatus(
        "bob@slow.example",
        "delayed",
        "4.3.0",
        f"smtp; {RETRY_LATER}",
        "mx1.slow.example",
        TRIED,
        will_retry_until=UNTIL,
    )
    assert human_text(rcpt) == lines(
        "This is the mail system at relay.test.",
        "",
        "Your message from <alice@sender.example> has not been delivered yet to the",
        "recipients below. The mail system will keep trying; you do not need to send",
        "it again.",
        "",
        "<bob@slow.example>:",
        "    A temporary problem has prevented delivery so far (the receiving server",
        "    was unreachable, busy, or asked us to try later). Delivery will be",
        "    retried.",
        "    Technical detail from mx1.slow.example: smtp; 451 4.3.0 Try again later",
        "    Retrying until Sun, 09 Mar 2025 10:00:00 +0000.",
        *OUTRO,
    )


def test_delay_text_while_no_mx_meets_the_policy() -> None:
    rcpt = RecipientStatus(
        "bob@old.example",
        "delayed",
        "4.7.4",
        "mx1.old.example[192.0.2.1]: does not offer STARTTLS",
        "mx1.old.example",
        TRIED,
        will_retry_until=UNTIL,
        insecure=Insecure.NO_STARTTLS,
    )
    text = " ".join(human_text(rcpt).split())
    assert (
        "The message has not been sent yet: no receiving server (MX) for this address meets the"
        " transport security policy this relay requires. The receiving server does not offer"
        " encryption (STARTTLS), and this relay never sends mail unencrypted. Delivery will be"
        " retried."
    ) in text


# -- the words, from the real runner ---------------------------------------------------------


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path / "world", first_address=FIRST_ADDRESS) as w:
        await w.add_mx(HOME, MODERN)
        yield w


def bounce_texts(world: World) -> dict[str, str]:
    """The human-readable part of every bounce the sender's MX received, by recipient."""
    texts = {}
    for msg in dsns(world.servers[0]):
        [block] = dsn_status(msg)
        texts[block["Final-Recipient"].removeprefix("rfc822; ")] = dsn_human_text(msg)
    return texts


async def test_bounces_from_the_runner_say_what_happened(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    weak = await world.add_mx("old.example", TLS10_ONLY)
    slow = await world.add_mx("slow.example", dataclasses.replace(MODERN, rcpt_reply=RETRY_LATER))
    relay = await start_relay(tmp_path, relay_factory, world, max_queue_lifetime="1s")
    queue_id = await asyncio.to_thread(submit, relay, ["bob@old.example", "bob@slow.example"])
    await settled(relay, queue_id, lambda r: r["state"] in ("bounced", "deferred"))
    await asyncio.sleep(1.1)  # let the queue lifetime run out (not an assertion on timing)
    conn = relay.db()
    with queue.transaction(conn):
        queue.retry(conn, queue_id, time.time())
    await settled(relay, queue_id, lambda r: r["state"] == "bounced")
    await world.servers[0].wait_until(lambda s: len(dsns(s)) == 2)
    texts = bounce_texts(world)
    intro = (
        "This is the mail system at relay.test.",
        "",
        "Your message from <alice@example.org> could not be delivered to one or more",
        "recipients. Nothing was sent to the recipients listed below.",
        "",
    )
    assert texts["bob@old.example"] == lines(
        *intro,
        "<bob@old.example>:",
        "    The message was not sent: no receiving server (MX) for this address met",
        "    the transport security policy this relay requires. The receiving",
        "    server's encryption (TLS protocol version or cipher) was below that",
        "    policy.",
        f"    Technical detail from {weak.hostname}: {weak.hostname}[{weak.address[0]}]:",
        "    negotiated TLSv1.0",
        *OUTRO,
    )
    assert texts["bob@slow.example"] == lines(
        *intro,
        "<bob@slow.example>:",
        "    The message could not be delivered within the maximum time this relay",
        "    keeps trying, and was given up. It will not be retried.",
        f"    Technical detail from {slow.hostname}: message expired in the queue;",
        "    last error: smtp; 451 4.3.0 Try again later",
        *OUTRO,
    )


# -- what a hostile server can write ---------------------------------------------------------


def strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in strings(v)]
    return []


async def test_hostile_reply_text_is_made_printable_and_short_everywhere(
    tmp_path: Path,
    relay_factory: RelayFactory,
    world: World,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hostile = await world.add_mx(
        "hostile.example", dataclasses.replace(MODERN, rcpt_reply=HOSTILE_REPLY)
    )
    garbled = await world.add_mx(
        "garbled.example", dataclasses.replace(MODERN, rcpt_reply=GARBLED_REPLY)
    )
    relay = await start_relay(tmp_path, relay_factory, world)
    with caplog.at_level(logging.INFO, logger="mailrelay.delivery"):
        queue_id = await asyncio.to_thread(
            submit, relay, ["bob@hostile.example", "bob@garbled.example"]
        )
        msg = await settled(relay, queue_id, lambda r: r["state"] in ("bounced", "deferred"))
        await world.servers[0].wait_until(lambda s: len(dsns(s)) == 1)

    # The store: the recipient's reply, its events and its attempts.
    rows = by_address(msg)
    bad = rows["bob@hostile.example"]
    assert (bad["state"], bad["status"]) == ("bounced", "5.1.1")
    assert bad["reply"] == f"smtp; 550 5.1.1 {HOSTILE_TEXT}"
    assert [a["reply"] for a in bad["delivery_attempts"]] == [f"550 5.1.1 {HOSTILE_TEXT}"]
    assert bad["events"][-1]["reply"] == f"5.1.1 smtp; 550 5.1.1 {HOSTILE_TEXT}"
    lost = rows["bob@garbled.example"]
    assert (lost["state"], lost["status"]) == ("deferred", "4.4.2")
    where = f"{garbled.hostname}[{garbled.address[0]}]"
    prefix = f"{where}: unreadable reply to RCPT TO: Malformed SMTP response line: EVIL ]0;pwned B"
    assert lost["reply"].startswith(prefix) and lost["reply"].endswith("B...")
    assert len(lost["reply"]) <= len(f"{where}: unreadable reply to RCPT TO: ") + CAP
    for text in strings(msg):
        assert text.isprintable(), text
        assert len(text) <= 100 + CAP

    # The bounce: its Diagnostic-Code (US-ASCII) and its words.
    [dsn] = dsns(world.servers[0])
    [block] = dsn_status(dsn)
    assert block["Remote-MTA"] == f"dns; {hostile.hostname}"
    assert " ".join(block["Diagnostic-Code"].split()) == f"smtp; 550 5.1.1 {HOSTILE_TEXT}"
    words = dsn_human_text(dsn)
    assert all(line.isprintable() for line in words.split("\r\n")), words
    assert words.count("A") <= CAP
    assert "No such user RCPT accepted evil" in " ".join(words.split())

    # The log: printable, short, and the address the server echoed reduced to its domain.
    delivery_lines = [
        r
        for r in caplog.records
        if r.getMessage().startswith(f"event=delivery queue_id={queue_id} ")
    ]
    assert len(delivery_lines) == 2
    for record in delivery_lines:
        for line in (KeyValueFormatter().format(record), JsonFormatter().format(record)):
            assert line.isprintable(), line
            assert "bob@" not in line
        assert len(json.loads(JsonFormatter().format(record))["reply"]) <= 100 + CAP
    [bounced] = [r for r in delivery_lines if "domain=hostile.example" in r.getMessage()]
    fields = json.loads(JsonFormatter().format(bounced))
    masked = HOSTILE_TEXT.replace("<bob@hostile.example>", "<…@hostile.example>")
    assert fields["reply"] == f"smtp; 550 5.1.1 {masked}"


def test_reply_parse_keeps_lines_and_cleans_each() -> None:
    # Two lines, a CR and a NUL inside the first, a byte that was not UTF-8 in the second
    # (aiosmtplib keeps it as a lone surrogate, which SQLite could not store).
    reply = Reply.parse(550, "5.1.1 no\r\x00such user\n5.1.1 try \udcff another")
    assert reply == Reply(550, "5.1.1", "no such user\ntry \ufffd another")
    assert str(reply) == "550 5.1.1 no such user try \ufffd another"
    long = Reply.parse(550, "5.7.1 " + "x " * 1000)
    assert len(long.text) == CAP and long.text.endswith("x...")
    assert Reply.parse(250, "2.0.0 Ok") == Reply(250, "2.0.0", "Ok")
