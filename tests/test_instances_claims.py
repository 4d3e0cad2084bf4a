"""Several instances on one database (issue 16), at the store: claims carry the instance and a
lease, a start releases only the instance's own claims, an expired lease is taken back by
another instance, and (PostgreSQL) a commit that queues mail wakes every listening instance.
The processes themselves are in test_instances.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mailrelay import config as configmod
from mailrelay.config import ConfigError
from mailrelay.delivery.result import Evidence, Kind
from mailrelay.store import claims, connect, queue
from mailrelay.store.backend import Connection, dialect
from mailrelay.store.listen import QueueListener
from mailrelay.store.queue import transaction

T0 = 1_000_000.0
LEASE = 100.0


def _queue(conn: Connection, count: int) -> None:
    with transaction(conn):
        for n in range(count):
            message = queue.NewMessage(
                sender="alice@example.org",
                recipients=(f"r{n}@dest.example",),
                data=b"Subject: x\r\n\r\nhi\r\n",
                auth_user="alice@example.org",
                client_ip="127.0.0.1",
                sender_domain="example.org",
            )
            queue.enqueue(conn, message, T0 - count + n)  # r0 is due first, then r1, ...


def _claim(conn: Connection, instance: str, now: float, limit: int = 100) -> list[claims.Job]:
    with transaction(conn):
        claims.recover_expired(conn, now, instance)
        return claims.claim_due(conn, now, limit, instance, now + LEASE)


def _holders(conn: Connection) -> list[tuple[str, object]]:
    return [
        (r["state"], r.get("claimed_by"))
        for m in queue.list_queue(conn)
        for r in m["recipients"]  # type: ignore[attr-defined]
    ]


def test_a_claim_names_its_instance_and_lease(database: str) -> None:
    conn = connect(database)
    _queue(conn, 2)
    [job] = _claim(conn, "relay-a", T0, limit=1)
    listed = [r for m in queue.list_queue(conn) for r in m["recipients"]]  # type: ignore[attr-defined]
    assert listed == [
        {"address": "r0@dest.example", "state": "active", "claimed_by": "relay-a",
         "lease_until": T0 + LEASE},
        {"address": "r1@dest.example", "state": "queued"},
    ]  # fmt: skip
    assert job.recipients[0].attempts == 1 and not job.recipients[0].interrupted


def test_a_start_releases_only_the_instances_own_claims(database: str) -> None:
    conn = connect(database)
    _queue(conn, 3)
    _claim(conn, "relay-a", T0, limit=1)
    _claim(conn, "relay-b", T0, limit=1)
    # A claim from before claims named their instance (one instance then): any start owns it.
    with transaction(conn):
        conn.execute(
            "UPDATE recipients SET state = 'active', attempts = 1, claimed_at = ?"
            " WHERE address = 'r2@dest.example'",
            (T0,),
        )
    with transaction(conn):
        released = claims.release_interrupted(conn, T0 + 1, "relay-a")
    if dialect(conn) == "sqlite":
        # One service per SQLite file (its lock): every claim is its own, whatever id it names.
        assert released == 3
        return
    assert released == 2
    assert _holders(conn) == [("deferred", None), ("active", "relay-b"), ("deferred", None)]
    # What relay-a released goes again as interrupted, its first attempt counted.
    jobs = _claim(conn, "relay-a", T0 + 1)
    assert sorted((r.address, r.attempts, r.interrupted) for j in jobs for r in j.recipients) == [
        ("r0@dest.example", 2, True),
        ("r2@dest.example", 2, True),
    ]


def test_an_expired_lease_is_taken_back_by_another_instance_only(database: str) -> None:
    conn = connect(database)
    _queue(conn, 1)
    _claim(conn, "relay-a", T0)
    # Before the lease runs out nobody takes it; after, not relay-a itself (it may still be
    # recording it: its own next start releases it), but another instance does.
    assert _claim(conn, "relay-b", T0 + LEASE - 1) == []
    assert _claim(conn, "relay-a", T0 + LEASE + 1) == []
    [job] = _claim(conn, "relay-b", T0 + LEASE + 1)
    [recipient] = job.recipients
    assert (recipient.attempts, recipient.interrupted) == (2, True)
    assert _holders(conn) == [("active", "relay-b")]


def test_recording_an_attempt_ends_the_claim(database: str) -> None:
    conn = connect(database)
    _queue(conn, 1)
    [job] = _claim(conn, "relay-a", T0)
    update = claims.RecipientUpdate(
        job.recipients[0].id, "r0@dest.example", "deferred", "4.4.1", "later", T0 + 60, ()
    )
    with transaction(conn):
        assert claims.record(conn, job.message_id, [update], T0 + 1, "relay-a") == []
    row = conn.execute("SELECT state, claimed_by, lease_until FROM recipients").fetchone()
    assert tuple(row) == ("deferred", None, None)
    # A deferred recipient is nobody's: a lease that would have run out takes nothing back.
    with transaction(conn):
        assert claims.recover_expired(conn, T0 + 2 * LEASE, "relay-b") == 0


def test_a_record_after_the_lease_leaves_the_other_instances_claim_alone(database: str) -> None:
    """relay-a's record arrives after its lease ran out and relay-b took the recipient back and
    is delivering it: the attempt and its event are kept as history, the state is relay-b's."""
    conn = connect(database)
    _queue(conn, 1)
    [mine] = _claim(conn, "relay-a", T0)
    [theirs] = _claim(conn, "relay-b", T0 + LEASE + 1)
    assert theirs.recipients[0].id == mine.recipients[0].id

    def sent(job: claims.Job, mx: str) -> claims.RecipientUpdate:
        evidence = Evidence(T0 + 5, Kind.SENT, mx, "127.0.0.9", "250 ok")
        recipient = job.recipients[0]
        return claims.RecipientUpdate(
            recipient.id, recipient.address, "sent", "2.0.0", "250 ok", None, (evidence,)
        )

    with transaction(conn):
        stale = claims.record(
            conn, mine.message_id, [sent(mine, "mx-a")], T0 + LEASE + 2, "relay-a"
        )
    assert stale == [mine.recipients[0].id]
    assert _holders(conn) == [("active", "relay-b")]
    body = "SELECT data IS NULL FROM messages"
    assert conn.execute(body).fetchone()[0] == 0  # relay-b still needs it
    with transaction(conn):
        done = claims.record(
            conn, theirs.message_id, [sent(theirs, "mx-b")], T0 + LEASE + 3, "relay-b"
        )
    assert done == []
    assert _holders(conn) == []  # sent: the queue is empty
    assert conn.execute(body).fetchone()[0] == 1
    attempts = conn.execute("SELECT mx_host FROM attempts ORDER BY id").fetchall()
    assert [a[0] for a in attempts] == ["mx-a", "mx-b"]  # both happened, both are kept
    events = conn.execute("SELECT event FROM events ORDER BY id").fetchall()
    assert [e[0] for e in events] == ["QUEUED", "DELIVERED", "DELIVERED"]
    conn.close()


