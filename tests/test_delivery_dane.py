"""DANE end to end (RFC 7672): a real relay delivering to loopback MX servers whose TLSA records,
made from their own certificates and vouched for with the AD bit, decide the certificate check
whatever `encrypt` or MTA-STS would have said, with nothing but QUIT over a refused session."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import Relay, RelayFactory, add_user, make_config
from tests.test_delivery import BODY_MARKER, dsns, settled, submit, untouched
from tests.world import MODERN, Issued, TestCA, World, self_signed, tlsa_record
from tests.world.https import PolicyServer, policy_text, serve_policy
from tests.world.mx import MxServer

FIRST_ADDRESS = "127.0.35.1"  # this file's MX servers: 127.0.35.x
POLICY_ADDRESS = "127.0.36.1"  # and its MTA-STS policy host
DOMAIN = "dane.example"
RCPT = f"bob@{DOMAIN}"
MX1 = f"mx1.{DOMAIN}"
MX2 = f"mx2.{DOMAIN}"
TLS13 = ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
ACCEPTED = "250 2.0.0 Message accepted"

# A private trust anchor, in no ca_file: only a TLSA record can vouch for it.
TA = TestCA("DANE trust anchor")
TA_INTERMEDIATE = TA.intermediate("DANE intermediate")
# Someone else's key: records for it match nothing the MX servers here present.
STRANGER = self_signed(MX1).leaf


def owner(host: str) -> str:
    return f"_25._tcp.{host}"


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def where(mx: MxServer) -> str:
    return f"{mx.hostname}[{mx.address[0]}]"


def ee_mismatch(mx: MxServer, leaf: x509.Certificate, *records: str) -> str:
    """The diagnostic of a session refused because no DANE-EE record matches the leaf."""
    return (
        f"{where(mx)}: certificate (leaf SHA-256 {fingerprint(leaf)}) does not match the TLSA "
        f"records at {owner(mx.hostname)}: no DANE-EE record matches the leaf; "
        f"records: {', '.join(records)}"
    )


@dataclasses.dataclass
class Env:
    tmp_path: Path
    world: World
    relay_factory: RelayFactory
    servers: list[PolicyServer] = dataclasses.field(default_factory=list)

    @property
    def home(self) -> MxServer:
        """The sender's own MX, where the bounces go."""
        return self.world.servers[0]

    def issue(self, hostname: str) -> Issued:
        """A certificate from the world's CA, which `encrypt` and `verify` both accept."""
        return self.world.ca.issue([hostname])

    async def add_mx(self, hostname: str, issued: Issued, preference: int = 10) -> MxServer:
        """A TLS 1.3 MX for DOMAIN that presents `issued`."""
        return await self.world.add_mx(
            DOMAIN, MODERN, hostname=hostname, preference=preference, issued=issued
        )

    def publish_tlsa(self, host: str, *records: str) -> None:
        for record in records:
            self.world.dns.add(owner(host), "TLSA", record)

    def sign(self) -> None:
        """DOMAIN's zone (its MX, A and TLSA answers) is DNSSEC-signed: answers carry AD."""
        self.world.dns.secure(DOMAIN)

    def delivery(self, **delivery: Any) -> dict[str, Any]:
        return {
            "hold": False,
            "port": self.world.smtp_port,
            "nameservers": self.world.nameservers,
            "ca_file": str(self.world.ca_file),
            "dns_timeout": 1,
            "connect_timeout": 2,
            "command_timeout": 5,
            **delivery,
        }

    async def relay(self, **delivery: Any) -> Relay:
        cfg = make_config(self.tmp_path, delivery=self.delivery(**delivery))
        add_user(cfg, "alice@example.org")
        return await self.relay_factory(cfg)


@contextlib.asynccontextmanager
async def open_env(
    tmp_path: Path, relay_factory: RelayFactory, first_address: str
) -> AsyncIterator[Env]:
    """A world whose MX servers start at `first_address`."""
    async with World(tmp_path / "world", first_address=first_address) as world:
        # The sender's own domain, unsigned, which receives the bounces.
        await world.add_mx("example.org", MODERN)
        e = Env(tmp_path, world, relay_factory)
        yield e
        for server in e.servers:
            await server.stop()


