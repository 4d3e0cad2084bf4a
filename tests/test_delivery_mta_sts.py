"""MTA-STS end to end: a real relay delivering to loopback MX servers under a policy from a real
`_mta-sts` TXT record and HTTPS policy host, where enforce refuses MX names the policy does not
list and certificates that fail WebPKI (those recipients wait rather than bounce) and testing
only reports what enforce would refuse."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Relay, RelayFactory, add_user, make_config
from tests.test_delivery import BODY_MARKER, dsns, settled, submit, untouched
from tests.world import EXPIRED_CERT, MODERN, TLS12_SELF_SIGNED, WRONG_HOST_CERT, Behaviour, World
from tests.world.https import PolicyServer, Reply, policy_text, serve_policy
from tests.world.mx import MxServer

FIRST_ADDRESS = "127.0.32.1"  # this file's MX servers: 127.0.32.x
POLICY_ADDRESS = "127.0.33.1"  # and its policy host
DOMAIN = "sts.example"
RCPT = f"bob@{DOMAIN}"
MX1 = f"mx1.{DOMAIN}"
MX2 = f"mx2.{DOMAIN}"
ENFORCE_MX1 = policy_text("enforce", (MX1,))
TLS13 = ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
FETCH_ERROR = "sts-policy-fetch-error"


def not_listed(host: str, policy_id: str = "1", listed: str = MX1) -> str:
    """The diagnostic for an MX an enforced policy does not name."""
    return (
        f"{host}: not an MX host of the MTA-STS policy (id={policy_id} mode=enforce, mx: {listed})"
    )


@dataclasses.dataclass
class Env:
    tmp_path: Path
    world: World
    relay_factory: RelayFactory
    policy_address: str
    servers: list[PolicyServer] = dataclasses.field(default_factory=list)

    async def serve(self, reply: Reply | str, policy_id: str | None = "1") -> PolicyServer:
        """mta-sts.sts.example, with "v=STSv1; id=<policy_id>" published unless None."""
        server = await serve_policy(
            self.world, DOMAIN, reply, address=self.policy_address, policy_id=policy_id
        )
        self.servers.append(server)
        return server

    def publish_id(self, policy_id: str) -> None:
        self.world.dns.remove(f"_mta-sts.{DOMAIN}", "TXT")
        self.world.dns.add(f"_mta-sts.{DOMAIN}", "TXT", f"v=STSv1; id={policy_id}")

    async def add_mx(
        self, hostname: str, behaviour: Behaviour = MODERN, preference: int = 10
    ) -> MxServer:
        # TTL 0: the relay's MX cache must see an MX record changed in the middle of a test.
        return await self.world.add_mx(
            DOMAIN, behaviour, hostname=hostname, preference=preference, ttl=0
        )

    def move_mx(self, hostname: str) -> None:
        """Point the domain's MX record at `hostname` alone (already started with add_mx)."""
        self.world.dns.remove(DOMAIN, "MX")
        self.world.dns.add(DOMAIN, "MX", f"10 {hostname}.", ttl=0)

    async def relay(self, policy_port: int, **delivery: Any) -> Relay:
        cfg = make_config(
            self.tmp_path,
            delivery={
                "hold": False,
                "port": self.world.smtp_port,
                "nameservers": self.world.nameservers,
                "ca_file": str(self.world.ca_file),
                # Generous: nothing here waits for a timeout to fire, and a loaded machine (two
                # test workers, TLS handshakes) must not turn a slow answer into "no policy".
                "dns_timeout": 5,
                "connect_timeout": 5,
                "command_timeout": 10,
                "mta_sts_port": policy_port,
                "mta_sts_timeout": 10,
                **delivery,
            },
        )
        add_user(cfg, "alice@example.org")
        return await self.relay_factory(cfg)


@contextlib.asynccontextmanager
async def open_env(
    tmp_path: Path,
    relay_factory: RelayFactory,
    first_address: str,
    policy_address: str,
) -> AsyncIterator[Env]:
    """A world whose MX servers start at `first_address`, with the policy host to come on
    `policy_address`."""
    async with World(tmp_path / "world", first_address=first_address) as world:
        # The sender's own domain, which receives the bounces; it publishes no policy.
        await world.add_mx("example.org", MODERN)
        e = Env(tmp_path, world, relay_factory, policy_address)
        yield e
        for server in e.servers:
            await server.stop()


@pytest.fixture
async def env(tmp_path: Path, relay_factory: RelayFactory) -> AsyncIterator[Env]:
    async with open_env(tmp_path, relay_factory, FIRST_ADDRESS, POLICY_ADDRESS) as e:
        yield e


async def send(relay: Relay, state: str = "sent") -> dict[str, Any]:
    """Submit one message to RCPT; once its attempt is recorded, check that the recipient ended
    in `state` and return its row."""
    queue_id = await asyncio.to_thread(submit, relay, [RCPT])
    msg = await settled(relay, queue_id, lambda r: r["state"] in ("sent", "deferred", "bounced"))
    [row] = msg["recipients"]
    assert isinstance(row, dict)
    assert row["state"] == state, row
    return row


