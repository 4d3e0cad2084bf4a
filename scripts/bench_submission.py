"""Submission benchmark: N concurrent clients, each one STARTTLS+AUTH session sending M messages
of S bytes to a mailrelay started for the purpose (own temporary database, loopback only).

Prints messages per second, p50/p99 acceptance latency (end of DATA to the 250 reply, which
includes the fsync of the group commit) and how many messages each commit carried.

    .venv/bin/python scripts/bench_submission.py --clients 20 --messages 50 --size 10000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib

PASSWORD = "benchmark password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def message(size: int, n: int) -> bytes:
    head = (
        f"From: bench@bench.example\r\nTo: sink@example.net\r\nSubject: bench {n}\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


async def client(port: int, ctx: ssl.SSLContext, count: int, size: int, out: list[float]) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, tls_context=ctx, start_tls=True)
    await smtp.connect()
    await smtp.login("bench@bench.example", PASSWORD)
    for n in range(count):
        data = message(size, n)
        await smtp.mail("bench@bench.example")
        await smtp.rcpt("sink@example.net")
        started = time.perf_counter()
        code, _ = await smtp.data(data)
        out.append(time.perf_counter() - started)
        if code != 250:
            raise RuntimeError(f"DATA answered {code}")
    await smtp.quit()


def prepare(work: Path, port: int, unsigned: bool) -> list[str]:
    """A config, a domain and a user for the benchmark; returns the mailrelay command."""
    config = work / "bench.toml"
    config.write_text(
        f'hostname = "relay.bench.test"\n[submission]\nlisten = ["127.0.0.1:{port}"]\n'
        'cert_file = "cert.pem"\nkey_file = "key.pem"\nself_signed_if_missing = true\n'
        'max_recipients = 10\n[storage]\npath = "queue.sqlite3"\n'
        '[dkim]\nkey_dir = "dkim"\n[metrics]\nlisten = ""\n[log]\nlevel = "warning"\n'
        # Submission only: the queue is held, so delivery neither competes for the CPU nor
        # sends anything anywhere.
        "[delivery]\nhold = true\n"
        # One user sends everything: no per-user rates or quotas.
        "[limits]\nmessages_per_minute = 0\nrecipients_per_hour = 0\nrecipients_per_day = 0\n"
        # And every client is 127.0.0.1.
        "max_connections_per_ip = 1000\nmax_unauthenticated_per_ip = 1000\n"
    )
    mailrelay = [sys.executable, "-m", "mailrelay", "--config", str(config)]
    subprocess.run(
        [*mailrelay, "domain", "add", "bench.example", "--notify", "postmaster@bench.example"],
        check=True,
        capture_output=True,
    )
    with sqlite3.connect(work / "queue.sqlite3") as db:  # benchmark only: skip `domain check`
        db.execute("UPDATE domains SET state = 'valid'")
        if unsigned:  # to measure what DKIM signing costs: no key, no signature
            db.execute("DELETE FROM dkim_keys")
    subprocess.run(
        [*mailrelay, "user", "add", "bench@bench.example", "--password-stdin"],
        input=PASSWORD.encode(),
        check=True,
        capture_output=True,
    )
    return mailrelay


async def load(args: argparse.Namespace, port: int, cafile: Path) -> tuple[list[float], float]:
    for _ in range(100):
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        except OSError:
            await asyncio.sleep(0.1)
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = False
    latencies: list[float] = []
    started = time.perf_counter()
    await asyncio.gather(
        *(client(port, ctx, args.messages, args.size, latencies) for _ in range(args.clients))
    )
    return latencies, time.perf_counter() - started


def bench(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="mailrelay-bench-", dir=args.dir))
    port = free_port()
    mailrelay = prepare(work, port, args.unsigned)
    server = subprocess.Popen([*mailrelay, "serve"], stderr=subprocess.DEVNULL)
    try:
        latencies, elapsed = asyncio.run(load(args, port, work / "cert.pem"))
    finally:
        server.terminate()
        server.wait(30)
    with sqlite3.connect(work / "queue.sqlite3") as db:
        queued = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    latencies.sort()
    total = len(latencies)
    print(
        f"clients={args.clients} messages/client={args.messages} size={args.size}B "
        f"total={total} queued={queued}"
    )
    print(f"throughput: {total / elapsed:.1f} messages/s over {elapsed:.2f}s (incl. TLS+AUTH)")
    print(
        f"acceptance latency: p50={statistics.median(latencies) * 1000:.1f}ms "
        f"p99={latencies[min(total - 1, int(total * 0.99))] * 1000:.1f}ms "
        f"max={latencies[-1] * 1000:.1f}ms"
    )
    print(f"work directory: {work}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--messages", type=int, default=50)
    p.add_argument("--size", type=int, default=10_000, help="bytes per message")
    p.add_argument("--unsigned", action="store_true", help="no DKIM key (measures its cost)")
    p.add_argument("--dir", default=os.environ.get("TMPDIR"), help="where the database goes")
    bench(p.parse_args())


if __name__ == "__main__":
    main()
