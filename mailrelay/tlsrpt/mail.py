"""A report as mail (RFC 8460 §5.3): multipart/report; report-type="tlsrpt", a short text part
and the gzipped JSON as application/tlsrpt+gzip named as §5.1 says, DKIM-signed by the domain of
its From: address, queued from the null sender.

Why `<>`: a report is an automatic message nobody should answer or bounce (RFC 3834 §3.1.7 and
RFC 5321 §4.5.5 name the null reverse-path for exactly that), and a bounce of a report to a
domain whose mail is broken would only be another message into the same breakage. With `<>`
and no sending domain of its own, the queue never bounces it either (`bounce_for` finds nobody
to tell), and the receiver's MX has nobody to bounce to. DMARC still passes on the DKIM
signature, whose d= is the From: domain.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
from email.utils import format_datetime

from mailrelay import dkim
from mailrelay.signing import signing_key
from mailrelay.store import accounts
from mailrelay.store.backend import Connection
from mailrelay.store.queue import NewMessage
from mailrelay.tlsrpt.report import Identity

_LINE = 76  # base64 lines, as RFC 2045 §6.8 wants them


class CannotSign(Exception):
    """No active DKIM key for the From: domain: §5.3 says a report "MUST" be DKIM-signed, and
    receivers ignore one that is not, so it is not sent at all."""


def build(
    who: Identity,
    *,
    to: str,
    domain: str,
    day: str,
    report_id: str,
    attachment_name: str,
    report_gz: bytes,
    date: dt.datetime | None = None,
) -> bytes:
    """The message, unsigned, with CRLF line ends."""
    boundary = f"=_mailrelay_tlsrpt_{secrets.token_hex(12)}"
    head = [
        f"From: {who.from_address}",
        f"To: {to}",
        f"Date: {format_datetime(date or dt.datetime.now(dt.UTC))}",
        f"Message-ID: <{report_id}>",
        # §5.3: "Report Domain: <policy domain> Submitter: <sending domain> Report-ID: <id>",
        # folded where its ABNF allows FWS, so no line is longer than RFC 5322 wants.
        f"Subject: Report Domain: {domain}",
        f" Submitter: {who.submitter}",
        f" Report-ID: <{report_id}>",
        f"TLS-Report-Domain: {domain}",
        f"TLS-Report-Submitter: {who.submitter}",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        'Content-Type: multipart/report; report-type="tlsrpt";',
        f' boundary="{boundary}"',
    ]
    text = (
        f"This is an aggregate TLS report (RFC 8460) from {who.organization_name}"
        f" ({who.submitter}) for {domain}, covering {day} (UTC).\r\n"
        f"Report-ID: <{report_id}>\r\n"
    )
    encoded = base64.b64encode(report_gz).decode("ascii")
    lines = [encoded[i : i + _LINE] for i in range(0, len(encoded), _LINE)]
    parts = [
        "\r\n".join(
            [
                'Content-Type: text/plain; charset="us-ascii"',
                "Content-Transfer-Encoding: 7bit",
                "",
                text.encode("ascii", "replace").decode("ascii"),
            ]
        ),
        "\r\n".join(
            [
                "Content-Type: application/tlsrpt+gzip;",
                f' name="{attachment_name}"',
                "Content-Transfer-Encoding: base64",
                "Content-Disposition: attachment;",
                f' filename="{attachment_name}"',
                "",
                *lines,
                "",
            ]
        ),
    ]
    out = "\r\n".join(head) + "\r\n\r\nThis is a multipart message in MIME format.\r\n"
    for part in parts:
        out += f"\r\n--{boundary}\r\n{part}"
    out += f"\r\n--{boundary}--\r\n"
    return out.encode("ascii")


def sign(conn: Connection, message: bytes, from_address: str) -> bytes:
    """`message` signed with the active keys of the From: domain; raises CannotSign."""
    domain = from_address.rpartition("@")[2].lower()
    stored = accounts.keys(conn, domain, active_only=True)
    if not stored:
        raise CannotSign(
            f"no active DKIM key for {domain} (tlsrpt.from_address {from_address}):"
            " RFC 8460 reports by mail must be DKIM-signed; use an address at one of our domains"
        )
    keys = [signing_key(k) for k in stored]
    try:
        return dkim.sign(message, domain=domain, keys=keys)
    except (OSError, ValueError) as exc:
        raise CannotSign(f"cannot sign as {domain}: {exc}") from exc


def queued(signed: bytes, to: str) -> NewMessage:
    """The message as the queue takes it: from <>, with no sending domain (so no bounce copy)."""
    return NewMessage(
        sender="",
        recipients=(to,),
        data=signed,
        auth_user=None,
        client_ip=None,
        sender_domain=None,
    )