def failures(relay: Relay, reason: str) -> float:
    counter = relay.service.metrics.smtp_tls_policy_failures.labels(policy="mta-sts", reason=reason)
    return float(counter._value.get())


def tls_sessions(relay: Relay, policy: str, trust: str = "verified") -> float:
    counter = relay.service.metrics.smtp_tls_connections.labels(
        protocol=TLS13[0], cipher=TLS13[1], trust=trust, policy=policy
    )
    return float(counter._value.get())


def refused_before_connecting(
    attempt: dict[str, Any], host: str, policy_id: str = "1", listed: str = MX1
) -> None:
    """The evidence of an MX an enforced policy refused by name: no address was dialled."""
    assert attempt == {
        "at": attempt["at"],
        "mx_host": host,
        "mx_address": None,
        "reply": not_listed(host, policy_id, listed),
        "tls_protocol": None,
        "tls_cipher": None,
        "cert_fingerprint": None,
        "cert_verified": None,
        "policy": "mta-sts",
        "policy_detail": f"MTA-STS policy id={policy_id}",
        "verdict": "insecure",
    }


def never_connected(mx: MxServer) -> None:
    assert mx.connections == []


def sent_under_policy(attempt: dict[str, Any], mx: MxServer, policy_id: str = "1") -> None:
    assert attempt["verdict"] == "sent"
    assert (attempt["mx_host"], attempt["mx_address"]) == (mx.hostname, mx.address[0])
    assert (attempt["tls_protocol"], attempt["tls_cipher"]) == TLS13
    assert attempt["cert_verified"] is True
    assert (attempt["policy"], attempt["policy_detail"]) == (
        "mta-sts",
        f"MTA-STS policy id={policy_id}",
    )


# -- enforce ---------------------------------------------------------------------------------------


async def test_enforced_policy_delivers_to_a_listed_mx_with_a_valid_certificate(env: Env) -> None:
    mx1 = await env.add_mx(MX1)
    server = await env.serve(ENFORCE_MX1)
    relay = await env.relay(server.port)

    row = await send(relay)

    assert row["status"] == "2.0.0"
    [attempt] = row["delivery_attempts"]
    sent_under_policy(attempt, mx1)
    [message] = mx1.messages
    assert message.tls and message.rcpt_tos == (RCPT,) and BODY_MARKER in message.data
    assert not mx1.received_message_bytes_before_tls
    assert [c.sni for c in mx1.connections] == [MX1]
    [request] = server.requests
    assert (request.path, request.sni) == ("/.well-known/mta-sts.txt", f"mta-sts.{DOMAIN}")
    assert tls_sessions(relay, "mta-sts") == 1
    assert tls_sessions(relay, "encrypt") == 0


async def test_an_unlisted_mx_is_skipped_for_a_listed_one(env: Env) -> None:
    # Preferred by its number, but not in the policy: an attacker's MX record looks like this.
    unlisted = await env.add_mx(MX2, preference=5)
    listed = await env.add_mx(MX1, preference=20)
    server = await env.serve(ENFORCE_MX1)
    relay = await env.relay(server.port)

    row = await send(relay)

    never_connected(unlisted)
    refusal, sent = row["delivery_attempts"]
    refused_before_connecting(refusal, MX2)
    sent_under_policy(sent, listed)
    assert [m.rcpt_tos for m in listed.messages] == [(RCPT,)]
    assert failures(relay, "mx_mismatch") == 1


async def test_only_unlisted_mx_defers_without_connecting(env: Env) -> None:
    unlisted = await env.add_mx(MX2)
    server = await env.serve(ENFORCE_MX1)
    relay = await env.relay(server.port)

    row = await send(relay, "deferred")

    assert (row["status"], row["reply"]) == ("4.7.5", not_listed(MX2))
    assert row["next_attempt_at"] > time.time() + 200  # the usual retry schedule, not a bounce
    [attempt] = row["delivery_attempts"]
    refused_before_connecting(attempt, MX2)
    never_connected(unlisted)
    assert failures(relay, "mx_mismatch") == 1
    assert dsns(env.world.servers[0]) == []


