"""The test world's MX servers: each TLS mode, certificate and misbehaviour is what it names,
and each records what the client sent."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import itertools
import re
import smtplib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import dns.rrset
import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import free_port
from tests.test_world_dns import ask
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
    TLS13_ONLY,
    WRONG_HOST_CERT,
    Behaviour,
    MxServer,
    TestCA,
    TlsSession,
    World,
    tlsa_record,
)
from tests.world.certs import ChainShape

CLIENT_NAME = "client.test"
SENDER = "alice@relay.test"
ACCEPTED = "250 2.0.0 Message accepted"
NO_SUCH_USER = "550 5.1.1 No such user"
TRY_LATER = "451 4.3.0 Try again later"
TLS_UNAVAILABLE = (454, b"4.7.0 TLS not available due to temporary reason")


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path) as w:
        yield w


# -- MX servers: TLS -------------------------------------------------------------------------------


def inspecting_context() -> ssl.SSLContext:
    """Accepts any certificate and offers every suite, so what the server chose can be named."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


async def read_reply(reader: asyncio.StreamReader) -> list[str]:
    lines = [(await reader.readline()).decode().rstrip("\r\n")]
    while lines[-1][3:4] == "-":
        lines.append((await reader.readline()).decode().rstrip("\r\n"))
    return lines


async def starttls(
    server: MxServer, ctx: ssl.SSLContext, *, server_hostname: str | None = None
) -> TlsSession:
    """EHLO, STARTTLS and a handshake with a plain asyncio client; what was negotiated."""
    reader, writer = await asyncio.open_connection(*server.address)
    try:
        await read_reply(reader)
        writer.write(f"EHLO {CLIENT_NAME}\r\nSTARTTLS\r\n".encode())
        assert "250 STARTTLS" in await read_reply(reader)
        assert await read_reply(reader) == ["220 2.0.0 Ready to start TLS"]
        await writer.start_tls(ctx, server_hostname=server_hostname)
        tls = writer.get_extra_info("ssl_object")
        return TlsSession(tls.version(), tls.cipher()[0])
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (MODERN, TlsSession("TLSv1.3", "TLS_AES_256_GCM_SHA384")),
        (TLS13_ONLY, TlsSession("TLSv1.3", "TLS_AES_256_GCM_SHA384")),
        (TLS12_SELF_SIGNED, TlsSession("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")),
        (TLS10_ONLY, TlsSession("TLSv1", "ECDHE-ECDSA-AES256-SHA")),
        (RSA_KEY_EXCHANGE_ONLY, TlsSession("TLSv1.2", "AES128-GCM-SHA256")),
        (CBC_ONLY, TlsSession("TLSv1.2", "ECDHE-RSA-AES128-SHA256")),
    ],
)
async def test_each_tls_mode_negotiates_what_it_names(
    world: World, behaviour: Behaviour, expected: TlsSession
) -> None:
    mx = await world.add_mx("example.org", behaviour)

    assert await starttls(mx, inspecting_context()) == expected
    await mx.wait_until(lambda s: s.connections[0].closed)
    assert mx.tls_sessions == [expected]


@pytest.mark.parametrize(
    ("behaviour", "verify_message"),
    [
        (MODERN, None),
        (EXPIRED_CERT, "certificate has expired"),
        (WRONG_HOST_CERT, "Hostname mismatch, certificate is not valid for 'mx1.example.org'."),
        (TLS12_SELF_SIGNED, "self-signed certificate"),
    ],
)
async def test_certificates_verify_only_when_they_should(
    world: World, behaviour: Behaviour, verify_message: str | None
) -> None:
    mx = await world.add_mx("example.org", behaviour)
    verifying = ssl.create_default_context(cafile=world.ca_file)

    if verify_message is None:
        await starttls(mx, verifying, server_hostname=mx.hostname)
    else:
        with pytest.raises(ssl.SSLCertVerificationError) as failure:
            await starttls(mx, verifying, server_hostname=mx.hostname)
        assert failure.value.verify_message == verify_message


