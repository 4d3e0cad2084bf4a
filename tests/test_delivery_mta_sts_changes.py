"""MTA-STS end to end as the policy host fails and the policy changes: a cached policy stays in
force through a failing host and a restart, a new id or a "none" policy takes its place, and a
refusal that outlasts the queue lifetime bounces."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailrelay.store import queue
from tests.conftest import RelayFactory
from tests.test_delivery import BODY_MARKER, dsn_status, dsns, settled, submit
from tests.test_delivery_mta_sts import (
    ENFORCE_MX1,
    FETCH_ERROR,
    MX1,
    MX2,
    RCPT,
    Env,
    failures,
    never_connected,
    not_listed,
    open_env,
    refused_before_connecting,
    send,
    sent_under_policy,
)
from tests.world import TLS12_SELF_SIGNED
from tests.world.https import Reply, policy_text

FIRST_ADDRESS = "127.0.38.1"  # this file's MX servers: 127.0.38.x
POLICY_ADDRESS = "127.0.39.1"  # and its policy host


@pytest.fixture
async def env(tmp_path: Path, relay_factory: RelayFactory) -> AsyncIterator[Env]:
    async with open_env(tmp_path, relay_factory, FIRST_ADDRESS, POLICY_ADDRESS) as e:
        yield e


# -- when the policy host fails --------------------------------------------------------------------


@pytest.mark.parametrize("down", [False, True], ids=["404", "down"])
async def test_failed_fetch_without_a_cached_policy_delivers_as_configured(
    env: Env, down: bool
) -> None:
    # A self-signed MX: only "encrypt" accepts it, so delivery shows no policy was applied.
    mx1 = await env.add_mx(MX1, TLS12_SELF_SIGNED)
    server = await env.serve(Reply(status=404, body="not here\n"))
    if down:
        await server.stop()
    relay = await env.relay(server.port)

    row = await send(relay)

    [attempt] = row["delivery_attempts"]
    assert (attempt["verdict"], attempt["policy"], attempt["policy_detail"]) == (
        "sent",
        "encrypt",
        None,
    )
    assert [m.rcpt_tos for m in mx1.messages] == [(RCPT,)]
    assert len(server.requests) == (0 if down else 1)
    assert failures(relay, FETCH_ERROR) == 1


async def test_failed_fetch_of_a_new_id_keeps_the_cached_policy_in_force(env: Env) -> None:
    mx1 = await env.add_mx(MX1)
    mx2 = await env.add_mx(MX2)
    env.move_mx(MX1)
    server = await env.serve(ENFORCE_MX1)
    relay = await env.relay(server.port)
    await send(relay)

    # A new id, a policy host that fails, and MX records now naming a host the cached policy
    # does not list: the shape of an attack on the policy; it must not downgrade delivery.
    env.publish_id("2")
    server.reply = Reply(status=500, body=policy_text("enforce", (MX2,)))
    env.move_mx(MX2)
    row = await send(relay, "deferred")

    assert (row["status"], row["reply"]) == ("4.7.5", not_listed(MX2))
    [attempt] = row["delivery_attempts"]
    refused_before_connecting(attempt, MX2)
    never_connected(mx2)
    assert len(server.requests) == 2  # it did try the new id
    assert failures(relay, FETCH_ERROR) == 1
    assert failures(relay, "mx_mismatch") == 1
    assert [m.rcpt_tos for m in mx1.messages] == [(RCPT,)]


# -- the policy changes ----------------------------------------------------------------------------


async def test_a_new_policy_id_is_fetched_and_applies(env: Env) -> None:
    mx1 = await env.add_mx(MX1, preference=10)
    mx2 = await env.add_mx(MX2, preference=20)
    server = await env.serve(ENFORCE_MX1)
    relay = await env.relay(server.port)
    first = await send(relay)
    sent_under_policy(first["delivery_attempts"][-1], mx1)

    env.publish_id("2")
    server.reply = Reply(body=policy_text("enforce", (MX2,)))
    second = await send(relay)

    refusal, sent = second["delivery_attempts"]
    refused_before_connecting(refusal, MX1, "2", listed=MX2)
    sent_under_policy(sent, mx2, "2")
    assert [m.rcpt_tos for m in mx1.messages] == [(RCPT,)]  # the first message only
    assert [m.rcpt_tos for m in mx2.messages] == [(RCPT,)]
    assert len(server.requests) == 2


async def test_cached_policy_survives_a_restart_with_the_policy_host_down(env: Env) -> None:
    mx1 = await env.add_mx(MX1)
    mx2 = await env.add_mx(MX2)
    env.move_mx(MX1)
    server = await env.serve(ENFORCE_MX1)
    relay = await env.relay(server.port)
    await send(relay)
    await relay.service.stop()
    await server.stop()

    env.move_mx(MX2)
    again = await env.relay_factory(relay.config)
    row = await send(again, "deferred")

    assert (row["status"], row["reply"]) == ("4.7.5", not_listed(MX2))
    [attempt] = row["delivery_attempts"]
    refused_before_connecting(attempt, MX2)
    never_connected(mx2)
    assert len(server.requests) == 1  # the id is unchanged: the cache answered
    assert [m.rcpt_tos for m in mx1.messages] == [(RCPT,)]


async def test_a_session_pooled_before_the_policy_appeared_is_not_used_under_it(
    env: Env,
) -> None:
    mx1 = await env.add_mx(MX1, TLS12_SELF_SIGNED)
    server = await env.serve(ENFORCE_MX1, policy_id=None)
    relay = await env.relay(server.port)
    first = await send(relay)
    assert first["delivery_attempts"][-1]["policy"] == "encrypt"

    # The domain publishes an enforced policy while the relay holds an idle session to mx1
    # that only "encrypt" accepted: that session must not carry the next message.
    env.publish_id("1")
    row = await send(relay, "deferred")

    assert row["status"] == "4.7.5"
    assert row["reply"] == (
        f"{MX1}[{mx1.address[0]}]: certificate not accepted: self-signed certificate"
        " (MTA-STS policy id=1)"
    )
    assert [m.rcpt_tos for m in mx1.all_messages] == [(RCPT,)]
    assert [c.line.split()[0].upper() for c in mx1.commands].count("MAIL") == 1
    assert len(mx1.connections) == 2  # a new connection, judged under the policy
    assert len(server.requests) == 1


async def test_a_none_policy_replaces_a_cached_enforced_one(env: Env) -> None:
    mx1 = await env.add_mx(MX1)
    mx2 = await env.add_mx(MX2, TLS12_SELF_SIGNED)
    env.move_mx(MX1)
    server = await env.serve(ENFORCE_MX1)
    relay = await env.relay(server.port)
    await send(relay)

    # RFC 8461 §8.3: how a domain withdraws its policy. Mail then goes as configured.
    env.publish_id("2")
    server.reply = Reply(body=policy_text("none", ()))
    env.move_mx(MX2)
    row = await send(relay)

    [attempt] = row["delivery_attempts"]
    assert (attempt["mx_host"], attempt["policy"], attempt["policy_detail"]) == (
        MX2,
        "encrypt",
        None,
    )
    assert [m.rcpt_tos for m in mx1.messages] == [(RCPT,)]
    assert [m.rcpt_tos for m in mx2.messages] == [(RCPT,)]
    assert failures(relay, "mx_mismatch") == 0


# -- the queue lifetime ----------------------------------------------------------------------------


async def test_deferral_past_the_queue_lifetime_bounces_with_the_policy_failure(env: Env) -> None:
    unlisted = await env.add_mx(MX2)
    server = await env.serve(ENFORCE_MX1)
    relay = await env.relay(server.port, max_queue_lifetime="1s")
    queue_id = await asyncio.to_thread(submit, relay, [RCPT])
    await settled(relay, queue_id, lambda r: r["state"] == "deferred")

    await asyncio.sleep(1.1)  # let the queue lifetime run out (not an assertion on timing)
    conn = relay.db()
    with queue.transaction(conn):
        assert queue.retry(conn, queue_id, time.time()) == 1
    msg = await settled(relay, queue_id, lambda r: r["state"] == "bounced")

    [row] = msg["recipients"]
    assert (row["status"], row["reply"]) == ("5.7.5", not_listed(MX2))
    assert [a["verdict"] for a in row["delivery_attempts"]] == ["insecure", "insecure"]
    never_connected(unlisted)
    home = env.world.servers[0]
    await home.wait_until(lambda s: len(dsns(s)) == 1)
    [report] = dsns(home)
    [block] = dsn_status(report)
    assert block == {
        "Final-Recipient": f"rfc822; {RCPT}",
        "Action": "failed",
        "Status": "5.7.5",
        "Remote-MTA": f"dns; {MX2}",
        "Diagnostic-Code": f"X-mailrelay; {not_listed(MX2)}",
        "Last-Attempt-Date": block["Last-Attempt-Date"],
    }
    assert BODY_MARKER not in report.as_bytes()