@pytest.fixture
async def env(tmp_path: Path, relay_factory: RelayFactory) -> AsyncIterator[Env]:
    async with open_env(tmp_path, relay_factory, FIRST_ADDRESS) as e:
        yield e


async def send(relay: Relay, state: str) -> tuple[str, dict[str, Any]]:
    """Submit one message to RCPT; once its attempt is recorded, check that the recipient is in
    `state` and return the queue id and the recipient's row."""
    queue_id = await asyncio.to_thread(submit, relay, [RCPT])
    msg = await settled(relay, queue_id, lambda r: r["state"] in ("sent", "deferred", "bounced"))
    [row] = msg["recipients"]
    assert isinstance(row, dict)
    assert row["state"] == state, row
    return queue_id, row


def policy_failures(relay: Relay, reason: str, policy: str = "dane") -> float:
    counter = relay.service.metrics.smtp_tls_policy_failures.labels(policy=policy, reason=reason)
    return float(counter._value.get())


def tls_sessions(relay: Relay, policy: str, trust: str = "verified") -> float:
    counter = relay.service.metrics.smtp_tls_connections.labels(
        protocol=TLS13[0], cipher=TLS13[1], trust=trust, policy=policy
    )
    return float(counter._value.get())


def session_attempt(
    attempt: dict[str, Any],
    mx: MxServer,
    leaf: x509.Certificate,
    *,
    verdict: str,
    reply: str,
    policy: str,
    detail: str | None,
    verified: bool,
) -> None:
    """The evidence of one TLS 1.3 session to `mx`, which presented `leaf`."""
    assert attempt == {
        "at": attempt["at"],
        "mx_host": mx.hostname,
        "mx_address": mx.address[0],
        "reply": reply,
        "tls_protocol": TLS13[0],
        "tls_cipher": TLS13[1],
        "cert_fingerprint": fingerprint(leaf),
        "cert_verified": verified,
        "policy": policy,
        "policy_detail": detail,
        "verdict": verdict,
    }


def delivered_once(mx: MxServer) -> None:
    [message] = mx.messages
    assert message.tls and message.rcpt_tos == (RCPT,) and BODY_MARKER in message.data
    assert not mx.received_message_bytes_before_tls


def refused_after_handshake(mx: MxServer, connections: int = 1) -> None:
    """Every session to `mx` reached TLS (with the MX name as SNI, the TLSA base domain), and
    over it went only QUIT: no MAIL, RCPT or DATA, not a byte of the message."""
    assert len(mx.connections) == connections
    for connection in mx.connections:
        assert connection.tls is not None and connection.sni == mx.hostname
        assert [(c.line.split()[0].upper(), c.tls) for c in connection.commands] == [
            ("EHLO", False),
            ("STARTTLS", False),
            ("QUIT", True),
        ]
    untouched(mx)


# -- DANE-EE ---------------------------------------------------------------------------------------


async def test_dane_ee_match_delivers_and_says_so(env: Env) -> None:
    # Self-signed: "encrypt" alone would take it too; the evidence must show DANE decided.
    issued = self_signed(MX1)
    record = tlsa_record(issued.leaf, 3, 1, 1)
    mx1 = await env.add_mx(MX1, issued)
    env.publish_tlsa(MX1, record)
    env.sign()
    relay = await env.relay()

    _, row = await send(relay, "sent")

    assert (row["status"], row["reply"]) == ("2.0.0", f"smtp; {ACCEPTED}")
    [attempt] = row["delivery_attempts"]
    session_attempt(
        attempt, mx1, issued.leaf, verdict="sent", reply=ACCEPTED, policy="dane-ee",
        detail=f"{owner(MX1)} TLSA {record}", verified=True,
    )  # fmt: skip
    delivered_once(mx1)
    assert [c.sni for c in mx1.connections] == [MX1]
    assert tls_sessions(relay, "dane-ee") == 1
    assert tls_sessions(relay, "encrypt") + tls_sessions(relay, "encrypt", "unverified") == 0


