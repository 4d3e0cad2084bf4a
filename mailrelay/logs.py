"""Log lines to stderr for journald: `key=value` by default, one JSON object per line if asked.

Code logs messages already shaped as `event=NAME key=value ...`; the formatters add time, level
and source, and the JSON formatter turns the pairs into fields.
"""

from __future__ import annotations

import ast
import json
import logging
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


def setup(config: LogConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else KeyValueFormatter())
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
    # warns about it; we never read it (see submission.handler.authenticated_user).
    return not str(record.msg).startswith("Session.login_data is deprecated")