def test_instance_config() -> None:
    parsed = configmod.parse(
        {"instance": {"id": "relay-2", "lease_margin": "30s"}, "delivery": {"poll_interval": 60}},
        base_dir=Path("/"),
    )
    assert (parsed.instance.id, parsed.instance.lease_margin) == ("relay-2", 30.0)
    assert parsed.delivery.poll_interval == 60.0
    with pytest.raises(ConfigError) as raised:
        configmod.parse({"instance": {"id": "two words"}}, base_dir=Path("/"))
    assert str(raised.value).startswith("instance.id: 'two words' is not")


async def test_a_commit_that_queues_mail_wakes_every_listener(pg_url: str) -> None:
    conn = connect(pg_url)
    woken = [asyncio.Event(), asyncio.Event()]
    listeners = [QueueListener(pg_url, event.set) for event in woken]
    for listener in listeners:
        await listener.start()
    try:
        # Nothing is sent for a transaction that rolls back.
        with pytest.raises(RuntimeError), transaction(conn):
            _queue_in(conn)
            raise RuntimeError("rolled back")
        await asyncio.sleep(1.0)
        assert not any(event.is_set() for event in woken)
        await asyncio.to_thread(_queue, conn, 3)  # one commit, three messages: one wake each
        async with asyncio.timeout(10):
            for event in woken:
                await event.wait()
        await asyncio.sleep(0.5)
        assert [listener.notifications for listener in listeners] == [1, 1]
    finally:
        for listener in listeners:
            await listener.stop()
        conn.close()


def _queue_in(conn: Connection) -> None:
    queue.enqueue(
        conn,
        queue.NewMessage(
            sender="alice@example.org",
            recipients=("x@dest.example",),
            data=b"Subject: x\r\n\r\nhi\r\n",
            auth_user="alice@example.org",
            client_ip="127.0.0.1",
            sender_domain="example.org",
        ),
        time.time(),
    )
