"""Side-by-side benchmark: mailrelay against Postfix + OpenDKIM, on loopback only.

Every target gets the same load and relays to the same sink; the table compares them.

Targets (each started fresh, with its own temporary state, then stopped):
  mailrelay         `.venv/bin/python -m mailrelay --config CFG serve`: own SQLite database, a
                    domain and a user made with the CLI, DKIM RSA-2048, delivery to the sink's
                    port with security_level = "encrypt"; its MX lookups go to a DNS server run
                    here (tests.world.dns.DnsServer) that points the recipient domain at the sink.
  postfix+opendkim  a private Postfix (own config and queue directories, `postfix -c DIR
                    start-fg`): submission with STARTTLS + AUTH (Cyrus SASL, a private sasldb),
                    the OpenDKIM milter on inet:PORT@127.0.0.1 signing RSA-2048
                    relaxed/relaxed, relayhost = the sink, smtp_tls_security_level = encrypt.
  postfix+opendkim unix   the same with the milter on a unix socket, as Debian configures
                    OpenDKIM by default. Over TCP every message waits twice for a delayed ACK
                    (~40 ms each: neither Postfix nor libmilter sets TCP_NODELAY).
  plain postfix     the same without the milter: what DKIM signing costs Postfix.
  direct-to-sink    the load straight to the sink (STARTTLS, no AUTH): the ceiling.

The sink is an asyncio SMTP server in its own process (scripts/bench_peer.py), TLS 1.3 only,
with a self-signed certificate made here; it accepts every message and reports, per message,
when it arrived (CLOCK_MONOTONIC, the same clock the load generator reads), the TLS version and
whether the message carried a DKIM-Signature, and when each TLS session began.

The load: N clients at once, each one SMTP session (EHLO, STARTTLS, EHLO, AUTH PLAIN, then its
M messages of S bytes, each with an `X-Bench-Id` header that matches submission to arrival),
after a warm-up of W messages per client (the same session shape, not measured; its mail must
arrive before the measured run starts).

Columns, per target:
  accept msg/s      measured messages / (first MAIL FROM -> last 250 reply to DATA)
  e2e msg/s         arrived messages / (first 250 reply to DATA -> last arrival at the sink)
  submit p50/p99    end of DATA (the final "." written) -> its 250 reply
  acc->arr p99      the 250 reply -> arrival at the sink, per message (direct-to-sink: the sink
                    notes the arrival just before it replies, so about -0.1 ms)
  peak RSS / PSS    the largest sum over the target's processes, sampled from /proc every
                    --sample-interval seconds (RSS counts shared pages once per process, PSS
                    divides them among the processes that share them: for Postfix's dozens of
                    processes the sum of RSS counts libc and OpenSSL dozens of times)
  CPU s             utime + stime of the target's processes over the measured window (first
                    connection -> last arrival), from /proc/<pid>/stat, exited children
                    included: see bench_peer.Meter for how
  CPU ms/msg        CPU s / measured messages
  arrived, DKIM     how many measured messages reached the sink, and how many were signed
The target's processes: mailrelay's process tree (the service and its delivery process); the
Postfix master's tree (every smtpd, cleanup, qmgr, smtp, ... it starts) plus opendkim. Below the
table, per run: the CPU time of every process on the machine (out of wall time x CPUs), the
load generator's (this process, which also runs the DNS server) and the sink's, how many TLS
sessions the sink accepted, and the target's memory before the load.

What differs between the targets besides the software: AUTH is checked against an argon2id hash
in mailrelay (argon2-cffi's defaults: 64 MiB and ~0.15 CPU s per check, one per session) and
against the plaintext secret in the sasldb for Postfix; Postfix opens a new TLS connection for
every delivery (smtp_tls_connection_reuse = no is its default) where mailrelay keeps sessions.
Both log to a file (mailrelay at level info, Postfix through postlogd; OpenDKIM not at all).

    .venv/bin/python scripts/bench_vs_postfix.py [--clients 8] [--messages 50] [--size 5000]
    make bench-peer BENCH_ARGS="--clients 16 --targets mailrelay,direct"

Root is needed for Postfix and OpenDKIM (apt-get installs them if missing, and says so).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import math
import os
import platform
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import aiosmtplib
from bench_peer import (
    MX_NAME,
    PASSWORD,
    RCPT,
    RCPT_DOMAIN,
    SENDER_DOMAIN,
    USER,
    Arrival,
    Meter,
    Sink,
    become_subreaper,
    free_port,
    loopback,
    make_certificate,
    sweep_descendants,
)
from bench_peer_targets import Endpoint, install_packages, launch, tool_version

if TYPE_CHECKING:
    from tests.world.dns import DnsServer

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "mailrelay": "mailrelay",
    "mailrelay-pg": "mailrelay on PostgreSQL",
    "mailrelay-pg-2": "2 mailrelays, 1 PostgreSQL",
    "postfix+opendkim": "postfix+opendkim",
    "postfix+opendkim-unix": "postfix+opendkim unix",
    "postfix": "plain postfix",
    "direct": "direct-to-sink",
}


# -- load --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    bench_id: str
    submitted: float  # CLOCK_MONOTONIC before MAIL FROM
    end_of_data: float  # the final "." written
    accepted: float  # its 250 read


def message(bench_id: str, size: int) -> bytes:
    head = (
        f"From: Bench <{USER}>\r\nTo: <{RCPT}>\r\nSubject: benchmark {bench_id}\r\n"
        f"Date: {email.utils.formatdate(localtime=True)}\r\n"
        f"Message-ID: <{bench_id}@{SENDER_DOMAIN}>\r\nX-Bench-Id: {bench_id}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


async def client(
    endpoint: Endpoint,
    port: int,
    ctx: ssl.SSLContext,
    ids: Sequence[str],
    size: int,
    out: list[Submitted],
    errors: list[str],
) -> None:
    smtp = aiosmtplib.SMTP(
        hostname=endpoint.host,
        port=port,
        tls_context=ctx,
        start_tls=True,
        local_hostname="client.bench.test",
        timeout=120,
    )
    try:
        await smtp.connect()  # EHLO, STARTTLS
        await smtp.ehlo()  # aiosmtplib's auth_plain() would not say EHLO again after STARTTLS
        if endpoint.auth:
            await smtp.auth_plain(USER, PASSWORD)
        for bench_id in ids:
            data = message(bench_id, size) + b".\r\n"  # no line starts with "."
            submitted = time.monotonic()
            await smtp.mail(USER)
            await smtp.rcpt(RCPT)
            reply = await smtp.execute_command(b"DATA")
            if reply.code != 354:
                raise aiosmtplib.SMTPDataError(reply.code, reply.message)
            # smtp.data() would time DATA's 354 round trip too: write the content and read
            # the reply ourselves, with aiosmtplib's public protocol methods.
            protocol = smtp.protocol
            assert protocol is not None
            protocol.write(data)
            end_of_data = time.monotonic()
            reply = await protocol.read_response(timeout=120)
            accepted = time.monotonic()
            if reply.code != 250:
                raise aiosmtplib.SMTPDataError(reply.code, reply.message)
            out.append(Submitted(bench_id, submitted, end_of_data, accepted))
        await smtp.quit()
    except (aiosmtplib.SMTPException, OSError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
        smtp.close()


def plan(tag: str, clients: int, messages: int) -> list[list[str]]:
    return [[f"{tag}.{c}.{n}" for n in range(messages)] for c in range(clients)]


async def load(
    endpoint: Endpoint, ctx: ssl.SSLContext, ids: list[list[str]], size: int
) -> tuple[list[Submitted], list[str]]:
    out: list[Submitted] = []
    errors: list[str] = []
    # Clients spread over the target's ports: one each for several instances behind DNS round
    # robin or a load balancer.
    ports = [endpoint.port, *endpoint.more_ports]
    await asyncio.gather(
        *(
            client(endpoint, ports[i % len(ports)], ctx, mine, size, out, errors)
            for i, mine in enumerate(ids)
        )
    )
    return out, errors


# -- one measured run --------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    planned: int = 0
    submitted: list[Submitted] = field(default_factory=list)
    arrivals: dict[str, Arrival] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duplicates: int = 0
    cpu: float | None = None
    peak_rss: int | None = None
    peak_pss: int | None = None
    first_rss: int | None = None  # at the start of the measured window (after the warm-up)
    first_pss: int | None = None
    machine_cpu: float = 0.0  # CPU time of every process on the machine in the window
    peak_procs: int = 0
    driver_cpu: float = 0.0
    sink_cpu: float = 0.0
    sink_sessions: int = 0  # TLS sessions the sink accepted in the window
    tree_cpu: list[tuple[str, float]] = field(default_factory=list)  # per root of the target
    wall: float = 0.0
    logged: list[str] = field(default_factory=list)  # warnings and errors the target logged
    failed: str = ""

    # -- derived -------------------------------------------------------------------------------

    def accept_rate(self) -> float | None:
        if not self.submitted:
            return None
        span = max(s.accepted for s in self.submitted) - min(s.submitted for s in self.submitted)
        return len(self.submitted) / span if span > 0 else None

    def e2e_rate(self) -> float | None:
        if not self.arrivals or not self.submitted:
            return None
        first = min(s.accepted for s in self.submitted)
        span = max(a.at for a in self.arrivals.values()) - first
        return len(self.arrivals) / span if span > 0 else None

    def submit_latency(self, q: float) -> float | None:
        return percentile([s.accepted - s.end_of_data for s in self.submitted], q)

    def transit_latency(self, q: float) -> float | None:
        return percentile(
            [
                self.arrivals[s.bench_id].at - s.accepted
                for s in self.submitted
                if s.bench_id in self.arrivals
            ],
            q,
        )


def tree_name(pid: int) -> str:
    """What a target's process tree is, for the CPU split: the root's command name, or its only
    child's when the root is a launcher (runuser starting postgres)."""

    def comm(p: int | str) -> str:
        try:
            return Path(f"/proc/{p}/comm").read_text().strip()
        except OSError:
            return "?"

    name = comm(pid)
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if name == "runuser" and len(children) == 1:
            name = comm(children[0])
    return f"{name}[{pid}]"


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    name: str, endpoint: Endpoint, sink: Sink, ctx: ssl.SSLContext, args: argparse.Namespace
) -> Run:
    run = Run(name)
    tag = f"{name.replace(' ', '-')}-{os.getpid()}-{time.monotonic_ns()}"
    if args.warmup:
        warm = plan(f"{tag}-warmup", args.clients, args.warmup)
        _done, errors = await load(endpoint, ctx, warm, args.size)
        missing = await sink.wait_for([i for ids in warm for i in ids], args.timeout)
        if errors or missing:
            run.failed = f"warm-up: {len(missing)} did not arrive; errors: {errors[:2]}"
            run.notes.append(endpoint.diagnose())
            return run
    ids = plan(tag, args.clients, args.messages)
    flat = [i for mine in ids for i in mine]
    run.planned = len(flat)
    meter, sink_meter = Meter(endpoint.roots), Meter([sink.pid])
    # Each root's tree on its own too: where the target's CPU goes (relay vs PostgreSQL).
    trees = [(tree_name(root), Meter([root])) for root in endpoint.roots]
    trees0 = [m.cpu_seconds() for _, m in trees]
    # Every process descends from PID 1. (Not /proc/stat's busy time: on a kernel with tick
    # based accounting that is sampled every tick and misses short bursts, while the times in
    # /proc/<pid>/stat add up to each task's exact run time.)
    machine = Meter([1])
    cpu0, sink0, self0 = meter.cpu_seconds(), sink_meter.cpu_seconds(), cpu_self()
    machine0 = machine.cpu_seconds()
    sampler = asyncio.create_task(meter.sample_every(args.sample_interval))
    started = time.monotonic()
    try:
        run.submitted, run.errors = await load(endpoint, ctx, ids, args.size)
        missing = await sink.wait_for([s.bench_id for s in run.submitted], args.timeout)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    ended = time.monotonic()
    run.machine_cpu = machine.cpu_seconds() - machine0
    meter.sample()
    if endpoint.roots:
        run.cpu = meter.cpu_seconds() - cpu0
        run.tree_cpu = [
            (name, m.cpu_seconds() - before)
            for (name, m), before in zip(trees, trees0, strict=True)
        ]
        run.peak_rss, run.peak_pss = meter.peak_rss, meter.peak_pss
        run.first_rss, run.first_pss = meter.first_rss, meter.first_pss
        run.peak_procs = meter.peak_procs
    run.sink_cpu = sink_meter.cpu_seconds() - sink0
    run.driver_cpu = cpu_self() - self0
    run.wall = ended - started
    run.sink_sessions = sum(1 for t in sink.sessions if started <= t <= ended)
    run.logged = endpoint.problems()
    run.arrivals = {i: sink.arrivals[i] for i in flat if i in sink.arrivals}
    run.duplicates = sum(sink.duplicates.get(i, 0) for i in flat)
    if missing:
        run.notes.append(f"{len(missing)} accepted messages did not arrive in {args.timeout}s")
        run.notes.append(endpoint.diagnose())
    return run


