"""Instruments for scripts/bench_vs_postfix.py: the TLS 1.3 sink, /proc accounting, and child
processes that are always cleaned up. Loopback only. (The relays under test are set up in
bench_peer_targets.py.)

Run as `python scripts/bench_peer.py sink HOST PORT CERT KEY` this is the sink itself: an
asyncio SMTP server (STARTTLS, TLS 1.3 only) that accepts every message. After a first line
`READY` it prints on stdout one line per TLS session, `S <time>`, and one per message,
`A <X-Bench-Id> <time> <TLS version> <DKIM-signed 0|1>`, where time is CLOCK_MONOTONIC in
seconds: one clock for every process on the machine, so arrival times compare directly with the
submission times the load generator takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import ipaddress
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SENDER_DOMAIN = "bench.example"
USER = f"bench@{SENDER_DOMAIN}"
PASSWORD = "benchmark password"
RCPT_DOMAIN = "dest.bench.test"
RCPT = f"rcpt@{RCPT_DOMAIN}"
MX_NAME = f"mx.{RCPT_DOMAIN}"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def loopback(address: str) -> str:
    """`address` if it is in 127.0.0.0/8; nothing this benchmark runs listens anywhere else."""
    if ipaddress.ip_address(address) not in LOOPBACK:
        raise ValueError(f"{address} is not a loopback address (127.0.0.0/8)")
    return address


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((loopback(host), 0))
        return int(s.getsockname()[1])


async def wait_for_port(host: str, port: int, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            _reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} is not listening on {host}:{port}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


def make_certificate(directory: Path, names: Sequence[str], addresses: Sequence[str]) -> Path:
    """A self-signed ECDSA P-256 certificate (cert.pem, key.pem) shared by every server here."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(directory / "key.pem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory / "cert.pem"


# -- child processes ---------------------------------------------------------------------------


