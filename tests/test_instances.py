"""Several relays on one PostgreSQL database (issue 16): `mailrelay serve` processes, each with
its own submission port and [instance] id, delivering inline (delivery.separate_process =
false, so that kill -9 of the service kills its deliverer too) to one MX of the test world,
which counts each message by its X-Seq header. Real processes, a real PostgreSQL (tests/pg.py),
real SMTP and TLS on 127.0.105.x."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from mailrelay.store import connect, queue
from tests.conftest import PASSWORD, add_user, free_port, make_config
from tests.world import MODERN, MxServer, World

# Submitted alternately to the two instances (about 10 s here; scripts/bench_instances.py runs
# the same at any size and prints the rates).
MESSAGES = 2000
SESSIONS_PER_INSTANCE = 4
SEQ = re.compile(rb"^X-Seq: (\d+)\r$", re.MULTILINE)
MAILRELAY = (sys.executable, "-m", "mailrelay")
QUEUED = re.compile(rb"2\.0\.0 Ok: queued as (\S+)")


@dataclasses.dataclass
class Instance:
    name: str
    directory: Path
    config: Path
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def cert(self) -> Path:
        return self.directory / "tls" / "cert.pem"


def write_instance(
    root: Path,
    name: str,
    url: str,
    world: World,
    *,
    hold: bool = False,
    separate_process: bool = False,
    delivery: str = "",
    instance: str = "",
) -> Instance:
    directory = root / name
    directory.mkdir(parents=True)
    port, metrics_port = free_port(), free_port()
    config = directory / "mailrelay.toml"
    config.write_text(
        f"""
hostname = "{name}.relay.test"
[submission]
listen = ["127.0.0.1:{port}"]
cert_file = "tls/cert.pem"
key_file = "tls/key.pem"
self_signed_if_missing = true
[storage]
path = "lock.sqlite3"
url = "{url}"
[instance]
id = "{name}"
{instance}
[dkim]
key_dir = "dkim"
rsa_bits = 1024
[metrics]
listen = "127.0.0.1:{metrics_port}"
[api]
listen = ""
[limits]
messages_per_minute = 0
recipients_per_hour = 0
recipients_per_day = 0
[delivery]
hold = {"true" if hold else "false"}
separate_process = {"true" if separate_process else "false"}
port = {world.smtp_port}
nameservers = {json.dumps(world.nameservers)}
ca_file = "{world.ca_file}"
dns_timeout = 2
connect_timeout = 5
{delivery}
"""
    )
    return Instance(name, directory, config, port, metrics_port)


def start(instance: Instance) -> None:
    with open(instance.directory / "stderr.log", "wb") as stderr:  # the child keeps its own
        instance.process = subprocess.Popen(
            [*MAILRELAY, "--config", str(instance.config), "serve"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + 30
    while True:
        assert instance.process.poll() is None, (instance.directory / "stderr.log").read_text()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", instance.port)):
            return
        assert time.monotonic() < deadline, "the relay did not open its submission port"
        time.sleep(0.05)


def stop(instance: Instance) -> None:
    process = instance.process
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.asynccontextmanager
async def running(*instances: Instance) -> AsyncIterator[None]:
    """Off the event loop: a relay stopping says QUIT to the world's MX, which runs on it."""
    try:
        for instance in instances:
            await asyncio.to_thread(start, instance)
        yield
    finally:
        await asyncio.gather(*(asyncio.to_thread(stop, i) for i in instances))


def message(seq: int) -> bytes:
    return (
        f"From: alice@example.org\r\nTo: r{seq}@dest.example\r\nSubject: {seq}\r\n"
        f"X-Seq: {seq}\r\n\r\nHello {seq}.\r\n"
    ).encode()


def submit(instance: Instance, seqs: list[int]) -> list[str]:
    """One authenticated session sending each message in turn; the queue ids."""
    ctx = ssl.create_default_context(cafile=str(instance.cert))
    ctx.check_hostname = False
    ids = []
    with smtplib.SMTP("127.0.0.1", instance.port, timeout=30) as client:
        client.starttls(context=ctx)
        client.login("alice@example.org", PASSWORD)
        for seq in seqs:
            client.mail("alice@example.org")
            client.rcpt(f"r{seq}@dest.example")
            code, text = client.data(message(seq))
            match = QUEUED.search(text)
            assert code == 250 and match, (code, text)
            ids.append(match.group(1).decode())
    return ids


