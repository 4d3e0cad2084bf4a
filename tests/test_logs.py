"""Log lines as journald receives them: key=value by default, one JSON object per line if asked."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator

import pytest

from mailrelay import logs
from mailrelay.config import LogConfig
from mailrelay.delivery.runner import DELIVERY_LINE
from mailrelay.logs import JsonFormatter, KeyValueFormatter

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# The queue runner's delivery line, with the arguments it passes.
DELIVERY = DELIVERY_LINE
DELIVERY_ARGS = (
    "3F2A9C0D11E4B765",
    "example.net",
    "mx1.example.net[192.0.2.25]",
    "TLSv1.3",
    "TLS_AES_256_GCM_SHA384",
    "encrypt",
    "sent",
    "2.0.0",
    1.25,
    1,
    "smtp; 250 2.0.0 Ok: queued as 4XyZ",
    "",
)


def record(msg: str, *args: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.getLogger("mailrelay.delivery").makeRecord(
        "mailrelay.delivery", level, __file__, 1, msg, args, None
    )


def as_json(rec: logging.LogRecord) -> dict[str, object]:
    line = JsonFormatter().format(rec)
    assert "\n" not in line  # one object per line, whatever the values hold
    fields: dict[str, object] = json.loads(line)
    assert TS.match(str(fields.pop("ts")))
    return fields


def test_delivery_line_as_json_has_every_field() -> None:
    assert as_json(record(DELIVERY, *DELIVERY_ARGS)) == {
        "level": "info",
        "event": "delivery",
        "queue_id": "3F2A9C0D11E4B765",
        "domain": "example.net",
        "mx": "mx1.example.net[192.0.2.25]",
        "tls": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
        "policy": "encrypt",
        "status": "sent",
        "dsn": "2.0.0",
        "delay": "1.2",
        "attempts": "1",
        "reply": "smtp; 250 2.0.0 Ok: queued as 4XyZ",
        "logger": "mailrelay.delivery",
    }


def test_delivery_line_as_key_value() -> None:
    line = KeyValueFormatter().format(record(DELIVERY, *DELIVERY_ARGS))
    ts, rest = line.split(" ", 1)
    assert TS.match(ts.removeprefix("ts="))
    assert rest == (
        "level=info event=delivery queue_id=3F2A9C0D11E4B765 domain=example.net"
        " mx=mx1.example.net[192.0.2.25] tls=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 policy=encrypt"
        " status=sent dsn=2.0.0 delay=1.2 attempts=1 reply='smtp; 250 2.0.0 Ok: queued as 4XyZ'"
    )


@pytest.mark.parametrize(
    "reply",
    ["it's refused", 'say "no"', "both ' and \" and \\ and a\ttab", "line\nbreak", "ünïcode"],
)
def test_quoted_values_come_back_exactly(reply: str) -> None:
    assert as_json(record("event=refused stage=rcpt reply=%r", reply))["reply"] == reply


def test_free_text_beside_the_pairs_is_kept() -> None:
    fields = as_json(record("event=delivery_held (delivery.hold = true: mail is queued, not sent)"))
    assert fields["event"] == "delivery_held"
    assert fields["msg"] == "(delivery.hold = true: mail is queued, not sent)"


def test_a_line_without_pairs_is_a_message() -> None:
    fields = as_json(record("store commit failed: %s", "disk I/O error", level=logging.ERROR))
    assert fields == {
        "level": "error",
        "msg": "store commit failed: disk I/O error",
        "logger": "mailrelay.delivery",
    }


def test_exception_is_one_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("event=delivery_error queue_id=%s", "ABC")
        rec.exc_info = sys.exc_info()
    fields = as_json(rec)
    assert fields["event"] == "delivery_error" and fields["queue_id"] == "ABC"
    assert str(fields["exc"]).endswith("ValueError: boom")
    kv = KeyValueFormatter().format(rec)
    assert "\n" not in kv and kv.endswith('ValueError: boom"')


@pytest.fixture
def restore_logging() -> Iterator[None]:
    # setup() replaces the root logger's handlers, pytest's own capture among them.
    root, aiosmtpd = logging.getLogger(), logging.getLogger("mail.log")
    handlers, level, aiosmtpd_level = root.handlers[:], root.level, aiosmtpd.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    aiosmtpd.setLevel(aiosmtpd_level)


@pytest.mark.usefixtures("restore_logging")
def test_setup_json_writes_one_object_per_line_to_stderr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    logs.setup(LogConfig(format="json", level="info"))
    logging.getLogger("mailrelay.delivery").info(DELIVERY, *DELIVERY_ARGS)
    logging.getLogger("mailrelay.delivery").debug("event=noise")
    logging.getLogger("mail.log").info("AUTH LOGIN secret")  # aiosmtpd: never below warning
    # aiosmtpd's warning about its own use of a deprecated attribute, on every AUTH: dropped.
    logging.getLogger("mail.log").warning(
        "Session.login_data is deprecated and will be removed in version 2.0"
    )
    [line] = stderr.getvalue().splitlines()
    assert json.loads(line)["queue_id"] == "3F2A9C0D11E4B765"