async def test_dane_ee_mismatch_defers_before_mail_from(env: Env) -> None:
    # A certificate from the world's CA, which "encrypt" and even "verify" would accept; the
    # TLSA record names another key (a rollover gone wrong, or someone in the path).
    issued = env.issue(MX1)
    mx1 = await env.add_mx(MX1, issued)
    record = tlsa_record(STRANGER, 3, 1, 1)
    env.publish_tlsa(MX1, record)
    env.sign()
    relay = await env.relay()

    _, row = await send(relay, "deferred")

    leaf = issued.leaf
    diagnostic = ee_mismatch(mx1, leaf, record)
    assert (row["status"], row["reply"]) == ("4.7.5", diagnostic)
    assert row["next_attempt_at"] > time.time() + 200  # the usual retry schedule
    [attempt] = row["delivery_attempts"]
    session_attempt(
        attempt, mx1, leaf, verdict="insecure", reply=diagnostic, policy="dane", detail=None,
        verified=False,
    )  # fmt: skip
    refused_after_handshake(mx1)
    assert policy_failures(relay, "certificate_mismatch") == 1
    assert relay.service.metrics.smtp_insecure_refusals.labels(reason="dane")._value.get() == 1
    assert tls_sessions(relay, "dane") + tls_sessions(relay, "dane", "unverified") == 0
    assert dsns(env.home) == []


# -- DANE-TA ---------------------------------------------------------------------------------------


async def test_dane_ta_with_a_private_anchor_delivers(env: Env) -> None:
    # "2 0 1" is a digest of the anchor, so the server sends it along (RFC 7671 §5.2.2); no
    # ca_file holds it, so WebPKI would refuse this chain.
    issued = TA_INTERMEDIATE.issue([MX1], chain="full")
    record = tlsa_record(TA.certificate, 2, 0, 1)
    mx1 = await env.add_mx(MX1, issued)
    env.publish_tlsa(MX1, record)
    env.sign()
    relay = await env.relay()

    _, row = await send(relay, "sent")

    [attempt] = row["delivery_attempts"]
    session_attempt(
        attempt, mx1, issued.leaf, verdict="sent", reply=ACCEPTED, policy="dane-ta",
        detail=f"{owner(MX1)} TLSA {record}", verified=True,
    )  # fmt: skip
    delivered_once(mx1)
    assert [c.sni for c in mx1.connections] == [MX1]
    assert tls_sessions(relay, "dane-ta") == 1


async def test_dane_ta_refuses_a_leaf_for_another_name(env: Env) -> None:
    issued = TA_INTERMEDIATE.issue(["mail.elsewhere.example"], chain="full")
    record = tlsa_record(TA.certificate, 2, 0, 1)
    mx1 = await env.add_mx(MX1, issued)
    env.publish_tlsa(MX1, record)
    env.sign()
    relay = await env.relay()

    _, row = await send(relay, "deferred")

    diagnostic = (
        f"{where(mx1)}: certificate (leaf SHA-256 {fingerprint(issued.leaf)}) does not match the "
        f"TLSA records at {owner(MX1)}: the certificate is issued to mail.elsewhere.example, "
        f"not to {MX1} or {DOMAIN}; records: {record}"
    )
    assert (row["status"], row["reply"]) == ("4.7.5", diagnostic)
    [attempt] = row["delivery_attempts"]
    session_attempt(
        attempt, mx1, issued.leaf, verdict="insecure", reply=diagnostic, policy="dane",
        detail=None, verified=False,
    )  # fmt: skip
    refused_after_handshake(mx1)
    assert policy_failures(relay, "certificate_mismatch") == 1


# -- where DANE does not apply ---------------------------------------------------------------------


