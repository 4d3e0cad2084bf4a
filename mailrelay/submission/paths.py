"""The argument of MAIL and RCPT read as RFC 5321 section 4.1.2 writes it: a path in angle
brackets, then nothing or ESMTP parameters.

aiosmtpd parses the path with the RFC 5322 header parser, which forgives what SMTP does not: a
missing closing bracket, white space and comments inside or after the brackets, a path that runs
on into other text. This module says what is wrong before aiosmtpd is asked; what it lets
through, aiosmtpd's own parser reads to the same address.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

# RFC 6531 (SMTPUTF8) admits UTF-8 wherever RFC 5321 has atext or a domain label; whether such
# an address is then acceptable is the handler's decision, not a matter of syntax.
_UTF8 = r"[^\x00-\x7f]"
_ATEXT = rf"(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]|{_UTF8})"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED_STRING = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e]|{_UTF8})*"'
_LET_DIG = rf"(?:[A-Za-z0-9]|{_UTF8})"
_LABEL = rf"{_LET_DIG}(?:(?:{_LET_DIG}|-)*{_LET_DIG})?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_MAILBOX = rf"(?:{_DOT_STRING}|{_QUOTED_STRING})@(?:{_DOMAIN}|{_ADDRESS_LITERAL})"
_SOURCE_ROUTE = rf"@{_DOMAIN}(?:,@{_DOMAIN})*:"
_PATH = re.compile(rf"<(?:{_SOURCE_ROUTE})?{_MAILBOX}>")
_NULL_PATH = re.compile(r"<>")
_ESMTP_PARAM = rf"[A-Za-z0-9][A-Za-z0-9-]*(?:=(?:[\x21-\x3c\x3e-\x7e]|{_UTF8})+)?"
_PARAMETERS = re.compile(rf"(?: +{_ESMTP_PARAM})+")


class Problem(enum.Enum):
    PATH = "path"
    """The path itself is not RFC 5321 syntax."""
    PARAMETERS = "parameters"
    """A well-formed path is followed by something that is not ESMTP parameters."""


# RFC 5321 section 4.5.3.1.3: a path is at most 256 octets; more than that is not an address.
_MAX_WRITTEN = 256


@dataclass(frozen=True)
class BadPath:
    problem: Problem
    written: str
    """The path as the client wrote it, to record beside the refusal: the enclosing angle
    brackets removed, control characters replaced (it is shown on operators' terminals), at most
    256 characters."""


def check(arg: str | None, keyword: str, *, null_allowed: bool) -> BadPath | None:
    """What is wrong with `arg` ("FROM:<a@b> SIZE=10") as the argument of MAIL (keyword "FROM:",
    where the null path "<>" is valid syntax) or RCPT ("TO:"); None if nothing is, or if the
    keyword is missing (aiosmtpd answers that with its own usage line).

    One liberty is kept: white space between the keyword and the path, which RFC 5321 does not
    allow but common clients send and Postfix accepts.
    """
    if arg is None or arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword) :].lstrip(" ")
    path = _PATH.match(rest) or (_NULL_PATH.match(rest) if null_allowed else None)
    if path is None:
        return BadPath(Problem.PATH, _written(rest))
    tail = rest[path.end() :]
    if not tail:
        return None
    if not tail.startswith(" "):
        # "<a@b>junk", "<a@b>>": the path runs on into other text.
        return BadPath(Problem.PATH, _written(rest))
    if _PARAMETERS.fullmatch(tail.rstrip(" ")):
        return None
    return BadPath(Problem.PARAMETERS, _written(path.group()))


def _written(text: str) -> str:
    if len(text) >= 2 and text[0] == "<" and text[-1] == ">":
        text = text[1:-1]
    return "".join(c if c.isprintable() else "?" for c in text[:_MAX_WRITTEN])
