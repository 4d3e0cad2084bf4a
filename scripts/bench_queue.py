"""Queue-scale benchmark: how long the queue's hot queries take with 10k, 100k and 1M recipients
queued, deferred and spread over the next five days (as after an outage of a big destination).

For each size it seeds a fresh database (a few messages due now, the rest in the future) and
times, as the running service would issue them:

- claim: `claims.claim_due` for 16 jobs, inside a transaction that is rolled back (the queue
  runner's claim; the number that must stay flat);
- next due: `claims.next_due`;
- counts: `queue.state_counts` and `queue.oldest_pending` (the metrics scrape);
- list: the first page of `queue.list_queue` (what `mailrelay queue list` prints);
- show: `queue.show` of one message.

    .venv/bin/python scripts/bench_queue.py                 # 10k, 100k, 1M
    .venv/bin/python scripts/bench_queue.py --sizes 10000   # one size

Each figure is the median of several runs, in milliseconds.
"""

from __future__ import annotations

import argparse
import functools
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mailrelay.store import claims, connect, queue

RECIPIENTS_PER_MESSAGE = 10
DUE_NOW = 50  # recipients due at the time of the claim
SPREAD = 5 * 86400.0
BODY = b"From: a@example.org\r\nSubject: queued\r\n\r\n" + b"x" * 2000 + b"\r\n"


def seed(conn: sqlite3.Connection, recipients: int, now: float) -> str:
    """Messages of RECIPIENTS_PER_MESSAGE recipients at distinct domains, deferred over the
    next SPREAD seconds, except DUE_NOW recipients due at once. Returns one message id."""
    rng = random.Random(1)
    messages = recipients // RECIPIENTS_PER_MESSAGE
    conn.execute("BEGIN")
    some_id = ""
    for m in range(messages):
        message_id = f"{m:016X}"
        some_id = some_id or message_id
        conn.execute(
            "INSERT INTO messages (id, sender, auth_user, client_ip, sender_domain, size, data,"
            " is_bounce, created_at) VALUES (?, 'a@example.org', 'a@example.org', '127.0.0.1',"
            " 'example.org', ?, ?, 0, ?)",
            (message_id, len(BODY), BODY, now - rng.uniform(0, 86400)),
        )
        rows = []
        for r in range(RECIPIENTS_PER_MESSAGE):
            n = m * RECIPIENTS_PER_MESSAGE + r
            due = now - 1 if n < DUE_NOW else now + rng.uniform(60, SPREAD)
            domain = f"d{n % 5000}.example"
            rows.append((message_id, f"user{n}@{domain}", domain, due, now))
        conn.executemany(
            "INSERT INTO recipients (message_id, address, domain, state, attempts,"
            " next_attempt_at, updated_at) VALUES (?, ?, ?, 'deferred', 1, ?, ?)",
            rows,
        )
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    return some_id


def timed(op: Callable[[], object], runs: int = 7) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        op()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def claim_rolled_back(conn: sqlite3.Connection, now: float) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        jobs = claims.claim_due(conn, now, 16)
        assert jobs, "nothing was due"
    finally:
        conn.execute("ROLLBACK")


def measure(size: int, directory: Path) -> dict[str, float]:
    path = str(directory / f"queue-{size}.sqlite3")
    conn = connect(path)
    now = time.time()
    message_id = seed(conn, size, now)
    result = {
        "claim": timed(functools.partial(claim_rolled_back, conn, now)),
        "next due": timed(lambda: claims.next_due(conn)),
        "counts": timed(lambda: (queue.state_counts(conn), queue.oldest_pending(conn))),
        "list (first page)": timed(lambda: queue.list_queue(conn, limit=50), runs=3),
        "show": timed(lambda: queue.show(conn, message_id)),
    }
    conn.close()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dir", default=None, help="where the databases go (default: a temp dir)")
    args = p.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="mailrelay-queue-bench-", dir=args.dir))
    rows = {size: measure(size, directory) for size in args.sizes}
    names = list(next(iter(rows.values())))
    print(f"{'recipients':>12} " + " ".join(f"{n:>18}" for n in names) + "   (ms, median)")
    for size, figures in rows.items():
        print(f"{size:>12} " + " ".join(f"{figures[n]:>18.2f}" for n in names))
    print(f"databases in {directory}")


if __name__ == "__main__":
    main()
