"""Bounds on one delivery attempt: how many MX hosts and addresses it tries, which address
family, and a deadline for the whole attempt; each against real servers of the test world."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Relay, RelayFactory, add_user, make_config
from tests.test_delivery import settled, submit, untouched
from tests.world import MODERN, NO_STARTTLS, TLS10_ONLY, World

FIRST_ADDRESS = "127.0.44.1"  # this file's MX servers: 127.0.44.x
SILENT_ADDRESS = "127.0.44.250"  # accepts connections and never says a word


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path / "world", first_address=FIRST_ADDRESS) as w:
        await w.add_mx("example.org", MODERN)  # the sender's domain receives the bounces
        yield w


async def start_relay(
    tmp_path: Path, relay_factory: RelayFactory, world: World, **delivery: Any
) -> Relay:
    cfg = make_config(
        tmp_path,
        delivery={
            "hold": False,
            "port": world.smtp_port,
            "nameservers": world.nameservers,
            "ca_file": str(world.ca_file),
            "dns_timeout": 1,
            "connect_timeout": 5,
            "command_timeout": 10,
            **delivery,
        },
    )
    add_user(cfg, "alice@example.org")
    return await relay_factory(cfg)


async def deliver(relay: Relay, rcpt: str) -> dict[str, Any]:
    queue_id = await asyncio.to_thread(submit, relay, [rcpt])
    msg = await settled(relay, queue_id, lambda r: r["state"] in ("sent", "deferred", "bounced"))
    [row] = msg["recipients"]
    assert isinstance(row, dict)
    return row


async def test_no_more_than_max_mx_hosts_are_tried(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    hosts = [
        await world.add_mx("many.example", NO_STARTTLS, preference=10 * n) for n in range(1, 8)
    ]
    relay = await start_relay(tmp_path, relay_factory, world, max_mx_hosts=5)
    row = await deliver(relay, "bob@many.example")
    assert (row["state"], row["status"]) == ("bounced", "5.7.4")
    assert [a["mx_host"] for a in row["delivery_attempts"]] == [h.hostname for h in hosts[:5]]
    for late in hosts[5:]:
        assert late.connections == []
    for tried in hosts[:5]:
        untouched(tried)


async def test_max_mx_addresses_counts_every_address(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    first = await world.add_mx("addresses.example", TLS10_ONLY, preference=10)
    second = await world.add_mx("addresses.example", TLS10_ONLY, preference=20)
    third = await world.add_mx("addresses.example", TLS10_ONLY, preference=30)
    relay = await start_relay(tmp_path, relay_factory, world, max_mx_addresses=2)
    row = await deliver(relay, "bob@addresses.example")
    assert (row["state"], row["status"]) == ("bounced", "5.7.10")
    assert [a["mx_host"] for a in row["delivery_attempts"]] == [first.hostname, second.hostname]
    assert third.connections == []


async def test_ipv4_only_skips_aaaa_records(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    weak = await world.add_mx("dual.example", TLS10_ONLY)
    # An IPv6 address that must never be dialled (2001:db8::/32 is for documentation).
    world.dns.add(weak.hostname, "AAAA", "2001:db8::25")
    relay = await start_relay(tmp_path, relay_factory, world, address_family="ipv4")
    row = await deliver(relay, "bob@dual.example")
    # Refused as insecure on its IPv4 address, nothing left that might work: a bounce, not a
    # five-day deferral because of an address this host cannot reach.
    assert (row["state"], row["status"]) == ("bounced", "5.7.10")
    assert [a["mx_address"] for a in row["delivery_attempts"]] == [weak.address[0]]


async def test_ipv6_only_with_ipv4_mx_hosts_waits(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    mx = await world.add_mx("v4.example", MODERN)
    relay = await start_relay(tmp_path, relay_factory, world, address_family="ipv6")
    row = await deliver(relay, "bob@v4.example")
    assert (row["state"], row["status"]) == ("deferred", "4.4.4")
    assert row["reply"] == (
        "no address of any MX host of v4.example is ipv6 (delivery.address_family)"
    )
    assert mx.connections == []


async def test_an_attempt_ends_at_its_deadline(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never a greeting: only the attempt's deadline ends this
        writer.close()

    server = await asyncio.start_server(silent, SILENT_ADDRESS, world.smtp_port)
    try:
        world.dns.add("slow.example", "MX", "10 mx.slow.example.")
        world.dns.add("mx.slow.example", "A", SILENT_ADDRESS)
        relay = await start_relay(
            tmp_path, relay_factory, world, connect_timeout=30, attempt_deadline=1
        )
        row = await deliver(relay, "bob@slow.example")
    finally:
        server.close()
        await server.wait_closed()
    assert (row["state"], row["status"]) == ("deferred", "4.4.1")
    assert row["reply"] == ("the delivery attempt took longer than 1s (delivery.attempt_deadline)")


async def test_an_address_this_host_cannot_route_to_does_not_hold_back_a_bounce(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    # 255.255.255.255 fails at connect() with ENETUNREACH, without a packet leaving: it stands
    # for an IPv6 MX address on a host without IPv6.
    world.dns.add("partial.example", "MX", "10 unroutable.partial.example.")
    world.dns.add("unroutable.partial.example", "A", "255.255.255.255")
    weak = await world.add_mx("partial.example", TLS10_ONLY, preference=20)
    relay = await start_relay(tmp_path, relay_factory, world)
    row = await deliver(relay, "bob@partial.example")
    # The one MX that could be reached is insecure: a bounce now, not five days of deferrals.
    assert (row["state"], row["status"]) == ("bounced", "5.7.10")
    unroutable, refused = row["delivery_attempts"]
    assert (unroutable["mx_address"], unroutable["verdict"]) == ("255.255.255.255", "transient")
    assert unroutable["reply"].endswith("no route from here: Network is unreachable")
    assert (refused["mx_host"], refused["verdict"]) == (weak.hostname, "insecure")
