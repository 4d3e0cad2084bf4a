"""RFC 3464 bounces: built as bytes, then read back with the email package, field by field."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import re
from email.message import EmailMessage, Message

import pytest

from mailrelay.delivery.dsn import RecipientStatus, build_dsn
from mailrelay.delivery.result import Insecure

ARRIVED = dt.datetime(2025, 3, 4, 10, 0, 0, tzinfo=dt.UTC)
TRIED = dt.datetime(2025, 3, 4, 10, 5, 30, tzinfo=dt.UTC)
NOW = dt.datetime(2025, 3, 4, 10, 6, 0, tzinfo=dt.UTC)
SECRET = b"Dear doctor, my BSN is 123456789 and my diagnosis is"
ORIGINAL = (
    b"From: Alice <alice@sender.example>\r\n"
    b"To: bob@dest.example, carol@dest.example\r\n"
    b"Subject: Lab results\r\n"
    b"Message-ID: <orig-1@sender.example>\r\n"
    b"\r\n" + SECRET + b"\r\n"
)
TLS_REFUSED = RecipientStatus(
    final_recipient="bob@dest.example",
    action="failed",
    status="5.7.10",
    diagnostic_code="mx1.dest.example[192.0.2.1]: negotiated TLSv1.0",
    remote_mta="mx1.dest.example",
    last_attempt_date=TRIED,
    insecure=Insecure.PROTOCOL,
)
NO_USER = RecipientStatus(
    final_recipient="carol@dest.example",
    action="failed",
    status="5.1.1",
    diagnostic_code="smtp; 550 5.1.1 <carol@dest.example>: Recipient address rejected",
    remote_mta="mx1.dest.example",
    last_attempt_date=TRIED,
)


def build(recipients: list[RecipientStatus], headers: bytes = ORIGINAL) -> bytes:
    return build_dsn(
        reporting_mta="relay.example.net",
        original_envelope_from="alice@sender.example",
        original_headers=headers,
        recipients=recipients,
        arrival_date=ARRIVED,
        to=["alice@sender.example", "postmaster@sender.example"],
        message_id_domain="relay.example.net",
        date=NOW,
    )


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    return msg


def parts(msg: EmailMessage) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def status_blocks(msg: EmailMessage) -> list[Message]:
    report = parts(msg)[1]
    assert report.get_content_type() == "message/delivery-status"
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


def test_envelope_headers() -> None:
    msg = parse(build([TLS_REFUSED]))
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.net>"
    assert msg["To"] == "alice@sender.example, postmaster@sender.example"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"] == "Tue, 04 Mar 2025 10:06:00 +0000"
    assert re.fullmatch(r"<[0-9a-f]{32}@relay\.example\.net>", str(msg["Message-ID"]))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"


def test_three_parts_in_order() -> None:
    msg = parse(build([TLS_REFUSED]))
    types = [p.get_content_type() for p in parts(msg)]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_human_part_says_why_in_plain_language() -> None:
    human = parts(parse(build([TLS_REFUSED, NO_USER])))[0]
    text = human.get_payload(decode=True)
    assert isinstance(text, bytes)
    plain = " ".join(text.decode().split())
    assert "relay.example.net" in plain
    assert "<alice@sender.example>" in plain
    assert "<bob@dest.example>:" in plain
    assert "no receiving server (MX) for this address met the transport security policy" in plain
    assert "encryption (TLS protocol version or cipher) was below that policy" in plain
    assert "The message was not sent" in plain
    assert "negotiated TLSv1.0" in plain
    assert "<carol@dest.example>:" in plain
    assert "does not exist" in plain
    assert "headers are attached; its content is not" in plain


@pytest.mark.parametrize(
    ("status", "insecure", "phrase"),
    [
        ("5.7.4", Insecure.NO_STARTTLS, "does not offer encryption (STARTTLS)"),
        ("5.7.5", Insecure.CERTIFICATE, "certificate failed verification"),
        ("5.7.5", Insecure.HANDSHAKE, "TLS handshake with the receiving server failed"),
        ("5.7.5", Insecure.DANE, "does not match the DANE (TLSA) records"),
        ("5.7.5", Insecure.MTA_STS, "MTA-STS policy the recipient's domain publishes"),
        # The same codes in the server's own reply are the server refusing, not our policy.
        ("5.7.4", None, "permanently refused the message"),
        ("5.4.7", None, "within the maximum time"),
        ("5.3.4", None, "larger than the receiving server accepts"),
        ("5.6.0", None, "permanently refused the message"),
    ],
)
def test_explanations_by_status(status: str, insecure: Insecure | None, phrase: str) -> None:
    rcpt = RecipientStatus("bob@dest.example", "failed", status, "smtp; 550 no", insecure=insecure)
    text = parts(parse(build([rcpt])))[0].get_payload(decode=True)
    assert isinstance(text, bytes)
    assert phrase in " ".join(text.decode().split())


def test_delivery_status_fields() -> None:
    msg = parse(build([TLS_REFUSED, NO_USER]))
    per_message, bob, carol = status_blocks(msg)
    assert per_message["Reporting-MTA"] == "dns; relay.example.net"
    assert per_message["Arrival-Date"] == "Tue, 04 Mar 2025 10:00:00 +0000"
    assert bob["Final-Recipient"] == "rfc822; bob@dest.example"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.7.10"
    assert bob["Remote-MTA"] == "dns; mx1.dest.example"
    assert bob["Diagnostic-Code"] == "X-mailrelay; mx1.dest.example[192.0.2.1]: negotiated TLSv1.0"
    assert bob["Last-Attempt-Date"] == "Tue, 04 Mar 2025 10:05:30 +0000"
    assert carol["Final-Recipient"] == "rfc822; carol@dest.example"
    assert carol["Status"] == "5.1.1"
    assert carol["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <carol@dest.example>: Recipient address rejected"
    )


def test_original_headers_only_never_the_body() -> None:
    raw = build([TLS_REFUSED], headers=ORIGINAL)  # the whole message, by mistake
    assert SECRET not in raw
    attached = parts(parse(raw))[2]
    assert attached.get_content_type() == "text/rfc822-headers"
    body = attached.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert body == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"


def test_lf_only_headers_become_crlf() -> None:
    raw = build([TLS_REFUSED], headers=b"Subject: x\nFrom: a@b.example\n")
    assert b"Subject: x\r\nFrom: a@b.example\r\n" in raw


def test_every_line_ends_in_crlf_and_is_short() -> None:
    long_reply = "smtp; 550 5.7.1 " + " ".join(["policy"] * 60)
    rcpt = RecipientStatus("bob@dest.example", "failed", "5.7.1", long_reply, "mx1.dest.example")
    raw = build([rcpt, TLS_REFUSED])
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert raw.endswith(b"\r\n")
    for line in raw.split(b"\r\n"):
        assert len(line) <= 78, line
    # Folded, the field reads back as one value.
    _, block, _ = status_blocks(parse(raw))
    assert " ".join(str(block["Diagnostic-Code"]).split()) == long_reply


def test_unbreakable_words_stay_within_the_hard_limit() -> None:
    rcpt = RecipientStatus("bob@dest.example", "failed", "5.0.0", "smtp; 550 " + "x" * 3000)
    raw = build([rcpt])
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_server_text_is_made_ascii_in_the_report() -> None:
    rcpt = RecipientStatus("bob@dest.example", "failed", "5.0.0", "smtp; 550 Adresse ungültig")
    raw = build([rcpt])
    _, block = status_blocks(parse(raw))
    assert block["Diagnostic-Code"] == "smtp; 550 Adresse ung?ltig"
    human = parts(parse(raw))[0].get_payload(decode=True)
    assert isinstance(human, bytes)
    assert "Adresse ungültig" in human.decode()


def test_non_ascii_recipient_uses_utf8_xtext() -> None:
    rcpt = RecipientStatus("jürgen+x@dest.example", "failed", "5.1.1", "smtp; 550 no")
    _, block = status_blocks(parse(build([rcpt])))
    assert block["Final-Recipient"] == "utf-8; j\\x{FC}rgen\\x{2B}x@dest.example"


def test_delay_notice() -> None:
    until = dt.datetime(2025, 3, 9, 10, 0, 0, tzinfo=dt.UTC)
    rcpt = RecipientStatus(
        "bob@dest.example",
        "delayed",
        "4.7.0",
        "smtp; 454 4.7.0 TLS not available due to temporary reason",
        "mx1.dest.example",
        TRIED,
        will_retry_until=until,
    )
    msg = parse(build([rcpt]))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, block = status_blocks(msg)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.7.0"
    assert block["Will-Retry-Until"] == "Sun, 09 Mar 2025 10:00:00 +0000"
    human = parts(msg)[0].get_payload(decode=True)
    assert isinstance(human, bytes)
    assert "will keep trying" in human.decode()


def test_needs_a_recipient() -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        build([])