def submit_alternating(instances: list[Instance], count: int, sessions: int) -> list[str]:
    """Messages 0..count-1, message n to instance n % 2, over `sessions` sessions each."""
    batches = [
        (instance, list(range(i + len(instances) * s, count, len(instances) * sessions)))
        for s in range(sessions)
        for i, instance in enumerate(instances)
    ]
    with concurrent.futures.ThreadPoolExecutor(len(batches)) as pool:
        return [i for ids in pool.map(lambda b: submit(*b), batches) for i in ids]


def delivered(mx: MxServer) -> collections.Counter[int]:
    """How many times the MX accepted each X-Seq."""
    seqs: collections.Counter[int] = collections.Counter()
    for m in mx.messages:
        found = SEQ.search(m.data)
        assert found is not None, m.data[:200]
        seqs[int(found.group(1))] += 1
    return seqs


async def until(predicate: Callable[[], bool], seconds: float) -> None:
    """Return once `predicate()` holds; fail with TimeoutError after `seconds`."""
    async with asyncio.timeout(seconds):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.05)


def data_commands(mx: MxServer) -> int:
    return sum(1 for c in mx.commands if c.line.upper() == "DATA")


def queue_list(instance: Instance, *options: str) -> str:
    done = subprocess.run(
        [*MAILRELAY, "--config", str(instance.config), "queue", "list", *options],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def queue_list_json(instance: Instance) -> list[dict[str, object]]:
    listed: list[dict[str, object]] = json.loads(queue_list(instance, "--json"))
    return listed


@contextlib.asynccontextmanager
async def shared_world(tmp_path: Path, first_address: str) -> AsyncIterator[tuple[World, MxServer]]:
    async with World(tmp_path / "world", first_address=first_address) as world:
        await world.add_mx("example.org", MODERN)  # bounces would go here: none are expected
        yield world, await world.add_mx("dest.example", MODERN)


def setup_database(tmp_path: Path, pg_url: str) -> None:
    add_user(make_config(tmp_path, storage={"url": pg_url}), "alice@example.org")


async def test_two_instances_deliver_every_message_exactly_once(
    tmp_path: Path, pg_url: str
) -> None:
    async with shared_world(tmp_path, "127.0.105.1") as (world, mx):
        setup_database(tmp_path, pg_url)
        a = write_instance(tmp_path, "relay-a", pg_url, world)
        b = write_instance(tmp_path, "relay-b", pg_url, world)
        async with running(a, b):
            ids = await asyncio.to_thread(
                submit_alternating, [a, b], MESSAGES, SESSIONS_PER_INSTANCE
            )
            assert len(set(ids)) == MESSAGES
            await until(lambda: len(delivered(mx)) >= MESSAGES, 120)
            await asyncio.sleep(1.0)  # a second delivery of anything would show by now
            assert delivered(mx) == {seq: 1 for seq in range(MESSAGES)}
            assert await asyncio.to_thread(queue_list_json, a) == []
        # Both instances delivered: each claims what is due when it looks, woken by its own
        # submissions and by the other's (NOTIFY).
        logs = [(i.directory / "stderr.log").read_text() for i in (a, b)]
        assert all(log.count("event=delivery ") > 0 for log in logs), [
            log.count("event=delivery ") for log in logs
        ]
        assert sum(log.count("event=delivery ") for log in logs) == MESSAGES


async def test_a_killed_instances_claims_are_finished_by_the_other_after_the_lease(
    tmp_path: Path, pg_url: str
) -> None:
    """relay-a claims ten messages and the MX holds each at the final dot, never answering;
    relay-b starts meanwhile and leaves them alone (a start releases only its own claims, and
    relay-a's lease runs); relay-a is killed with -9; once the lease ran out relay-b delivers
    each exactly once. The MX never answered 250 to relay-a, so no message may arrive twice."""
    count = 10
    # The lease: attempt_deadline + lease_margin = 11 s from the claim. relay-a would give up at
    # 10 s; it is killed long before.
    delivery = 'attempt_deadline = "10s"\ncommand_timeout = "60s"'
    async with shared_world(tmp_path, "127.0.105.33") as (world, mx):
        mx.behaviour = dataclasses.replace(MODERN, data_reply=None, data_stall=300.0)
        setup_database(tmp_path, pg_url)
        a = write_instance(
            tmp_path, "relay-a", pg_url, world, delivery=delivery, instance='lease_margin = "1s"'
        )
        b = write_instance(
            tmp_path, "relay-b", pg_url, world, delivery=delivery, instance='lease_margin = "1s"'
        )
        async with running(a):
            await asyncio.to_thread(submit, a, list(range(count)))
            await until(lambda: data_commands(mx) >= count, 15)
            async with running(b):
                await asyncio.sleep(0.5)  # relay-b's first claims (and its start's release)
                listed = await asyncio.to_thread(_listed, pg_url)
                claimed = [r for m in listed for r in m["recipients"]]  # type: ignore[attr-defined]
                assert [(r["state"], r["claimed_by"]) for r in claimed] == [
                    ("active", "relay-a")
                ] * count
                first_lease_end = min(float(r["lease_until"]) for r in claimed)
                text = await asyncio.to_thread(queue_list, b)
                assert text.count("being delivered by relay-a (lease until ") == count, text
                assert data_commands(mx) == count and delivered(mx) == {}
                assert a.process is not None
                a.process.send_signal(signal.SIGKILL)
                await asyncio.to_thread(a.process.wait, 30)
                mx.behaviour = MODERN
                await until(lambda: len(delivered(mx)) > 0, 40)
                first_delivery_seen = time.time()
                await until(lambda: len(delivered(mx)) >= count, 20)
                await asyncio.sleep(1.0)
                assert delivered(mx) == {seq: 1 for seq in range(count)}
                assert await asyncio.to_thread(queue_list_json, b) == []
        log = (b.directory / "stderr.log").read_text()
        recovered = re.findall(r"event=recovered_expired_leases recipients=(\d+)", log)
        assert sum(map(int, recovered)) == count, log
        # Not before relay-a's lease ran out (11 s after its claims; the kill came long before).
        assert first_delivery_seen > first_lease_end
        # Each recipient's interrupted attempt stays counted: the delivery was its second.
        conn = connect(pg_url)
        try:
            rows = conn.execute("SELECT state, attempts, claimed_by FROM recipients").fetchall()
        finally:
            conn.close()
        assert [tuple(r) for r in rows] == [("sent", 2, None)] * count


async def test_new_mail_wakes_an_idle_instance_at_once(tmp_path: Path, pg_url: str) -> None:
    """relay-b delivers (from its separate delivery process, the default) and looks at the queue
    only once a minute; relay-a only accepts (delivery held). Mail submitted to relay-a reaches
    the MX through relay-b long before relay-b's next look: relay-a's commit NOTIFYs, relay-b's
    service LISTENs and wakes its delivery process."""
    async with shared_world(tmp_path, "127.0.105.65") as (world, mx):
        setup_database(tmp_path, pg_url)
        a = write_instance(tmp_path, "relay-a", pg_url, world, hold=True)
        b = write_instance(
            tmp_path,
            "relay-b",
            pg_url,
            world,
            separate_process=True,
            delivery='poll_interval = "60s"',
        )
        async with running(b, a):
            for seq in range(2):
                # The first may meet relay-b's start-up claim; the second comes when relay-b
                # has claimed and delivered, and waits for a poll a minute away.
                await asyncio.to_thread(submit, a, [seq])
                await until(functools.partial(_delivered_more_than, mx, seq), 15)
            assert delivered(mx) == {0: 1, 1: 1}
            metrics = await asyncio.to_thread(_metrics, b)
            assert 'mailrelay_instance_info{instance_id="relay-b"} 1.0' in metrics


def _listed(url: str) -> list[dict[str, object]]:
    """`queue list --json`, without a process start: relay-a's deadline runs meanwhile."""
    conn = connect(url)
    try:
        return queue.list_queue(conn)
    finally:
        conn.close()


def _delivered_more_than(mx: MxServer, count: int) -> bool:
    return len(delivered(mx)) > count


def _metrics(instance: Instance) -> str:
    url = f"http://127.0.0.1:{instance.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return text