@pytest.mark.parametrize(
    ("behaviour", "why"),
    [
        (EXPIRED_CERT, "certificate has expired (notAfter "),
        (
            WRONG_HOST_CERT,
            f"hostname mismatch: the certificate names wrong-host.invalid, not {MX1}",
        ),
        (TLS12_SELF_SIGNED, "self-signed certificate"),
    ],
    ids=["expired", "wrong-host", "self-signed"],
)
async def test_listed_mx_with_an_invalid_certificate_defers_before_mail_from(
    env: Env, behaviour: Behaviour, why: str
) -> None:
    mx1 = await env.add_mx(MX1, behaviour)
    server = await env.serve(ENFORCE_MX1)
    relay = await env.relay(server.port)

    row = await send(relay, "deferred")

    where = f"{MX1}[{mx1.address[0]}]"
    assert row["status"] == "4.7.5"
    assert row["reply"].startswith(f"{where}: certificate not accepted: {why}")
    assert row["reply"].endswith(" (MTA-STS policy id=1)")
    [attempt] = row["delivery_attempts"]
    assert (attempt["verdict"], attempt["policy"], attempt["cert_verified"]) == (
        "insecure",
        "mta-sts",
        False,
    )
    assert attempt["policy_detail"] == "MTA-STS policy id=1"
    assert attempt["reply"] == row["reply"]
    assert attempt["tls_protocol"] is not None and len(attempt["cert_fingerprint"]) == 64
    # The handshake happened; over it went only QUIT.
    [connection] = mx1.connections
    assert connection.tls is not None
    assert [(c.line.split()[0].upper(), c.tls) for c in connection.commands] == [
        ("EHLO", False),
        ("STARTTLS", False),
        ("QUIT", True),
    ]
    untouched(mx1)
    assert failures(relay, "certificate") == 1
    assert tls_sessions(relay, "mta-sts") == 0


# -- testing ---------------------------------------------------------------------------------------


async def test_testing_mode_delivers_and_records_what_enforce_would_refuse(env: Env) -> None:
    mx1 = await env.add_mx(MX1, TLS12_SELF_SIGNED)
    server = await env.serve(policy_text("testing", (MX1,)))
    relay = await env.relay(server.port)

    row = await send(relay)

    [attempt] = row["delivery_attempts"]
    assert (attempt["verdict"], attempt["policy"], attempt["cert_verified"]) == (
        "sent",
        "encrypt",
        False,
    )
    assert attempt["policy_detail"] == (
        "mta-sts testing id=1: enforce would refuse: certificate not accepted:"
        " self-signed certificate (MTA-STS policy id=1)"
    )
    assert [m.rcpt_tos for m in mx1.messages] == [(RCPT,)]


async def test_testing_mode_delivers_to_an_unlisted_mx_and_says_so(env: Env) -> None:
    mx2 = await env.add_mx(MX2)
    server = await env.serve(policy_text("testing", (MX1,)))
    relay = await env.relay(server.port)

    row = await send(relay)

    [attempt] = row["delivery_attempts"]
    assert (attempt["verdict"], attempt["policy"], attempt["cert_verified"]) == (
        "sent",
        "encrypt",
        True,
    )
    assert attempt["policy_detail"] == (
        "mta-sts testing id=1: enforce would refuse: not an MX host of the MTA-STS policy"
        f" (id=1 mode=testing, mx: {MX1})"
    )
    assert [m.rcpt_tos for m in mx2.messages] == [(RCPT,)]
    assert failures(relay, "mx_mismatch") == 0  # testing reports, it does not fail


# -- tls-check -------------------------------------------------------------------------------------


async def test_cli_tls_check_shows_the_policy(env: Env) -> None:
    listed = await env.add_mx(MX1, MODERN, preference=10)
    unlisted = await env.add_mx(MX2, MODERN, preference=20)
    server = await env.serve(ENFORCE_MX1)
    config = env.tmp_path / "mailrelay.toml"
    config.write_text(
        f'hostname = "relay.test"\n[storage]\npath = "q.sqlite3"\n'
        f'[delivery]\nport = {env.world.smtp_port}\nnameservers = ["{env.world.nameservers[0]}"]\n'
        f'ca_file = "{env.world.ca_file}"\ndns_timeout = 1\nconnect_timeout = 2\n'
        f"mta_sts_port = {server.port}\nmta_sts_timeout = 2\n"
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "mailrelay", "--config", str(config), "tls-check", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    as_json = await asyncio.to_thread(cli, DOMAIN, "--json")
    assert as_json.returncode == 1, as_json.stderr  # not every MX is acceptable
    report = json.loads(as_json.stdout)
    assert report["verdict"] == "partly secure"
    assert report["mta_sts"] == {
        "mode": "enforce",
        "policy_id": "1",
        "mx": [MX1],
        "max_age": 86400,
        "source": "fresh",
        "error": None,
        "detail": "",
    }
    good, bad = report["mx"]
    assert (good["host"], good["verdict"], good["policy"], good["policy_detail"]) == (
        MX1,
        "secure",
        "mta-sts",
        "MTA-STS policy id=1",
    )
    assert (bad["host"], bad["verdict"], bad["status"], bad["detail"]) == (
        MX2,
        "insecure",
        "5.7.5",
        not_listed(MX2),
    )
    assert unlisted.connections == []  # refused by the policy without a connection
    assert listed.all_messages == []  # a probe sends no mail

    # Without a service database the policy is fetched each time; the text names it.
    as_text = await asyncio.to_thread(cli, DOMAIN)
    lines = as_text.stdout.splitlines()
    assert lines[0].startswith(f"{DOMAIN}: PARTLY SECURE")
    assert lines[1] == f"  MTA-STS: mode enforce, id 1, mx {MX1}, max_age 86400, fresh"
    assert "      policy mta-sts: MTA-STS policy id=1" in lines
    assert lines[-1] == f"      {not_listed(MX2)}"
