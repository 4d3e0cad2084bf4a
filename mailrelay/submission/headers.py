"""The header section of a submitted message read as RFC 5322 section 2.2 defines it: every line
a field (a name, then a colon) or the folded continuation of the field above it.

Other readers each forgive something different: Python's email parser takes `From : x` for a
misplaced mbox separator and leaves it out, dkimpy drops any line starting "From " and raises on
one without a colon, and a leading folded line continues whatever field a relay puts above it.
A message they would read differently is refused here, so that what we check, what we sign and
what the recipient reads are the same fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailrelay.submission import replies
from mailrelay.submission.message import header_block

# ftext (RFC 5322 section 3.6.8), then the white space section 4.5 still allows before the colon.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)([ \t]*):")


@dataclass(frozen=True)
class Field:
    name: bytes
    """As written, without the obsolete white space before the colon."""
    value: bytes
    """Everything after the colon, folding kept (CRLF before each continuation line)."""

    def unfolded(self) -> str:
        return self.value.replace(b"\r\n", b"").decode("utf-8", "replace")


class HeaderError(ValueError):
    """The header section is not RFC 5322; `reply` says where and why."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class HeaderSection:
    fields: list[Field]
    message: bytes
    """The message with each obsolete `Name :` written `Name:`: the same field (section 4.5),
    in the syntax every reader after us parses alike, dkimpy's among them."""

    def all(self, name: str) -> list[Field]:
        wanted = name.lower().encode()
        return [f for f in self.fields if f.name.lower() == wanted]


def read(message: bytes) -> HeaderSection:
    """The fields of `message` (CRLF line ends; a bare CR or LF was refused before).

    Raises HeaderError for a line that is neither a field nor a continuation, and for a first
    line that is a continuation. A message without an empty line is all header section.
    """
    head = header_block(message)
    lines = head.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()  # what follows the last CRLF
    # Each field as its name and value pieces, joined once at the end: joining as we go would
    # be quadratic in a header of thousands of continuation lines.
    pieces: list[tuple[bytes, list[bytes]]] = []
    written: list[bytes] = []
    obsolete = False
    for number, line in enumerate(lines, 1):
        if line[:1] in (b" ", b"\t"):
            if not pieces:
                raise HeaderError(replies.HEADER_STARTS_FOLDED)
            pieces[-1][1].append(line)
            written.append(line)
            continue
        match = _FIELD.match(line)
        if match is None:
            raise HeaderError(replies.HEADER_NOT_A_FIELD.format(line=number))
        name, value = match.group(1), line[match.end() :]
        pieces.append((name, [value]))
        obsolete = obsolete or bool(match.group(2))
        written.append(name + b":" + value)
    if obsolete:
        message = b"".join(line + b"\r\n" for line in written) + message[len(head) :]
    fields = [Field(name, b"\r\n".join(value)) for name, value in pieces]
    return HeaderSection(fields, message)
