"""A JSON send request made into an RFC 5322 / MIME message with Python's email package, and a
raw message/rfc822 body read for its envelope.

Every value that becomes part of a header field is checked for CR, LF and NUL first: one would
let the caller write fields of its own (header injection), and the answer names the field.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import email.utils
import hashlib
import re
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage

from pydantic import BaseModel, ConfigDict, Field

from mailrelay.api.errors import ApiError
from mailrelay.submission import headers
from mailrelay.submission.accept import split_address
from mailrelay.submission.message import header_block


class Attachment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: str
    content: str = Field(description="base64")
    content_type: str = "application/octet-stream"


class SendRequest(BaseModel):
    """POST /v1/messages as JSON. Addresses are `addr@example.org` or `Name <addr@example.org>`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str = Field(alias="from")
    to: list[str] = []
    cc: list[str] = []
    bcc: list[str] = Field(default=[], description="envelope only; not in the header")
    reply_to: list[str] = []
    subject: str = ""
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = []
    headers: dict[str, str] = Field(default={}, description="extra header fields")
    requiretls: bool = Field(
        default=False,
        description="REQUIRETLS (RFC 8689): deliver only over authenticated TLS to MX hosts"
        " that offer REQUIRETLS, else bounce",
    )


@dataclass(frozen=True)
class AttachmentInfo:
    filename: str
    content_type: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Built:
    data: bytes
    """CRLF line ends, 7-bit: what submission's checks then read."""
    sender: str
    recipients: tuple[str, ...]
    attachments: tuple[AttachmentInfo, ...] = ()
    requiretls: bool = False


# Fields the builder writes itself, or that only we may write: an extra header may not set them.
_RESERVED = {
    "from", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "sender",
    "mime-version", "received", "return-path", "dkim-signature", "authentication-results",
    "content-type", "content-transfer-encoding", "content-disposition",
}  # fmt: skip
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")


def _one_line(value: str, field: str) -> None:
    if any(c in value for c in "\r\n\0"):
        raise ApiError(422, "header_injection", "CR, LF and NUL are not allowed here", field)


def _address(value: str, field: str) -> Address:
    """'Name <a@b.org>' or 'a@b.org' -> Address (a non-ASCII display name is RFC 2047-encoded
    when written)."""
    _one_line(value, field)
    found = email.utils.getaddresses([value])
    name, addr = found[0] if len(found) == 1 else ("", "")
    parts = split_address(addr) if addr else None
    if parts is None:
        raise ApiError(422, "invalid_address", f"not an address: {value!r}", field)
    return Address(display_name=name, username=parts[0], domain=parts[1])


def build(req: SendRequest, *, message_id: str, date: str) -> Built:
    sender = _address(req.from_, "from")
    groups = {
        name: [_address(v, f"{name}[{i}]") for i, v in enumerate(getattr(req, name))]
        for name in ("to", "cc", "bcc", "reply_to")
    }
    recipients = tuple(a.addr_spec for name in ("to", "cc", "bcc") for a in groups[name])
    if not recipients:
        raise ApiError(422, "no_recipients", "give at least one of to, cc, bcc", "to")
    _one_line(req.subject, "subject")
    extra: list[tuple[str, str]] = []
    for name, value in req.headers.items():
        field = f"headers.{name}"
        _one_line(name, field)
        _one_line(value, field)
        if not _FIELD_NAME.fullmatch(name):
            raise ApiError(422, "invalid_header", f"not a header field name: {name!r}", field)
        if name.lower() in _RESERVED or name.lower().startswith(("arc-", "content-")):
            raise ApiError(422, "invalid_header", f"{name} is set by the API itself", field)
        extra.append((name, value))

    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    if groups["to"]:
        msg["To"] = groups["to"]
    if groups["cc"]:
        msg["Cc"] = groups["cc"]
    if groups["reply_to"]:
        msg["Reply-To"] = groups["reply_to"]
    msg["Subject"] = req.subject
    msg["Date"] = date
    msg["Message-ID"] = message_id
    for name, value in extra:
        msg[name] = value
    if req.text is not None or req.html is None:
        msg.set_content(req.text or "", cte=_cte(req.text or ""))
        if req.html is not None:
            msg.add_alternative(req.html, subtype="html", cte=_cte(req.html))
    else:
        msg.set_content(req.html, subtype="html", cte=_cte(req.html))
    infos: list[AttachmentInfo] = []
    for i, att in enumerate(req.attachments):
        field = f"attachments[{i}]"
        _one_line(att.filename, f"{field}.filename")
        _one_line(att.content_type, f"{field}.content_type")
        if not _CONTENT_TYPE.fullmatch(att.content_type):
            raise ApiError(422, "invalid", "not a MIME type", f"{field}.content_type")
        try:
            content = base64.b64decode(att.content, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "invalid_base64", "not base64", f"{field}.content") from None
        maintype, _, subtype = att.content_type.lower().partition("/")
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=att.filename)
        infos.append(
            AttachmentInfo(
                att.filename, att.content_type.lower(), len(content),
                hashlib.sha256(content).hexdigest(),
            )
        )  # fmt: skip
    return Built(msg.as_bytes(), sender.addr_spec, recipients, tuple(infos), req.requiretls)


def _cte(text: str) -> str:
    # Always 7-bit on the wire: no 8BITMIME or SMTPUTF8 needed from any MX after us, and the
    # DKIM signature survives a relay that would down-convert.
    return (
        "7bit"
        if text.isascii() and all(len(x) <= 998 for x in text.splitlines())
        else ("quoted-printable")
    )


def read_raw(data: bytes) -> Built:
    """A message/rfc822 body: its envelope from From:, To:, Cc: and Bcc: (whose field is then
    removed, as `sendmail -t` does). A body with LF line ends only is given CRLF ones."""
    if b"\r" not in data:
        data = data.replace(b"\n", b"\r\n")
    try:
        section = headers.read(data)
    except headers.HeaderError as exc:
        raise ApiError(422, "invalid_message", exc.reply[10:]) from None
    from_fields = section.all("From")
    authors = email.utils.getaddresses([f.unfolded() for f in from_fields])
    if len(from_fields) != 1 or len(authors) != 1 or split_address(authors[0][1]) is None:
        raise ApiError(422, "invalid_message", "the message needs one From: with one address")
    recipients: list[str] = []
    for name in ("To", "Cc", "Bcc"):
        for _, addr in email.utils.getaddresses([f.unfolded() for f in section.all(name)]):
            if split_address(addr) is None:
                raise ApiError(422, "invalid_address", f"not an address in {name}: {addr!r}")
            recipients.append(addr)
    if not recipients:
        raise ApiError(422, "no_recipients", "the message has no To:, Cc: or Bcc: address")
    message = section.message
    if section.all("Bcc"):
        head = header_block(message)
        kept = [f for f in section.fields if f.name.lower() != b"bcc"]
        message = b"".join(f.name + b":" + f.value + b"\r\n" for f in kept) + message[len(head) :]
    return Built(message, authors[0][1], tuple(recipients))
