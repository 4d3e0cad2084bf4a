"""Per-user rates and quotas ([limits] messages_per_minute, recipients_per_hour,
recipients_per_day): checked at MAIL and RCPT, counted in the store with the message (so a
restart forgets nothing and a refused message counts for nothing), and checked once more in the
transaction that queues it. Spoken by smtplib over real TLS to the real server.

The windows are the real clock's minutes, hours and days: a test that needs its messages in one
window waits, if the window is about to end, for the next one to begin (`in_one_window`).
"""

from __future__ import annotations

import asyncio
import math
import re
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest

from mailrelay.store import queue
from mailrelay.store.backend import is_url
from tests.conftest import Relay, RelayFactory, add_user, make_config
from tests.test_submission import MESSAGE, queued_id, send_raw
from tests.test_submission_syntax import refused_events

run = asyncio.to_thread

Reply = tuple[int, bytes]

SENDER_OK = (250, b"2.1.0 Sender ok")
RECIPIENT_OK = (250, b"2.1.5 Recipient ok")
NO_LIMITS = {"messages_per_minute": 0, "recipients_per_hour": 0, "recipients_per_day": 0}


async def in_one_window(seconds: int, needed: float = 10.0) -> None:
    """Return at least `needed` seconds before the current window of `seconds` ends."""
    left = seconds - time.time() % seconds
    if left < needed:
        await asyncio.sleep(left + 0.05)


def try_again(reply: Reply, pattern: bytes, seconds: int, sent: tuple[float, float]) -> int:
    """Check `reply` against `pattern` (whose last group is the seconds to wait) and that the
    wait is what was left of the window while the command was on its way; return it."""
    match = re.fullmatch(pattern + rb"; try again in (\d+) seconds?", reply[1])
    assert match, reply
    wait = int(match.group(match.lastindex or 0))
    before, after = sent
    end = math.floor(before / seconds) * seconds + seconds
    assert max(1, math.ceil(end - after)) <= wait <= math.ceil(end - before), (wait, sent)
    return wait


def limit_refusals(relay: Relay, limit: str) -> float:
    value: float = relay.service.metrics.smtpd_limit_refusals.labels(limit=limit)._value.get()
    return value


def submit(relay: Relay, rcpts: list[str]) -> Reply:
    client = relay.session()
    try:
        return send_raw(client, "alice@example.org", rcpts, MESSAGE + b".\r\n")
    finally:
        client.quit()


def mail(relay: Relay) -> tuple[Reply, tuple[float, float]]:
    client = relay.session()
    try:
        before = time.time()
        reply = client.docmd("MAIL", "FROM:<alice@example.org>")
        return reply, (before, time.time())
    finally:
        client.quit()


@pytest.fixture
def storage(database: str) -> dict[str, str]:
    """The [storage] section on each backend (tests/conftest.py `database`): the counters live
    in the store, and on PostgreSQL the sessions' transactions race there."""
    return {"url": database} if is_url(database) else {}


async def start(
    tmp_path: Path, relay_factory: RelayFactory, storage: dict[str, str], **limits: Any
) -> Relay:
    cfg = make_config(tmp_path, storage=storage, limits={**NO_LIMITS, **limits})
    add_user(cfg, "alice@example.org")
    add_user(cfg, "bob@example.org", "bob's own password")
    return await relay_factory(cfg)


async def test_messages_per_minute_survive_a_restart(
    tmp_path: Path, relay_factory: RelayFactory, storage: dict[str, str]
) -> None:
    first = await start(tmp_path, relay_factory, storage, messages_per_minute=2)
    await in_one_window(60)
    queued_id(await run(submit, first, ["carol@example.net"]))
    await first.service.stop()

    second = await relay_factory(first.config)  # the same database
    queued_id(await run(submit, second, ["carol@example.net"]))
    refused, sent = await run(mail, second)
    assert refused[0] == 451
    try_again(refused, rb"4\.7\.1 alice@example\.org: more than 2 messages a minute", 60, sent)
    assert limit_refusals(second, "messages_per_minute") == 1
    assert len(queue.list_queue(second.db())) == 2

    # Per user: bob has his own count.
    def bob() -> Reply:
        client = second.session("bob@example.org", "bob's own password")
        try:
            return client.docmd("MAIL", "FROM:<bob@example.org>")
        finally:
            client.quit()

    assert await run(bob) == SENDER_OK


