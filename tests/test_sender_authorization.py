"""Who a user may send as (Postfix's smtpd_sender_login_maps with
reject_authenticated_sender_login_mismatch): their own address, and what `mailrelay user add` /
`user modify --may-send-as` grants; checked on the envelope sender, every From: address and
Sender:. Also two defects found beside it: NUL in DATA, and refused recipients whose record was
lost when its write failed. Spoken by smtplib over real TLS to the real server, and by the real
`mailrelay` command."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from pathlib import Path

import dkim as dkimpy
import pytest

from mailrelay import onboarding
from mailrelay.store import accounts, connect, queue, senders
from mailrelay.store.queue import transaction
from mailrelay.submission import replies
from tests.conftest import Relay, RelayFactory, add_user, make_config, write_config_file
from tests.test_cli import cli as mailrelay
from tests.test_cli import ok, ok_json, user_error
from tests.test_submission import MESSAGE, queued_id, send_raw
from tests.test_submission_syntax import refused_events

run = asyncio.to_thread

Reply = tuple[int, bytes]

SENDER_OK = (250, b"2.1.0 Sender ok")
NUL_IN_DATA = (
    554,
    b"5.6.0 Message refused: NUL character in DATA (RFC 5322 section 2.3, RFC 6152)",
)


def not_a_sender(address: str, user: str = "alice@example.org") -> Reply:
    return 553, f"5.7.1 <{address}>: not a sender {user} may use".encode()


def expect(reply: str) -> Reply:
    code, _, text = reply.partition(" ")
    return int(code), text.encode()


def message(from_: str, *more: str) -> bytes:
    """A message from `from_` with header lines `more`, ending in the final dot."""
    head = "".join(f"{line}\r\n" for line in (f"From: {from_}", "To: carol@example.net", *more))
    return head.encode() + b"Subject: test\r\n\r\nHello Carol.\r\n.\r\n"


def queued_senders(relay: Relay) -> list[str]:
    return [str(m["sender"]) for m in queue.list_queue(relay.db())]


@pytest.fixture
async def two_users(tmp_path: Path, relay_factory: RelayFactory) -> Relay:
    cfg = make_config(tmp_path)
    add_user(cfg, "alice@example.org")
    add_user(cfg, "bob@example.org", "bob's own password")
    return await relay_factory(cfg)


# ---- by default: one's own address, and only that -------------------------------------------


async def test_a_user_sends_only_as_their_own_address(two_users: Relay) -> None:
    relay = two_users

    def converse() -> dict[str, Reply]:
        client = relay.session()
        got = {"mail as bob": client.docmd("MAIL", "FROM:<bob@example.org>")}
        carol = ["carol@example.net"]
        got["from bob"] = send_raw(
            client, "alice@example.org", carol, message("Bob <bob@example.org>")
        )
        got["from alice and bob"] = send_raw(
            client,
            "alice@example.org",
            carol,
            message("alice@example.org, Bob <bob@example.org>", "Sender: alice@example.org"),
        )
        got["sender bob"] = send_raw(
            client,
            "alice@example.org",
            carol,
            message("alice@example.org", "Sender: bob@example.org"),
        )
        # The address compares without case, as Postfix's lookups do.
        got["mail as Alice"] = client.docmd("MAIL", "FROM:<Alice@Example.ORG>")
        client.rset()
        got["own"] = send_raw(client, "alice@example.org", carol, MESSAGE + b".\r\n")
        # Outside the user's own domain: the refusals that were there before grants.
        got["mail outside"] = client.docmd("MAIL", "FROM:<ceo@example.net>")
        got["from outside"] = send_raw(
            client, "alice@example.org", carol, message("ceo@example.net")
        )
        client.quit()
        return got

    got = await run(converse)
    assert got["mail as bob"] == not_a_sender("bob@example.org")
    assert got["from bob"] == not_a_sender("bob@example.org")
    assert got["from alice and bob"] == not_a_sender("bob@example.org")
    assert got["sender bob"] == not_a_sender("bob@example.org")
    assert got["mail as Alice"] == SENDER_OK
    assert got["mail outside"] == expect(replies.SENDER_NOT_OWNED)
    assert got["from outside"] == expect(replies.FROM_NOT_OWNED)
    [accepted] = queue.list_queue(relay.db())
    assert accepted["id"] == queued_id(got["own"])
    await relay.service.submission.handler.flush()
    refusal = f"{not_a_sender('bob@example.org')[0]} {not_a_sender('bob@example.org')[1].decode()}"
    assert refused_events(relay) == [("carol@example.net", refusal)] * 3 + [
        ("carol@example.net", replies.FROM_NOT_OWNED)
    ]


async def test_may_send_as_given_and_taken_back_with_the_cli_while_serving(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    cfg = make_config(tmp_path)
    add_user(cfg, "alice@example.org")
    add_user(cfg, "bob@example.org", "bob's own password")
    relay = await relay_factory(cfg)
    config = write_config_file(tmp_path)[0]  # the same database, for the real command

    def command(*args: str) -> str:
        return ok(config, "user", "modify", "alice@example.org", *args)

    def submit(sender: str) -> Reply:
        client = relay.session()
        try:
            mail = client.docmd("MAIL", f"FROM:<{sender}>")
            if mail != SENDER_OK:
                return mail
            client.rset()
            return send_raw(client, sender, ["carol@example.net"], message(sender))
        finally:
            client.quit()

    assert await run(command, "--may-send-as", "Sales@Example.ORG") == (
        "user alice@example.org may send as alice@example.org, sales@example.org\n"
    )
    queued_id(await run(submit, "sales@example.org"))
    assert await run(submit, "bob@example.org") == not_a_sender("bob@example.org")

    assert await run(command, "--may-send-as", "@example.org") == (
        "user alice@example.org may send as alice@example.org, @example.org, sales@example.org\n"
    )
    queued_id(await run(submit, "bob@example.org"))
    queued_id(await run(submit, "anyone@example.org"))

    narrowed = await run(
        command, "--may-not-send-as", "@example.org", "--may-not-send-as", "sales@example.org"
    )
    assert narrowed == "user alice@example.org may send as alice@example.org\n"
    assert await run(submit, "bob@example.org") == not_a_sender("bob@example.org")
    assert await run(submit, "sales@example.org") == not_a_sender("sales@example.org")
    queued_id(await run(submit, "alice@example.org"))
    assert queued_senders(relay) == [
        "sales@example.org",
        "bob@example.org",
        "anyone@example.org",
        "alice@example.org",
    ]


async def test_a_grant_for_another_of_our_domains_signs_with_the_from_domain(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    cfg = make_config(tmp_path)
    conn = connect(cfg.storage.path)
    for domain in ("example.org", "example.net", "example.com"):
        onboarding.add(conn, cfg, domain, f"postmaster@{domain}")
    with transaction(conn):
        accounts.set_domain_state(conn, "example.org", "valid", 0.0)
        accounts.set_domain_state(conn, "example.net", "valid", 0.0)  # example.com: not yet
    conn.close()
    add_user(cfg, "alice@example.org")
    conn = connect(cfg.storage.path)
    with transaction(conn):
        senders.grant(conn, "alice@example.org", "@example.net", time.time())
        senders.grant(conn, "alice@example.org", "@example.com", time.time())
    conn.close()
    relay = await relay_factory(cfg)

    def converse() -> tuple[Reply, Reply, Reply]:
        client = relay.session()
        rcpt = ["carol@example.net"]
        # The envelope stays alice's own; DMARC aligns on From:, so example.net signs.
        news = send_raw(client, "alice@example.org", rcpt, message("News <news@example.net>"))
        envelope = client.docmd("MAIL", "FROM:<news@example.net>")
        client.rset()
        unverified = send_raw(client, "alice@example.org", rcpt, message("news@example.com"))
        client.quit()
        return news, envelope, unverified

    news, envelope, unverified = await run(converse)
    assert envelope == SENDER_OK
    assert unverified == (
        550,
        b"5.7.1 Sending domain example.com is not verified;"
        b" run: mailrelay domain check example.com",
    )
    row = (
        relay.db()
        .execute("SELECT data, sender_domain FROM messages WHERE id = ?", (queued_id(news),))
        .fetchone()
    )
    data, sender_domain = bytes(row[0]), row[1]
    assert sender_domain == "example.org"  # bounce copies: the envelope sender's domain
    assert b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.net;" in data
    keys = relay.db().execute("SELECT domain, selector, public_record FROM dkim_keys").fetchall()

    def dns(name: bytes, timeout: int = 5) -> bytes:
        for domain, selector, record in keys:
            if name == f"{selector}._domainkey.{domain}.".encode():
                return str(record).encode()
        return b""

    assert dkimpy.verify(data, dnsfunc=dns)
    assert queued_senders(relay) == ["alice@example.org"]


# ---- the command ----------------------------------------------------------------------------


def test_user_add_modify_and_list_what_a_user_may_send_as(tmp_path: Path) -> None:
    config = write_config_file(tmp_path)[0]
    ok(config, "domain", "add", "example.org", "--notify", "postmaster@example.org")
    ok(config, "domain", "add", "example.net", "--notify", "postmaster@example.net")

    added = ok(
        config,
        "user",
        "add",
        "alice@example.org",
        "--password-stdin",
        "--may-send-as",
        "sales@example.org",
        "--may-send-as",
        "@Example.NET",
        stdin="correct horse battery staple\n",
    )
    assert added == (
        "user alice@example.org added\n"
        "user alice@example.org may send as alice@example.org, @example.net, sales@example.org\n"
    )
    listing = ok(config, "user", "list")
    assert listing.startswith("alice@example.org\tadded ")
    assert listing.endswith("\tmay send as alice@example.org, @example.net, sales@example.org\n")
    [alice] = ok_json(config, "user", "list")
    assert alice["may_send_as"] == ["alice@example.org", "@example.net", "sales@example.org"]

    def fails(*args: str, stdin: str | None = None) -> str:
        return user_error(mailrelay(config, "user", *args, stdin=stdin))

    assert fails("add", "bob@example.org", "--password-stdin", "--may-send-as", "@example.com") == (
        "domain example.com is not one of ours;"
        " first run: mailrelay domain add example.com --notify ADDRESS"
    )
    assert fails("add", "bob@example.org", "--password-stdin", "--may-send-as", "sales") == (
        "--may-send-as: 'sales' is not an address or @domain"
    )
    assert [u["address"] for u in ok_json(config, "user", "list")] == ["alice@example.org"]
    alice_ = ("modify", "alice@example.org")
    assert fails(*alice_) == "nothing to change: give --may-send-as or --may-not-send-as"
    assert fails(*alice_, "--may-not-send-as", "bob@example.org") == (
        "user alice@example.org has no --may-send-as bob@example.org"
    )
    assert fails(*alice_, "--may-not-send-as", "Alice@example.org") == (
        "alice@example.org may always send as their own address"
    )
    assert fails(
        *alice_, "--may-send-as", "x@example.org", "--may-not-send-as", "X@example.org"
    ) == ("x@example.org is given to both --may-send-as and --may-not-send-as")
    assert fails(*alice_, "--may-send-as", "x@example.com") == (
        "domain example.com is not one of ours;"
        " first run: mailrelay domain add example.com --notify ADDRESS"
    )
    assert fails("modify", "nobody@example.org", "--may-send-as", "@example.org") == (
        "no user nobody@example.org"
    )
    # A failed modify changed nothing.
    assert ok_json(config, "user", "list")[0]["may_send_as"] == alice["may_send_as"]

    # Granting one's own address, or a grant twice, changes nothing either.
    assert ok(
        config,
        *("user", *alice_),
        "--may-send-as",
        "alice@example.org",
        "--may-send-as",
        "@example.net",
    ) == ("user alice@example.org may send as alice@example.org, @example.net, sales@example.org\n")
    # The grants go with the user.
    ok(config, "user", "delete", "alice@example.org")
    ok(config, "user", "add", "alice@example.org", "--password-stdin", stdin="another passphrase\n")
    assert ok_json(config, "user", "list")[0]["may_send_as"] == ["alice@example.org"]


# ---- NUL in DATA (RFC 5322 section 2.3, RFC 6152) -------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        MESSAGE.replace(b"Hello Bob.", b"Hello\0Bob.") + b".\r\n",
        MESSAGE.replace(b"Subject: test", b"Subject: te\0st") + b".\r\n",
    ],
    ids=["body", "header"],
)
async def test_nul_in_data_is_refused(relay: Relay, raw: bytes) -> None:
    def converse() -> tuple[Reply, Reply]:
        client = relay.session()
        got = send_raw(client, "alice@example.org", ["bob@example.net"], raw)
        noop = client.docmd("NOOP")
        client.quit()
        return got, noop

    got, noop = await run(converse)
    assert got == NUL_IN_DATA
    assert noop == (250, b"2.0.0 OK")
    assert queue.list_queue(relay.db()) == []
    await relay.service.submission.handler.flush()
    assert refused_events(relay) == [("bob@example.net", f"{got[0]} {got[1].decode()}")]


# ---- refused recipients are recorded, however the service stops ----------------------------


async def test_every_refused_recipient_is_recorded_when_the_service_stops_at_once(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    # Not UTF-8, UTF-8 but not ASCII: refused by the protocol layer before any hook, since
    # SMTPUTF8 is not offered (they never become recipients, so they leave no event). Not RFC
    # 5321 syntax: refused by the handler, each to be recorded even though the service stops
    # at once. (Addresses that are not valid UTF-8 are still stored escaped, should one reach
    # the handler: aiosmtpd hands them on as lone surrogates, which SQLite refuses.)
    written = [
        b"\xff@example.net",
        b"caf\xc3\xa9@example.net",
        b"a..b@x.net",
        b"b..c@x.net",
        b"c..d@x.net",
    ]

    def converse() -> list[Reply]:
        client = relay.session()
        assert client.mail("alice@example.org") == SENDER_OK
        client.send(b"".join(b"RCPT TO:<" + w + b">\r\n" for w in written))  # pipelined
        got = [client.getreply() for _ in written]
        client.close()
        return got

    with caplog.at_level(logging.WARNING):
        got = await run(converse)
        await relay.service.stop()  # at once: the refusals may not be written yet
        gc.collect()  # a task left behind with an unread failure is reported when collected
        await asyncio.sleep(0)

    not_ascii, bad_syntax = (
        (500, b"5.5.2 Error: strict ASCII mode"),
        expect(replies.BAD_RECIPIENT_SYNTAX),
    )
    assert got == [not_ascii, not_ascii, bad_syntax, bad_syntax, bad_syntax]
    events = connect(relay.config.storage.path).execute(
        "SELECT recipient, reply FROM events WHERE event = 'REFUSED' ORDER BY id"
    )
    assert [tuple(e) for e in events] == [
        (address, replies.BAD_RECIPIENT_SYNTAX)
        for address in ("a..b@x.net", "b..c@x.net", "c..d@x.net")
    ]
    complaints = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name in ("asyncio", "mailrelay.submission")
    ]
    assert complaints == []
