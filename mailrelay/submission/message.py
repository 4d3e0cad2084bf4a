"""What the submission server adds to a message before queueing it (RFC 6409 section 8)."""

from __future__ import annotations

import email.utils
import re

import authres

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
    protocol: str = "ESMTPSA",
) -> bytes:
    """Prepend Received (and Authentication-Results when given); add Date and Message-ID when the
    client left them out, as a submission server may.

    The Received line names neither the client's address nor its EHLO name: recipients have no
    use for where inside the organisation a message was written, and it is personal data.

    Each field we add is one line ending in CRLF, and the client's first line must not start
    with white space (the handler refuses such a message first): a continuation line there
    would extend the field above it, ours, with the client's text.

    `protocol` is the Received field's "with" (RFC 5321 section 4.4): ESMTPSA for
    authenticated SMTP submission over TLS (RFC 3848), HTTP or HTTPS for the API.
    """
    if data[:1] in (b" ", b"\t"):
        raise ValueError("the message starts with a continuation line; refuse it before this")
    data = drop_forged_authentication_results(data, hostname)
    date = email.utils.formatdate(now, localtime=False, usegmt=True)
    added = [f"Received: by {hostname} (mailrelay) with {protocol} id {queue_id}; {date}"]
    if authentication_results:
        added.append(authentication_results)
    if not has_header(data, "Date"):
        added.append(f"Date: {date}")
    if not has_header(data, "Message-ID"):
        added.append(f"Message-ID: <{queue_id}.{int(now)}@{hostname}>")
    for field in added:
        if any(c in field for c in "\r\n\0"):
            raise ValueError(f"a field we add must be one line: {field!r}")
    return "".join(line + "\r\n" for line in added).encode() + data


# authres re-matches the rest of a field for each token it reads, about 8 microseconds a
# character: it reads fields up to this size, and this much in all per message. Anything beyond
# (only a hostile client writes so much Authentication-Results) goes to the tokenizer below.
_AUTHRES_FIELD_MAX = 2048
_AUTHRES_BUDGET = 32768


def drop_forged_authentication_results(data: bytes, authserv_id: str) -> bytes:
    """Remove Authentication-Results fields that claim to come from us (RFC 8601 section 5):
    only this server may say who authenticated here, and a client could otherwise forge it.

    "From us" is decided as a receiver would read the field: unfolded, then parsed by authres,
    which skips comments and a version (`relay.test (x) 1; ...`) and compares without case.
    A field authres cannot parse is read by `_claims_id` instead, which leans towards removal.
    """
    head = header_block(data)
    ours = authserv_id.lower().rstrip(".")
    budget = _AUTHRES_BUDGET
    kept: list[list[bytes]] = []
    forged = 0
    for field in _fields(head.split(b"\r\n")[:-1]):
        name, colon, _ = field[0].partition(b":")
        if colon and name.rstrip(b" \t").lower() == b"authentication-results":
            value = b"".join(field)[len(name) + 1 :].decode("utf-8", "replace")  # unfolded
            claimed = None
            if len(value) <= min(_AUTHRES_FIELD_MAX, budget):
                budget -= len(value)
                claimed = _authres_id(value)
            if claimed == ours if claimed is not None else _claims_id(value, ours):
                forged += 1
                continue
        kept.append(field)
    if not forged:
        return data
    return b"".join(line + b"\r\n" for field in kept for line in field) + data[len(head) :]


def _fields(lines: list[bytes]) -> list[list[bytes]]:
    """Header lines grouped into fields: a field's first line and its continuation lines."""
    fields: list[list[bytes]] = []
    for line in lines:
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields


def _authres_id(value: str) -> str | None:
    """The authserv-id authres reads in an unfolded field value, lowercased; None if it cannot
    parse the value (a syntax error, a version it does not know, an id that is no token)."""
    try:
        header = authres.AuthenticationResultsHeader.parse_value(value)
    except Exception:  # authres raises its own errors, and others on odd input; either way: no
        return None
    authserv_id = getattr(header, "authserv_id", None)
    if not isinstance(authserv_id, str) or not _TOKEN.fullmatch(authserv_id):
        # authres reads a dot-atom, which allows "/" and "=": `relay.test/1` is not the token
        # RFC 8601 asks for, and other readers may stop before the "/". Not parsed, then.
        return None
    return authserv_id.lower()


# RFC 2045 token: printable US-ASCII but tspecials (RFC 8601 section 2.2: authserv-id = value).
_TOKEN = re.compile(r'[^\x00-\x20\x7f()<>@,;:\\"/\[\]?=]+')
_WORD = re.compile(r'[^\s()<>,;:\\"\[\]]+')


def _claims_id(value: str, ours: str) -> bool:
    """Whether a field authres could not parse may claim `ours`: its leading value read as RFC
    8601 says (after comments and white space, a token or a quoted string), or `ours` as any word
    before the first semicolon. A receiver may be more lenient than the RFC; the second reading
    covers that, at the cost of removing a broken foreign field that mentions us."""
    leading = _leading_value(value)
    if leading is not None and leading.strip().lower().rstrip(".") == ours:
        return True
    before = value.split(";", 1)[0]
    return any(w.lower().rstrip(".") == ours for w in _WORD.findall(before))


def _leading_value(text: str) -> str | None:
    i = _skip_cfws(text, 0)
    if i is None or i >= len(text):
        return None
    if text[i] == '"':
        out: list[str] = []
        i += 1
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                out.append(text[i + 1])
                i += 2
            elif c == '"':
                return "".join(out)
            else:
                out.append(c)
                i += 1
        return None
    match = _TOKEN.match(text, i)
    return match.group() if match else None


def _skip_cfws(text: str, i: int) -> int | None:
    """The index after white space and (nested, quoted-pair) comments; None if a comment never
    ends."""
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
        elif text[i] == "(":
            depth = 0
            while i < len(text):
                c = text[i]
                if c == "\\":
                    i += 2
                    continue
                depth += c == "("
                depth -= c == ")"
                i += 1
                if depth == 0:
                    break
            if depth:
                return None
        else:
            break
    return i
