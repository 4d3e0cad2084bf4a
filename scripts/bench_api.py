"""HTTP API benchmark beside SMTP: the same mailrelay (own temporary database, loopback, queue
held) takes N concurrent clients sending M messages of S bytes, first over SMTP (STARTTLS+AUTH,
as scripts/bench_submission.py), then as JSON POSTs to /v1/messages (keep-alive, plain HTTP on
loopback). Prints messages per second and p50/p99 latency (to the 250 or 202 answer: both mean
signed and committed to disk) for each. With --batch N the API clients send N messages per
POST /v1/messages/batch instead (latency is then per batch).

    .venv/bin/python scripts/bench_api.py --clients 20 --messages 50 --size 10000
    .venv/bin/python scripts/bench_api.py --clients 4 --messages 1000 --batch 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_submission as smtp_bench  # the SMTP side, measured as it is alone


async def api_batch_client(
    url: str, token: str, count: int, size: int, out: list[float], offset: int, batch: int
) -> None:
    text = ("x" * 76 + "\n") * max(1, size // 78)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        for start in range(0, count, batch):
            messages = [
                {
                    "from": "bench@bench.example",
                    "to": ["sink@example.net"],
                    "subject": f"bench {offset + n}",
                    "text": text,
                }
                for n in range(start, min(count, start + batch))
            ]
            started = time.perf_counter()
            got = await client.post("/v1/messages/batch", json={"messages": messages})
            out.append(time.perf_counter() - started)
            statuses = {r["status"] for r in got.json().get("results", [])}
            if got.status_code != 200 or statuses != {202}:
                raise RuntimeError(f"batch answered {got.status_code}: {got.text[:500]}")


async def api_client(
    url: str, token: str, count: int, size: int, out: list[float], offset: int
) -> None:
    text = ("x" * 76 + "\n") * max(1, size // 78)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        for n in range(count):
            body = {
                "from": "bench@bench.example",
                "to": ["sink@example.net"],
                "subject": f"bench {offset + n}",
                "text": text,
            }
            started = time.perf_counter()
            got = await client.post("/v1/messages", json=body)
            out.append(time.perf_counter() - started)
            if got.status_code != 202:
                raise RuntimeError(f"POST answered {got.status_code}: {got.text}")


def report(name: str, latencies: list[float], elapsed: float) -> None:
    latencies.sort()
    total = len(latencies)
    print(
        f"{name}: {total / elapsed:.1f} messages/s ({total} in {elapsed:.2f}s);"
        f" latency p50={statistics.median(latencies) * 1000:.1f}ms"
        f" p99={latencies[min(total - 1, int(total * 0.99))] * 1000:.1f}ms"
    )


async def run(args: argparse.Namespace, smtp_port: int, url: str, token: str, work: Path) -> None:
    smtp_latencies, smtp_elapsed = await smtp_bench.load(args, smtp_port, work / "cert.pem")
    report("smtp", smtp_latencies, smtp_elapsed)
    api_latencies: list[float] = []
    started = time.perf_counter()
    if args.batch:
        await asyncio.gather(
            *(
                api_batch_client(
                    url,
                    token,
                    args.messages,
                    args.size,
                    api_latencies,
                    i * args.messages,
                    args.batch,
                )
                for i in range(args.clients)
            )
        )
        elapsed = time.perf_counter() - started
        total = args.clients * args.messages
        print(f"api batch of {args.batch}: {total / elapsed:.1f} messages/s ({total} in"
              f" {elapsed:.2f}s); latency per batch p50="
              f"{statistics.median(sorted(api_latencies)) * 1000:.1f}ms")  # fmt: skip
        return
    await asyncio.gather(
        *(
            api_client(url, token, args.messages, args.size, api_latencies, i * args.messages)
            for i in range(args.clients)
        )
    )
    report("api ", api_latencies, time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--messages", type=int, default=50)
    p.add_argument("--size", type=int, default=10_000, help="bytes per message")
    p.add_argument("--batch", type=int, default=0, help="API: messages per batch request")
    p.add_argument("--dir", default=os.environ.get("TMPDIR"), help="where the database goes")
    args = p.parse_args()
    args.unsigned = False
    work = Path(tempfile.mkdtemp(prefix="mailrelay-bench-api-", dir=args.dir))
    smtp_port, api_port = smtp_bench.free_port(), smtp_bench.free_port()
    mailrelay = smtp_bench.prepare(work, smtp_port, unsigned=False)
    config = work / "bench.toml"
    config.write_text(config.read_text() + f'[api]\nlisten = "127.0.0.1:{api_port}"\n')
    added = subprocess.run(
        [*mailrelay, "apikey", "add", "--domain", "bench.example", "--scope", "send", "--json"],
        check=True,
        capture_output=True,
    )
    token = json.loads(added.stdout)["token"]
    server = subprocess.Popen([*mailrelay, "serve"], stderr=subprocess.DEVNULL)
    try:
        asyncio.run(run(args, smtp_port, f"http://127.0.0.1:{api_port}", token, work))
    finally:
        server.terminate()
        server.wait(30)
    with sqlite3.connect(work / "queue.sqlite3") as db:
        queued = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    print(f"clients={args.clients} messages/client={args.messages} size={args.size}B")
    print(f"queued in all: {queued}; work directory: {work}")


if __name__ == "__main__":
    main()