@pytest.mark.parametrize("sni", ["mx1.example.org", None])
async def test_the_mx_records_the_sni_the_client_sent(world: World, sni: str | None) -> None:
    mx = await world.add_mx("example.org", MODERN)

    await starttls(mx, inspecting_context(), server_hostname=sni)
    await mx.wait_until(lambda s: s.connections[0].closed)

    assert mx.connections[0].sni == sni


async def test_an_mx_can_be_given_its_certificate_chain(world: World) -> None:
    private = TestCA("private trust anchor").intermediate("private intermediate")
    issued = private.issue(["mx1.example.org"], chain="full")
    mx = await world.add_mx("example.org", MODERN, issued=issued)
    received: list[bytes] = []

    def fetch_leaf() -> None:
        with smtp_client(mx) as client:
            client.starttls(context=inspecting_context())
            assert client.sock is not None
            received.append(cast(ssl.SSLSocket, client.sock).getpeercert(binary_form=True) or b"")

    await asyncio.to_thread(fetch_leaf)

    assert received == issued.chain_der[:1]
    assert [c.subject.rfc4514_string() for c in issued.certificates] == [
        "CN=mx1.example.org",
        "CN=private intermediate",
        "CN=private trust anchor",
    ]


@pytest.mark.parametrize(
    ("shape", "expected"),
    [("intermediates", 2), ("full", 3), ("leaf", 1)],
)
def test_issue_sends_the_chain_shape_asked_for(shape: ChainShape, expected: int) -> None:
    root = TestCA("root")
    issued = root.intermediate("intermediate").issue(["mx.example.org"], chain=shape)

    chain = issued.certificates
    assert len(chain) == expected
    for cert, issuer in itertools.pairwise(chain):
        cert.verify_directly_issued_by(issuer)


def test_tlsa_records_name_the_certificate_or_its_key() -> None:
    cert = TestCA().issue(["mx.example.org"]).leaf
    der = cert.public_bytes(serialization.Encoding.DER)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    assert tlsa_record(cert, 3, 1, 1) == f"3 1 1 {hashlib.sha256(spki).hexdigest()}"
    assert tlsa_record(cert, 2, 0, 2) == f"2 0 2 {hashlib.sha512(der).hexdigest()}"
    assert tlsa_record(cert, 3, 0, 0) == f"3 0 0 {der.hex()}"
    with pytest.raises(ValueError, match="no such TLSA selector: 2"):
        tlsa_record(cert, 3, 2, 1)


async def test_a_modern_client_cannot_handshake_with_tls10_only(world: World) -> None:
    mx = await world.add_mx("example.org", TLS10_ONLY)

    with pytest.raises(ssl.SSLError) as failure:
        await starttls(mx, ssl.create_default_context(cafile=world.ca_file))
    await mx.wait_until(lambda s: s.connections[0].closed)

    # The server sent its alert, as a real MX does; the client names it.
    assert failure.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"
    assert mx.connections[0].tls is None
    assert "UNSUPPORTED_PROTOCOL" in (mx.connections[0].tls_error or "")


def smtp_client(server: MxServer) -> smtplib.SMTP:
    return smtplib.SMTP(*server.address, local_hostname=CLIENT_NAME, timeout=5)


def try_starttls(server: MxServer) -> BaseException | None:
    with smtp_client(server) as client:
        try:
            client.starttls(context=inspecting_context())
        except (smtplib.SMTPException, ssl.SSLError) as e:
            return e
        return None


async def test_no_starttls_is_not_advertised_and_refused_if_sent(world: World) -> None:
    mx = await world.add_mx("example.org", NO_STARTTLS)

    def session() -> tuple[bool, tuple[int, bytes]]:
        with smtp_client(mx) as client:
            client.ehlo()
            return client.has_extn("starttls"), client.docmd("STARTTLS")

    assert await asyncio.to_thread(session) == (False, (502, b"5.5.1 STARTTLS not offered"))