# -- the table ---------------------------------------------------------------------------------


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(runs: list[Run]) -> str:
    header = (
        ("target", "accept", "e2e", "submit", "submit", "acc->arr", "peak RSS", "peak PSS",
         "CPU", "CPU", "arrived", "DKIM"),
        ("", "msg/s", "msg/s", "p50 ms", "p99 ms", "p99 ms", "MiB", "MiB", "s", "ms/msg",
         "", "signed"),
    )  # fmt: skip
    rows: list[tuple[str, ...]] = []
    for r in runs:
        if r.failed and not r.submitted:
            rows.append((r.name, f"FAILED: {r.failed}"))
            continue
        n = len(r.submitted)
        signed = sum(1 for a in r.arrivals.values() if a.signed)
        rows.append(
            (
                r.name,
                fmt(r.accept_rate()),
                fmt(r.e2e_rate()),
                fmt(r.submit_latency(0.5), 1000),
                fmt(r.submit_latency(0.99), 1000),
                fmt(r.transit_latency(0.99), 1000),
                fmt(r.peak_rss, 1 / 2**20) if r.peak_rss is not None else "-",
                fmt(r.peak_pss, 1 / 2**20) if r.peak_pss is not None else "-",
                fmt(r.cpu, digits=2),
                fmt(r.cpu / n if r.cpu is not None and n else None, 1000, 2),
                f"{len(r.arrivals)}/{r.planned}",
                str(signed),
            )
        )
    widths = [max(len(row[i]) for row in (*header, *rows) if len(row) > 2) for i in range(12)]

    def line(row: tuple[str, ...]) -> str:
        if len(row) == 2:
            return f"{row[0]:<{widths[0]}}  {row[1]}"
        cells = [f"{row[0]:<{widths[0]}}"] + [
            f"{c:>{w}}" for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells)

    return "\n".join(line(row) for row in (*header, *rows))


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def report(runs: list[Run], args: argparse.Namespace, versions: str) -> str:
    by_name = {r.name: r for r in runs}
    out = [
        f"{args.clients} clients x {args.messages} messages x {args.size} B "
        f"= {args.clients * args.messages} messages per target, after a warm-up of "
        f"{args.warmup} per client; {os.cpu_count()} CPUs; {versions}",
        "",
        table(runs),
        "",
    ]
    relay = by_name.get(TARGETS["mailrelay"])
    direct = by_name.get(TARGETS["direct"])
    for kind in ("postfix+opendkim", "postfix+opendkim-unix"):
        peer = by_name.get(TARGETS[kind])
        if relay and peer:
            out.append(
                f"mailrelay / {peer.name}: accept {ratio(relay.accept_rate(), peer.accept_rate())}"
                f", end-to-end {ratio(relay.e2e_rate(), peer.e2e_rate())}"
            )
    if relay and direct:
        out.append(
            f"mailrelay end-to-end / direct-to-sink: {ratio(relay.e2e_rate(), direct.e2e_rate())}"
        )
    out += ["", "per run (the measured window):"]
    for r in runs:
        if r.submitted:
            tls = "/".join(sorted({a.tls for a in r.arrivals.values()})) or "-"
            target = (
                f"; target: up to {r.peak_procs} processes, RSS/PSS before the load "
                f"{fmt(r.first_rss, 1 / 2**20)}/{fmt(r.first_pss, 1 / 2**20)} MiB"
                if r.peak_procs
                else ""
            )
            out.append(
                f"  {r.name}: {r.wall:.2f}s; all processes {r.machine_cpu:.2f} of "
                f"{r.wall * (os.cpu_count() or 1):.2f} CPU s; load generator "
                f"{r.driver_cpu:.2f} CPU s; sink {r.sink_cpu:.2f} CPU s, "
                f"{r.sink_sessions} {tls} sessions{target}"
            )
            if len(r.tree_cpu) > 1:
                split = ", ".join(f"{name} {cpu:.2f}" for name, cpu in r.tree_cpu)
                out.append(f"    target CPU s by process tree: {split}")
    for r in runs:
        problems = [f"FAILED: {r.failed}"] if r.failed else []
        problems += [f"{len(r.errors)} client errors, e.g. {r.errors[0]}"] if r.errors else []
        problems += [f"{r.duplicates} duplicate deliveries"] if r.duplicates else []
        if r.logged:
            problems.append(f"logged {len(r.logged)} warnings or errors, e.g.:")
            problems += [f"  {line[:300]}" for line in r.logged[:3]]
        problems += r.notes
        if problems:
            out.append(f"\n{r.name}:\n  " + "\n  ".join("\n".join(problems).splitlines()))
    return "\n".join(out)


