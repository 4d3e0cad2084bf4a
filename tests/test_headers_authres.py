"""Authentication-Results fields that claim our authserv-id (RFC 8601 section 5): a client's are
removed in every form a receiver would read as ours, and ours cannot be continued by the
client's text. Submitted over real SMTP and TLS; the queued bytes are what is checked."""

from __future__ import annotations

import asyncio

import authres
import pytest

from mailrelay.submission.message import add_submission_headers
from tests.conftest import Relay

run = asyncio.to_thread

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: test\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)
OURS = b"Authentication-Results: relay.test; auth=pass smtp.auth=alice@example.org\r\n"
HEADER_STARTS_FOLDED = (
    554,
    b"5.6.0 Header line 1 starts with white space: it continues no header field",
)

AR = b"Authentication-Results: "
CLAIM = b" auth=pass smtp.auth=ceo@example.org\r\n"
FORGED = {
    "plain": AR + b"relay.test;" + CLAIM,
    "version": AR + b"relay.test 1;" + CLAIM,
    "unknown version": AR + b"relay.test 2;" + CLAIM,
    "comments": AR + b"(checked) relay.test (trust me) 1;" + CLAIM,
    "nested comment with semicolon": AR + b"(a; (b)) relay.test;" + CLAIM,
    "case and no spaces": b"Authentication-Results:RELAY.Test;" + CLAIM.lstrip(),
    "odd spacing": AR + b"\t relay.test\t ;  auth = pass smtp.auth=ceo@example.org\r\n",
    "folded": AR.rstrip()
    + b"\r\n relay.test\r\n\t;\r\n auth=pass\r\n smtp.auth=ceo@example.org\r\n",
    "space before colon": b"Authentication-Results : relay.test;" + CLAIM,
    "lower-case name": b"authentication-results: relay.test;" + CLAIM,
    "quoted id": AR + b'"relay.test";' + CLAIM,
    "trailing dot": AR + b"relay.test.;" + CLAIM,
    "slash after id": AR + b"relay.test/1;" + CLAIM,
    "none": AR + b"relay.test; none (smtp.auth=ceo@example.org)\r\n",
    "unclosed comment": AR + b"(x relay.test;" + CLAIM,
    # Folded (lines are at most 1000 octets), and far beyond what authres is given to read.
    "huge comment": AR + b"relay.test (" + b"\r\n ".join([b"x" * 900] * 20) + b");" + CLAIM,
}
FOREIGN = [
    AR + b"other.example;\r\n spf=pass smtp.mailfrom=example.org\r\n",
    AR + b"other.example (via relay.test); dkim=pass header.d=relay.test\r\n",
]


def submit(relay: Relay, message: bytes) -> tuple[int, bytes]:
    client = relay.session()
    assert client.mail("alice@example.org")[0] == 250
    assert client.rcpt("bob@example.net")[0] == 250
    assert client.docmd("DATA")[0] == 354
    client.send(message + b".\r\n")
    reply = client.getreply()
    client.quit()
    return reply


def queued(relay: Relay, reply: tuple[int, bytes]) -> bytes:
    code, text = reply
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as "), reply
    queue_id = text.rsplit(b" ", 1)[1].decode()
    row = relay.db().execute("SELECT data FROM messages WHERE id = ?", (queue_id,)).fetchone()
    return bytes(row[0])


def authentication_results(message: bytes) -> list[bytes]:
    """Every Authentication-Results field of the header section, as written (folding kept)."""
    head = message.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    fields: list[bytes] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return [
        f + b"\r\n"
        for f in fields
        if f.split(b":", 1)[0].rstrip(b" \t").lower() == b"authentication-results"
    ]


@pytest.mark.parametrize("variant", list(FORGED))
async def test_every_form_of_our_authserv_id_is_removed(relay: Relay, variant: str) -> None:
    data = await run(lambda: queued(relay, submit(relay, FORGED[variant] + MESSAGE)))
    assert authentication_results(data) == [OURS]
    assert b"ceo@example.org" not in data
    assert data.endswith(MESSAGE)


async def test_foreign_authentication_results_are_kept(relay: Relay) -> None:
    data = await run(lambda: queued(relay, submit(relay, b"".join(FOREIGN) + MESSAGE)))
    assert authentication_results(data) == [OURS, *FOREIGN]
    # Parsed as a receiver would: exactly one field names us, and it says who authenticated.
    ids = [
        authres.AuthenticationResultsHeader.parse(f.replace(b"\r\n", b"").decode()).authserv_id
        for f in authentication_results(data)
    ]
    assert ids == ["relay.test", "other.example", "other.example"]


async def test_no_client_text_continues_our_header(relay: Relay) -> None:
    # A first line that is a continuation would extend whatever field is above it: ours.
    smuggled = b" ; dkim=pass header.d=bank.test\r\n" + MESSAGE
    assert await run(submit, relay, smuggled) == HEADER_STARTS_FOLDED
    data = await run(lambda: queued(relay, submit(relay, MESSAGE)))
    ours = data.index(OURS) + len(OURS)
    assert data[ours : ours + 1] not in (b" ", b"\t")


def test_our_fields_are_single_lines_before_any_client_line() -> None:
    added = add_submission_headers(
        MESSAGE,
        hostname="relay.test",
        queue_id="0123456789ABCDEF",
        now=0.0,
        authentication_results=OURS.rstrip(b"\r\n").decode(),
    )
    assert added.endswith(b"\r\n" + MESSAGE)
    with pytest.raises(ValueError, match="continuation"):
        add_submission_headers(
            b"\t; dkim=pass\r\n" + MESSAGE, hostname="relay.test", queue_id="X", now=0.0
        )
    with pytest.raises(ValueError, match="one line"):
        add_submission_headers(
            MESSAGE,
            hostname="relay.test",
            queue_id="X",
            now=0.0,
            authentication_results="Authentication-Results: relay.test;\r\n auth=pass",
        )
