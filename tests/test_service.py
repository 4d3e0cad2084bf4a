"""The service as systemd runs it: a separate process, sd_notify, SIGTERM, and kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mailrelay.service import Service
from tests.conftest import PASSWORD, free_port, make_config, write_config_file
from tests.test_submission import MESSAGE, queued_id, send_raw
from tests.world import MODERN, World

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


FIRST_ADDRESS = "127.0.42.1"  # this file's MX servers: 127.0.42.x


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


async def test_delivery_process_survives_kill_9_of_its_own(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """`serve` delivers from a second process; killing it loses nothing and the service
    starts another; its metrics are served on the one endpoint; SIGTERM ends both."""
    async with World(tmp_path / "world", first_address=FIRST_ADDRESS) as world:
        mx = await world.add_mx("example.net", MODERN)
        await world.add_mx("example.org", MODERN)
        config, port, metrics_port = write_delivering_config(tmp_path, world)
        setup_user(config)
        proc = start(config, notify_socket)
        try:
            assert (await run(notify_socket.recv, 1024)).startswith(b"READY=1")
            [deliverer] = children(proc.pid)
            first = await run(submit, port, tmp_path / "tls" / "cert.pem")
            await mx.wait_for_messages(1)
            await recorded_as_sent(config, first)  # else the kill below may cause a duplicate

            os.kill(deliverer, signal.SIGKILL)
            await run(submit, port, tmp_path / "tls" / "cert.pem")
            async with asyncio.timeout(10):
                await mx.wait_until(lambda s: len(s.messages) == 2)
            [successor] = children(proc.pid)
            assert successor != deliverer
            # The successor's own count (counters restart with their process, as Prometheus
            # expects), served by the parent's endpoint.
            sent = 'mailrelay_smtp_messages_processed_total{status="sent"} 1.0'
            text = await run(scrape_until, metrics_port, sent)
            assert "mailrelay_smtpd_messages_processed_total 2.0" in text

            proc.send_signal(signal.SIGTERM)
            assert await run(proc.wait, 30) == 0
            assert not await run(Path(f"/proc/{successor}").exists)
        finally:
            if proc.poll() is None:
                proc.kill()
            assert proc.stderr is not None
            stderr = proc.stderr.read().decode()
            proc.stderr.close()
    assert "event=delivery_process_died" in stderr
    assert [m.rcpt_tos for m in mx.messages] == [("bob@example.net",)] * 2
    listed = json.loads(cli(config, "queue", "list", "--json").stdout)
    assert listed == []


def scrape_until(port: int, line: str) -> str:
    deadline = time.monotonic() + 10
    while line not in (text := scrape(port)):
        assert time.monotonic() < deadline, text
        time.sleep(0.1)
    return text


async def recorded_as_sent(config: Path, queue_id: str) -> None:
    async with asyncio.timeout(10):
        while True:
            shown = json.loads((await run(cli, config, "queue", "show", queue_id, "--json")).stdout)
            if [r["state"] for r in shown["recipients"]] == ["sent"]:
                return
            await asyncio.sleep(0.05)


def write_delivering_config(directory: Path, world: World) -> tuple[Path, int, int]:
    """A config for `serve` that delivers to `world` from its own delivery process."""
    metrics_port = free_port()
    delivery = (
        f'port = {world.smtp_port}\nnameservers = ["{world.nameservers[0]}"]\n'
        f'ca_file = "{world.ca_file}"\ndns_timeout = 1\nconnect_timeout = 5\n'
    )
    path, port = write_config_file(directory, delivery=delivery, metrics_port=metrics_port)
    return path, port, metrics_port


async def test_a_second_serve_on_the_same_database_refuses(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    config, _port = write_config_file(tmp_path)
    proc = start(config, notify_socket)
    try:
        assert (await run(notify_socket.recv, 1024)).startswith(b"READY=1")
        second = await run(cli, config, "serve")
        database = tmp_path / "queue.sqlite3"
        assert (second.returncode, second.stdout) == (1, "")
        assert second.stderr == (
            f"mailrelay: another mailrelay (pid {proc.pid}) is serving {database}; stop it first\n"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await run(proc.wait, 30) == 0
        assert proc.stderr is not None
        proc.stderr.close()


async def test_a_start_that_fails_half_way_closes_what_it_opened(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    busy = socket.socket()
    busy.bind(("127.0.0.1", cfg.submission.listen[0].port))
    busy.listen()
    try:
        service = Service(cfg)
        with pytest.raises(OSError):
            await service.start()
    finally:
        busy.close()
    # The lock and the database were given back: the next start on them works.
    again = Service(cfg)
    await again.start()
    await again.stop()