async def test_a_refused_message_counts_for_nothing(
    tmp_path: Path, relay_factory: RelayFactory, storage: dict[str, str]
) -> None:
    relay = await start(tmp_path, relay_factory, storage, messages_per_minute=1)
    await in_one_window(60)

    def converse() -> list[Reply]:
        client = relay.session()
        carol = ["carol@example.net"]
        not_ours = MESSAGE.replace(b"From: Alice <alice@example.org>", b"From: bob@example.org")
        got = [
            send_raw(client, "alice@example.org", carol, not_ours + b".\r\n"),  # 553
            send_raw(client, "alice@example.org", carol, MESSAGE + b".\r\n"),  # the one allowed
            client.docmd("MAIL", "FROM:<alice@example.org>"),
        ]
        client.quit()
        return got

    refused, accepted, over = await run(converse)
    assert refused == (553, b"5.7.1 <bob@example.org>: not a sender alice@example.org may use")
    queued_id(accepted)
    assert over[0] == 451 and over[1].startswith(
        b"4.7.1 alice@example.org: more than 1 message a minute; try again in "
    )


async def test_sessions_side_by_side_cannot_both_pass_the_message_rate(
    tmp_path: Path, relay_factory: RelayFactory, storage: dict[str, str]
) -> None:
    relay = await start(tmp_path, relay_factory, storage, messages_per_minute=1)
    await in_one_window(60)

    def converse() -> tuple[Reply, Reply]:
        one, two = relay.session(), relay.session()
        for client, rcpt in ((one, "carol@example.net"), (two, "dave@example.net")):
            # Both see room for one more message at MAIL and RCPT.
            assert client.mail("alice@example.org") == SENDER_OK
            assert client.rcpt(rcpt) == RECIPIENT_OK
        got = []
        for client in (one, two):
            assert client.docmd("DATA")[0] == 354
            client.send(MESSAGE + b".\r\n")
            got.append(client.getreply())
            client.quit()
        return got[0], got[1]

    first, second = await run(converse)
    queued_id(first)
    assert second[0] == 451 and second[1].startswith(
        b"4.7.1 alice@example.org: more than 1 message a minute; try again in "
    )
    assert [m["recipients"] for m in queue.list_queue(relay.db())] == [
        [{"address": "carol@example.net", "state": "queued"}]
    ]
    await relay.service.submission.handler.flush()
    refusal = second[1].decode()
    assert refused_events(relay) == [("dave@example.net", f"451 {refusal}")]
    assert limit_refusals(relay, "messages_per_minute") == 1


async def test_recipients_per_hour_count_the_transaction_and_survive_a_restart(
    tmp_path: Path, relay_factory: RelayFactory, storage: dict[str, str]
) -> None:
    first = await start(tmp_path, relay_factory, storage, recipients_per_hour=3)
    await in_one_window(3600, needed=60)
    queued_id(await run(submit, first, ["bob@example.net", "carol@example.net"]))
    await first.service.stop()
    second = await relay_factory(first.config)

    def converse() -> tuple[list[Reply], tuple[float, float], Reply, Reply, Reply]:
        client = second.session()
        assert client.mail("alice@example.org") == SENDER_OK
        before = time.time()
        rcpts = [
            client.rcpt("dave@example.net"),  # 2 + 1
            client.rcpt("erin@example.net"),  # 2 + 2: one too many
            client.rcpt("dave@Example.NET"),  # dave again: queued once, counted once
        ]
        sent = (before, time.time())
        assert client.docmd("DATA")[0] == 354
        client.send(MESSAGE + b".\r\n")
        accepted = client.getreply()
        mail = client.docmd("MAIL", "FROM:<alice@example.org>")
        frank = client.docmd("RCPT", "TO:<frank@example.net>")
        client.quit()
        return rcpts, sent, accepted, mail, frank

    (dave, erin, dave_again), sent, accepted, mail, frank = await run(converse)
    assert dave == dave_again == RECIPIENT_OK
    assert erin[0] == 452
    try_again(erin, rb"4\.5\.3 alice@example\.org: more than 3 recipients an hour", 3600, sent)
    # The hour's quota is spent; a new transaction may still begin, but adds no one.
    assert mail == SENDER_OK
    assert frank[0] == 452 and frank[1].startswith(erin[1].split(b"; ")[0])
    msg = queue.show(second.db(), queued_id(accepted))
    assert msg is not None
    assert [r["address"] for r in msg["recipients"]] == ["dave@example.net"]  # type: ignore[attr-defined]
    await second.service.submission.handler.flush()
    assert [address for address, _ in refused_events(second)] == [
        "erin@example.net",
        "frank@example.net",
    ]
    assert limit_refusals(second, "recipients_per_hour") == 2


