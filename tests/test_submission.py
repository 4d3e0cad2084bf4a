"""The submission server, spoken to by smtplib over real TLS on loopback."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import smtplib
import ssl
from pathlib import Path

import pytest

from mailrelay.store import queue
from tests.conftest import PASSWORD, Relay, RelayFactory, add_user, make_config

run = asyncio.to_thread

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: test\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)
QUEUED = re.compile(rb"^2\.0\.0 Ok: queued as ([0-9A-F]{16})$")

NEED_STARTTLS = (530, b"5.7.0 Must issue a STARTTLS command first")
AUTH_REQUIRED = (530, b"5.7.0 Authentication required")
AUTH_FAILED = (535, b"5.7.8 Authentication credentials invalid")
BAD_ADDRESS = (501, b"5.1.3 Bad address syntax")
BAD_RECIPIENT_SYNTAX = (501, b"5.1.3 Bad recipient address syntax")
SENDER_NOT_OWNED = (553, b"5.7.1 Sender address not owned by the authenticated user")
FROM_NOT_OWNED = (553, b"5.7.1 From: header address not owned by the authenticated user")
TOO_MANY_RECIPIENTS = (452, b"4.5.3 Too many recipients")
BARE_LINE_ENDING = (554, b"5.5.2 Message refused: bare CR or LF in DATA (RFC 5321 section 2.3.8)")


def send_raw(
    client: smtplib.SMTP, mail_from: str, rcpts: list[str], raw: bytes
) -> tuple[int, bytes]:
    """MAIL, RCPT, DATA with `raw` sent exactly as given (smtplib.data would fix line endings)."""
    assert client.mail(mail_from)[0] == 250
    for rcpt in rcpts:
        assert client.rcpt(rcpt)[0] == 250
    assert client.docmd("DATA")[0] == 354
    client.send(raw)
    return client.getreply()


def queued_id(reply: tuple[int, bytes]) -> str:
    code, text = reply
    match = QUEUED.match(text)
    assert code == 250 and match, reply
    return match.group(1).decode()


async def test_ehlo_before_and_after_starttls(relay: Relay) -> None:
    def converse() -> tuple[str, str]:
        client = relay.smtp()
        client.ehlo()
        before = (client.ehlo_resp or b"").decode()
        client.starttls(context=relay.client_context())
        client.ehlo()
        after = (client.ehlo_resp or b"").decode()
        client.quit()
        return before, after

    before, after = await run(converse)
    assert "STARTTLS" in before and "AUTH" not in before
    assert "ENHANCEDSTATUSCODES" in before and "SIZE 26214400" in before
    assert "STARTTLS" not in after
    assert "AUTH LOGIN PLAIN" in after and "ENHANCEDSTATUSCODES" in after


async def test_commands_before_starttls_are_refused(relay: Relay) -> None:
    def converse() -> list[tuple[int, bytes]]:
        client = relay.smtp()
        client.ehlo()
        replies = [
            client.docmd("MAIL", "FROM:<alice@example.org>"),
            client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0a\0b").decode()),
            client.docmd("NOOP"),
        ]
        client.quit()
        return replies

    mail, auth, noop = await run(converse)
    assert mail == NEED_STARTTLS
    assert auth == NEED_STARTTLS
    assert noop == (250, b"2.0.0 OK")


async def test_mail_requires_auth_after_starttls(relay: Relay) -> None:
    def converse() -> tuple[int, bytes]:
        client = relay.smtp()
        client.starttls(context=relay.client_context())
        client.ehlo()
        reply = client.docmd("MAIL", "FROM:<alice@example.org>")
        client.quit()
        return reply

    assert await run(converse) == AUTH_REQUIRED


async def test_wrong_password_three_times_closes(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "hunter2-not-the-password"

    def converse() -> list[tuple[int, bytes]]:
        client = relay.smtp()
        client.starttls(context=relay.client_context())
        client.ehlo()
        results: list[tuple[int, bytes]] = []
        plain = base64.b64encode(b"\0alice@example.org\0" + secret.encode()).decode()
        for _ in range(3):
            results.append(client.docmd("AUTH", "PLAIN " + plain))
        # The third failure is followed by 421 and the server closing the connection.
        results.append(client.getreply())
        try:
            client.docmd("NOOP")
        except smtplib.SMTPServerDisconnected:
            results.append((0, b"disconnected"))
        return results

    with caplog.at_level(logging.DEBUG):
        results = await run(converse)
    assert results[:3] == [AUTH_FAILED] * 3
    assert results[3] == (421, b"4.7.0 Too many authentication failures, closing connection")
    assert results[4] == (0, b"disconnected")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    encoded = base64.b64encode(secret.encode()).decode()
    assert secret not in logged and encoded not in logged
    assert relay.service.metrics.smtpd_sasl_authentication_failures._value.get() == 3


async def test_auth_login_and_accepted_message_is_queued(relay: Relay) -> None:
    def converse() -> tuple[int, bytes]:
        client = relay.smtp()
        client.starttls(context=relay.client_context())
        client.ehlo()
        client.user, client.password = "alice@example.org", PASSWORD
        code, text = client.auth("LOGIN", client.auth_login)
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        reply = send_raw(
            client,
            "alice@example.org",
            ["bob@example.net", "carol@example.com"],
            MESSAGE + b".\r\n",
        )
        assert client.quit() == (221, b"2.0.0 Bye")
        return reply

    queue_id = queued_id(await run(converse))
    msg = queue.show(relay.db(), queue_id)
    assert msg is not None
    assert msg["sender"] == "alice@example.org" and msg["auth_user"] == "alice@example.org"
    rcpts = msg["recipients"]
    assert [(r["address"], r["state"], r["attempts"]) for r in rcpts] == [  # type: ignore[attr-defined]
        ("bob@example.net", "queued", 0),
        ("carol@example.com", "queued", 0),
    ]
    data = relay.db().execute("SELECT data FROM messages WHERE id = ?", (queue_id,)).fetchone()[0]
    assert data.endswith(MESSAGE)
    assert data.startswith(
        b"Received: by relay.test (mailrelay) with ESMTPSA id " + queue_id.encode()
    )
    assert b"Authentication-Results: relay.test; auth=pass smtp.auth=alice@example.org" in data
    assert b"\r\nMessage-ID: <" in data and b"\r\nDate: " in data
    assert relay.service.metrics.smtpd_messages_processed._value.get() == 1


async def test_sender_must_own_domain(relay: Relay) -> None:
    def converse() -> list[tuple[int, bytes]]:
        client = relay.session()
        replies = [client.docmd("MAIL", "FROM:<mallory@example.net>")]
        client.rset()
        replies.append(
            send_raw(
                client,
                "alice@example.org",
                ["bob@example.net"],
                MESSAGE.replace(b"alice@example.org", b"ceo@example.net") + b".\r\n",
            )
        )
        client.rset()
        replies.append(client.docmd("MAIL", "FROM:<>"))
        client.quit()
        return replies

    mail, data, null = await run(converse)
    assert mail == SENDER_NOT_OWNED
    assert data == FROM_NOT_OWNED
    assert null == BAD_ADDRESS


async def test_unverified_domain_may_not_send(tmp_path: Path, relay_factory: RelayFactory) -> None:
    cfg = make_config(tmp_path)
    add_user(cfg, "dave@unverified.example", valid=False)
    relay = await relay_factory(cfg)

    def converse() -> tuple[int, bytes]:
        client = relay.session("dave@unverified.example")
        reply = client.docmd("MAIL", "FROM:<dave@unverified.example>")
        client.quit()
        return reply

    assert await run(converse) == (
        550,
        b"5.7.1 Sending domain unverified.example is not verified;"
        b" run: mailrelay domain check unverified.example",
    )


async def test_unverified_domain_allowed_for_development(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    cfg = make_config(tmp_path, submission={"allow_unverified_domains": True})
    add_user(cfg, "dave@unverified.example", valid=False)
    relay = await relay_factory(cfg)

    def converse() -> tuple[int, bytes]:
        client = relay.session("dave@unverified.example")
        msg = MESSAGE.replace(b"alice@example.org", b"dave@unverified.example")
        reply = send_raw(client, "dave@unverified.example", ["bob@example.net"], msg + b".\r\n")
        client.quit()
        return reply

    queued_id(await run(converse))


async def test_size_limit(tmp_path: Path, relay_factory: RelayFactory) -> None:
    cfg = make_config(tmp_path, submission={"max_message_size": 2048})
    add_user(cfg, "alice@example.org")
    relay = await relay_factory(cfg)

    def converse() -> list[tuple[int, bytes]]:
        client = relay.session()
        replies = [client.docmd("MAIL", "FROM:<alice@example.org> SIZE=4096")]
        client.rset()
        big = MESSAGE + b"x" * 70 + b"\r\n"
        replies.append(
            send_raw(client, "alice@example.org", ["bob@example.net"], big * 40 + b".\r\n")
        )
        replies.append(client.docmd("NOOP"))
        client.quit()
        return replies

    mail, data, noop = await run(converse)
    assert mail == (552, b"5.3.4 Error: message size exceeds fixed maximum message size")
    assert data == (552, b"5.3.4 Message size exceeds fixed maximum message size")
    assert noop == (250, b"2.0.0 OK")
    assert queue.list_queue(relay.db()) == []
    # aiosmtpd made both refusals itself; they are counted and recorded all the same.
    await relay.service.submission.handler.flush()
    rejected = relay.service.metrics.smtpd_messages_rejected.labels(code="552")
    assert rejected._value.get() == 2
    refused = relay.db().execute("SELECT recipient, event, reply FROM events").fetchall()
    assert [tuple(r) for r in refused] == [
        ("bob@example.net", "REFUSED", "552 5.3.4 Message size exceeds fixed maximum message size")
    ]


async def test_recipient_limit_and_syntax(tmp_path: Path, relay_factory: RelayFactory) -> None:
    cfg = make_config(tmp_path, submission={"max_recipients": 2})
    add_user(cfg, "alice@example.org")
    relay = await relay_factory(cfg)

    def converse() -> list[tuple[int, bytes]]:
        client = relay.session()
        client.mail("alice@example.org")
        replies = [
            client.docmd("RCPT", "TO:<no-domain>"),
            client.docmd("RCPT", "TO:<a@b@example.net>"),
            client.docmd("RCPT", "TO:<one@example.net>"),
            client.docmd("RCPT", "TO:<two@example.net>"),
            client.docmd("RCPT", "TO:<three@example.net>"),
        ]
        client.quit()
        return replies

    no_domain, two_ats, one, two, three = await run(converse)
    # Neither is RFC 5321 path syntax: refused before the handler sees it.
    assert no_domain == BAD_RECIPIENT_SYNTAX
    assert two_ats == BAD_RECIPIENT_SYNTAX
    assert one == two == (250, b"2.1.5 Recipient ok")
    assert three == TOO_MANY_RECIPIENTS


@pytest.mark.parametrize(
    "smuggled",
    [
        b"\n.\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n",
        b"\r\n.\nMAIL FROM:<alice@example.org>\r\n",
        b"\n.\r\nMAIL FROM:<alice@example.org>\r\n",
        b"\r.\r\nbare CR\r\n",
    ],
)
async def test_smuggling_one_data_one_reply(relay: Relay, smuggled: bytes) -> None:
    def converse() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        client = relay.session()
        body = MESSAGE + b"first part" + smuggled + b"Subject: smuggled\r\n\r\nsecond\r\n.\r\n"
        reply = send_raw(client, "alice@example.org", ["bob@example.net"], body)
        # Had the server seen two messages, this would read its second reply instead.
        noop = client.docmd("NOOP")
        client.quit()
        return reply, noop

    reply, noop = await run(converse)
    assert reply == BARE_LINE_ENDING
    assert noop == (250, b"2.0.0 OK")
    assert queue.list_queue(relay.db()) == []


async def test_line_too_long(relay: Relay) -> None:
    def converse() -> tuple[int, bytes]:
        client = relay.session()
        body = MESSAGE + b"y" * 1200 + b"\r\n.\r\n"
        reply = send_raw(client, "alice@example.org", ["bob@example.net"], body)
        client.quit()
        return reply

    assert await run(converse) == (500, b"5.5.2 Line too long (RFC 5321 section 4.5.3.1.6)")


async def test_implicit_tls_port(relay: Relay) -> None:
    def converse() -> tuple[str, tuple[int, bytes]]:
        client = smtplib.SMTP_SSL(
            "127.0.0.1", relay.implicit_port, context=relay.client_context(), timeout=10
        )
        client.ehlo()
        ehlo = (client.ehlo_resp or b"").decode()
        client.login("alice@example.org", PASSWORD)
        reply = send_raw(client, "alice@example.org", ["bob@example.net"], MESSAGE + b".\r\n")
        client.quit()
        return ehlo, reply

    ehlo, reply = await run(converse)
    assert "STARTTLS" not in ehlo and "AUTH LOGIN PLAIN" in ehlo
    queued_id(reply)


async def test_weak_client_tls_is_refused(relay: Relay) -> None:
    def converse() -> None:
        ctx = relay.client_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("AES128-SHA256")  # RSA key exchange, CBC: not offered by the server
        client = relay.smtp()
        try:
            client.starttls(context=ctx)
        finally:
            client.close()

    with pytest.raises(ssl.SSLError):
        await run(converse)


async def test_unknown_command_and_quit_have_enhanced_codes(relay: Relay) -> None:
    def converse() -> list[tuple[int, bytes]]:
        client = relay.smtp()
        client.ehlo()
        replies = [client.docmd("FROB")]
        client.starttls(context=relay.client_context())
        client.ehlo()
        replies += [client.docmd("FROB"), client.docmd("RCPT", "TO:<bob@example.net>")]
        replies.append(client.quit())
        return replies

    before_tls, frob, rcpt, quit_ = await run(converse)
    assert before_tls == NEED_STARTTLS
    assert frob == (500, b'5.5.2 Error: command "FROB" not recognized')
    assert rcpt == AUTH_REQUIRED
    assert quit_ == (221, b"2.0.0 Bye")


async def test_restart_keeps_queued_mail(tmp_path: Path, relay_factory: RelayFactory) -> None:
    cfg = make_config(tmp_path)
    add_user(cfg, "alice@example.org")
    first = await relay_factory(cfg)

    def submit(relay: Relay) -> str:
        client = relay.session()
        reply = send_raw(client, "alice@example.org", ["bob@example.net"], MESSAGE + b".\r\n")
        client.quit()
        return queued_id(reply)

    queue_id = await run(submit, first)
    await first.service.stop()
    second = await relay_factory(cfg)
    listed = queue.list_queue(second.db())
    assert [m["id"] for m in listed] == [queue_id]
    assert listed[0]["recipients"] == [{"address": "bob@example.net", "state": "queued"}]


async def test_forged_authentication_results_are_removed(relay: Relay) -> None:
    forged = (
        b"Authentication-Results: relay.test; auth=pass smtp.auth=ceo@example.org\r\n"
        b"Authentication-Results: other.example;\r\n spf=pass\r\n"
    )

    def converse() -> tuple[int, bytes]:
        client = relay.session()
        reply = send_raw(
            client, "alice@example.org", ["bob@example.net"], forged + MESSAGE + b".\r\n"
        )
        client.quit()
        return reply

    queue_id = queued_id(await run(converse))
    data = relay.db().execute("SELECT data FROM messages WHERE id = ?", (queue_id,)).fetchone()[0]
    assert b"ceo@example.org" not in data
    assert b"Authentication-Results: other.example;\r\n spf=pass\r\n" in data  # not ours: kept
    assert data.count(b"Authentication-Results: relay.test;") == 1
    assert data.endswith(MESSAGE)


async def test_shutdown_lets_open_transaction_finish(relay: Relay) -> None:
    busy = await run(relay.session)
    idle = await run(relay.session)
    assert (await run(busy.mail, "alice@example.org"))[0] == 250
    assert (await run(busy.rcpt, "bob@example.net"))[0] == 250
    stopping = asyncio.create_task(relay.service.stop())
    # The idle session is told at once; the one mid-transaction is left to finish.
    assert await run(idle.getreply) == (421, b"4.3.2 Service shutting down, try again later")
    idle.close()  # as a mail client does on 421
    assert not stopping.done()

    def finish() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        assert busy.docmd("DATA")[0] == 354
        busy.send(MESSAGE + b".\r\n")
        return busy.getreply(), busy.getreply()

    accepted, closing = await run(finish)
    queue_id = queued_id(accepted)
    assert closing == (421, b"4.3.2 Service shutting down, try again later")
    busy.close()
    await stopping
    assert [m["id"] for m in queue.list_queue(relay.db())] == [queue_id]
