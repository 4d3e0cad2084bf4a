"""DANE end to end (RFC 7672) when mail must wait: a failed TLSA lookup, or DANE required
where it does not apply, keeps the mail queued without connecting, and a refusal that outlasts
the queue lifetime bounces with its reason."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailrelay.store import queue
from tests.conftest import RelayFactory
from tests.test_delivery import dsn_status, dsns, settled
from tests.test_delivery_dane import (
    DOMAIN,
    MX1,
    RCPT,
    STRANGER,
    Env,
    delivered_once,
    ee_mismatch,
    open_env,
    owner,
    policy_failures,
    refused_after_handshake,
    send,
)
from tests.world import tlsa_record

FIRST_ADDRESS = "127.0.37.1"  # this file's MX servers: 127.0.37.x


@pytest.fixture
async def env(tmp_path: Path, relay_factory: RelayFactory) -> AsyncIterator[Env]:
    async with open_env(tmp_path, relay_factory, FIRST_ADDRESS) as e:
        yield e


# -- trouble ---------------------------------------------------------------------------------------


async def test_servfail_on_tlsa_defers_without_connecting(env: Env) -> None:
    issued = env.issue(MX1)
    mx1 = await env.add_mx(MX1, issued)
    env.publish_tlsa(MX1, tlsa_record(issued.leaf, 3, 1, 1))
    env.sign()
    env.world.dns.servfail(owner(MX1))  # how a validating resolver answers for bogus data
    relay = await env.relay()

    queue_id, row = await send(relay, "deferred")

    dns_host, dns_port = env.world.dns.address
    diagnostic = (
        f"{MX1}: TLSA lookup failed, not delivering without DANE: TLSA lookup for {owner(MX1)}: "
        f"no nameserver gave an answer (All nameservers failed to answer the query {owner(MX1)}. "
        f"IN TLSA: Server Do53:{dns_host}@{dns_port} answered SERVFAIL)"
    )
    assert (row["status"], row["reply"]) == ("4.4.3", diagnostic)
    assert row["next_attempt_at"] > time.time() + 200
    [attempt] = row["delivery_attempts"]
    assert attempt == {
        "at": attempt["at"],
        "mx_host": MX1,
        "mx_address": None,
        "reply": diagnostic,
        "tls_protocol": None,
        "tls_cipher": None,
        "cert_fingerprint": None,
        "cert_verified": None,
        "policy": "dane",
        "policy_detail": None,
        "verdict": "transient",
    }
    assert mx1.connections == []  # not even a TCP connection: no fallback to "no DANE"
    assert policy_failures(relay, "tlsa_lookup") == 1
    assert dsns(env.home) == []

    # Once the lookup works again, the retry goes out under DANE.
    env.world.dns.heal(owner(MX1))
    conn = relay.db()
    with queue.transaction(conn):
        assert queue.retry(conn, queue_id, time.time()) == 1
    msg = await settled(relay, queue_id, lambda r: r["state"] == "sent")
    [row] = msg["recipients"]
    assert [(a["verdict"], a["policy"]) for a in row["delivery_attempts"]] == [
        ("transient", "dane"),
        ("sent", "dane-ee"),
    ]
    delivered_once(mx1)


# -- security_level = "dane" -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signed", "why"),
    [
        (True, f"no TLSA records at {owner(MX1)}"),  # a validated "nothing here"
        (False, f"the MX answer naming {MX1} is not DNSSEC-validated"),
    ],
    ids=["no-tlsa", "unsigned"],
)
async def test_required_dane_without_dane_defers_without_connecting(
    env: Env, signed: bool, why: str
) -> None:
    mx1 = await env.add_mx(MX1, env.issue(MX1))
    if signed:
        env.sign()
    relay = await env.relay(domains={DOMAIN: {"security_level": "dane"}})

    _, row = await send(relay, "deferred")

    diagnostic = f"{MX1}: security_level is dane, and {why}"
    assert (row["status"], row["reply"]) == ("4.7.5", diagnostic)
    [attempt] = row["delivery_attempts"]
    assert attempt == {
        "at": attempt["at"],
        "mx_host": MX1,
        "mx_address": None,
        "reply": diagnostic,
        "tls_protocol": None,
        "tls_cipher": None,
        "cert_fingerprint": None,
        "cert_verified": None,
        "policy": "dane",
        "policy_detail": None,  # no record to name
        "verdict": "insecure",
    }
    assert mx1.connections == []
    assert policy_failures(relay, "dane_required") == 1
    assert dsns(env.home) == []


# -- the queue lifetime ----------------------------------------------------------------------------


async def test_a_dane_mismatch_bounces_with_its_reason_at_the_queue_lifetime(env: Env) -> None:
    issued = env.issue(MX1)
    mx1 = await env.add_mx(MX1, issued)
    record = tlsa_record(STRANGER, 3, 1, 1)
    env.publish_tlsa(MX1, record)
    env.sign()
    relay = await env.relay(max_queue_lifetime="1s")
    queue_id, first = await send(relay, "deferred")
    assert first["status"] == "4.7.5"

    await asyncio.sleep(1.1)  # let the queue lifetime run out (not an assertion on timing)
    conn = relay.db()
    with queue.transaction(conn):
        assert queue.retry(conn, queue_id, time.time()) == 1
    msg = await settled(relay, queue_id, lambda r: r["state"] == "bounced")

    [row] = msg["recipients"]
    diagnostic = ee_mismatch(mx1, issued.leaf, record)
    assert (row["status"], row["reply"], row["attempts"]) == ("5.7.5", diagnostic, 2)
    assert [e["event"] for e in row["events"]] == ["QUEUED", "SOFT-BOUNCE", "HARD-BOUNCE"]
    assert [a["verdict"] for a in row["delivery_attempts"]] == ["insecure", "insecure"]
    refused_after_handshake(mx1, connections=2)
    await env.home.wait_until(lambda s: len(dsns(s)) == 1)
    [block] = dsn_status(dsns(env.home)[0])
    assert (block["Action"], block["Status"]) == ("failed", "5.7.5")
    assert block["Final-Recipient"] == f"rfc822; {RCPT}"
    assert block["Remote-MTA"] == f"dns; {MX1}"
    assert " ".join(block["Diagnostic-Code"].split()) == f"X-mailrelay; {diagnostic}"
