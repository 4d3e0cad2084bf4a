"""MTA-STS (RFC 8461) policy caching (§5.1) against a real DNS server, a real HTTPS policy
host and a real store: when a policy is fetched again, kept, or dropped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailrelay.delivery.mta_sts import ConnectionStsCache, MtaSts, StsLookup, StsPolicy
from mailrelay.resolver import make_resolver
from mailrelay.store import Store, connect
from tests.test_mta_sts import (
    DAY,
    DOMAIN,
    ENFORCE,
    FETCH_ERROR,
    HOST,
    START,
    TIMEOUT,
    Env,
    enforce_policy,
    open_env,
)
from tests.world.https import Reply, policy_text

ADDRESS = "127.0.85.1"  # the policy host; this file's own 127.0.85.x
WHERE = f"{HOST}[{ADDRESS}]"


@pytest.fixture
async def env(tmp_path: Path, database: str) -> AsyncIterator[Env]:
    """On each backend (SQLite and PostgreSQL, tests/conftest.py `database`)."""
    async with open_env(tmp_path, ADDRESS, database) as e:
        yield e


# -- the cache (§5.1) ------------------------------------------------------------------------------


async def test_unchanged_id_uses_the_cache_without_fetching(env: Env) -> None:
    server = await env.serve(ENFORCE)
    sts = env.sts(server.port)
    await sts.lookup(DOMAIN)
    env.clock.now += 3600
    assert await sts.lookup(DOMAIN) == StsLookup(enforce_policy(), "cache")
    assert len(server.requests) == 1


async def test_changed_id_fetches_again(env: Env) -> None:
    server = await env.serve(ENFORCE)
    sts = env.sts(server.port)
    await sts.lookup(DOMAIN)
    env.world.dns.remove(f"_mta-sts.{DOMAIN}", "TXT")
    env.world.dns.add(f"_mta-sts.{DOMAIN}", "TXT", "v=STSv1; id=2")
    server.reply = Reply(body=policy_text("testing", ("mx2.example.org",), DAY))
    env.clock.now += 60

    result = await sts.lookup(DOMAIN)
    assert result == StsLookup(
        StsPolicy(DOMAIN, "2", "testing", ("mx2.example.org",), DAY, START + 60, START + 60 + DAY),
        "fresh",
    )
    assert len(server.requests) == 2
    cached = env.cached()
    assert cached is not None and (cached.policy_id, cached.mode) == ("2", "testing")


async def test_expired_policy_is_fetched_again(env: Env) -> None:
    server = await env.serve(policy_text("enforce", ("mx.example.org",), 3600))
    sts = env.sts(server.port)
    await sts.lookup(DOMAIN)
    env.clock.now += 3600
    result = await sts.lookup(DOMAIN)
    assert result.policy is not None
    assert (result.source, result.policy.fetched_at) == ("fresh", START + 3600)
    assert len(server.requests) == 2


async def test_policy_is_refreshed_daily_before_it_expires(env: Env) -> None:
    server = await env.serve(ENFORCE)
    sts = env.sts(server.port)
    await sts.lookup(DOMAIN)
    env.clock.now += DAY - 1
    assert (await sts.lookup(DOMAIN)).source == "cache"
    env.clock.now += 1
    assert await sts.lookup(DOMAIN) == StsLookup(enforce_policy(at=START + DAY), "fresh")
    assert len(server.requests) == 2


async def test_failed_refresh_keeps_the_cached_policy(env: Env) -> None:
    server = await env.serve(ENFORCE)
    sts = env.sts(server.port)
    await sts.lookup(DOMAIN)
    env.world.dns.remove(f"_mta-sts.{DOMAIN}", "TXT")
    env.world.dns.add(f"_mta-sts.{DOMAIN}", "TXT", "v=STSv1; id=2")
    server.reply = Reply(status=500)

    assert await sts.lookup(DOMAIN) == StsLookup(
        enforce_policy(), "cache", FETCH_ERROR, f"{WHERE}: HTTP status 500, not 200"
    )
    cached = env.cached()
    assert cached is not None and cached.policy_id == "1"


async def test_failed_fetch_is_not_retried_for_five_minutes(env: Env) -> None:
    server = await env.serve(Reply(status=404))
    sts = env.sts(server.port)
    failed = StsLookup(None, "none", FETCH_ERROR, f"{WHERE}: HTTP status 404, not 200")
    assert await sts.lookup(DOMAIN) == failed
    server.reply = Reply(body=ENFORCE)
    env.clock.now += 299
    assert await sts.lookup(DOMAIN) == failed
    assert len(server.requests) == 1
    env.clock.now += 1
    assert await sts.lookup(DOMAIN) == StsLookup(enforce_policy(at=START + 300), "fresh")


async def test_new_id_is_fetched_even_while_backing_off(env: Env) -> None:
    server = await env.serve(Reply(status=404))
    sts = env.sts(server.port)
    await sts.lookup(DOMAIN)
    env.world.dns.remove(f"_mta-sts.{DOMAIN}", "TXT")
    env.world.dns.add(f"_mta-sts.{DOMAIN}", "TXT", "v=STSv1; id=2")
    server.reply = Reply(body=ENFORCE)
    assert await sts.lookup(DOMAIN) == StsLookup(enforce_policy("2"), "fresh")


async def test_removed_txt_record_keeps_the_cached_policy(env: Env) -> None:
    server = await env.serve(ENFORCE)
    sts = env.sts(server.port)
    await sts.lookup(DOMAIN)
    env.world.dns.remove(f"_mta-sts.{DOMAIN}", "TXT")
    # An attacker who suppresses the record must not switch the policy off (§5.1).
    assert await sts.lookup(DOMAIN) == StsLookup(enforce_policy(), "cache")
    env.clock.now += 7 * DAY  # until it expires, when it is dropped from the store
    assert await sts.lookup(DOMAIN) == StsLookup(None, "none")
    assert env.cached() is None


async def test_none_mode_policy_replaces_the_cached_one(env: Env) -> None:
    server = await env.serve(ENFORCE)
    sts = env.sts(server.port)
    await sts.lookup(DOMAIN)
    env.world.dns.remove(f"_mta-sts.{DOMAIN}", "TXT")
    env.world.dns.add(f"_mta-sts.{DOMAIN}", "TXT", "v=STSv1; id=2")
    server.reply = Reply(body=policy_text("none", (), DAY))

    result = await sts.lookup(DOMAIN)
    assert result == StsLookup(StsPolicy(DOMAIN, "2", "none", (), DAY, START, START + DAY), "fresh")
    cached = env.cached()
    assert cached is not None and (cached.mode, cached.mx_patterns) == ("none", ())


async def test_cached_policy_survives_a_restart_with_the_policy_host_down(env: Env) -> None:
    server = await env.serve(ENFORCE)
    await env.sts(server.port).lookup(DOMAIN)
    await server.stop()
    await env.store.stop()

    store = Store(env.db_path)
    await store.start()
    try:
        sts = env.sts(server.port, store)
        assert await sts.lookup(DOMAIN) == StsLookup(enforce_policy(), "cache")
        # Even a new id, whose fetch fails, leaves the cached policy in force.
        env.world.dns.remove(f"_mta-sts.{DOMAIN}", "TXT")
        env.world.dns.add(f"_mta-sts.{DOMAIN}", "TXT", "v=STSv1; id=2")
        result = await sts.lookup(DOMAIN)
        assert (result.policy, result.source, result.error) == (
            enforce_policy(),
            "cache",
            FETCH_ERROR,
        )
    finally:
        await store.stop()


async def test_connection_cache_for_the_cli(env: Env) -> None:
    server = await env.serve(ENFORCE)
    conn = connect(env.db_path)
    try:
        sts = MtaSts(
            ConnectionStsCache(conn),
            make_resolver(env.world.nameservers, TIMEOUT),
            ca_file=str(env.world.ca_file),
            port=server.port,
            timeout=TIMEOUT,
            clock=env.clock,
        )
        assert await sts.lookup(DOMAIN) == StsLookup(enforce_policy(), "fresh")
    finally:
        conn.close()
    # The service sees what the CLI fetched.
    assert await env.sts(server.port).lookup(DOMAIN) == StsLookup(enforce_policy(), "cache")
    assert len(server.requests) == 1


async def test_concurrent_lookups_share_one_fetch(env: Env) -> None:
    server = await env.serve(Reply(body=ENFORCE, delay=0.1))
    sts = env.sts(server.port)
    results = await asyncio.gather(*(sts.lookup(DOMAIN) for _ in range(3)))
    assert results == [StsLookup(enforce_policy(), "fresh")] * 3
    assert len(server.requests) == 1


async def test_one_cancelled_caller_does_not_cancel_the_others(env: Env) -> None:
    server = await env.serve(Reply(body=ENFORCE, delay=0.1))
    sts = env.sts(server.port)
    first = asyncio.create_task(sts.lookup(DOMAIN))
    second = asyncio.create_task(sts.lookup(DOMAIN))
    await asyncio.sleep(0.05)
    first.cancel()
    assert await second == StsLookup(enforce_policy(), "fresh")
    assert first.cancelled()
    assert len(server.requests) == 1
