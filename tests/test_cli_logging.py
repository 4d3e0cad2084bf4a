"""What `mailrelay serve` writes, as systemd's journal receives it: syslog priorities when stderr
is journald's stream, the first-steps hint only while there is no domain, nothing but JSON in JSON
mode, each refusal once at info with the client and the address, and no per-connection warning on
the implicit-TLS port."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, free_port, write_config_file
from tests.test_service import cli
from tests.test_submission import MESSAGE

run = asyncio.to_thread


def config_with(tmp_path: Path, *, log_format: str = "kv") -> tuple[Path, int, int]:
    """A serve config with an implicit-TLS port, a 2 KB size limit and the given log format."""
    config, port = write_config_file(tmp_path, f'[log]\nformat = "{log_format}"\n')
    implicit = free_port()
    text = config.read_text().replace(
        f'listen = ["127.0.0.1:{port}"]',
        f'listen = ["127.0.0.1:{port}"]\nimplicit_tls_listen = ["127.0.0.1:{implicit}"]\n'
        "max_message_size = 2048",
    )
    config.write_text(text)
    return config, port, implicit


class Serving:
    """`mailrelay serve` in its own process, stdout and stderr in files: journald's stream is a
    file descriptor too, and JOURNAL_STREAM names it by device and inode."""

    def __init__(self, config: Path, notify: socket.socket, *, journal: bool) -> None:
        directory = config.parent
        self.stdout_path = directory / "stdout.log"
        self.stderr_path = directory / "stderr.log"
        self.notify = notify
        env = {**os.environ, "NOTIFY_SOCKET": notify.getsockname()}
        env.pop("JOURNAL_STREAM", None)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            if journal:
                st = os.fstat(err.fileno())
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailrelay", "--config", str(config), "serve"],
                env=env,
                stdout=out,
                stderr=err,
            )

    async def ready(self) -> None:
        message = await run(self.notify.recv, 1024)
        assert message.split(b"\n")[0] == b"READY=1", message

    async def stop(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            # Taken off the socket, so that the next process's READY=1 is the next message.
            assert (await run(self.notify.recv, 1024)).startswith(b"STOPPING=1")
        assert await run(self.proc.wait, 30) == 0
        return self.stdout_path.read_text(), self.stderr_path.read_text()


def client_context(config: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(config.parent / "tls" / "cert.pem"))
    ctx.check_hostname = False
    return ctx


def add_domain_and_user(config: Path) -> None:
    added = cli(config, "domain", "add", "example.org", "--notify", "postmaster@example.org")
    assert added.returncode == 0, added.stderr
    user = cli(config, "user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD)
    assert user.returncode == 0, user.stderr


def refusals(config: Path, port: int, implicit: int) -> None:
    ctx = client_context(config)
    # Two sessions on the implicit-TLS port: aiosmtpd's warning would come once per session.
    for _ in range(2):
        with smtplib.SMTP_SSL("127.0.0.1", implicit, context=ctx, timeout=10) as client:
            assert client.ehlo()[0] == 250
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=ctx)
        client.ehlo()
        assert client.mail("alice@example.org")[0] == 530  # no AUTH: relaying refused
        client.user, client.password = "alice@example.org", "not the password"
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.auth("PLAIN", client.auth_plain)  # one attempt (login() tries each mechanism)
        assert failed.value.smtp_code == 535
        client.login("alice@example.org", PASSWORD)
        assert client.mail("mallory@example.org")[0] == 553  # not hers
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt("bob@example.net")[0] == 250
        code, _ = client.data(MESSAGE + (b"x" * 70 + b"\r\n") * 60)
        assert code == 552


def lines_with(stderr: str, event: str) -> list[str]:
    return [line for line in stderr.splitlines() if f" event={event} " in line + " "]


async def test_journal_priorities_refusals_and_the_first_steps_hint(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    config, port, implicit = config_with(tmp_path)
    serving = Serving(config, notify_socket, journal=True)
    try:
        await serving.ready()
        await run(add_domain_and_user, config)
        await run(refusals, config, port, implicit)
    finally:
        stdout, stderr = await serving.stop()

    log_lines = [line for line in stderr.splitlines() if " level=" in line]
    assert log_lines and all(re.match(r"<[2-7]>ts=\S+ level=", line) for line in log_lines)
    [started] = lines_with(stderr, "started")
    assert started.startswith("<6>")
    [warning] = lines_with(stderr, "self_signed_certificate")
    assert warning.startswith("<4>ts=") and " level=warning " in warning
    # No domain when it started: the hint, after the log line that says where it listens.
    assert "No sending domain yet." in stderr
    assert stdout == ""

    [auth_failed] = lines_with(stderr, "auth_failed")
    assert auth_failed.startswith("<6>") and " level=info " in auth_failed
    assert " client=127.0.0.1 " in auth_failed
    assert "not the password" not in stderr and PASSWORD not in stderr
    refused = lines_with(stderr, "refused")
    assert all(line.startswith("<6>") and "client=127.0.0.1 " in line for line in refused)
    assert [re.search(r"stage=(\w+)", line)[1] for line in refused] == [  # type: ignore[index]
        "mail",
        "mail",
        "data",
    ]
    assert "address='alice@example.org'" in refused[0]
    assert "reply='530 5.7.0 Authentication required'" in refused[0]
    assert "address='mallory@example.org'" in refused[1] and "reply='553 5.7.1" in refused[1]
    assert "address='alice@example.org'" in refused[2] and "reply='552" in refused[2]
    assert "auth_require_tls" not in stderr and "Requiring AUTH" not in stderr


async def test_no_hint_once_a_domain_exists_and_json_mode_is_json_only(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    config, port, implicit = config_with(tmp_path)
    await run(add_domain_and_user, config)
    serving = Serving(config, notify_socket, journal=False)
    await serving.ready()
    stdout, stderr = await serving.stop()
    assert "No sending domain" not in stderr and stdout == ""
    assert lines_with(stderr, "started")[0].startswith("ts=")  # not journald's stream: no <6>

    config.write_text(config.read_text().replace('format = "kv"', 'format = "json"'))
    serving = Serving(config, notify_socket, journal=False)
    try:
        await serving.ready()
        await run(refusals, config, port, implicit)
    finally:
        stdout, stderr = await serving.stop()
    assert stdout == ""
    entries = [json.loads(line) for line in stderr.splitlines()]
    events = [entry.get("event") for entry in entries]
    assert "started" in events and "stopped" in events
    assert events.count("auth_failed") == 1 and events.count("refused") == 3
    [mallory] = [e for e in entries if e.get("address") == "mallory@example.org"]
    assert mallory["level"] == "info" and mallory["client"] == "127.0.0.1"
