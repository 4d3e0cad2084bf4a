"""The delivery session's TLS against real receiving servers on loopback, one per TLS
behaviour: what it accepts and records, and what it refuses, under each level and profile."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mailrelay.config import CipherProfile, SecurityLevel
from mailrelay.delivery.ciphers import PROFILES, Acceptable, grade, parse_suite
from mailrelay.delivery.policy import Authentication, Encrypt, TlsRequirement, WebPki
from mailrelay.delivery.result import Insecure, Kind, Result
from mailrelay.delivery.session import Session, open_session
from tests.world import (
    CBC_ONLY,
    EXPIRED_CERT,
    MODERN,
    NO_STARTTLS,
    RSA_KEY_EXCHANGE_ONLY,
    TLS10_ONLY,
    TLS12_SELF_SIGNED,
    TLS13_ONLY,
    WRONG_HOST_CERT,
    Behaviour,
    MxServer,
    TlsMode,
    World,
)
from tests.world.mx import server_context

FIRST_ADDRESS = "127.0.26.1"  # this file's MX servers: 127.0.26.x
EHLO_NAME = "relay.test"
SENDER = "alice@sender.test"
MESSAGE = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: bob@dest.test\r\n"
    b"Subject: results\r\n"
    b"\r\n"
    b"Personal data.\r\n"
    b".A line starting with a dot.\r\n"
)
ENVELOPE_VERBS = ("MAIL", "RCPT", "DATA", "BDAT")
ACCEPTED_BY_MX = "250 2.0.0 Message accepted"


@contextlib.asynccontextmanager
async def checked_world(tmp_path: Path, first_address: str) -> AsyncIterator[World]:
    """A world whose servers, once the test is done, must have received nothing outside TLS."""
    async with World(tmp_path, first_address=first_address) as w:
        yield w
        # Whatever a test did, nothing ever reached any server outside TLS.
        for server in w.servers:
            assert not server.received_message_bytes_before_tls, server.hostname


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with checked_world(tmp_path, FIRST_ADDRESS) as w:
        yield w


async def connect(
    world: World,
    server: MxServer,
    level: SecurityLevel = "encrypt",
    profile: CipherProfile = "ncsc-2025",
    *,
    ca_file: bool = True,
) -> Session | Result:
    host, port = server.address
    return await open_session(
        server.hostname,
        host,
        requirement(server.hostname, level, profile, str(world.ca_file) if ca_file else ""),
        port=port,
        ehlo_name=EHLO_NAME,
        connect_timeout=5.0,
        command_timeout=5.0,
    )


def requirement(
    mx_name: str, level: SecurityLevel, profile: CipherProfile = "ncsc-2025", ca_file: str = ""
) -> TlsRequirement:
    """What the local transport policy asks under `level`, as delivery builds it."""
    authentication: Authentication = (
        WebPki((mx_name,), ca_file) if level == "verify" else Encrypt(ca_file)
    )
    return TlsRequirement(profile, authentication, mx_name)


async def session(world: World, server: MxServer, level: SecurityLevel = "encrypt") -> Session:
    result = await connect(world, server, level)
    assert isinstance(result, Session), result
    return result


async def failure(
    world: World,
    server: MxServer,
    level: SecurityLevel = "encrypt",
    profile: CipherProfile = "ncsc-2025",
    **kw: bool,
) -> Result:
    result = await connect(world, server, level, profile, **kw)
    assert isinstance(result, Result), result
    return result


def server_reply(result: Result) -> str | None:
    """The reply the server gave, as the evidence records it."""
    return result.evidence[-1].reply


def assert_envelope_never_sent(server: MxServer) -> None:
    lines = [c.line.upper() for c in server.commands]
    assert not [line for line in lines if line.startswith(ENVELOPE_VERBS)], lines
    assert server.all_messages == []


def leaf_sha256(server: MxServer, world: World) -> str:
    pem = (world.directory / "certs" / f"{server.hostname}.crt").read_bytes()
    return hashlib.sha256(
        x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    ).hexdigest()


# -- secure servers: a session, its TLS facts recorded, and mail delivered ----------------------


async def test_tls13_records_the_facts_and_delivers(world: World) -> None:
    server = await world.add_mx("dest.test", TLS13_ONLY)
    async with await session(world, server) as s:
        assert s.tls.protocol == "TLSv1.3"
        assert s.tls.cipher == server.tls_sessions[0].cipher
        assert isinstance(grade("ncsc-2025", s.tls.protocol, s.tls.cipher), Acceptable)
        cert = s.tls.certificate
        assert cert is not None
        assert cert.sha256 == leaf_sha256(server, world)
        assert cert.subject == f"CN={server.hostname}"
        assert cert.issuer == "CN=mailrelay test CA"
        assert cert.not_before < cert.not_after
        # "encrypt" does not require a valid chain, but records whether there was one.
        assert s.tls.verified is True
        assert s.tls.verify_error is None
        result = await s.send(SENDER, ["bob@dest.test"], MESSAGE)
    (rcpt,) = result
    assert rcpt.kind is Kind.SENT
    assert server_reply(rcpt) == ACCEPTED_BY_MX
    assert rcpt.status == "2.0.0"
    (evidence,) = rcpt.evidence
    assert (evidence.tls_protocol, evidence.policy, evidence.cert_verified) == (
        "TLSv1.3",
        "encrypt",
        True,
    )
    (message,) = await server.wait_for_messages()
    assert message.tls
    assert message.mail_from == SENDER
    assert message.rcpt_tos == ("bob@dest.test",)
    assert message.data == MESSAGE
    assert server.commands[-1].line == "QUIT"


async def test_tls12_self_signed_is_enough_for_encrypt(world: World) -> None:
    server = await world.add_mx("dest.test", TLS12_SELF_SIGNED)
    async with await session(world, server) as s:
        assert s.tls.protocol == "TLSv1.2"
        assert s.tls.cipher.startswith("ECDHE-ECDSA-AES") and "-GCM-" in s.tls.cipher
        assert s.tls.certificate is not None
        assert s.tls.certificate.issuer == s.tls.certificate.subject
        assert s.tls.verified is False
        assert s.tls.verify_error
        result = await s.send(SENDER, ["bob@dest.test"], MESSAGE)
    assert [r.kind for r in result] == [Kind.SENT]
    await server.wait_for_messages()


async def test_ca_signed_certificate_passes_verify_with_ca_file(world: World) -> None:
    server = await world.add_mx("dest.test", MODERN)
    async with await session(world, server, "verify") as s:
        assert s.tls.verified is True
        assert s.tls.protocol == "TLSv1.3"
        assert s.tls.policy == "verify"
        result = await s.send(SENDER, ["bob@dest.test"], MESSAGE)
    assert result[0].kind is Kind.SENT


async def test_two_messages_over_one_session(world: World) -> None:
    server = await world.add_mx("dest.test", MODERN)
    async with await session(world, server) as s:
        first = await s.send(SENDER, ["bob@dest.test"], MESSAGE)
        second = await s.send("other@sender.test", ["carol@dest.test"], MESSAGE + b"Two.\r\n")
        assert s.alive
    assert first[0].kind is second[0].kind is Kind.SENT
    one, two = await server.wait_for_messages(2)
    assert len(server.connections) == 1
    assert (one.rcpt_tos, two.rcpt_tos) == (("bob@dest.test",), ("carol@dest.test",))
    assert two.mail_from == "other@sender.test"
    assert two.data.endswith(b"Two.\r\n")
    verbs = [c.line.split()[0].upper() for c in server.commands]
    assert verbs == [
        *("EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA"),
        *("RSET", "MAIL", "RCPT", "DATA", "QUIT"),
    ]


# -- insecure servers: refused before MAIL FROM, with the named reason ---------------------------


@pytest.mark.parametrize("level", ["encrypt", "verify"])
@pytest.mark.parametrize(
    ("behaviour", "reason", "status", "detail"),
    [
        (NO_STARTTLS, Insecure.NO_STARTTLS, "5.7.4", "does not offer STARTTLS"),
        (TLS10_ONLY, Insecure.PROTOCOL, "5.7.10", "negotiated TLSv1.0"),
        (RSA_KEY_EXCHANGE_ONLY, Insecure.CIPHER, "5.7.10", "AES128-GCM-SHA256 uses RSA key"),
        (CBC_ONLY, Insecure.CIPHER, "5.7.10", "uses CBC mode"),
    ],
    ids=["no-starttls", "tls1.0", "rsa-kx", "cbc"],
)  # fmt: skip
async def test_insecure_servers_are_refused(
    world: World,
    level: SecurityLevel,
    behaviour: Behaviour,
    reason: Insecure,
    status: str,
    detail: str,
) -> None:
    server = await world.add_mx("dest.test", behaviour)
    result = await failure(world, server, level)
    assert result.kind is Kind.INSECURE
    assert result.insecure is reason
    assert result.status == status
    assert result.diagnostic.startswith(f"{server.hostname}[{server.address[0]}]: ")
    assert detail in result.diagnostic
    assert_envelope_never_sent(server)
    await server.wait_until(lambda s: all(c.closed for c in s.connections))
    assert server.commands[-1].line == "QUIT"
    if reason in (Insecure.PROTOCOL, Insecure.CIPHER):
        # The refusal records exactly what the server negotiated.
        (evidence,) = result.evidence
        (negotiated,) = server.tls_sessions
        assert (evidence.tls_protocol, evidence.tls_cipher) == (
            negotiated.version,
            negotiated.cipher,
        )


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (EXPIRED_CERT, "certificate has expired"),
        (WRONG_HOST_CERT, "hostname mismatch: the certificate names wrong-host.invalid"),
        (TLS12_SELF_SIGNED, "self-signed certificate"),
    ],
    ids=["expired", "wrong-host", "self-signed"],
)
async def test_certificate_failures_under_verify(
    world: World, behaviour: Behaviour, message: str
) -> None:
    server = await world.add_mx("dest.test", behaviour)
    result = await failure(world, server, "verify")
    assert (result.kind, result.insecure, result.status) == (
        Kind.INSECURE,
        Insecure.CERTIFICATE,
        "5.7.5",
    )
    assert message in result.diagnostic
    # The refused session is evidence too: what was negotiated, and under which policy.
    (evidence,) = result.evidence
    assert (evidence.kind, evidence.policy, evidence.cert_verified) == (
        Kind.INSECURE,
        "verify",
        False,
    )
    assert evidence.tls_protocol is not None and evidence.cert_fingerprint is not None
    assert_envelope_never_sent(server)


async def test_verify_needs_the_ca(world: World) -> None:
    server = await world.add_mx("dest.test", MODERN)
    result = await failure(world, server, "verify", ca_file=False)
    assert result.insecure is Insecure.CERTIFICATE
    assert "unable to get local issuer certificate" in result.diagnostic
    assert_envelope_never_sent(server)


@pytest.mark.parametrize("behaviour", [EXPIRED_CERT, WRONG_HOST_CERT])
async def test_bad_certificates_are_enough_for_encrypt(world: World, behaviour: Behaviour) -> None:
    server = await world.add_mx("dest.test", behaviour)
    async with await session(world, server) as s:
        assert s.tls.verified is False
        assert s.tls.verify_error


async def test_no_shared_cipher_is_a_handshake_failure(world: World) -> None:
    # The world has no "no cipher in common" behaviour; this server offers only NULL
    # encryption, which our client never offers, so its TLS stack answers with an alert.
    server = await world.add_mx("dest.test", Behaviour(tls=TlsMode.TLS12_ECDHE_GCM))
    cert = world.directory / "certs" / f"{server.hostname}.crt"
    ctx = server_context(TlsMode.TLS12_ECDHE_GCM, cert, cert.with_suffix(".key"))
    ctx.set_ciphers("eNULL:@SECLEVEL=0")
    server._contexts[TlsMode.TLS12_ECDHE_GCM] = ctx  # world API has no hook for this
    result = await failure(world, server)
    assert (result.kind, result.insecure, result.status) == (
        Kind.INSECURE,
        Insecure.HANDSHAKE,
        "5.7.5",
    )
    assert "ALERT_HANDSHAKE_FAILURE" in result.diagnostic
    assert_envelope_never_sent(server)


# -- the profile decides ---------------------------------------------------------------------


async def test_nist_accepts_ecdhe_cbc(world: World) -> None:
    server = await world.add_mx("dest.test", CBC_ONLY)
    result = await connect(world, server, profile="nist-800-52r2")
    assert isinstance(result, Session), result
    suite = parse_suite(result.tls.cipher)
    assert (suite.kx, suite.mode) == ("ECDHE", "CBC")
    await result.close()


async def test_nist_still_refuses_rsa_key_exchange(world: World) -> None:
    server = await world.add_mx("dest.test", RSA_KEY_EXCHANGE_ONLY)
    result = await failure(world, server, profile="nist-800-52r2")
    assert result.insecure is Insecure.CIPHER


async def test_tls13_only_refuses_tls12(world: World) -> None:
    server = await world.add_mx("dest.test", TLS12_SELF_SIGNED)
    result = await failure(world, server, profile="tls13-only")
    assert result.insecure is Insecure.PROTOCOL
    assert result.diagnostic.endswith("negotiated TLSv1.2")
    assert_envelope_never_sent(server)


@pytest.mark.parametrize("profile", sorted(PROFILES))
async def test_every_profile_accepts_a_modern_server(world: World, profile: CipherProfile) -> None:
    server = await world.add_mx("dest.test", MODERN)
    result = await connect(world, server, profile=profile)
    assert isinstance(result, Session), result
    await result.close()
