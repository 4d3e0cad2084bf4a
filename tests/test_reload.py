"""The submission certificate as an operator renews it: SIGHUP to a real `mailrelay serve`
reloads it for new connections while open sessions go on, and the development certificate
verifies for clients that dial 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from mailrelay.submission.tls import ensure_self_signed
from tests.conftest import PASSWORD, Relay, free_port, write_config_file
from tests.test_service import scrape, setup_user
from tests.test_submission import MESSAGE, queued_id, send_raw

run = asyncio.to_thread
EXPIRY = "mailrelay_tls_certificate_expiry_timestamp_seconds"
RELOADED = "event=tls_reloaded"
RELOAD_FAILED = "event=tls_reload_failed"


def make_pair(directory: Path, name: str, days: int) -> tuple[Path, Path, float]:
    """A self-signed certificate for `name` (and 127.0.0.1) valid `days` days; its notAfter."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_after = now + datetime.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, not_after.timestamp()


def fingerprint(cert_file: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()


def any_certificate() -> ssl.SSLContext:
    """A client that accepts whatever it is shown: these tests look at what that is."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def shown_on_starttls(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=any_certificate())
        der = cast(ssl.SSLSocket, client.sock).getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def shown_on_implicit(port: int) -> str:
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=any_certificate()) as client:
        der = cast(ssl.SSLSocket, client.sock).getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def expiry(metrics_port: int) -> float:
    for family in text_string_to_metric_families(scrape(metrics_port)):
        if family.name == EXPIRY:
            return float(family.samples[0].value)
    raise AssertionError(f"{EXPIRY} not exported")


def wait_for_log(log: Path, line: str, count: int) -> str:
    """Wait until `line` appears `count` times in the service's stderr."""
    deadline = time.monotonic() + 10
    while (text := log.read_text()).count(line) < count:
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    return text


def serve(config: Path, notify: socket.socket, log: Path) -> subprocess.Popen[bytes]:
    """`mailrelay serve` as systemd starts it, its stderr (the journal) in `log`."""
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "mailrelay", "--config", str(config), "serve"],
            env={**os.environ, "NOTIFY_SOCKET": notify.getsockname()},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


async def test_sighup_reloads_the_certificate_and_keeps_open_sessions(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    metrics_port, implicit_port = free_port(), free_port()
    config, port = write_config_file(tmp_path, metrics_port=metrics_port)
    implicit = f'implicit_tls_listen = ["127.0.0.1:{implicit_port}"]\n'
    config.write_text(config.read_text().replace("[submission]\n", "[submission]\n" + implicit))
    first_cert, first_key, first_expiry = make_pair(tmp_path / "pairs", "first.test", 90)
    second_cert, second_key, second_expiry = make_pair(tmp_path / "pairs", "second.test", 60)
    third_cert, _third_key, _ = make_pair(tmp_path / "pairs", "third.test", 30)
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    cert.parent.mkdir()
    shutil.copy(first_cert, cert)
    shutil.copy(first_key, key)
    setup_user(config)
    log = tmp_path / "stderr.log"
    proc = serve(config, notify_socket, log)
    try:
        assert (await run(notify_socket.recv, 1024)).startswith(b"READY=1")
        assert await run(shown_on_starttls, port) == fingerprint(first_cert)
        assert await run(expiry, metrics_port) == first_expiry

        # A session set up on the first certificate, authenticated and in a transaction.
        open_session = smtplib.SMTP("127.0.0.1", port, timeout=10)
        await run(open_session.starttls, context=any_certificate())
        await run(open_session.login, "alice@example.org", PASSWORD)
        assert (await run(open_session.mail, "alice@example.org"))[0] == 250
        assert (await run(open_session.rcpt, "bob@example.net"))[0] == 250

        # certbot renews: new files in place, then the deploy hook's reload.
        shutil.copy(second_cert, cert)
        shutil.copy(second_key, key)
        proc.send_signal(signal.SIGHUP)
        await run(wait_for_log, log, RELOADED, 1)
        assert await run(shown_on_starttls, port) == fingerprint(second_cert)
        assert await run(shown_on_implicit, implicit_port) == fingerprint(second_cert)
        assert await run(expiry, metrics_port) == second_expiry
        # The open session goes on to the end of its transaction, and another one.
        assert (await run(open_session.docmd, "DATA"))[0] == 354
        await run(open_session.send, MESSAGE + b".\r\n")
        queued_id(await run(open_session.getreply))
        reply = await run(
            send_raw, open_session, "alice@example.org", ["bob@example.net"], MESSAGE + b".\r\n"
        )
        queued_id(reply)
        await run(open_session.quit)

        # A renewal gone wrong: a key that does not belong to the certificate, then no PEM at
        # all. Each is logged, and the loaded pair stays.
        shutil.copy(third_cert, cert)
        proc.send_signal(signal.SIGHUP)
        await run(wait_for_log, log, RELOAD_FAILED, 1)
        cert.write_text("not a certificate\n")
        proc.send_signal(signal.SIGHUP)
        logged = await run(wait_for_log, log, RELOAD_FAILED, 2)
        assert await run(shown_on_starttls, port) == fingerprint(second_cert)
        assert await run(shown_on_implicit, implicit_port) == fingerprint(second_cert)
        assert await run(expiry, metrics_port) == second_expiry
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await run(proc.wait, 30) == 0
    failures = [line for line in logged.splitlines() if RELOAD_FAILED in line]
    assert all("level=error" in line and str(cert) in line for line in failures), failures
    assert RELOADED in logged and "not_after=" in logged


def log_in_verifying_the_address(relay: Relay) -> None:
    ctx = ssl.create_default_context(cafile=relay.cert_file)
    assert ctx.check_hostname  # against the address dialled: 127.0.0.1
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.starttls(context=ctx)
        client.login("alice@example.org", PASSWORD)
    with smtplib.SMTP_SSL("127.0.0.1", relay.implicit_port, timeout=10, context=ctx) as client:
        client.login("alice@example.org", PASSWORD)


async def test_development_certificate_verifies_by_ip_address(tmp_path: Path, relay: Relay) -> None:
    await run(log_in_verifying_the_address, relay)
    # And what `make run` makes on a first start, which names ::1 too.
    cert_file, key_file = tmp_path / "dev" / "cert.pem", tmp_path / "dev" / "key.pem"
    assert ensure_self_signed(str(cert_file), str(key_file), "relay.test")
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["relay.test"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
