"""What a hostile or broken client sends that is not SMTP or not RFC 5322: malformed paths, an
authorization identity, header sections that are not header fields; and AUTH while the store
is down. Spoken by smtplib over real TLS to the real server on loopback."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import threading
from pathlib import Path

import dkim as dkimpy
import pytest

from mailrelay import onboarding
from mailrelay.store import accounts, connect, queue
from mailrelay.store.queue import transaction
from mailrelay.submission import replies
from tests.conftest import PASSWORD, Relay, RelayFactory, add_user, make_config
from tests.test_submission import MESSAGE, queued_id, send_raw

run = asyncio.to_thread

Reply = tuple[int, bytes]


def expect(reply: str) -> Reply:
    """A reply constant as smtplib reports it: the code, then the rest of the line."""
    code, _, text = reply.partition(" ")
    return int(code), text.encode()


NEED_MAIL = (503, b"5.5.1 Error: need MAIL command")
SENDER_OK = (250, b"2.1.0 Sender ok")
RECIPIENT_OK = (250, b"2.1.5 Recipient ok")
NOT_AUTHENTICATED = expect(replies.AUTH_REQUIRED)


def plain(authzid: str, login: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{login}\0{password}".encode()).decode()


def refused_events(relay: Relay) -> list[tuple[str, str]]:
    rows = relay.db().execute("SELECT recipient, reply FROM events WHERE event = 'REFUSED'")
    return [(r[0], r[1]) for r in rows]


# ---- 1. paths in MAIL and RCPT (RFC 5321 section 4.1.2) -------------------------------------

# "{}" is the address: alice@example.org in MAIL, x@example.net in RCPT.
MALFORMED_PATHS = [
    "<{}",  # no closing bracket
    "{}>",  # no opening bracket
    "{}",  # no brackets at all
    "< {}>",  # spaces inside the brackets
    "<{} >",
    "<{0} @{1}>",
    "<{}>junk",  # the path runs on into something else
    "<{}>>",
    "<{}>(comment)",
    "<<{}>>",
    "<\x1b[2J{}>",  # a terminal escape, which `mailrelay log` would print
]


def fill(template: str, address: str) -> str:
    return template.format(*address.split("@")) if "{0}" in template else template.format(address)


def recorded(path: str) -> str:
    """A refused recipient as the events table keeps it: as written, without the enclosing
    brackets, control characters replaced."""
    if path.startswith("<") and path.endswith(">"):
        path = path[1:-1]
    return path.replace("\x1b", "?")


JUNK_AFTER_PATH = [
    " (a comment)",
    " SIZE=100 @@",
    " =8BITMIME",
    " BODY=",
]


@pytest.mark.parametrize("path", MALFORMED_PATHS)
async def test_malformed_sender_path_is_refused(relay: Relay, path: str) -> None:
    def converse() -> list[Reply]:
        client = relay.session()
        got = [
            client.docmd("MAIL", "FROM:" + fill(path, "alice@example.org")),
            client.docmd("RCPT", "TO:<bob@example.net>"),  # no transaction was opened
            client.docmd("MAIL", "FROM:<alice@example.org>"),  # the session goes on
        ]
        client.quit()
        return got

    mail, rcpt, again = await run(converse)
    assert mail == expect(replies.BAD_SENDER_SYNTAX)
    assert rcpt == NEED_MAIL
    assert again == SENDER_OK
    assert queue.list_queue(relay.db()) == []


@pytest.mark.parametrize("junk", JUNK_AFTER_PATH)
async def test_junk_after_sender_path_is_refused(relay: Relay, junk: str) -> None:
    def converse() -> tuple[Reply, Reply]:
        client = relay.session()
        got = client.docmd("MAIL", "FROM:<alice@example.org>" + junk)
        rcpt = client.docmd("RCPT", "TO:<bob@example.net>")
        client.quit()
        return got, rcpt

    mail, rcpt = await run(converse)
    assert mail == expect(replies.BAD_PATH_PARAMETERS)
    assert rcpt == NEED_MAIL
    assert queue.list_queue(relay.db()) == []


async def test_well_formed_paths_and_parameters_still_work(relay: Relay) -> None:
    def converse() -> list[Reply]:
        client = relay.session()
        got = [
            # RFC 5321 allows no space after the colon, but common clients send one.
            client.docmd("MAIL", "FROM: <alice@example.org> BODY=8BITMIME SIZE=100"),
            client.docmd("RCPT", "TO:<bob@example.net>"),
            client.docmd("RCPT", "TO:<@relay.example,@b.example:carol@example.com>"),
            client.docmd("RSET"),
            # A well-formed parameter we do not know is RFC 5321's 555, not a syntax error.
            client.docmd("MAIL", "FROM:<alice@example.org> FROB"),
        ]
        client.quit()
        return got

    mail, rcpt, routed, rset, unknown = await run(converse)
    assert mail == SENDER_OK
    assert rcpt == routed == RECIPIENT_OK
    assert rset == (250, b"2.0.0 OK")
    assert unknown == (555, b"5.5.4 MAIL FROM parameters not recognized or not implemented")


@pytest.mark.parametrize("path", MALFORMED_PATHS)
async def test_malformed_recipient_path_is_refused_and_not_queued(relay: Relay, path: str) -> None:
    def converse() -> tuple[Reply, Reply]:
        client = relay.session()
        assert client.mail("alice@example.org")[0] == 250
        bad = client.docmd("RCPT", "TO:" + fill(path, "x@example.net"))
        assert client.rcpt("bob@example.net") == RECIPIENT_OK
        assert client.docmd("DATA")[0] == 354
        client.send(MESSAGE + b".\r\n")
        accepted = client.getreply()
        client.quit()
        return bad, accepted

    bad, accepted = await run(converse)
    assert bad == expect(replies.BAD_RECIPIENT_SYNTAX)
    msg = queue.show(relay.db(), queued_id(accepted))
    assert msg is not None
    assert [r["address"] for r in msg["recipients"]] == ["bob@example.net"]  # type: ignore[attr-defined]
    await relay.service.submission.handler.flush()
    written = recorded(fill(path, "x@example.net"))
    assert refused_events(relay) == [(written, replies.BAD_RECIPIENT_SYNTAX)]


@pytest.mark.parametrize("junk", JUNK_AFTER_PATH)
async def test_junk_after_recipient_path_is_refused(relay: Relay, junk: str) -> None:
    def converse() -> tuple[Reply, Reply]:
        client = relay.session()
        assert client.mail("alice@example.org")[0] == 250
        got = client.docmd("RCPT", "TO:<x@example.net>" + junk)
        data = client.docmd("DATA")  # no recipient was added
        client.quit()
        return got, data

    rcpt, data = await run(converse)
    assert rcpt == expect(replies.BAD_PATH_PARAMETERS)
    assert data == (503, b"5.5.1 Error: need RCPT command")
    assert queue.list_queue(relay.db()) == []
    await relay.service.submission.handler.flush()
    assert refused_events(relay) == [("x@example.net", replies.BAD_PATH_PARAMETERS)]


async def test_path_syntax_is_checked_only_after_auth(relay: Relay) -> None:
    """The order of refusals is aiosmtpd's: who you are before what you wrote."""

    def converse() -> Reply:
        client = relay.smtp()
        client.starttls(context=relay.client_context())
        client.ehlo()
        got = client.docmd("MAIL", "FROM:<alice@example.org")
        client.quit()
        return got

    assert await run(converse) == NOT_AUTHENTICATED


