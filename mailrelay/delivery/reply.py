"""One SMTP reply as a receiving server sent it, and what its code means for delivery.

This is where a remote server's text enters: whatever it says ends up in the store, the log
and the bounce, so it is made safe here, once (`server_text`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailrelay.delivery.result import Kind

_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")
# A reply's text (all its lines), in characters. RFC 5321 §4.5.3.1.5 allows 512 octets per reply
# line; a hostile or broken server may send 32 KB (aiosmtplib's limit) in every reply, and each
# would be copied into every event row, log line and bounce.
MAX_TEXT = 512
_ELLIPSIS = "..."  # ASCII: the Diagnostic-Code of a DSN is US-ASCII
# ANSI/VT100 control sequences (colours, cursor moves, "clear screen"): removed whole, so that
# no "[31m" is left behind once the ESC is gone.
_CSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def _char(c: str) -> str:
    # aiosmtplib decodes with surrogateescape: a byte that was not UTF-8 is a lone surrogate,
    # which neither SQLite nor a log line can encode.
    return "\ufffd" if "\ud800" <= c <= "\udfff" else " "


def _line(text: str) -> str:
    """One line of server text: every character Python does not call printable (C0 and C1
    controls such as NUL, ESC, CR, LF and DEL; bidi and other format characters; line and
    paragraph separators) becomes a space, and runs of spaces become one."""
    text = _CSI.sub(" ", text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _char(c) for c in text)
    return " ".join(text.split())


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - len(_ELLIPSIS)].rstrip() + _ELLIPSIS


def server_text(text: str, limit: int = MAX_TEXT) -> str:
    """Text that came from the remote side (a reply, an error quoting one, a certificate's
    names), fit to store, log and quote in a bounce: one printable line of at most `limit`
    characters, cut with "..."."""
    return _cap(_line(text), limit)


@dataclass(frozen=True)
class Reply:
    """Code, RFC 3463 enhanced code if given, and the text."""

    code: int
    enhanced: str | None
    # Continuation lines joined with "\n", each without its enhanced code, and printable (see
    # `server_text`): the "\n" between lines is the only control character left. At most
    # MAX_TEXT characters in all.
    text: str

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        # aiosmtplib joins the lines of a multi-line reply with "\n"; a CR, an LF or anything
        # else inside a line is the server's doing and becomes a space.
        lines = [_line(line) for line in message.split("\n")]
        match = _ENHANCED.match(lines[0])
        enhanced = match.group(1) if match else None
        if enhanced is not None:
            lines = [line.removeprefix(enhanced).strip() for line in lines]
        return cls(code, enhanced, _cap("\n".join(lines), MAX_TEXT))

    @property
    def kind(self) -> Kind:
        """RFC 5321 §4.2.1: 2yz done, 4yz try again later, anything else never."""
        if 200 <= self.code < 300:
            return Kind.SENT
        return Kind.TRANSIENT if 400 <= self.code < 500 else Kind.PERMANENT

    @property
    def status(self) -> str:
        """The enhanced status to record: the server's own if consistent, else a generic one."""
        klass = self.code // 100
        if self.enhanced and self.enhanced[0] == str(klass):
            return self.enhanced
        return f"{klass}.0.0" if klass in (2, 4, 5) else "5.5.0"

    @property
    def diagnostic(self) -> str:
        """The RFC 3464 Diagnostic-Code value."""
        return f"smtp; {self}"

    def __str__(self) -> str:
        text = " ".join(self.text.split())
        return " ".join(str(p) for p in (self.code, self.enhanced, text) if p)
