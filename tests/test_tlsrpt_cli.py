"""`mailrelay tlsrpt list | show | send-now`, run as an operator runs them (a separate process),
against a store with a day of sessions and a test world whose DNS names an HTTPS collector."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailrelay.store import tlsrpt
from mailrelay.store.db import connect_sqlite
from mailrelay.store.queue import transaction
from mailrelay.tlsrpt import report
from mailrelay.tlsrpt.model import AppliedPolicy, Session
from tests.conftest import free_port, write_config_file
from tests.test_cli import cli, ok, user_error
from tests.test_tlsrpt_schema import report_json_problems
from tests.world import World
from tests.world.https import PolicyServer, serve_collector

FIRST_ADDRESS = "127.0.93.1"  # this file's world (no MX servers: only its DNS and CA)
COLLECTOR_ADDRESS = "127.0.94.1"
COLLECTOR = "collector.rpt.example"
TLSRPT = """
[tlsrpt]
enabled = true
organization_name = "Example Relay B.V."
contact_info = "tlsrpt@example.org"
send_hour = 23
"""


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path / "world", first_address=FIRST_ADDRESS) as w:
        yield w


@pytest.fixture
async def collector(world: World) -> AsyncIterator[PolicyServer]:
    server = await serve_collector(world, COLLECTOR, address=COLLECTOR_ADDRESS)
    world.dns.add(
        "_smtp._tls.sts.example", "TXT", f"v=TLSRPTv1; rua=https://{COLLECTOR}:{server.port}/in"
    )
    yield server
    await server.stop()


def config_file(directory: Path, world: World, extra: str = TLSRPT) -> Path:
    delivery = (
        f'hold = true\nport = {free_port()}\nnameservers = ["{world.dns.nameserver}"]\n'
        f'dns_timeout = 1\nca_file = "{world.ca_file}"\n'
    )
    directory.mkdir(exist_ok=True)
    return write_config_file(directory, extra, delivery=delivery)[0]


async def run(config: Path, *args: str) -> str:
    """A command that must succeed, run while this test's servers go on answering."""
    return await asyncio.to_thread(ok, config, *args)


async def test_send_now_list_and_show(
    tmp_path: Path, world: World, collector: PolicyServer
) -> None:
    config = config_file(tmp_path, world)
    assert user_error(cli(config, "tlsrpt", "list")).startswith("no database at ")
    day = tlsrpt.utc_day(time.time() - 86400)
    policy = AppliedPolicy("sts", "sts.example", ("version: STSv1",), ("mx1.sts.example",))
    with connect_sqlite(str(tmp_path / "queue.sqlite3")) as conn, transaction(conn):
        tlsrpt.record_sessions(
            conn,
            [
                Session(report.day_start(day), policy, None, "127.0.0.1", "mx1.sts.example"),
                Session(report.day_start(day), AppliedPolicy("no-policy-found", "x.example"), None),
            ],
        )
    assert await run(config, "tlsrpt", "list") == "no TLS reports\n"

    # send_hour = 23 has not come (or has): send-now does not wait for it.
    out = await run(config, "tlsrpt", "send-now")

    assert out == "1 report(s) made; 0 queued as mail, 1 sent, 0 failed, 0 to retry\n"
    [request] = collector.requests
    posted = gzip.decompress(request.body)
    assert report_json_problems(posted) == []
    [listed] = json.loads(await run(config, "tlsrpt", "list", "--json"))
    key = listed["id"]
    assert {k: listed[k] for k in ("report_id", "domain", "day", "state")} == {
        "report_id": f"{key}@relay.test",
        "domain": "sts.example",
        "day": day,
        "state": "sent",
    }
    url = f"https://{COLLECTOR}:{collector.port}/in"
    assert [(d["uri"], d["method"], d["state"], d["attempts"]) for d in listed["deliveries"]] == [
        (url, "https", "sent", 1)
    ]
    text = (await run(config, "tlsrpt", "list")).splitlines()
    assert text[0] == f"{key}  {day}  sent     sts.example"
    assert text[1].startswith(f"    sent    {url}, attempts 1, ")
    assert json.loads(await run(config, "tlsrpt", "show", key)) == json.loads(posted)
    assert await run(config, "tlsrpt", "show", "--raw", f"{key}@relay.test") == (
        posted.decode() + "\n"
    )
    assert user_error(cli(config, "tlsrpt", "show", "0000")) == "no TLS report 0000"
    again = await run(config, "tlsrpt", "send-now")
    assert again == "0 report(s) made; 0 queued as mail, 0 sent, 0 failed, 0 to retry\n"
    assert len(collector.requests) == 1


async def test_send_now_when_reporting_is_off(tmp_path: Path, world: World) -> None:
    config = config_file(tmp_path / "off", world, extra="")
    assert user_error(cli(config, "tlsrpt", "send-now")) == (
        "TLS reporting is off (set [tlsrpt] enabled = true)"
    )