# ---- 2. AUTH PLAIN with an authorization identity (RFC 4616 section 2) ----------------------


async def test_auth_plain_refuses_a_foreign_authorization_identity(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    cfg = make_config(tmp_path)
    add_user(cfg, "alice@example.org")
    add_user(cfg, "bob@example.org", "bob's own password")
    relay = await relay_factory(cfg)

    def converse() -> list[Reply]:
        client = relay.smtp()
        client.starttls(context=relay.client_context())
        client.ehlo()
        got = [
            # Alice's own, correct credentials, asking to act as Bob.
            client.docmd(
                "AUTH", "PLAIN " + plain("bob@example.org", "alice@example.org", PASSWORD)
            ),
            # The same with a wrong password: the reply does not say which part was wrong.
            client.docmd("AUTH", "PLAIN " + plain("bob@example.org", "alice@example.org", "x")),
            client.docmd("MAIL", "FROM:<bob@example.org>"),
        ]
        client.quit()
        return got

    foreign, foreign_and_wrong, mail = await run(converse)
    assert foreign == expect(replies.AUTH_FAILED)
    assert foreign_and_wrong == expect(replies.AUTH_FAILED)
    assert mail == NOT_AUTHENTICATED
    assert relay.service.metrics.smtpd_sasl_authentication_failures._value.get() == 2
    assert queue.list_queue(relay.db()) == []


async def test_auth_plain_foreign_authorization_identity_in_the_challenge_form(
    relay: Relay,
) -> None:
    def converse() -> tuple[Reply, Reply, Reply]:
        client = relay.smtp()
        client.starttls(context=relay.client_context())
        client.ehlo()
        challenge = client.docmd("AUTH", "PLAIN")
        got = client.docmd(plain("postmaster@example.org", "alice@example.org", PASSWORD))
        mail = client.docmd("MAIL", "FROM:<alice@example.org>")
        client.quit()
        return challenge, got, mail

    challenge, got, mail = await run(converse)
    assert challenge == (334, b"")
    assert got == expect(replies.AUTH_FAILED)
    assert mail == NOT_AUTHENTICATED


@pytest.mark.parametrize("authzid", ["", "alice@example.org", "Alice@Example.ORG"])
async def test_auth_plain_with_own_authorization_identity_succeeds(
    relay: Relay, authzid: str
) -> None:
    def converse() -> tuple[Reply, Reply]:
        client = relay.smtp()
        client.starttls(context=relay.client_context())
        client.ehlo()
        auth = client.docmd("AUTH", "PLAIN " + plain(authzid, "alice@example.org", PASSWORD))
        mail = client.docmd("MAIL", "FROM:<alice@example.org>")
        client.quit()
        return auth, mail

    auth, mail = await run(converse)
    assert auth == (235, b"2.7.0 Authentication successful")
    assert mail == SENDER_OK


# ---- 3. header sections that are not RFC 5322 (section 2.2, 3.6, 4.5) -----------------------


@pytest.fixture
async def signing_relay(tmp_path: Path, relay_factory: RelayFactory) -> Relay:
    """A relay whose domain has DKIM keys, as `mailrelay domain add` makes them: every accepted
    message goes through dkimpy's header parser, as in production."""
    cfg = make_config(tmp_path)
    conn = connect(cfg.storage.path)
    onboarding.add(conn, cfg, "example.org", "postmaster@example.org")
    with transaction(conn):
        accounts.set_domain_state(conn, "example.org", "valid", 0.0)
    conn.close()
    add_user(cfg, "alice@example.org")
    return await relay_factory(cfg)


BODY = b"\r\nHello Bob.\r\n"


@pytest.mark.parametrize(
    ("header", "reply"),
    [
        (
            b"From: alice@example.org\r\nTo: bob@example.net\r\nnot a header field\r\n",
            replies.HEADER_NOT_A_FIELD.format(line=3),
        ),
        (
            b"From: alice@example.org\r\nBad Header: x\r\nTo: bob@example.net\r\n",
            replies.HEADER_NOT_A_FIELD.format(line=2),
        ),
        (
            # An mbox separator is no header field either (dkimpy would drop it unseen).
            b"From alice@example.org Mon Jan  1 00:00:00 2024\r\nFrom: alice@example.org\r\n",
            replies.HEADER_NOT_A_FIELD.format(line=1),
        ),
        (
            # It would continue our own Authentication-Results, prepended above it.
            b" ; dkim=pass header.d=bank.test\r\nFrom: alice@example.org\r\n",
            replies.HEADER_STARTS_FOLDED,
        ),
        (b"\tx\r\nFrom: alice@example.org\r\n", replies.HEADER_STARTS_FOLDED),
        (
            # The obsolete `From :` is a From field (RFC 5322 section 4.5.6): one too many.
            b"From: alice@example.org\r\nFrom : eve@bank.test\r\nTo: bob@example.net\r\n",
            replies.FROM_MISSING,
        ),
        (b"From : eve@bank.test\r\nFrom: alice@example.org\r\n", replies.FROM_MISSING),
    ],
)
async def test_header_section_not_rfc5322_is_refused(
    signing_relay: Relay, header: bytes, reply: str
) -> None:
    relay = signing_relay

    def converse() -> tuple[Reply, Reply]:
        client = relay.session()
        got = send_raw(client, "alice@example.org", ["bob@example.net"], header + BODY + b".\r\n")
        noop = client.docmd("NOOP")
        client.quit()
        return got, noop

    got, noop = await run(converse)
    assert got == expect(reply)
    assert noop == (250, b"2.0.0 OK")
    assert queue.list_queue(relay.db()) == []
    await relay.service.submission.handler.flush()
    assert refused_events(relay) == [("bob@example.net", reply)]


async def test_obsolete_from_with_space_before_colon_is_accepted_and_signed(
    signing_relay: Relay,
) -> None:
    relay = signing_relay
    message = (
        b"From : Alice <alice@example.org>\r\nSubject  :\r\n hi\r\nTo: bob@example.net\r\n" + BODY
    )

    def converse() -> Reply:
        client = relay.session()
        got = send_raw(client, "alice@example.org", ["bob@example.net"], message + b".\r\n")
        client.quit()
        return got

    queue_id = queued_id(await run(converse))
    data = relay.db().execute("SELECT data FROM messages WHERE id = ?", (queue_id,)).fetchone()[0]
    # Written in today's syntax, which means the same (RFC 5322 section 4.5) and which every
    # parser after us, dkimpy's among them, reads.
    assert data.endswith(
        b"From: Alice <alice@example.org>\r\nSubject:\r\n hi\r\nTo: bob@example.net\r\n" + BODY
    )
    keys = relay.db().execute("SELECT selector, public_record FROM dkim_keys").fetchall()

    def dns(name: bytes, timeout: int = 5) -> bytes:
        for selector, record in keys:
            if name == f"{selector}._domainkey.example.org.".encode():
                return str(record).encode()
        return b""

    assert dkimpy.verify(data, dnsfunc=dns)


# ---- 4. AUTH while the store cannot answer (RFC 4954 section 6) -----------------------------


async def test_auth_while_the_store_is_stopped_is_a_temporary_failure(relay: Relay) -> None:
    await relay.service.store.stop()

    def converse() -> tuple[Reply, Reply]:
        client = relay.smtp()
        client.starttls(context=relay.client_context())
        client.ehlo()
        auth = client.docmd("AUTH", "PLAIN " + plain("", "alice@example.org", PASSWORD))
        mail = client.docmd("MAIL", "FROM:<alice@example.org>")
        client.quit()
        return auth, mail

    auth, mail = await run(converse)
    assert auth == expect(replies.AUTH_TEMPORARY_FAILURE)
    assert mail == NOT_AUTHENTICATED
    # Not the client's failure: it counts toward no limit.
    assert relay.service.metrics.smtpd_sasl_authentication_failures._value.get() == 0


async def test_auth_while_the_store_read_fails_is_a_temporary_failure(relay: Relay) -> None:
    # A real failing read: the users table is gone under the running server.
    conn = relay.db()
    conn.execute("ALTER TABLE users RENAME TO users_elsewhere")
    conn.close()

    def converse() -> list[Reply]:
        client = relay.smtp()
        client.starttls(context=relay.client_context())
        client.ehlo()
        got = [
            client.docmd("AUTH", "PLAIN " + plain("", "alice@example.org", PASSWORD))
            for _ in range(4)  # more than max_auth_failures: still no 421
        ]
        client.quit()
        return got

    assert await run(converse) == [expect(replies.AUTH_TEMPORARY_FAILURE)] * 4
    assert relay.service.metrics.smtpd_sasl_authentication_failures._value.get() == 0
    with pytest.raises(sqlite3.OperationalError):
        relay.db().execute("SELECT * FROM users")


async def test_smtputf8_is_not_offered_as_utf8_addresses_are_not_taken(relay: Relay) -> None:
    def exchange() -> tuple[bool, tuple[int, bytes], tuple[int, bytes]]:
        client = relay.session()
        try:
            offered = client.has_extn("smtputf8")
            with_param = client.docmd("MAIL", "FROM:<alice@example.org> SMTPUTF8")
            client.rset()
            utf8 = client.docmd("MAIL", "FROM:<alice@example.org>")
            client.send("RCPT TO:<jürgen@example.net>\r\n".encode())
            rcpt = client.getreply()
            return offered, with_param, rcpt if utf8[0] == 250 else utf8
        finally:
            client.close()

    offered, with_param, rcpt = await asyncio.to_thread(exchange)
    assert offered is False
    assert with_param == (501, b"5.5.4 Error: SMTPUTF8 disabled")
    assert rcpt == (500, b"5.5.2 Error: strict ASCII mode")  # no UTF-8 without SMTPUTF8


async def test_data_is_prepared_off_the_event_loop(relay: Relay) -> None:
    """Checks, parsing and signing of an accepted message run in a worker thread, in one call,
    so that a 25 MB message does not stall every other session while it is read."""
    handler = relay.service.submission.handler
    signer = handler.signer
    assert signer is not None
    seen: list[tuple[str, bool]] = []

    def recording_signer(message: bytes, domain: str) -> bytes:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        seen.append((threading.current_thread().name, on_loop))
        return signer(message, domain)

    handler.signer = recording_signer
    client = await asyncio.to_thread(relay.session)
    try:
        reply = await asyncio.to_thread(
            send_raw, client, "alice@example.org", ["bob@example.net"], MESSAGE + b".\r\n"
        )
    finally:
        await asyncio.to_thread(client.quit)
    queued_id(reply)
    [(thread, on_loop)] = seen
    assert not on_loop and thread != threading.main_thread().name