async def test_only_unusable_records_deliver_as_encrypt(env: Env) -> None:
    # PKIX-TA(0) and PKIX-EE(1) are not for SMTP (RFC 7672 §3.1.3), even where they match.
    issued = env.issue(MX1)
    mx1 = await env.add_mx(MX1, issued)
    leaf = issued.leaf
    env.publish_tlsa(
        MX1, tlsa_record(leaf, 1, 1, 1), tlsa_record(env.world.ca.certificate, 0, 0, 1)
    )
    env.sign()
    relay = await env.relay()

    _, row = await send(relay, "sent")

    [attempt] = row["delivery_attempts"]
    session_attempt(
        attempt, mx1, leaf, verdict="sent", reply=ACCEPTED, policy="encrypt", detail=None,
        verified=True,
    )  # fmt: skip
    delivered_once(mx1)
    assert [c.sni for c in mx1.connections] == [MX1]
    assert policy_failures(relay, "certificate_mismatch") == 0


@pytest.mark.parametrize("signed", ["nothing", "mx-host-zone"])
async def test_unsigned_mx_answer_means_no_dane_despite_tlsa(env: Env, signed: str) -> None:
    # The TLSA record matches nothing; applied, it would refuse the MX. But the MX answer has no
    # AD (the domain's zone is unsigned), so it may be forged and DANE does not apply at all,
    # even where the MX host's own zone and its TLSA records are signed.
    host = "mx1.provider.example"
    mx = await env.world.add_mx(DOMAIN, MODERN, hostname=host)
    env.publish_tlsa(host, tlsa_record(STRANGER, 3, 1, 1))
    if signed == "mx-host-zone":
        env.world.dns.secure("provider.example")
    relay = await env.relay()

    _, row = await send(relay, "sent")

    [attempt] = row["delivery_attempts"]
    assert (attempt["verdict"], attempt["policy"], attempt["policy_detail"]) == (
        "sent",
        "encrypt",
        None,
    )
    assert (attempt["mx_host"], attempt["cert_verified"]) == (host, True)
    assert [m.rcpt_tos for m in mx.messages] == [(RCPT,)]
    assert [q.name for q in env.world.dns.queries if q.rdtype == "TLSA"] == []
    assert policy_failures(relay, "certificate_mismatch") == 0


# -- several MX hosts ------------------------------------------------------------------------------


async def test_a_mismatching_mx_is_passed_over_for_a_matching_one(env: Env) -> None:
    wrong_issued = env.issue(MX1)
    wrong = await env.add_mx(MX1, wrong_issued, preference=10)
    wrong_leaf = wrong_issued.leaf
    issued = self_signed(MX2)
    right = await env.add_mx(MX2, issued, preference=20)
    stale, good = tlsa_record(STRANGER, 3, 1, 1), tlsa_record(issued.leaf, 3, 1, 1)
    env.publish_tlsa(MX1, stale)
    env.publish_tlsa(MX2, good)
    env.sign()
    relay = await env.relay()

    _, row = await send(relay, "sent")

    refused, sent = row["delivery_attempts"]
    session_attempt(
        refused, wrong, wrong_leaf, verdict="insecure", reply=ee_mismatch(wrong, wrong_leaf, stale),
        policy="dane", detail=None, verified=False,
    )  # fmt: skip
    session_attempt(
        sent, right, issued.leaf, verdict="sent", reply=ACCEPTED, policy="dane-ee",
        detail=f"{owner(MX2)} TLSA {good}", verified=True,
    )  # fmt: skip
    refused_after_handshake(wrong)
    delivered_once(right)
    assert [c.sni for c in right.connections] == [MX2]
    assert policy_failures(relay, "certificate_mismatch") == 1


# -- DANE and MTA-STS ------------------------------------------------------------------------------