async def test_starttls_454(world: World) -> None:
    mx = await world.add_mx("example.org", STARTTLS_454)

    error = await asyncio.to_thread(try_starttls, mx)

    assert isinstance(error, smtplib.SMTPResponseException)
    assert (error.smtp_code, error.smtp_error) == TLS_UNAVAILABLE


async def test_garbage_instead_of_a_handshake(world: World) -> None:
    mx = await world.add_mx("example.org", GARBAGE_AFTER_STARTTLS)

    error = await asyncio.to_thread(try_starttls, mx)

    assert isinstance(error, ssl.SSLError)
    assert error.reason == "WRONG_VERSION_NUMBER"


# -- MX servers: the SMTP session and what it records ---------------------------------------------


async def test_two_messages_on_one_connection_over_tls(world: World) -> None:
    mx = await world.add_mx("example.org", MODERN)

    def session() -> None:
        with smtp_client(mx) as client:
            client.starttls(context=inspecting_context())
            client.sendmail(SENDER, ["bob@example.org"], b"Subject: one\r\n\r\n.leading dot\r\n")
            client.sendmail(SENDER, ["carol@example.org"], b"Subject: two\r\n\r\nbody\r\n")

    await asyncio.to_thread(session)

    messages = await mx.wait_for_messages(2)
    assert [(m.mail_from, m.rcpt_tos, m.data, m.tls) for m in messages] == [
        (SENDER, ("bob@example.org",), b"Subject: one\r\n\r\n.leading dot\r\n", True),
        (SENDER, ("carol@example.org",), b"Subject: two\r\n\r\nbody\r\n", True),
    ]
    assert len(mx.connections) == 1
    assert [(c.line.split()[0], c.tls) for c in mx.commands[:4]] == [
        ("ehlo", False),
        ("STARTTLS", False),
        ("ehlo", True),
        ("mail", True),
    ]
    assert not mx.saw_mail_from_without_tls
    assert not mx.received_message_bytes_before_tls


async def test_plaintext_delivery_is_visible(world: World) -> None:
    mx = await world.add_mx("example.org", NO_STARTTLS)

    def session() -> None:
        with smtp_client(mx) as client:
            client.sendmail(SENDER, ["bob@example.org"], b"Subject: plain\r\n\r\nsecret\r\n")

    await asyncio.to_thread(session)

    assert mx.saw_mail_from_without_tls
    assert mx.received_message_bytes_before_tls
    assert [m.tls for m in mx.messages] == [False]


async def test_rcpt_replies_per_recipient(world: World) -> None:
    behaviour = Behaviour(rcpt_replies={"nobody@example.org": NO_SUCH_USER})
    mx = await world.add_mx("example.org", behaviour)

    def session() -> dict[str, tuple[int, bytes]]:
        with smtp_client(mx) as client:
            client.starttls(context=inspecting_context())
            return client.sendmail(SENDER, ["Nobody@example.org", "bob@example.org"], b"x\r\n")

    refused = await asyncio.to_thread(session)

    assert refused == {"Nobody@example.org": (550, b"5.1.1 No such user")}
    assert [m.rcpt_tos for m in mx.messages] == [("bob@example.org",)]


async def test_behaviour_can_change_between_attempts(world: World) -> None:
    mx = await world.add_mx("example.org", Behaviour(rcpt_reply=TRY_LATER))

    def attempt() -> None:
        with smtp_client(mx) as client:
            client.starttls(context=inspecting_context())
            client.sendmail(SENDER, ["bob@example.org"], b"x\r\n")

    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await asyncio.to_thread(attempt)
    mx.behaviour = MODERN
    await asyncio.to_thread(attempt)

    assert len(mx.messages) == 1


async def test_hang_up_instead_of_replying_to_data(world: World) -> None:
    mx = await world.add_mx("example.org", dataclasses.replace(MODERN, data_reply=None))

    def attempt() -> None:
        with smtp_client(mx) as client:
            client.starttls(context=inspecting_context())
            client.sendmail(SENDER, ["bob@example.org"], b"x\r\n")

    with pytest.raises(smtplib.SMTPServerDisconnected):
        await asyncio.to_thread(attempt)
    assert (mx.messages, [m.reply for m in mx.all_messages]) == ([], [""])


