"""What an operator sees of each message: the events behind `mailrelay log` and `mailrelay queue
show`, recorded from real deliveries and refusals."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mailrelay import cli
from mailrelay.logs import JsonFormatter
from mailrelay.store import connect, events
from tests.conftest import Relay, RelayFactory
from tests.test_delivery import settled, start_relay, submit
from tests.test_submission import MESSAGE, SENDER_NOT_OWNED, queued_id, send_raw
from tests.world import MODERN, World

FIRST_ADDRESS = "127.0.40.1"  # this file's MX servers: 127.0.40.x
BAD_RCPT_REPLY = "501 5.1.3 Bad address syntax"
FROM_NOT_OWNED_REPLY = "553 5.7.1 From: header address not owned by the authenticated user"
EVENT_KEYS = {
    "at", "queue_id", "recipient", "domain", "event", "mx", "reply", "tls_protocol", "tls_cipher",
    "policy", "policy_detail",
}  # fmt: skip


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path / "world", first_address=FIRST_ADDRESS) as w:
        await w.add_mx("example.org", MODERN)  # the sender's domain: bounces go here
        yield w


# ---- events: mailrelay log and queue show ------------------------------------------------------


def run_cli(relay: Relay, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`mailrelay --config FILE ARGV...` in this process, against the relay's database."""
    config = Path(relay.config.storage.path).parent / "cli.toml"
    config.write_text(f"[storage]\npath = {json.dumps(relay.config.storage.path)}\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main(["--config", str(config), *argv])
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def log_json(relay: Relay, capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    status, out, err = run_cli(relay, capsys, "log", "--json", *argv)
    assert (status, err) == (0, "")
    page: dict[str, Any] = json.loads(out)
    return page


def story(page: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(e["queue_id"], e["recipient"], e["event"]) for e in page["events"]]


def when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def refuse_one_rcpt(relay: Relay) -> None:
    client = relay.session()
    try:
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt("no-at-sign")[0] == 501
    finally:
        client.quit()


async def test_log_tells_a_real_delivery_newest_first_and_pages(
    tmp_path: Path,
    relay_factory: RelayFactory,
    world: World,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    mx = await world.add_mx("tls13.example", MODERN)
    relay = await start_relay(tmp_path, relay_factory, world)
    with caplog.at_level(logging.INFO, logger="mailrelay.delivery"):
        first = await asyncio.to_thread(submit, relay, ["bob@tls13.example"])
        await settled(relay, first, lambda r: r["state"] == "sent")
    middle = time.time()
    rcpts = ["carol@tls13.example", "dave@example.org", "erin@tls13.example"]
    second = await asyncio.to_thread(submit, relay, rcpts)
    await settled(relay, second, lambda r: r["state"] == "sent")

    page = log_json(relay, capsys)
    assert page["next_cursor"] is None
    everything = story(page)
    # Newest first; per recipient, the story reads QUEUED then DELIVERED.
    assert everything[-2:] == [
        (first, "bob@tls13.example", "DELIVERED"),
        (first, "bob@tls13.example", "QUEUED"),
    ]
    assert sorted(everything[:3]) == [(second, r, "DELIVERED") for r in sorted(rcpts)]
    assert everything[3:6] == [(second, r, "QUEUED") for r in reversed(rcpts)]
    assert len(everything) == 8
    delivered = page["events"][-2]
    assert set(delivered) == EVENT_KEYS
    assert {k: v for k, v in delivered.items() if k != "at"} == {
        "queue_id": first,
        "recipient": "bob@tls13.example",
        "domain": "tls13.example",
        "event": "DELIVERED",
        "mx": mx.hostname,
        "reply": "2.0.0 smtp; 250 2.0.0 Message accepted",
        "tls_protocol": "TLSv1.3",
        "tls_cipher": "TLS_AES_256_GCM_SHA384",
        "policy": "encrypt",
        "policy_detail": None,
    }
    assert page["events"][-1]["at"] <= delivered["at"] < middle

    # Filters.
    assert story(log_json(relay, capsys, "--domain", "Example.ORG")) == [
        (second, "dave@example.org", "DELIVERED"),
        (second, "dave@example.org", "QUEUED"),
    ]
    assert [e for _, _, e in story(log_json(relay, capsys, "--status", "delivered"))] == [
        "DELIVERED"
    ] * 4
    since = datetime.datetime.fromtimestamp(middle).isoformat()
    assert {q for q, _, _ in story(log_json(relay, capsys, "--since", since))} == {second}
    assert story(log_json(relay, capsys, "--since", "1h")) == everything
    assert log_json(relay, capsys, "--status", "hard-bounce") == {"events": [], "next_cursor": None}

    # Paging: no overlap, no gap, even when newer events arrive between pages.
    one = log_json(relay, capsys, "--limit", "3")
    assert story(one) == everything[:3] and one["next_cursor"] is not None
    await asyncio.to_thread(refuse_one_rcpt, relay)
    await relay.service.submission.handler.flush()
    two = log_json(relay, capsys, "--limit", "3", "--cursor", one["next_cursor"])
    assert story(two) == everything[3:6] and two["next_cursor"] is not None
    three = log_json(relay, capsys, "--limit", "3", "--cursor", two["next_cursor"])
    assert story(three) == everything[6:] and three["next_cursor"] is None
    assert story(log_json(relay, capsys, "--limit", "1"))[0][2] == "REFUSED"

    # Plain output: one Postfix-like line per event; a next page is announced on stderr.
    [newest] = log_json(relay, capsys, "--domain", "tls13.example", "--limit", "1")["events"]
    status, out, err = run_cli(relay, capsys, "log", "--domain", "tls13.example", "--limit", "1")
    assert (status, out) == (
        0,
        f"{when(newest['at'])} {second}: to=<{newest['recipient']}>, DELIVERED, mx={mx.hostname},"
        " tls=TLSv1.3/TLS_AES_256_GCM_SHA384, policy=encrypt"
        " (2.0.0 smtp; 250 2.0.0 Message accepted)\n",
    )
    cursor = log_json(relay, capsys, "--domain", "tls13.example", "--limit", "1")["next_cursor"]
    assert err == f"more: --cursor {cursor}\n"
    assert run_cli(relay, capsys, "log", "--since", "yesterday")[0] == 1
    assert run_cli(relay, capsys, "log", "--status", "lost")[0] == 1
    assert run_cli(relay, capsys, "log", "--cursor", "x")[0] == 1

    # The delivery's log line, as journald gets it in JSON.
    [line] = [r for r in caplog.records if r.getMessage().startswith("event=delivery ")]
    fields = json.loads(JsonFormatter().format(line))
    assert fields["delay"] == f"{float(fields['delay']):.1f}" and float(fields["delay"]) >= 0
    assert {k: fields[k] for k in ("event", "queue_id", "domain", "tls", "cipher", "status")} == {
        "event": "delivery",
        "queue_id": first,
        "domain": "tls13.example",
        "tls": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
        "status": "sent",
    }
    assert fields["mx"] == f"{mx.hostname}[{mx.address[0]}]"
    assert fields["reply"] == "smtp; 250 2.0.0 Message accepted"
    assert "bob@" not in line.getMessage()


async def test_refusals_at_submission_are_recorded(
    relay: Relay, capsys: pytest.CaptureFixture[str]
) -> None:
    def converse() -> tuple[str, tuple[int, bytes], tuple[int, bytes]]:
        client = relay.session()
        try:
            # A transaction that is accepted after one of its recipients was refused.
            client.mail("alice@example.org")
            assert client.rcpt("bob@example.net")[0] == 250
            assert client.rcpt("bob@example")[0] == 501
            assert client.docmd("DATA")[0] == 354
            client.send(MESSAGE + b".\r\n")
            accepted = queued_id(client.getreply())
            # A DATA refused as a whole: each recipient given is refused.
            foreign = MESSAGE.replace(b"<alice@example.org>", b"<mallory@elsewhere.example>")
            rcpts = ["x@a.example", "y@b.example"]
            refused = send_raw(client, "alice@example.org", rcpts, foreign + b".\r\n")
            # A MAIL refused: no recipient yet, so nothing for the events table.
            mail = client.docmd("MAIL", "FROM:<alice@elsewhere.example>")
            return accepted, refused, mail
        finally:
            client.quit()

    accepted, refused, mail = await asyncio.to_thread(converse)
    assert refused[0] == 553 and mail == SENDER_NOT_OWNED
    await relay.service.submission.handler.flush()

    page = log_json(relay, capsys, "--status", "refused")
    assert [(e["recipient"], e["domain"], e["reply"]) for e in page["events"]] == [
        ("y@b.example", "b.example", FROM_NOT_OWNED_REPLY),
        ("x@a.example", "a.example", FROM_NOT_OWNED_REPLY),
        ("bob@example", "example", BAD_RCPT_REPLY),
    ]
    # The DATA-refused transaction's two share an id no message has; the third is the message's.
    [never, never_too, in_accepted] = [e["queue_id"] for e in page["events"]]
    assert never == never_too != accepted == in_accepted
    assert all(e["mx"] is None and e["tls_protocol"] is None for e in page["events"])

    # `queue show` of the accepted message names the recipient refused in its transaction.
    status, out, _ = run_cli(relay, capsys, "queue", "show", accepted, "--json")
    shown = json.loads(out)
    [queued] = shown["recipients"][0]["events"]
    [refusal] = shown["refused"][0]["events"]
    assert (status, shown["removed"], shown["refused"]) == (
        0,
        False,
        [{"address": "bob@example", "events": [refusal]}],
    )
    assert {k: v for k, v in refusal.items() if k != "at"} == {
        "event": "REFUSED",
        "mx": None,
        "reply": BAD_RCPT_REPLY,
        "tls_protocol": None,
        "tls_cipher": None,
        "policy": None,
        "policy_detail": None,
    }
    assert run_cli(relay, capsys, "queue", "show", accepted) == (
        0,
        f"message {accepted} from alice@example.org ({shown['size']} bytes)\n"
        f"  accepted {when(shown['created_at'])} from user alice@example.org\n"
        "  bob@example.net: queued after 0 attempt(s)\n"
        f"    {when(queued['at'])} QUEUED\n"
        "  bob@example:\n"
        f"    {when(refusal['at'])} REFUSED ({BAD_RCPT_REPLY})\n",
        "",
    )
    # Deleted, it still has its story.
    assert run_cli(relay, capsys, "queue", "delete", accepted)[0] == 0
    assert run_cli(relay, capsys, "queue", "show", accepted) == (
        0,
        f"message {accepted} was deleted from the queue; what the events record:\n"
        "  bob@example.net:\n"
        f"    {when(queued['at'])} QUEUED\n"
        "  bob@example:\n"
        f"    {when(refusal['at'])} REFUSED ({BAD_RCPT_REPLY})\n",
        "",
    )
    # ... and of the refused transaction, what its events record.
    status, out, _ = run_cli(relay, capsys, "queue", "show", never.lower(), "--json")
    shown = json.loads(out)
    assert (status, shown["id"], shown["removed"], shown["recipients"]) == (0, never, False, [])
    assert [(r["address"], [e["event"] for e in r["events"]]) for r in shown["refused"]] == [
        ("x@a.example", ["REFUSED"]),
        ("y@b.example", ["REFUSED"]),
    ]
    status, out, err = run_cli(relay, capsys, "queue", "show", "0123456789ABCDEF")
    assert (status, out) == (1, "")
    assert err == "mailrelay: no message or refusal with id 0123456789ABCDEF\n"


def test_parse_since() -> None:
    now = 1_750_000_000.0
    assert events.parse_since("90m", now) == now - 5400
    assert events.parse_since("2d", now) == now - 2 * 86400
    assert events.parse_since("2025-03-01T09:30:00+01:00", now) == 1740817800.0
    assert events.parse_since("2025-03-01T08:30:00Z", now) == 1740817800.0
    local_midnight = datetime.datetime(2025, 3, 1).timestamp()
    assert events.parse_since("2025-03-01", now) == local_midnight
    for bad in ("yesterday", "1y", "-1h", ""):
        with pytest.raises(ValueError, match="--since"):
            events.parse_since(bad, now)


def test_log_query_on_an_empty_database() -> None:
    conn = connect(":memory:")
    assert events.query(conn).to_json() == {"events": [], "next_cursor": None}
    with pytest.raises(ValueError, match="limit"):
        events.query(conn, limit=0)
    with pytest.raises(ValueError, match="unknown status 'SENT'"):
        events.query(conn, status="SENT")