async def test_dane_decides_the_certificate_over_mta_sts(env: Env) -> None:
    # An enforced MTA-STS policy lists the MX, whose self-signed certificate fails WebPKI; a
    # validated DANE-EE record matches it, and DANE wins (RFC 8461 §2).
    issued = self_signed(MX1)
    record = tlsa_record(issued.leaf, 3, 1, 1)
    mx1 = await env.add_mx(MX1, issued)
    env.publish_tlsa(MX1, record)
    env.sign()
    server = await serve_policy(
        env.world, DOMAIN, policy_text("enforce", (MX1,)), address=POLICY_ADDRESS
    )
    env.servers.append(server)
    relay = await env.relay(mta_sts_port=server.port, mta_sts_timeout=2)

    _, row = await send(relay, "sent")

    [attempt] = row["delivery_attempts"]
    session_attempt(
        attempt, mx1, issued.leaf, verdict="sent", reply=ACCEPTED, policy="dane-ee",
        detail=f"{owner(MX1)} TLSA {record}", verified=True,
    )  # fmt: skip
    delivered_once(mx1)
    [request] = server.requests  # the policy was fetched, and applied to the MX name
    assert request.path == "/.well-known/mta-sts.txt"
    assert policy_failures(relay, "certificate", "mta-sts") == 0
    assert tls_sessions(relay, "dane-ee") == 1


# -- tls-check -------------------------------------------------------------------------------------


async def test_cli_tls_check_shows_dane(env: Env) -> None:
    # Mid-rollover: the next key is published beside the current one.
    issued = self_signed(MX1)
    current, upcoming = tlsa_record(issued.leaf, 3, 1, 1), tlsa_record(STRANGER, 3, 1, 1)
    mx1 = await env.add_mx(MX1, issued)
    env.publish_tlsa(MX1, current, upcoming)
    env.sign()
    config = env.tmp_path / "mailrelay.toml"
    config.write_text(
        f'hostname = "relay.test"\n[storage]\npath = "q.sqlite3"\n'
        f'[delivery]\nport = {env.world.smtp_port}\nnameservers = ["{env.world.nameservers[0]}"]\n'
        f'ca_file = "{env.world.ca_file}"\ndns_timeout = 1\nconnect_timeout = 2\n'
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "mailrelay", "--config", str(config), "tls-check", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    as_json, as_text = await asyncio.gather(
        asyncio.to_thread(cli, DOMAIN, "--json"), asyncio.to_thread(cli, DOMAIN)
    )

    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert (report["domain"], report["verdict"]) == (DOMAIN, "secure")
    [mx] = report["mx"]
    leaf = issued.leaf
    assert mx == {
        "host": MX1,
        "preference": 10,
        "address": mx1.address[0],
        "dnssec": True,
        "tlsa": "secure",
        "tlsa_detail": f"{owner(MX1)} (DNSSEC-validated)",
        "tlsa_records": mx["tlsa_records"],
        "starttls": True,
        "protocol": TLS13[0],
        "cipher": TLS13[1],
        "certificate_subject": f"CN={MX1}",
        "certificate_issuer": f"CN={MX1}",
        "certificate_not_before": leaf.not_valid_before_utc.isoformat(),
        "certificate_not_after": leaf.not_valid_after_utc.isoformat(),
        "certificate_verified": True,
        "policy": "dane-ee",
        "policy_detail": f"{owner(MX1)} TLSA {current}",
        "verdict": "secure",
        "status": "2.0.0",
        "detail": f"{where(mx1)}: accepted",
    }
    assert sorted(mx["tlsa_records"]) == sorted([current, upcoming])

    assert as_text.returncode == 0, as_text.stderr
    lines = as_text.stdout.splitlines()
    assert lines[0].startswith(f"{DOMAIN}: SECURE (every MX meets the policy)")
    assert f"  MX 10 {MX1} [{mx1.address[0]}]: secure (2.0.0)" in lines
    assert f"      DNSSEC yes; TLSA secure: {owner(MX1)} (DNSSEC-validated)" in lines
    assert f"        TLSA {current}" in lines and f"        TLSA {upcoming}" in lines
    assert f"      policy dane-ee: {owner(MX1)} TLSA {current}" in lines
    # A probe sends no mail, and introduces itself with the TLSA base domain too.
    assert mx1.all_messages == []
    assert {c.sni for c in mx1.connections} == {MX1}