async def test_world_publishes_mx_and_a_records(world: World) -> None:
    first = await world.add_mx("example.org", MODERN, preference=10)
    second = await world.add_mx("example.org", MODERN, preference=20)

    mx = await ask(world.dns, "example.org", "MX")
    a = await ask(world.dns, "mx2.example.org", "A")

    port = world.smtp_port
    assert (first.address, second.address) == (("127.0.1.1", port), ("127.0.1.2", port))
    assert mx.answer == [
        dns.rrset.from_text(
            "example.org.", 300, "IN", "MX", "10 mx1.example.org.", "20 mx2.example.org."
        )
    ]
    assert a.answer == [dns.rrset.from_text("mx2.example.org.", 300, "IN", "A", "127.0.1.2")]


# -- the world's SMTP port -------------------------------------------------------------------------


async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def greeting(address: tuple[str, int]) -> str:
    reader, writer = await asyncio.open_connection(*address)
    try:
        [line] = await read_reply(reader)
        return line
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_the_smtp_port_comes_from_the_os_and_is_held_for_the_first_mx(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    with pytest.raises(RuntimeError, match=r"in start\(\)"):
        _ = world.smtp_port
    async with world:
        port = world.smtp_port
        # Held from start() on: nothing else gets it, not even binding as asyncio does, with
        # SO_REUSEADDR.
        with pytest.raises(OSError) as taken:
            await asyncio.start_server(hang_up, "127.0.1.1", port)
        assert taken.value.errno == errno.EADDRINUSE
        first = await world.add_mx("example.org", MODERN)
        second = await world.add_mx("example.net", MODERN)
        assert (first.address, second.address) == (("127.0.1.1", port), ("127.0.1.2", port))
        assert await greeting(first.address) == "220 mx1.example.org ESMTP test world"
        assert await greeting(second.address) == "220 mx2.example.net ESMTP test world"


async def test_the_port_in_use_on_a_later_address_fails_loudly(world: World) -> None:
    await world.add_mx("example.org", MODERN)
    squatter = await asyncio.start_server(hang_up, "127.0.1.2", world.smtp_port)
    try:
        message = (
            f"MX mx2.example.org cannot listen on 127.0.1.2:{world.smtp_port}, which is in use"
        )
        with pytest.raises(RuntimeError, match=re.escape(message)):
            await world.add_mx("example.org", MODERN)
    finally:
        squatter.close()
        await squatter.wait_closed()
    assert [s.hostname for s in world.servers] == ["mx1.example.org"]


async def test_two_worlds_on_the_same_addresses_do_not_collide(tmp_path: Path) -> None:
    """As two test runs at once: each world has its own port, so each reaches only its own MX."""
    async with World(tmp_path / "a") as a, World(tmp_path / "b") as b:
        assert a.smtp_port != b.smtp_port
        for w, domain in ((a, "a.example"), (b, "b.example")):
            for n in (1, 2):
                mx = await w.add_mx(domain, MODERN)
                assert mx.address == (f"127.0.1.{n}", w.smtp_port)
                assert await greeting(mx.address) == f"220 mx{n}.{domain} ESMTP test world"


async def test_a_world_can_be_given_its_smtp_port(tmp_path: Path) -> None:
    port = free_port("127.0.1.1")
    async with World(tmp_path, smtp_port=port) as world:
        mx = await world.add_mx("example.org", MODERN)
        assert (world.smtp_port, mx.address) == (port, ("127.0.1.1", port))


async def test_stop_closes_idle_connections(world: World) -> None:
    mx = await world.add_mx("example.org", MODERN)
    reader, writer = await asyncio.open_connection(*mx.address)
    await read_reply(reader)

    async with asyncio.timeout(2):
        await mx.stop()
        assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
