"""What TLS-RPT recording adds to a delivery's commit (run by hand, not in `make test`).

The queue runner records each attempt's TLS sessions (`store.tlsrpt.record_sessions`) in the
same transaction as the recipients' outcome. This commits N transactions that each write one
row, with and without also recording one session (a success, then a failure), on a database in
a temporary directory, and prints the time per commit: the difference is the recording's cost.

    .venv/bin/python scripts/bench_tlsrpt_record.py [--commits 5000]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from mailrelay.store import connect, tlsrpt
from mailrelay.tlsrpt.model import AppliedPolicy, Session


def per_commit(conn: sqlite3.Connection, commits: int, session: Session | None) -> float:
    start = time.perf_counter()
    for i in range(commits):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO bench VALUES (?)", (i,))  # the outcome the commit exists for
        if session is not None:
            tlsrpt.record_sessions(conn, [session])
        conn.execute("COMMIT")
    return (time.perf_counter() - start) / commits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=5000)
    args = parser.parse_args()
    policy = AppliedPolicy("tlsa", "example.net", ("3 1 1 " + "ab" * 32,), ("mx.example.net",))
    now = time.time()
    sessions = {
        "success": Session(now, policy, None, "127.0.0.1", "mx.example.net", "192.0.2.1"),
        "failure": Session(
            now, policy, "tlsa-invalid", "127.0.0.1", "mx.example.net", "192.0.2.1", "mismatch"
        ),
    }
    with tempfile.TemporaryDirectory() as directory:
        conn = connect(str(Path(directory) / "bench.sqlite3"))
        conn.execute("CREATE TABLE bench (i INTEGER)")
        for name, session in sessions.items():
            without = per_commit(conn, args.commits, None)
            with_it = per_commit(conn, args.commits, session)
            print(
                f"{name}: {without * 1e6:.0f} us per commit without recording,"
                f" {with_it * 1e6:.0f} us with ({(with_it - without) * 1e6:+.0f} us)"
            )
        conn.close()


if __name__ == "__main__":
    main()
