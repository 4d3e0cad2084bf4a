"""Log lines to stderr for journald: `key=value` by default, one JSON object per line if asked.

Code logs messages already shaped as `event=NAME key=value ...`; the formatters add time, level
and source, and the JSON formatter turns the pairs into fields. When stderr is journald's stream,
each line starts with its syslog priority (`<3>` error ... `<7>` debug), which journald takes off
and keeps as PRIORITY, so that `journalctl -p warning` works.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import sys
import time

from mailrelay.config import LogConfig

_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|\S*)')


def _value(text: str) -> str:
    """A value as written in the line: quoted ones are Python reprs (`%r`) or JSON strings, and
    both are string literals Python can read back, escapes and all."""
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text[1:-1]
        return value if isinstance(value, str) else text[1:-1]
    return text


def _ts(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"ts={_ts(record)} level={record.levelname.lower()} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        fields: dict[str, object] = {"ts": _ts(record), "level": record.levelname.lower()}
        if message.startswith("event="):
            for key, value in _PAIR.findall(message):
                fields[key] = _value(value)
            # Free text beside the pairs, e.g. "event=delivery_held (why)", is kept, not lost.
            rest = " ".join(_PAIR.sub(" ", message).split())
            if rest:
                fields["msg"] = rest
        else:
            fields["msg"] = message
        fields["logger"] = record.name
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return json.dumps(fields)


# syslog(3) priorities by logging level.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalPriority(logging.Formatter):
    """Another formatter's line behind its `<N>` priority prefix (sd-daemon(3))."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{priority}>{self.inner.format(record)}"


def writes_to_journal(stream: object) -> bool:
    """Whether `stream` is the one systemd connected to journald: JOURNAL_STREAM holds its
    "device:inode" (systemd.exec(5)). Checked, not assumed, so that a shell started from the
    service's environment, or output redirected to a file, gets no prefixes."""
    expected = os.environ.get("JOURNAL_STREAM")
    fileno = getattr(stream, "fileno", None)
    if not expected or fileno is None:
        return False
    try:
        st = os.fstat(fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup(config: LogConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (
        JsonFormatter() if config.format == "json" else KeyValueFormatter()
    )
    if writes_to_journal(sys.stderr):
        formatter = JournalPriority(formatter)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # aiosmtpd logs every command line at INFO, AUTH LOGIN responses included (base64 user names
    # and passwords); only its warnings may reach the journal.
    aiosmtpd_log = logging.getLogger("mail.log")
    aiosmtpd_log.setLevel(logging.WARNING)
    aiosmtpd_log.addFilter(_drop_own_deprecation)


def _drop_own_deprecation(record: logging.LogRecord) -> bool:
    # aiosmtpd 1.4.6 sets its own deprecated Session.login_data on every successful AUTH and
    # warns about it; we never read it (see submission.handler.authenticated_user). On the
    # implicit-TLS port it warns at every connection that AUTH does not require TLS: there the
    # whole session is TLS before the first byte, so the warning is wrong, and repeated it would
    # drown the journal.
    return not str(record.msg).startswith(_AIOSMTPD_NOISE)


_AIOSMTPD_NOISE = (
    "Session.login_data is deprecated",
    "auth_required == True but auth_require_tls == False",
)