def spawn(argv: Sequence[str | Path], log: Path, *, pipe: bool = False) -> subprocess.Popen[bytes]:
    """Start a child with stderr (and stdout, unless `pipe`) appended to `log`."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            [str(a) for a in argv],
            stdout=subprocess.PIPE if pipe else f,
            stderr=f,
            stdin=subprocess.DEVNULL,
        )


def run_command(argv: Sequence[str | Path], stdin: bytes | None = None) -> str:
    """Run a command to completion; its stderr in the exception if it fails."""
    out = subprocess.run([str(a) for a in argv], input=stdin, capture_output=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {out.stderr.decode(errors='replace').strip()}")
    return out.stdout.decode(errors="replace")


_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned descendants (Postfix's children when its master exits, daemons that double-fork)
    are re-parented to this process instead of PID 1, so `sweep_descendants` can find, end and
    reap every one of them. Best effort: without it the sweep still finds the direct tree."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; always reaps it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def sweep_descendants(grace: float = 5.0, keep: Iterable[int] = ()) -> list[int]:
    """End every process below this one except the trees under `keep` (by pid: SIGTERM, then
    SIGKILL after `grace` seconds) and reap the zombies that are our children. Returns the pids
    that were still running."""
    me, kept = os.getpid(), list(keep)

    def running() -> list[int]:
        procs = snapshot()
        spared = descendants(kept, procs) | {me}
        return [p for p in descendants([me], procs) - spared if procs[p].state not in "ZX"]

    alive = running()
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        _reap_children(me)
        if not running():
            break
        time.sleep(0.05)
    for pid in running():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.05)
    _reap_children(me)
    return alive


def _reap_children(me: int) -> None:
    for pid, p in snapshot().items():
        if p.ppid == me and p.state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


# -- /proc accounting --------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    ticks: int  # utime + stime: this process, all its threads
    child_ticks: int  # cutime + cstime: its children that exited and were reaped (waited for)
    rss_pages: int


def snapshot() -> dict[int, Proc]:
    """Every process on the machine, from /proc/<pid>/stat."""
    procs: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # gone meanwhile
        # comm (field 2) may hold spaces and parentheses: the fields start after the last ")".
        fields = raw[raw.rindex(b")") + 2 :].split()
        procs[int(entry.name)] = Proc(
            pid=int(entry.name),
            ppid=int(fields[1]),
            state=fields[0].decode(),
            ticks=int(fields[11]) + int(fields[12]),
            child_ticks=int(fields[13]) + int(fields[14]),
            rss_pages=int(fields[21]),
        )
    return procs


def descendants(roots: Iterable[int], procs: dict[int, Proc]) -> set[int]:
    """The roots that exist and every process below them."""
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found: set[int] = set()
    todo = [r for r in roots if r in procs]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes that map them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class Meter:
    """CPU time and memory of the process trees under `roots`.

    CPU: the sum over every live (or not yet reaped) process in the trees of utime + stime +
    cutime + cstime. A child that exits and is reaped by its parent moves its time into the
    parent's cutime/cstime, so this total only grows, and its difference between two readings
    is the CPU the trees used in between, including children that were born and died within it
    (Postfix's smtpd, cleanup, smtp, ... are reaped by master). Not counted: a process whose
    parent outside the trees reaps it, and a child reaped in the instant between reading it
    and reading its parent (counted twice). Memory: sum of RSS (shared pages counted once per
    process) and of PSS (shared pages divided), sampled; the peaks are kept.
    """

    roots: list[int]
    first_rss: int | None = None
    first_pss: int | None = None
    peak_rss: int = 0
    peak_pss: int = 0
    peak_procs: int = 0

    def cpu_seconds(self) -> float:
        procs = snapshot()
        ticks = sum(procs[p].ticks + procs[p].child_ticks for p in descendants(self.roots, procs))
        return ticks / CLOCK_TICKS

    def sample(self) -> None:
        procs = snapshot()
        members = [p for p in descendants(self.roots, procs) if procs[p].state not in "ZX"]
        rss = sum(procs[p].rss_pages for p in members) * PAGE_SIZE
        pss = sum(pss_bytes(p) for p in members)
        if self.first_rss is None:
            self.first_rss, self.first_pss = rss, pss
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(members))

    async def sample_every(self, interval: float) -> None:
        while True:
            self.sample()
            await asyncio.sleep(interval)


# -- the sink (server side: runs in its own process) -----------------------------------------

_SINK_NAME = MX_NAME.encode()
_EHLO = b"250-%s\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n" % _SINK_NAME
_EHLO_BEFORE_TLS = _EHLO + b"250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n"
_EHLO_AFTER_TLS = _EHLO + b"250 ENHANCEDSTATUSCODES\r\n"
_BENCH_ID = re.compile(rb"^X-Bench-Id:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)
_DKIM = re.compile(rb"^DKIM-Signature:", re.IGNORECASE | re.MULTILINE)


def sink_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    return ctx


async def _sink_session(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: ssl.SSLContext, out: IO[bytes]
) -> None:
    tls = ""
    try:
        writer.write(b"220 %s ESMTP benchmark sink\r\n" % _SINK_NAME)
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(_EHLO_AFTER_TLS if tls else _EHLO_BEFORE_TLS)
            elif verb == b"HELO":
                writer.write(b"250 %s\r\n" % _SINK_NAME)
            elif verb == b"STAR" and not tls:
                writer.write(b"220 2.0.0 Ready to start TLS\r\n")
                await writer.drain()
                await writer.start_tls(ctx)
                ssl_object = writer.get_extra_info("ssl_object")
                tls = ssl_object.version() if ssl_object else "?"
                out.write(f"S {time.monotonic():.6f}\n".encode())
                out.flush()
            elif verb == b"MAIL" and not tls:
                writer.write(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                data = await reader.readuntil(b"\r\n.\r\n")
                arrived = time.monotonic()
                head = data[: data.find(b"\r\n\r\n") + 2]
                m = _BENCH_ID.search(head)
                bench_id = m.group(1).decode() if m else "-"
                signed = 1 if _DKIM.search(head) else 0
                out.write(f"A {bench_id} {arrived:.6f} {tls} {signed}\n".encode())
                out.flush()
                writer.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"502 5.5.2 Command not recognized\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def _sink_main(host: str, port: int, cert: str, key: str) -> None:
    ctx = sink_context(cert, key)
    out = sys.stdout.buffer
    server = await asyncio.start_server(
        lambda r, w: _sink_session(r, w, ctx, out), loopback(host), port, limit=128 << 20
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    out.write(b"READY\n")
    out.flush()
    async with server:
        await stop.wait()


# -- the sink (client side: in the benchmark process) ----------------------------------------


@dataclass(frozen=True)
class Arrival:
    at: float  # CLOCK_MONOTONIC
    tls: str
    signed: bool


class Sink:
    """The sink process, and what arrived there (by X-Bench-Id)."""

    def __init__(self, host: str, port: int, directory: Path) -> None:
        self.host, self.port = loopback(host), port
        self.directory = directory
        self.arrivals: dict[str, Arrival] = {}
        self.duplicates: dict[str, int] = {}
        self.sessions: list[float] = []  # when each TLS session began
        self._changed = asyncio.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def start(self) -> None:
        cert, key = self.directory / "cert.pem", self.directory / "key.pem"
        argv: list[str | Path] = [
            sys.executable,
            __file__,
            "sink",
            self.host,
            str(self.port),
            cert,
            key,
        ]
        self._proc = spawn(argv, self.directory / "sink.log", pipe=True)
        assert self._proc.stdout is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), self._proc.stdout
        )
        first = await asyncio.wait_for(reader.readline(), 30)
        if first != b"READY\n":
            raise RuntimeError(f"sink did not start: {(self.directory / 'sink.log').read_text()}")
        self._pump = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            if line.startswith(b"S "):
                self.sessions.append(float(line[2:]))
                continue
            _a, bench_id, at, tls, signed = line.decode().split()
            if bench_id in self.arrivals:
                self.duplicates[bench_id] = self.duplicates.get(bench_id, 1) + 1
            else:
                self.arrivals[bench_id] = Arrival(float(at), tls, signed == "1")
            self._changed.set()

    async def wait_for(self, ids: Iterable[str], within: float) -> set[str]:
        """Wait until every id arrived, or `within` seconds passed; returns the missing ids."""
        missing = set(ids) - self.arrivals.keys()
        deadline = time.monotonic() + within
        while missing and (left := deadline - time.monotonic()) > 0:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
            missing -= self.arrivals.keys()
        return missing

    async def stop(self) -> None:
        if self._proc is not None:
            await asyncio.to_thread(stop_process, self._proc)
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                self._pump.cancel()
                await self._pump


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "sink":
        sys.exit(f"usage: {sys.argv[0]} sink HOST PORT CERT KEY")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_sink_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]))
