"""What real deliveries tell TLS reporting: each connection counted under the recipient's policy
(TLSA, or none found) as a success or with its RFC 8460 result type, in the same commit as the
delivery's outcome."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailrelay.store import tlsrpt as tlsrpt_store
from tests.conftest import Relay, RelayFactory, add_user, make_config
from tests.test_delivery import settled, submit
from tests.world import MODERN, NO_STARTTLS, World, tlsa_record
from tests.world.mx import MxServer

FIRST_ADDRESS = "127.0.97.1"  # this file's MX servers: 127.0.97.x


@dataclasses.dataclass
class Env:
    world: World
    relay: Relay

    async def dane_mx(self, domain: str, *, matching: bool) -> tuple[MxServer, str]:
        hostname = f"mx.{domain}"
        issued = self.world.ca.issue([hostname])
        mx = await self.world.add_mx(domain, MODERN, hostname=hostname, issued=issued)
        record = tlsa_record(issued.leaf, 3, 1, 1) if matching else "3 1 1 " + "ab" * 32
        self.world.dns.add(f"_25._tcp.{hostname}", "TLSA", record)
        self.world.dns.secure(domain)
        return mx, record

    async def deliver(self, rcpt: str, state: str) -> None:
        queue_id = await asyncio.to_thread(submit, self.relay, [rcpt])
        final = ("sent", "deferred", "bounced")
        msg = await settled(self.relay, queue_id, lambda r: r["state"] in final)
        [row] = msg["recipients"]
        assert row["state"] == state, row

    def aggregates(self, domain: str) -> list[tlsrpt_store.PolicyAggregate]:
        day = tlsrpt_store.utc_day(time.time())
        return tlsrpt_store.aggregates(self.relay.db(), domain, day)


@pytest.fixture
async def env(tmp_path: Path, relay_factory: RelayFactory) -> AsyncIterator[Env]:
    async with World(tmp_path / "world", first_address=FIRST_ADDRESS) as world:
        cfg = make_config(
            tmp_path,
            delivery={
                "hold": False,
                "port": world.smtp_port,
                "nameservers": world.nameservers,
                "ca_file": str(world.ca_file),
                "dns_timeout": 1,
                "connect_timeout": 2,
                "command_timeout": 5,
            },
        )
        add_user(cfg, "alice@example.org")
        yield Env(world, await relay_factory(cfg))


async def test_a_dane_session_that_passes_counts_as_one_success(env: Env) -> None:
    mx, record = await env.dane_mx("good.example", matching=True)
    await env.deliver("bob@good.example", "sent")
    [policy] = env.aggregates("good.example")
    assert (policy.policy_type, policy.strings, policy.mx_hosts) == (
        "tlsa",
        (record,),
        ("mx.good.example",),
    )
    assert (policy.successful, policy.failed, policy.failures) == (1, 0, ())
    assert len(mx.messages) == 1


async def test_a_tlsa_mismatch_is_tlsa_invalid_with_both_addresses(env: Env) -> None:
    mx, record = await env.dane_mx("bad.example", matching=False)
    await env.deliver("bob@bad.example", "deferred")
    [policy] = env.aggregates("bad.example")
    assert (policy.policy_type, policy.strings, policy.successful, policy.failed) == (
        "tlsa",
        (record,),
        0,
        1,
    )
    [failure] = policy.failures
    assert (failure.result_type, failure.receiving_mx, failure.receiving_ip) == (
        "tlsa-invalid",
        "mx.bad.example",
        mx.address[0],
    )
    assert failure.sending_ip == "127.0.0.1" and failure.sessions == 1
    assert failure.reason is not None and "does not match the TLSA records" in failure.reason


async def test_no_starttls_without_a_policy_is_starttls_not_supported(env: Env) -> None:
    mx = await env.world.add_mx("plain.example", NO_STARTTLS)
    await env.deliver("bob@plain.example", "bounced")
    [policy] = env.aggregates("plain.example")
    assert (policy.policy_type, policy.strings, policy.mx_hosts) == ("no-policy-found", (), ())
    assert (policy.successful, policy.failed) == (0, 1)
    [failure] = policy.failures
    assert (failure.result_type, failure.receiving_mx, failure.receiving_ip) == (
        "starttls-not-supported",
        mx.hostname,
        mx.address[0],
    )
    # The bounce to example.org (no MX here) is our own mail: nothing about it was counted for
    # a domain that was never reached over TLS.
    assert env.aggregates("example.org") == []
