"""Every reply the submission server sends, with RFC 3463 enhanced status codes.

aiosmtpd writes some replies itself, several without an enhanced code; `enhance` gives each one
the code it lacks, so that ENHANCEDSTATUSCODES (RFC 2034) holds for every reply we send.
"""

from __future__ import annotations

import re

NEED_STARTTLS = "530 5.7.0 Must issue a STARTTLS command first"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
REQUIRETLS_VALUE = "501 5.5.4 REQUIRETLS takes no value"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
# RFC 4954 section 6: the password could not be checked (the store is down); try again later.
AUTH_TEMPORARY_FAILURE = "454 4.7.0 Temporary authentication failure"
TOO_MANY_AUTH_FAILURES = "421 4.7.0 Too many authentication failures, closing connection"
BAD_ADDRESS = "501 5.1.3 Bad address syntax"
# A path that is not RFC 5321 section 4.1.2 syntax. RFC 3463 has a code for each side: X.1.7
# "bad sender's mailbox address syntax" and X.1.3 "bad destination mailbox address syntax"; the
# generic X.5.4 "invalid command arguments" is kept for what follows a well-formed path.
BAD_SENDER_SYNTAX = "501 5.1.7 Bad sender address syntax"
BAD_RECIPIENT_SYNTAX = "501 5.1.3 Bad recipient address syntax"
BAD_PATH_PARAMETERS = "501 5.5.4 Syntax error in the parameters after the address"
SENDER_NOT_OWNED = "553 5.7.1 Sender address not owned by the authenticated user"
FROM_NOT_OWNED = "553 5.7.1 From: header address not owned by the authenticated user"
FROM_MISSING = "550 5.6.0 Message must have exactly one From: header"
# A header section that is not RFC 5322 section 2.2: refused for good, never with a 4xx that
# would have the client retry the same bytes for days. {line} counts from 1, the client's first.
HEADER_NOT_A_FIELD = "554 5.6.0 Header line {line} is not a header field"
HEADER_STARTS_FOLDED = (
    "554 5.6.0 Header line 1 starts with white space: it continues no header field"
)
DOMAIN_NOT_VERIFIED = (
    "550 5.7.1 Sending domain {domain} is not verified; run: mailrelay domain check {domain}"
)
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
BARE_LINE_ENDING = "554 5.5.2 Message refused: bare CR or LF in DATA (RFC 5321 section 2.3.8)"
LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 section 4.5.3.1.6)"
QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
NOT_QUEUED = "451 4.3.0 Local error: message not queued, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
# Connection caps ([limits], like Postfix's anvil), answered before anything else; then closed.
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections to this server, try again later"
TOO_MANY_CONNECTIONS_FROM_CLIENT = (
    "421 4.7.0 Too many connections from your address, try again later"
)
TOO_MANY_UNAUTHENTICATED = (
    "421 4.7.0 Too many unauthenticated connections from your address, try again later"
)
# RFC 3463 X.4.2 "bad connection": the session ends for want of the client's bytes.
PRE_AUTH_TIMEOUT = "421 4.4.2 Not authenticated in time, closing connection"
TIMEOUT = "421 4.4.2 Timeout exceeded, closing connection"
DATA_TOO_SLOW = "421 4.4.2 Message data too slow, closing connection"
INTERNAL_ERROR = "451 4.3.0 Internal error"
# The store could not be read or written (PostgreSQL restarting, a full disk): nothing was taken.
STORE_UNAVAILABLE = "451 4.3.0 Local error: the database is unavailable, try again later"

# aiosmtpd's own wording, replaced by ours where the code itself should differ.
_REPLACE = {
    "530 Must issue a STARTTLS command first": NEED_STARTTLS,
    "553 5.1.3 Error: malformed address": BAD_ADDRESS,
    "552 Error: Too much mail data": TOO_BIG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": LINE_TOO_LONG,
}

_DEFAULT_ENHANCED = {
    "220": "2.0.0",
    "221": "2.0.0",
    "235": "2.7.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "421": "4.3.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "538": "5.7.11",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.7.0",
    "555": "5.5.4",
}

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(\s|$)")


def enhance(reply: str) -> str:
    """Add the enhanced status code a 2xx/4xx/5xx reply line lacks (3xx replies carry none)."""
    reply = _REPLACE.get(reply, reply)
    if len(reply) < 3 or reply[0] not in "245" or _HAS_ENHANCED.match(reply):
        return reply
    code, sep, text = reply[:3], reply[3:4] or " ", reply[4:]
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code[0]}.0.0")
    return f"{code}{sep}{enhanced} {text}".rstrip()
