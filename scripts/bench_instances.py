"""Several relays on one PostgreSQL (issue 16), at full size: 2,000 messages submitted alternately
to two `mailrelay serve` processes on one database, each delivered exactly once to the test
world's MX (tests/test_instances.py runs the same with fewer messages within `make test`).

    .venv/bin/python scripts/bench_instances.py [--messages 2000] [--instances 2]

Prints the submission and delivery times and rates, how many each instance delivered, and
exits 1 unless every message arrived exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/ is not installed; it lives in the repository

from tests.pg import Cluster  # noqa: E402
from tests.test_instances import (  # noqa: E402
    SESSIONS_PER_INSTANCE,
    delivered,
    running,
    setup_database,
    shared_world,
    submit_alternating,
    until,
    write_instance,
)

FIRST_ADDRESS = "127.0.105.97"  # beside tests/test_instances.py's 127.0.105.x


async def run(messages: int, count: int, tmp: Path) -> int:
    cluster = Cluster()
    await asyncio.to_thread(cluster.start)
    try:
        url = await asyncio.to_thread(cluster.new_database)
        async with shared_world(tmp, FIRST_ADDRESS) as (world, mx):
            setup_database(tmp, url)
            instances = [write_instance(tmp, f"relay-{n}", url, world) for n in range(1, count + 1)]
            async with running(*instances):
                started = time.monotonic()
                ids = await asyncio.to_thread(
                    submit_alternating, instances, messages, SESSIONS_PER_INSTANCE
                )
                submitted = time.monotonic() - started
                await until(lambda: len(delivered(mx)) >= messages, 600)
                done = time.monotonic() - started
                await asyncio.sleep(2.0)  # a second delivery of anything would show by now
            seqs = delivered(mx)
            per_instance = {
                i.name: (i.directory / "stderr.log").read_text().count("event=delivery ")
                for i in instances
            }
        twice = sorted(seq for seq, n in seqs.items() if n > 1)
        missing = sorted(set(range(messages)) - set(seqs))
        print(f"instances: {count}, messages: {messages} ({len(set(ids))} queue ids)")
        print(f"submitted in {submitted:.1f}s ({messages / submitted:.0f}/s)")
        print(f"all delivered {done:.1f}s after the first submission ({messages / done:.0f}/s)")
        print(f"delivered by: {per_instance}")
        print(f"delivered twice: {len(twice)} {twice[:10]}, missing: {len(missing)} {missing[:10]}")
        return 0 if not twice and not missing and len(seqs) == messages else 1
    finally:
        await asyncio.to_thread(cluster.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--instances", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailrelay-instances-") as tmp:
        sys.exit(asyncio.run(run(args.messages, args.instances, Path(tmp))))


if __name__ == "__main__":
    main()
