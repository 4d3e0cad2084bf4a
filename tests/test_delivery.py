"""Delivery end to end: a message submitted over SMTP leaves only over TLS that meets the policy,
to the MX servers of a real test world (DNS and receivers on loopback)."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.message
import email.policy
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from mailrelay.store import queue
from tests.conftest import Relay, RelayFactory, add_user, make_config
from tests.test_submission import MESSAGE, queued_id, send_raw
from tests.world import (
    CBC_ONLY,
    EXPIRED_CERT,
    GARBAGE_AFTER_STARTTLS,
    MODERN,
    NO_STARTTLS,
    RSA_KEY_EXCHANGE_ONLY,
    STARTTLS_454,
    TLS10_ONLY,
    TLS12_SELF_SIGNED,
    WRONG_HOST_CERT,
    World,
)
from tests.world.mx import MxServer

BODY_MARKER = b"Hello Bob."


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path / "world") as w:
        # The sender's own domain receives the bounces.
        await w.add_mx("example.org", MODERN)
        yield w


def delivery_config(world: World, **delivery: Any) -> dict[str, Any]:
    return {
        "hold": False,
        "port": world.smtp_port,
        "nameservers": world.nameservers,
        "ca_file": str(world.ca_file),
        "dns_timeout": 1,
        "connect_timeout": 5,
        "command_timeout": 10,
        **delivery,
    }


async def start_relay(
    tmp_path: Path, relay_factory: RelayFactory, world: World, **delivery: Any
) -> Relay:
    cfg = make_config(tmp_path, delivery=delivery_config(world, **delivery))
    add_user(cfg, "alice@example.org")
    return await relay_factory(cfg)


def submit(relay: Relay, rcpts: list[str], message: bytes = MESSAGE) -> str:
    client = relay.session()
    try:
        return queued_id(send_raw(client, "alice@example.org", rcpts, message + b".\r\n"))
    finally:
        client.quit()


async def settled(relay: Relay, queue_id: str, done: Callable[[dict[str, Any]], bool]) -> Any:
    """Wait until every recipient of the message satisfies `done`; return the message."""
    deadline = time.monotonic() + 30
    while True:
        msg = queue.show(relay.db(), queue_id)
        assert msg is not None
        if all(done(r) for r in msg["recipients"]):  # type: ignore[attr-defined]
            return msg
        assert time.monotonic() < deadline, msg
        await asyncio.sleep(0.05)


def final_or_deferred(r: dict[str, Any]) -> bool:
    return r["state"] in ("sent", "bounced", "deferred")


def by_address(msg: Any) -> dict[str, dict[str, Any]]:
    return {r["address"]: r for r in msg["recipients"]}


def untouched(mx: MxServer) -> None:
    """The server never saw a MAIL FROM, nor a byte of the message."""
    assert mx.all_messages == []
    assert not any(c.line.upper().startswith(("MAIL", "RCPT", "DATA")) for c in mx.commands)
    assert not any(BODY_MARKER in c.line.encode() for c in mx.commands)


def dsns(mx: MxServer) -> list[email.message.EmailMessage]:
    parsed = []
    for m in mx.messages:
        msg = email.message_from_bytes(m.data, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        if msg.get_content_type() == "multipart/report":
            assert m.mail_from == ""
            parsed.append(msg)
    return parsed


def dsn_status(msg: email.message.EmailMessage) -> list[dict[str, str]]:
    part = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [
        {k: str(v) for k, v in block.items()}
        for block in blocks[1:]
        if isinstance(block, email.message.Message)
    ]


async def test_each_destination_gets_exactly_what_its_tls_deserves(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    mx = {
        "tls13": await world.add_mx("tls13.example", MODERN),
        "tls12": await world.add_mx("tls12.example", TLS12_SELF_SIGNED),
        "nostarttls": await world.add_mx("nostarttls.example", NO_STARTTLS),
        "tls10": await world.add_mx("tls10.example", TLS10_ONLY),
        "rsakx": await world.add_mx("rsakx.example", RSA_KEY_EXCHANGE_ONLY),
        "cbc": await world.add_mx("cbc.example", CBC_ONLY),
        "s454": await world.add_mx("s454.example", STARTTLS_454),
        "garbage": await world.add_mx("garbage.example", GARBAGE_AFTER_STARTTLS),
        "r451": await world.add_mx(
            "r451.example", dataclasses.replace(MODERN, rcpt_reply="451 4.3.0 Try again later")
        ),
        "r550": await world.add_mx(
            "r550.example", dataclasses.replace(MODERN, rcpt_reply="550 5.1.1 No such user")
        ),
        "expired": await world.add_mx("expired.example", EXPIRED_CERT),
        "wronghost": await world.add_mx("wronghost.example", WRONG_HOST_CERT),
        "two_weak": await world.add_mx("two.example", TLS10_ONLY, preference=10),
        "two_good": await world.add_mx("two.example", MODERN, preference=20),
    }
    world.dns.add("nullmx.example", "MX", "0 .")
    world.dns.servfail("servfail.example")
    relay = await start_relay(
        tmp_path,
        relay_factory,
        world,
        domains={
            "expired.example": {"security_level": "verify"},
            "wronghost.example": {"security_level": "verify"},
        },
    )
    names = [
        "tls13", "tls12", "nostarttls", "tls10", "rsakx", "cbc", "s454", "garbage", "r451",
        "r550", "expired", "wronghost", "two", "nullmx", "nxdomain", "servfail",
    ]  # fmt: skip
    rcpts = [f"bob@{n}.example" for n in names]
    queue_id = await asyncio.to_thread(submit, relay, rcpts)
    msg = await settled(relay, queue_id, final_or_deferred)
    got = {
        a.split("@")[1].split(".")[0]: (r["state"], r["status"]) for a, r in by_address(msg).items()
    }
    assert got == {
        "tls13": ("sent", "2.0.0"),
        "tls12": ("sent", "2.0.0"),
        "nostarttls": ("bounced", "5.7.4"),
        "tls10": ("bounced", "5.7.10"),
        "rsakx": ("bounced", "5.7.10"),
        "cbc": ("bounced", "5.7.10"),
        "s454": ("deferred", "4.7.0"),
        "garbage": ("deferred", "4.7.5"),
        "r451": ("deferred", "4.3.0"),
        "r550": ("bounced", "5.1.1"),
        "expired": ("bounced", "5.7.5"),
        "wronghost": ("bounced", "5.7.5"),
        "two": ("sent", "2.0.0"),
        "nullmx": ("bounced", "5.1.10"),
        "nxdomain": ("bounced", "5.1.2"),
        "servfail": ("deferred", "4.4.3"),
    }
    rows = by_address(msg)
    # Delivered where safe, with the TLS recorded as evidence.
    [m13] = mx["tls13"].messages
    assert m13.tls and BODY_MARKER in m13.data and m13.rcpt_tos == ("bob@tls13.example",)
    sent13 = rows["bob@tls13.example"]["delivery_attempts"][-1]
    assert (sent13["tls_protocol"], sent13["tls_cipher"]) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    assert sent13["cert_verified"] is True and len(sent13["cert_fingerprint"]) == 64
    sent12 = rows["bob@tls12.example"]["delivery_attempts"][-1]
    assert sent12["tls_protocol"] == "TLSv1.2" and "ECDHE" in sent12["tls_cipher"]
    assert sent12["cert_verified"] is False  # self-signed: fine under "encrypt", and recorded
    assert [m.rcpt_tos for m in mx["two_good"].messages] == [("bob@two.example",)]
    # Nothing insecure ever received a byte of the message.
    for name in ("nostarttls", "tls10", "rsakx", "cbc", "s454", "garbage", "expired",
                 "wronghost", "two_weak"):  # fmt: skip
        untouched(mx[name])
    # A refused recipient means no DATA: nothing of the message went there either.
    r550_verbs = [c.line.split()[0].upper() for c in mx["r550"].commands if c.tls]
    assert "RCPT" in r550_verbs and "DATA" not in r550_verbs
    # The diagnostics name the MX and what it offered.
    tls10_mx = f"{mx['tls10'].hostname}[{mx['tls10'].address[0]}]"
    assert rows["bob@tls10.example"]["reply"] == f"{tls10_mx}: negotiated TLSv1.0"
    assert rows["bob@nostarttls.example"]["reply"].endswith("]: does not offer STARTTLS")
    assert "expired" in rows["bob@expired.example"]["reply"]

    # Bounces: DSNs to the sender and the domain's notification address, headers only.
    bounced = {a for a, r in rows.items() if r["state"] == "bounced"}
    home = world.servers[0]
    await home.wait_until(lambda s: sum(len(dsn_status(d)) for d in dsns(s)) >= len(bounced))
    # One transaction per bounce carries both copies: the sender's and the notify address's.
    assert {m.rcpt_tos for m in home.messages} == {("alice@example.org", "postmaster@example.org")}
    reports = dsns(home)
    statuses = {}
    for report in reports:
        assert report["From"] == "Mail Delivery System <MAILER-DAEMON@relay.test>"
        assert report["Auto-Submitted"] == "auto-replied"
        assert {a.addr_spec for a in report["To"].addresses} == {
            "alice@example.org",
            "postmaster@example.org",
        }
        raw = report.as_bytes()
        assert BODY_MARKER not in raw  # the body may hold personal data
        assert b"Subject: test" in raw
        for block in dsn_status(report):
            statuses[block["Final-Recipient"].split(";")[1].strip()] = block
    assert set(statuses) == bounced
    tls10 = statuses["bob@tls10.example"]
    assert tls10["Action"] == "failed" and tls10["Status"] == "5.7.10"
    assert tls10["Remote-MTA"] == f"dns; {mx['tls10'].hostname}"
    assert "negotiated TLSv1" in tls10["Diagnostic-Code"]
    assert statuses["bob@r550.example"]["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert "Last-Attempt-Date" in tls10


async def test_insecure_action_defer(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    weak = await world.add_mx("tls10.example", TLS10_ONLY)
    relay = await start_relay(tmp_path, relay_factory, world, insecure_action="defer")
    queue_id = await asyncio.to_thread(submit, relay, ["bob@tls10.example"])
    msg = await settled(relay, queue_id, final_or_deferred)
    [r] = msg["recipients"]
    assert (r["state"], r["status"]) == ("deferred", "4.7.10")
    assert r["next_attempt_at"] > time.time() + 200  # the first retry is ~5 minutes out
    untouched(weak)
    assert dsns(world.servers[0]) == []


async def test_connection_reused_for_the_next_message(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    good = await world.add_mx("tls13.example", MODERN)
    relay = await start_relay(tmp_path, relay_factory, world)
    for n in range(3):
        queue_id = await asyncio.to_thread(submit, relay, [f"user{n}@tls13.example"])
        await settled(relay, queue_id, lambda r: r["state"] == "sent")
    assert len(good.messages) == 3
    assert len(good.connections) == 1
    assert (
        relay.service.metrics.smtp_tls_connections.labels(
            protocol="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", trust="verified", policy="encrypt"
        )._value.get()
        == 1
    )


async def test_stale_pooled_session_is_replaced_at_once(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    good = await world.add_mx("tls13.example", MODERN)
    relay = await start_relay(tmp_path, relay_factory, world)
    first = await asyncio.to_thread(submit, relay, ["user1@tls13.example"])
    await settled(relay, first, lambda r: r["state"] == "sent")
    # The MX timed the idle session out; the relay finds out only at its next RSET.
    good.behaviour = dataclasses.replace(MODERN, rset_reply="421 4.4.2 Idle timeout, closing")
    second = await asyncio.to_thread(submit, relay, ["user2@tls13.example"])
    msg = await settled(relay, second, lambda r: r["state"] != "queued" and r["state"] != "active")
    [r] = msg["recipients"]
    assert (r["state"], r["status"], r["attempts"]) == ("sent", "2.0.0", 1)
    assert [e["event"] for e in r["events"]] == ["QUEUED", "DELIVERED"]
    assert [m.rcpt_tos for m in good.messages] == [
        ("user1@tls13.example",),
        ("user2@tls13.example",),
    ]
    assert len(good.connections) == 2  # the stale one, then a fresh one at once


async def test_restart_mid_queue_then_retry(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    flaky = await world.add_mx(
        "flaky.example", dataclasses.replace(MODERN, rcpt_reply="451 4.3.0 Try again later")
    )
    relay = await start_relay(tmp_path, relay_factory, world)
    queue_id = await asyncio.to_thread(submit, relay, ["bob@flaky.example"])
    await settled(relay, queue_id, lambda r: r["state"] == "deferred")
    await relay.service.stop()

    flaky.behaviour = MODERN
    again = await relay_factory(relay.config)
    conn = again.db()
    with queue.transaction(conn):
        assert queue.retry(conn, queue_id, time.time()) == 1
    msg = await settled(again, queue_id, lambda r: r["state"] == "sent")
    [r] = msg["recipients"]
    assert r["attempts"] == 2
    assert [e["event"] for e in r["events"]] == ["QUEUED", "SOFT-BOUNCE", "DELIVERED"]
    assert [m.rcpt_tos for m in flaky.messages] == [("bob@flaky.example",)]
    assert msg["body_kept"] is False  # delivered everywhere: the body is gone from the queue


async def test_deferred_past_lifetime_bounces(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    await world.add_mx(
        "slow.example", dataclasses.replace(MODERN, rcpt_reply="451 4.3.0 Try again later")
    )
    relay = await start_relay(tmp_path, relay_factory, world, max_queue_lifetime="1s")
    queue_id = await asyncio.to_thread(submit, relay, ["bob@slow.example"])
    await settled(relay, queue_id, lambda r: r["state"] == "deferred")
    await asyncio.sleep(1.1)  # let the queue lifetime run out (not an assertion on timing)
    conn = relay.db()
    with queue.transaction(conn):
        queue.retry(conn, queue_id, time.time())
    msg = await settled(relay, queue_id, lambda r: r["state"] == "bounced")
    [r] = msg["recipients"]
    assert r["status"] == "4.4.7"
    assert r["reply"].startswith("message expired in the queue; last error: smtp; 451 4.3.0")
    home = world.servers[0]
    await home.wait_until(lambda s: len(dsns(s)) == 1)
    [block] = dsn_status(dsns(home)[0])
    assert (block["Action"], block["Status"]) == ("failed", "4.4.7")