async def test_recipients_per_day(
    tmp_path: Path, relay_factory: RelayFactory, storage: dict[str, str]
) -> None:
    relay = await start(
        tmp_path, relay_factory, storage, recipients_per_hour=10, recipients_per_day=2
    )
    await in_one_window(86400, needed=60)

    def converse() -> tuple[Reply, Reply, tuple[float, float]]:
        client = relay.session()
        accepted = send_raw(
            client,
            "alice@example.org",
            ["bob@example.net", "carol@example.net"],
            MESSAGE + b".\r\n",
        )
        assert client.mail("alice@example.org") == SENDER_OK
        before = time.time()
        refused = client.rcpt("dave@example.net")
        sent = (before, time.time())
        client.quit()
        return accepted, refused, sent

    accepted, refused, sent = await run(converse)
    queued_id(accepted)
    assert refused[0] == 452
    try_again(refused, rb"4\.5\.3 alice@example\.org: more than 2 recipients a day", 86400, sent)
    assert limit_refusals(relay, "recipients_per_day") == 1
    assert limit_refusals(relay, "recipients_per_hour") == 0


async def test_zero_means_no_limit(
    tmp_path: Path, relay_factory: RelayFactory, storage: dict[str, str]
) -> None:
    relay = await start(tmp_path, relay_factory, storage)

    def converse() -> list[Reply]:
        client = relay.session()
        rcpts = [f"r{n}@example.net" for n in range(20)]
        got = [send_raw(client, "alice@example.org", rcpts, MESSAGE + b".\r\n") for _ in range(5)]
        client.quit()
        return got

    for reply in await run(converse):
        queued_id(reply)
    assert relay.db().execute("SELECT count(*) FROM user_usage").fetchone()[0] == 0


async def test_two_instances_on_one_database_count_together(
    tmp_path: Path, relay_factory: RelayFactory, pg_url: str
) -> None:
    """Two relays on one PostgreSQL (issue 16): a session on each passes MAIL and RCPT, then
    both send DATA at once. Their writers' transactions race for the user's counters; the row
    lock that the count takes makes the second one see the first, so exactly one is queued."""
    limits = {**NO_LIMITS, "messages_per_minute": 1}
    storage = {"url": pg_url}
    a = make_config(tmp_path / "a", storage=storage, limits=limits, instance={"id": "relay-a"})
    b = make_config(tmp_path / "b", storage=storage, limits=limits, instance={"id": "relay-b"})
    add_user(a, "alice@example.org")
    relays = [await relay_factory(a), await relay_factory(b)]
    await in_one_window(60)

    def open_transaction(relay: Relay, rcpt: str) -> smtplib.SMTP:
        client = relay.session()
        assert client.mail("alice@example.org") == SENDER_OK
        assert client.rcpt(rcpt) == RECIPIENT_OK
        assert client.docmd("DATA")[0] == 354
        return client

    def finish(client: smtplib.SMTP) -> Reply:
        try:
            client.send(MESSAGE + b".\r\n")
            return client.getreply()
        finally:
            client.close()

    clients = [
        await run(open_transaction, relay, rcpt)
        for relay, rcpt in zip(relays, ("carol@example.net", "dave@example.net"), strict=True)
    ]
    replies = await asyncio.gather(*(run(finish, client) for client in clients))
    assert sorted(code for code, _ in replies) == [250, 451]
    refused = next(text for code, text in replies if code == 451)
    assert refused.startswith(b"4.7.1 alice@example.org: more than 1 message a minute; try again")
    assert len(queue.list_queue(relays[0].db())) == 1
    refusals = [limit_refusals(relay, "messages_per_minute") for relay in relays]
    assert sorted(refusals) == [0, 1]