# -- main --------------------------------------------------------------------------------------


async def start_dns(sink_host: str) -> DnsServer:
    """The recipient domain's MX, pointing at the sink, for mailrelay's delivery."""
    sys.path.insert(0, str(ROOT))  # tests.world is not installed; it lives in the repository
    from tests.world.dns import DnsServer

    dns = DnsServer("127.0.0.1")
    dns.add(RCPT_DOMAIN, "MX", f"10 {MX_NAME}")
    dns.add(MX_NAME, "A", sink_host)
    await dns.start()
    return dns


async def bench(args: argparse.Namespace, work: Path) -> list[Run]:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM cleans up as Ctrl-C does: the main task is cancelled and every `finally` runs.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    sink_host = loopback(args.sink_address)
    make_certificate(work, ["localhost", MX_NAME], ["127.0.0.1", sink_host])
    ctx = ssl.create_default_context(cafile=str(work / "cert.pem"))
    ctx.check_hostname = False
    sink = Sink(sink_host, free_port(sink_host), work)
    dns = await start_dns(sink_host)
    runs: list[Run] = []
    try:
        await sink.start()
        for kind in args.targets:
            name = TARGETS[kind]
            print(f"running {name} ...", file=sys.stderr, flush=True)
            try:
                async with launch(kind, work, sink, dns.nameserver) as endpoint:
                    runs.append(await measure(name, endpoint, sink, ctx, args))
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                runs.append(Run(name, failed=str(exc)))
    finally:
        await sink.stop()
        await dns.stop()
    return runs


