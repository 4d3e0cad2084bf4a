"""One SMTP reply as a receiving server sent it, and what its code means for delivery."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailrelay.delivery.result import Kind

_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")


@dataclass(frozen=True)
class Reply:
    """Code, RFC 3463 enhanced code if given, and the text."""

    code: int
    enhanced: str | None
    text: str  # continuation lines joined with "\n", each without its enhanced code

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        match = _ENHANCED.match(message)
        if match is None:
            return cls(code, None, message)
        enhanced = match.group(1)
        lines = [line.removeprefix(enhanced).strip() for line in message.split("\n")]
        return cls(code, enhanced, "\n".join(lines))

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
