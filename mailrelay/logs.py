"""Log lines to stderr for journald: `key=value` by default, one JSON object per line if asked.

Code logs messages already shaped as `event=NAME key=value ...`; the formatters add time, level
and source, and the JSON formatter turns the pairs into fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from mailrelay.config import LogConfig

_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|\S*)')


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
        pairs = _PAIR.findall(message)
        if pairs and message.startswith("event="):
            for key, value in pairs:
                fields[key] = value[1:-1] if value[:1] in "\"'" and len(value) > 1 else value
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
    logging.getLogger("mail.log").setLevel(logging.WARNING)
