"""What the submission server adds to a message before queueing it (RFC 6409 section 8)."""

from __future__ import annotations

import email.utils
import re

_HEADER_END = re.compile(rb"\r\n\r\n")


def header_block(data: bytes) -> bytes:
    """The header section of a CRLF message, up to and including its last header line's CRLF."""
    if data.startswith(b"\r\n"):
        return b""
    end = _HEADER_END.search(data)
    return data if end is None else data[: end.start() + 2]


def has_header(data: bytes, name: str) -> bool:
    pattern = re.compile(rb"^" + re.escape(name.encode()) + rb"[ \t]*:", re.IGNORECASE | re.M)
    return pattern.search(header_block(data)) is not None


def add_submission_headers(
    data: bytes,
    *,
    hostname: str,
    queue_id: str,
    now: float,
    authentication_results: str | None = None,
) -> bytes:
    """Prepend Received (and Authentication-Results when given); add Date and Message-ID when the
    client left them out, as a submission server may.

    The Received line names neither the client's address nor its EHLO name: recipients have no
    use for where inside the organisation a message was written, and it is personal data.
    """
    data = drop_forged_authentication_results(data, hostname)
    date = email.utils.formatdate(now, localtime=False, usegmt=True)
    added = [f"Received: by {hostname} (mailrelay) with ESMTPSA id {queue_id}; {date}"]
    if authentication_results:
        added.append(authentication_results)
    if not has_header(data, "Date"):
        added.append(f"Date: {date}")
    if not has_header(data, "Message-ID"):
        added.append(f"Message-ID: <{queue_id}.{int(now)}@{hostname}>")
    return "".join(line + "\r\n" for line in added).encode() + data


_FIELD_START = re.compile(rb"^[^ \t\r\n]")


def drop_forged_authentication_results(data: bytes, authserv_id: str) -> bytes:
    """Remove Authentication-Results fields that claim to come from us (RFC 8601 section 5):
    only this server may say who authenticated here, and a client could otherwise forge it."""
    head = header_block(data)
    lines = head.split(b"\r\n")[:-1]
    kept: list[bytes] = []
    dropping = False
    for line in lines:
        if _FIELD_START.match(line):
            name, _, value = line.partition(b":")
            dropping = (
                name.strip().lower() == b"authentication-results"
                and value.split(b";", 1)[0].strip().lower() == authserv_id.lower().encode()
            )
        if not dropping:
            kept.append(line)
    if len(kept) == len(lines):
        return data
    return b"".join(line + b"\r\n" for line in kept) + data[len(head) :]
