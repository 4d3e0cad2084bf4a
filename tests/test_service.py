"""The service as systemd runs it: a separate process, sd_notify, SIGTERM, and kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, write_config_file
from tests.test_submission import MESSAGE, queued_id, send_raw

run = asyncio.to_thread


def cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailrelay", "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(30)
    yield sock
    sock.close()


def start(config: Path, notify: socket.socket) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NOTIFY_SOCKET": notify.getsockname()}
    return subprocess.Popen(
        [sys.executable, "-m", "mailrelay", "--config", str(config), "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def submit(port: int, cert: Path) -> str:
    import smtplib
    import ssl

    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=ctx)
        client.login("alice@example.org", PASSWORD)
        reply = send_raw(client, "alice@example.org", ["bob@example.net"], MESSAGE + b".\r\n")
    return queued_id(reply)


def setup_user(config: Path) -> None:
    added = cli(config, "domain", "add", "example.org", "--notify", "postmaster@example.org")
    assert added.returncode == 0, added.stderr
    user = cli(config, "user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD)
    assert user.returncode == 0, user.stderr


async def test_ready_stopping_and_sigterm(tmp_path: Path, notify_socket: socket.socket) -> None:
    config, port = write_config_file(tmp_path)
    setup_user(config)
    proc = start(config, notify_socket)
    try:
        ready = await run(notify_socket.recv, 1024)
        assert ready.split(b"\n")[0] == b"READY=1"
        queue_id = await run(submit, port, tmp_path / "tls" / "cert.pem")
        proc.send_signal(signal.SIGTERM)
        assert await run(notify_socket.recv, 1024) == b"STOPPING=1"
        assert await run(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    assert "event=stopped" in stderr
    assert PASSWORD not in stderr
    listed = json.loads(cli(config, "queue", "list", "--json").stdout)
    assert [m["id"] for m in listed] == [queue_id]


async def test_kill_9_loses_no_accepted_mail(tmp_path: Path, notify_socket: socket.socket) -> None:
    config, port = write_config_file(tmp_path)
    setup_user(config)
    proc = start(config, notify_socket)
    try:
        await run(notify_socket.recv, 1024)
        ids = [await run(submit, port, tmp_path / "tls" / "cert.pem") for _ in range(5)]
    finally:
        proc.send_signal(signal.SIGKILL)
        await run(proc.wait, 30)
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    listed = json.loads(cli(config, "queue", "list", "--json").stdout)
    assert sorted(m["id"] for m in listed) == sorted(ids)
    # And a restarted service starts cleanly on the same database.
    again = start(config, notify_socket)
    try:
        assert (await run(notify_socket.recv, 1024)).startswith(b"READY=1")
    finally:
        again.send_signal(signal.SIGTERM)
        assert await run(again.wait, 30) == 0
        assert again.stderr is not None
        again.stderr.close()
