"""RFC 3464 delivery status notifications (bounces and delay warnings), built as bytes.

A DSN has three parts: a plain-language explanation, the machine-readable
`message/delivery-status`, and the original message's headers as `text/rfc822-headers`. Never
the body: it may hold personal data, and the sender already has it.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import format_datetime
from typing import Literal

from mailrelay.delivery.result import Insecure

Action = Literal["failed", "delayed"]

_LINE = 78  # RFC 5322 SHOULD; folding keeps every line well under the 998 MUST


@dataclass(frozen=True)
class RecipientStatus:
    final_recipient: str
    action: Action
    status: str  # RFC 3463, e.g. "5.7.10"
    diagnostic_code: str  # "smtp; 550 5.1.1 no such user", or plain text (sent as X-mailrelay)
    remote_mta: str | None = None  # the MX host name, when one was reached
    last_attempt_date: dt.datetime | None = None
    will_retry_until: dt.datetime | None = None  # "delayed" only
    # Set when no MX met the transport policy: the reason, as the delivery decided it. A 5.7.x
    # from the server's own reply is the server refusing, and leaves this None.
    insecure: Insecure | None = None


def build_dsn(
    *,
    reporting_mta: str,
    original_envelope_from: str,
    original_headers: bytes,
    recipients: Sequence[RecipientStatus],
    arrival_date: dt.datetime,
    to: Sequence[str],
    message_id_domain: str,
    date: dt.datetime | None = None,
) -> bytes:
    """The complete DSN message (headers and body, CRLF line ends), to be sent from <>."""
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    now = date or dt.datetime.now(dt.UTC)
    failed = any(r.action == "failed" for r in recipients)
    boundary = f"=_mailrelay_{secrets.token_hex(12)}"
    subject = (
        "Undelivered Mail Returned to Sender" if failed else "Delayed Mail (still being retried)"
    )
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        _fold("To", ", ".join(to)),
        f"Subject: {subject}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <{uuid.uuid4().hex}@{message_id_domain}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
    ]
    human = _human_text(reporting_mta, original_envelope_from, recipients, failed)
    human_bytes = human.encode("utf-8")
    status = _delivery_status(reporting_mta, arrival_date, recipients)
    headers = _headers_only(original_headers)
    parts = [
        _part(
            [
                "Content-Type: text/plain; charset=utf-8",
                f"Content-Transfer-Encoding: {_cte(human_bytes)}",
            ],
            human_bytes,
        ),
        _part(["Content-Type: message/delivery-status"], status.encode("ascii")),
        _part(
            ["Content-Type: text/rfc822-headers", f"Content-Transfer-Encoding: {_cte(headers)}"],
            headers,
        ),
    ]
    out = "\r\n".join(head).encode("utf-8") + b"\r\n\r\n"
    out += b"This is a MIME-encapsulated delivery status notification.\r\n"
    for part in parts:
        out += f"\r\n--{boundary}\r\n".encode("ascii") + part
    out += f"\r\n--{boundary}--\r\n".encode("ascii")
    return out


def _part(headers: list[str], body: bytes) -> bytes:
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + _crlf(body)


def _cte(data: bytes) -> str:
    return "7bit" if data.isascii() else "8bit"


def _crlf(data: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def _headers_only(raw: bytes) -> bytes:
    """The header section of `raw`: defends against a caller passing the whole message."""
    raw = _crlf(raw)
    if raw.startswith(b"\r\n"):
        return b""
    end = raw.find(b"\r\n\r\n")
    if end >= 0:
        return raw[: end + 2]
    return raw if raw.endswith(b"\r\n") or not raw else raw + b"\r\n"


def _delivery_status(
    reporting_mta: str, arrival_date: dt.datetime, recipients: Sequence[RecipientStatus]
) -> str:
    blocks = [
        [f"Reporting-MTA: dns; {reporting_mta}", f"Arrival-Date: {format_datetime(arrival_date)}"]
    ]
    for r in recipients:
        block = [_fold("Final-Recipient", _address_field(r.final_recipient))]
        block.append(f"Action: {r.action}")
        block.append(f"Status: {r.status}")
        if r.remote_mta:
            block.append(f"Remote-MTA: dns; {r.remote_mta}")
        block.append(_fold("Diagnostic-Code", _diagnostic(r.diagnostic_code)))
        if r.last_attempt_date:
            block.append(f"Last-Attempt-Date: {format_datetime(r.last_attempt_date)}")
        if r.will_retry_until and r.action == "delayed":
            block.append(f"Will-Retry-Until: {format_datetime(r.will_retry_until)}")
        blocks.append(block)
    return "\r\n\r\n".join("\r\n".join(b) for b in blocks) + "\r\n"


def _address_field(address: str) -> str:
    if address.isascii():
        return f"rfc822; {address}"
    # RFC 6533 3: a non-ASCII address inside message/delivery-status is utf-8-addr-xtext.
    encoded = "".join(
        c if 33 <= ord(c) <= 126 and c not in "+\\=" else f"\\x{{{ord(c):X}}}" for c in address
    )
    return f"utf-8; {encoded}"


def _diagnostic(code: str) -> str:
    # RFC 3464: diagnostic-type ";" text, all US-ASCII. Server replies may carry anything.
    text = _ascii(_printable(code))
    if re.match(r"[A-Za-z][A-Za-z0-9-]*;", text):
        return text
    return f"X-mailrelay; {text}"


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _fold(name: str, value: str) -> str:
    """`name: value` folded at spaces so lines stay within 78 characters where words allow."""
    lines: list[str] = []
    current, has_word = f"{name}:", False
    for word in value.split():
        if has_word and len(current) + 1 + len(word) > _LINE:
            lines.append(current)
            current = f" {word}"
        else:
            current += f" {word}"
        has_word = True
        while len(current) > 998:  # an unbreakable word: split it, still within the hard limit
            lines.append(current[:998])
            current = " " + current[998:]
    lines.append(current)
    return "\r\n".join(lines)


def _human_text(
    reporting_mta: str, envelope_from: str, recipients: Sequence[RecipientStatus], failed: bool
) -> str:
    sender = envelope_from or "(no sender)"
    if failed:
        intro = (
            f"Your message from <{sender}> could not be delivered to one or more recipients. "
            "Nothing was sent to the recipients listed below."
        )
    else:
        intro = (
            f"Your message from <{sender}> has not been delivered yet to the recipients "
            "below. The mail system will keep trying; you do not need to send it again."
        )
    paragraphs = [("", f"This is the mail system at {reporting_mta}."), ("", intro)]
    for r in recipients:
        where = f" from {r.remote_mta}" if r.remote_mta else ""
        block = [
            _explain(r),
            f"Technical detail{where}: {_printable(r.diagnostic_code)}",
        ]
        if r.action == "delayed" and r.will_retry_until:
            block.append(f"Retrying until {format_datetime(r.will_retry_until)}.")
        paragraphs.append(("", f"<{r.final_recipient}>:"))
        paragraphs.extend(("    ", text) for text in block)
    paragraphs.append(("", "The original message's headers are attached; its content is not."))
    lines: list[str] = []
    for indent, text in paragraphs:
        if not indent and lines:
            lines.append("")
        lines.extend(indent + line for line in _wrap(text, _LINE - 2 - len(indent)))
    return "\r\n".join(lines) + "\r\n"


# Why the MX that said most about the destination (`result.most_telling`) was refused.
_NO_STARTTLS = (
    "The receiving server does not offer encryption (STARTTLS), and this relay never sends "
    "mail unencrypted."
)
_WEAK_TLS = (
    "The receiving server's encryption (TLS protocol version or cipher) was below that policy."
)
_INSECURE_WHY = {
    Insecure.NO_STARTTLS: _NO_STARTTLS,
    Insecure.STARTTLS_REFUSED: (
        "The receiving server refused encryption (STARTTLS), and this relay never sends mail "
        "unencrypted."
    ),
    Insecure.PROTOCOL: _WEAK_TLS,
    Insecure.CIPHER: _WEAK_TLS,
    Insecure.CERTIFICATE: "The receiving server's certificate failed verification.",
    Insecure.HANDSHAKE: "The TLS handshake with the receiving server failed.",
    Insecure.DANE: (
        "The receiving server's certificate does not match the DANE (TLSA) records the "
        "recipient's domain publishes."
    ),
    Insecure.DANE_REQUIRED: (
        "This relay requires DANE for the recipient's domain, and the receiving server has no "
        "usable DANE (TLSA) records."
    ),
    Insecure.MTA_STS: (
        "The MTA-STS policy the recipient's domain publishes does not allow the receiving "
        "server or its certificate."
    ),
    Insecure.REQUIRETLS: (
        "The message was sent with REQUIRETLS (RFC 8689): it may only travel over TLS whose "
        "server is authenticated (DANE or MTA-STS) to a server that promises the same for the "
        "next hop, and no receiving server of the recipient's domain offers both."
    ),
}


def _explain(r: RecipientStatus) -> str:
    """Say in plain language why: from the insecure reason where no MX met the transport
    policy, else from the RFC 3463 status code."""
    klass, _, detail = r.status.partition(".")
    if r.insecure is not None:
        why = _INSECURE_WHY[r.insecure]
        if r.action == "delayed":
            return (
                "The message has not been sent yet: no receiving server (MX) for this address "
                f"meets the transport security policy this relay requires. {why} "
                "Delivery will be retried."
            )
        return (
            "The message was not sent: no receiving server (MX) for this address met the "
            f"transport security policy this relay requires. {why}"
        )
    if r.action == "delayed":
        return (
            "A temporary problem has prevented delivery so far (the receiving server was "
            "unreachable, busy, or asked us to try later). Delivery will be retried."
        )
    # Expiry first: 4.4.7 is class 4 because the last errors were temporary, but the message
    # has been given up.
    if detail == "4.7":
        return (
            "The message could not be delivered within the maximum time this relay keeps "
            "trying, and was given up. It will not be retried."
        )
    if klass == "4":
        return "A temporary problem prevented delivery, and the message was given up."
    if detail.startswith("1."):
        return "The receiving server says this address does not exist or cannot receive mail."
    if detail.startswith("3.4"):
        return "The message is larger than the receiving server accepts."
    return "The receiving server permanently refused the message."


def _printable(text: str) -> str:
    # Defence in depth: the delivery already keeps server text printable (reply.server_text),
    # but a diagnostic may also quote an exception. Every line of a DSN must stay one line.
    text = text.encode("utf-8", "replace").decode("utf-8")
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _wrap(text: str, width: int) -> list[str]:
    """Word-wrap `text`; a word longer than `width` (a long server reply token) is cut."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        while len(word) > width:
            if current:
                lines.append(current)
                current = ""
            lines.append(word[:width])
            word = word[width:]
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(current)
    return lines