def main() -> None:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=8, help="concurrent sessions (default 8)")
    p.add_argument("--messages", type=int, default=50, help="messages per client (default 50)")
    p.add_argument("--size", type=int, default=5000, help="bytes per message (default 5000)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured messages per client first")
    p.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated, in this order (default {','.join(TARGETS)})",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for arrivals")
    p.add_argument("--sample-interval", type=float, default=0.1, help="/proc sampling, seconds")
    p.add_argument("--sink-address", default="127.0.9.25", help="in 127.0.0.0/8")
    p.add_argument("--dir", default=None, help="where the work directory goes (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, queues)")
    args = p.parse_args()
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := [t for t in args.targets if t not in TARGETS]:
        p.error(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    loopback(args.sink_address)
    if any(t.startswith("postfix") for t in args.targets):
        install_packages()
    postfix_version = tool_version(["postconf", "-d", "mail_version"], r"= (\S+)")
    opendkim_version = tool_version(["opendkim", "-V"], r"v(\S+)")
    versions = (
        f"Python {platform.python_version()}, Postfix {postfix_version}, "
        f"OpenDKIM {opendkim_version}"
    )
    become_subreaper()
    work = Path(tempfile.mkdtemp(prefix="bench-vs-postfix-", dir=args.dir))
    work.chmod(0o755)  # Postfix and OpenDKIM run as their own users and must reach their files
    try:
        runs = asyncio.run(bench(args, work))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; cleaning up", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        sweep_descendants()
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(report(runs, args, versions))
    if any(r.failed or r.errors or len(r.arrivals) < r.planned for r in runs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
