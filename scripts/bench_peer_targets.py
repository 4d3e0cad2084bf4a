"""The relays under test for scripts/bench_vs_postfix.py, each started fresh with its own
temporary state: mailrelay, and a private Postfix instance with or without OpenDKIM. Loopback
only; no system Postfix or OpenDKIM is touched (and apt-get installs them if missing)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from bench_peer import (
    PASSWORD,
    SENDER_DOMAIN,
    USER,
    Sink,
    free_port,
    loopback,
    run_command,
    spawn,
    stop_process,
    sweep_descendants,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parent.parent


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


_MAILRELAY_PROBLEM = re.compile(r"level=(warning|error|critical)|Traceback")
_POSTFIX_PROBLEM = re.compile(r"\b(warning|error|fatal|panic):")


# -- Postfix + OpenDKIM ------------------------------------------------------------------------

PACKAGES = ("postfix", "opendkim", "opendkim-tools", "sasl2-bin", "libsasl2-modules")


def missing_packages() -> list[str]:
    missing = []
    for pkg in PACKAGES:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False
        ).stdout
        if "install ok installed" not in status:
            missing.append(pkg)
    return missing


def install_packages() -> None:
    """apt-get install whatever is missing. A fresh Postfix is preseeded "No configuration", so
    the package neither writes /etc/postfix/main.cf nor starts a system instance."""
    missing = missing_packages()
    if not missing:
        return
    print(f"installing with apt-get (Debian packages): {' '.join(missing)}", file=sys.stderr)
    if os.geteuid() != 0:
        raise RuntimeError(f"not root: install {' '.join(missing)} first (apt-get install)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if "postfix" in missing:
        subprocess.run(
            ["debconf-set-selections"],
            input=b"postfix postfix/main_mailer_type select No configuration\n",
            check=True,
        )
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    if still := missing_packages():
        raise RuntimeError(f"apt-get did not install {' '.join(still)}")


def tool_version(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except OSError:
        return "?"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "?"


_MASTER_CF_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class OpenDkim:
    """A private opendkim (signing, RSA-2048, relaxed/relaxed, From over-signed) listening on
    inet:PORT@127.0.0.1, or with `unix` on a socket file in its directory."""

    selector = "bench"

    def __init__(self, directory: Path, *, unix: bool = False) -> None:
        self.directory = directory
        self.unix = unix
        self.port = 0 if unix else free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        """The milter address in Postfix's spelling."""
        if self.unix:
            return f"unix:{self.directory / 'opendkim.sock'}"
        return f"inet:127.0.0.1:{self.port}"

    @property
    def _own_socket(self) -> str:
        if self.unix:
            return f"local:{self.directory / 'opendkim.sock'}"
        return f"inet:{self.port}@127.0.0.1"

    async def _wait_ready(self) -> None:
        if not self.unix:
            await wait_for_port("127.0.0.1", self.port, 20, "opendkim")
            return
        deadline = time.monotonic() + 20
        while True:
            try:
                _r, writer = await asyncio.open_unix_connection(self.directory / "opendkim.sock")
                writer.close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("opendkim is not listening") from None
                await asyncio.sleep(0.05)

    async def start(self) -> None:
        d = self.directory
        keys = d / "keys"
        keys.mkdir(parents=True)
        await asyncio.to_thread(
            run_command,
            ["opendkim-genkey", "-b", "2048", "-d", SENDER_DOMAIN, "-s", self.selector, "-D", keys],
        )
        user = pwd.getpwnam("opendkim")
        for path in (d, keys, *keys.iterdir()):  # d: opendkim makes its unix socket there
            os.chown(path, user.pw_uid, user.pw_gid)
        (keys / f"{self.selector}.private").chmod(0o600)
        keys.chmod(0o700)
        key_name = f"{self.selector}._domainkey.{SENDER_DOMAIN}"
        (d / "key.table").write_text(
            f"{key_name} {SENDER_DOMAIN}:{self.selector}:{keys / self.selector}.private\n"
        )
        (d / "signing.table").write_text(f"*@{SENDER_DOMAIN} {key_name}\n")
        (d / "opendkim.conf").write_text(
            "Mode s\n"
            "Canonicalization relaxed/relaxed\n"
            "SignatureAlgorithm rsa-sha256\n"
            "OversignHeaders From\n"
            f"KeyTable file:{d / 'key.table'}\n"
            f"SigningTable refile:{d / 'signing.table'}\n"
            "InternalHosts 127.0.0.1\n"
            f"Socket {self._own_socket}\n"
            "UMask 000\n"  # the unix socket: Postfix's smtpd runs as user postfix
            f"PidFile {d / 'opendkim.pid'}\n"
            "UserID opendkim\n"
            "Syslog no\n"
            # OpenDKIM refuses keys below a world-writable directory such as /tmp, where the
            # benchmark keeps its state; the check is about file modes, not speed.
            "RequireSafeKeys false\n"
        )
        self.proc = spawn(["opendkim", "-f", "-x", d / "opendkim.conf"], d / "opendkim.log")
        try:
            await self._wait_ready()
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {(d / 'opendkim.log').read_text()[-2000:]}") from None

    def log_problems(self) -> list[str]:
        return read_lines(self.directory / "opendkim.log")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class Postfix:
    """A private Postfix instance (own config_directory and queue_directory under `directory`),
    run with `postfix -c DIR start-fg` as our child, so no system Postfix is touched.

    Submission on 127.0.0.1:PORT with STARTTLS required and SASL AUTH through Cyrus SASL with
    a private sasldb (Debian's Postfix reads smtpd.conf from $config_directory/sasl/); every
    message is relayed to the sink with smtp_tls_security_level = encrypt.
    """

    def __init__(
        self, directory: Path, cert_dir: Path, sink: tuple[str, int], milter: str | None
    ) -> None:
        self.directory = directory
        self.cert_dir = cert_dir
        self.sink = sink
        self.milter = milter
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.master_pid = 0

    @property
    def config_dir(self) -> Path:
        return self.directory / "etc"

    def _write_config(self) -> None:
        d = self.directory
        (d / "etc" / "sasl").mkdir(parents=True)
        (d / "queue").mkdir(mode=0o755)
        (d / "data").mkdir()
        os.chown(d / "data", pwd.getpwnam("postfix").pw_uid, -1)
        host, port = self.sink
        milter = (
            f"smtpd_milters = {self.milter}\nnon_smtpd_milters = $smtpd_milters\n"
            "milter_default_action = tempfail\n"
            if self.milter
            else ""
        )
        (d / "etc" / "main.cf").write_text(
            "compatibility_level = 3.6\n"
            f"queue_directory = {d / 'queue'}\n"
            f"data_directory = {d / 'data'}\n"
            "mail_owner = postfix\nsetgid_group = postdrop\n"
            f"maillog_file = {d / 'maillog'}\nmaillog_file_prefixes = {d}\n"
            "myhostname = relay.bench.test\nmydomain = bench.test\nmyorigin = $mydomain\n"
            "mydestination =\nlocal_recipient_maps =\nalias_maps =\nalias_database =\n"
            "inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\nmynetworks = 127.0.0.1/32\n"
            "biff = no\nappend_dot_mydomain = no\nreadme_directory = no\n"
            f"relayhost = [{loopback(host)}]:{port}\n"
            f"smtpd_tls_cert_file = {self.cert_dir / 'cert.pem'}\n"
            f"smtpd_tls_key_file = {self.cert_dir / 'key.pem'}\n"
            "smtpd_tls_protocols = >=TLSv1.2\nsmtpd_tls_mandatory_protocols = >=TLSv1.2\n"
            "smtpd_tls_session_cache_database = btree:${data_directory}/smtpd_scache\n"
            "smtp_tls_security_level = encrypt\n"
            "smtp_tls_mandatory_protocols = >=TLSv1.2\n"
            "smtp_tls_session_cache_database = btree:${data_directory}/smtp_scache\n"
            f"{milter}"
        )
        submission = (
            f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
            "  -o syslog_name=postfix/submission\n"
            "  -o smtpd_tls_security_level=encrypt\n"
            "  -o smtpd_sasl_auth_enable=yes\n"
            "  -o smtpd_tls_auth_only=yes\n"
            "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n"
        )
        (d / "etc" / "master.cf").write_text(submission + _MASTER_CF_SERVICES)
        sasldb = d / "sasldb2"
        (d / "etc" / "sasl" / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
            f"mech_list: PLAIN LOGIN\nsasldb_path: {sasldb}\n"
        )
        local, _, realm = USER.partition("@")
        run_command(
            ["saslpasswd2", "-p", "-c", "-f", sasldb, "-u", realm, local], PASSWORD.encode()
        )
        os.chown(sasldb, 0, pwd.getpwnam("postfix").pw_gid)
        sasldb.chmod(0o640)

    async def start(self) -> None:
        self.directory.mkdir(mode=0o755, exist_ok=True)
        await asyncio.to_thread(self._write_config)
        self.proc = spawn(
            ["postfix", "-c", self.config_dir, "start-fg"], self.directory / "postfix.out"
        )
        try:
            await wait_for_port("127.0.0.1", self.port, 60, "postfix submission")
            pid_file = self.directory / "queue" / "pid" / "master.pid"
            self.master_pid = int(pid_file.read_text().strip())
        except (RuntimeError, OSError, ValueError) as exc:
            raise RuntimeError(f"postfix did not start ({exc}): {self.log_tail()}") from None

    def log_tail(self, lines: int = 15) -> str:
        log = read_lines(self.directory / "postfix.out") + read_lines(self.directory / "maillog")
        return "\n".join(log[-lines:])

    def log_problems(self) -> list[str]:
        return [
            line for line in read_lines(self.directory / "maillog") if _POSTFIX_PROBLEM.search(line)
        ]

    def queue_summary(self) -> str:
        out = subprocess.run(
            ["postqueue", "-c", str(self.config_dir), "-p"],
            capture_output=True,
            text=True,
            check=False,
        )
        return "\n".join((out.stdout + out.stderr).splitlines()[-3:])

    def stop(self) -> None:
        if self.master_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.master_pid, signal.SIGTERM)  # what `postfix stop` does
        if self.proc is not None:
            stop_process(self.proc, timeout=15)


# -- mailrelay ---------------------------------------------------------------------------------


class Mailrelay:
    """mailrelay with its own temporary database, set up through its CLI."""

    def __init__(
        self,
        directory: Path,
        cert_dir: Path,
        sink_port: int,
        nameserver: str,
        *,
        storage_url: str | None = None,
        instance: str = "",
        shared_dir: Path | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        # The first instance on a database sets up the domain and the user; the others find
        # them there. Instances on one machine share the DKIM key directory.
        self.first = instance in ("", "1")
        state = shared_dir or directory
        # With a url, the path is only where this instance's lock file goes.
        storage = f"path = {json.dumps(str(directory / 'mailrelay.sqlite3'))}\n"
        if storage_url:
            storage += f"url = {json.dumps(storage_url)}\n"
        master = ""
        if storage_url:
            # On PostgreSQL the DKIM keys are sealed in the database under one master key,
            # the same file for every instance.
            key_file = state / "dkim-master.key"
            if not key_file.exists():
                key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
                key_file.chmod(0o600)
            master = f"master_key_file = {json.dumps(str(key_file))}\n"
        python = ROOT / ".venv" / "bin" / "python"
        self.command = [str(python if python.exists() else sys.executable), "-m", "mailrelay"]
        self.command += ["--config", str(directory / "mailrelay.toml")]
        q = json.dumps  # a TOML basic string, for these plain paths
        directory.mkdir()
        (directory / "mailrelay.toml").write_text(
            'hostname = "relay.bench.test"\n'
            "[submission]\n"
            f"listen = [{q(f'127.0.0.1:{self.port}')}]\n"
            f"cert_file = {q(str(cert_dir / 'cert.pem'))}\n"
            f"key_file = {q(str(cert_dir / 'key.pem'))}\n"
            "allow_unverified_domains = true\n"
            + (f"[instance]\nid = {q('bench-' + instance)}\n" if instance else "")
            + "[storage]\n"
            + storage
            + "[dkim]\n"
            f"key_dir = {q(str(state / 'dkim'))}\n" + master + "rsa_bits = 2048\n"
            "[delivery]\n"
            f"port = {sink_port}\n"
            f"nameservers = [{q(nameserver)}]\n"
            'security_level = "encrypt"\n'
            "hold = false\n"
            "[metrics]\n"
            'listen = ""\n'
            "[api]\n"
            'listen = ""\n'
            # One user sends the whole load: per-user rates and quotas (which Postfix does not
            # have by default either) would refuse most of it.
            "[limits]\n"
            "max_connections_per_ip = 1000\n"  # every client of the load is 127.0.0.1
            "max_unauthenticated_per_ip = 1000\n"
            "messages_per_minute = 0\n"
            "recipients_per_hour = 0\n"
            "recipients_per_day = 0\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def _cli(self, *args: str, stdin: bytes | None = None) -> str:
        return run_command([*self.command, *args], stdin)

    async def start(self) -> None:
        notify = f"postmaster@{SENDER_DOMAIN}"
        if self.first:
            await asyncio.to_thread(self._cli, "domain", "add", SENDER_DOMAIN, "--notify", notify)
            await asyncio.to_thread(
                self._cli, "user", "add", USER, "--password-stdin", stdin=PASSWORD.encode()
            )
        self.proc = spawn([*self.command, "serve"], self.directory / "mailrelay.log")
        try:
            await wait_for_port("127.0.0.1", self.port, 60, "mailrelay submission")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.log_tail()}") from None

    def log_tail(self, lines: int = 10) -> str:
        return "\n".join(read_lines(self.directory / "mailrelay.log")[-lines:])

    def log_problems(self) -> list[str]:
        return [
            line
            for line in read_lines(self.directory / "mailrelay.log")
            if _MAILRELAY_PROBLEM.search(line)
        ]

    def queue_summary(self) -> str:
        try:
            listing = self._cli("queue", "list")
        except RuntimeError as exc:
            return str(exc)
        rows = listing.splitlines()
        return f"`mailrelay queue list`: {len(rows)} lines; first: {rows[:3]}"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)


# -- the targets, started and stopped -----------------------------------------------------------


@dataclass
class Endpoint:
    """Where the load goes, and what to ask the target about itself."""

    host: str
    port: int
    auth: bool
    roots: list[int]  # the target's process trees, for CPU and memory
    diagnose: Callable[[], str] = lambda: ""  # its queue and log, when mail went missing
    problems: Callable[[], list[str]] = list  # warnings and errors it logged
    more_ports: tuple[int, ...] = ()  # further instances: the clients spread over all ports


@contextlib.asynccontextmanager
async def launch(kind: str, work: Path, sink: Sink, nameserver: str) -> AsyncIterator[Endpoint]:
    """Start one target; stop it (and sweep its leftovers) however the block ends."""
    run_dir = work / f"{kind.replace('+', '-')}-{time.monotonic_ns()}"
    if kind == "direct":
        yield Endpoint(sink.host, sink.port, auth=False, roots=[])
        return
    if kind.startswith("mailrelay-pg"):
        async with _on_postgresql(kind, run_dir, work, sink, nameserver) as endpoint:
            yield endpoint
        return
    if kind == "mailrelay":
        relay = Mailrelay(run_dir, work, sink.port, nameserver)
        try:
            await relay.start()
            assert relay.proc is not None

            def diagnose() -> str:
                return f"{relay.queue_summary()}\nlog tail:\n{relay.log_tail()}"

            yield Endpoint(
                "127.0.0.1", relay.port, True, [relay.proc.pid], diagnose, relay.log_problems
            )
        finally:
            await asyncio.to_thread(relay.stop)
            await asyncio.to_thread(sweep_descendants, keep=[sink.pid])
        return
    dkim = None
    if kind.startswith("postfix+opendkim"):
        dkim = OpenDkim(run_dir / "opendkim", unix=kind.endswith("-unix"))
    postfix = Postfix(run_dir, work, (sink.host, sink.port), dkim.socket if dkim else None)
    try:
        if dkim is not None:
            await dkim.start()
        await postfix.start()
        roots = [postfix.proc.pid] if postfix.proc else []
        if dkim is not None and dkim.proc is not None:
            roots.append(dkim.proc.pid)

        def diagnose() -> str:
            return f"postqueue -p: {postfix.queue_summary()}\nlog tail:\n{postfix.log_tail()}"

        def problems() -> list[str]:
            return postfix.log_problems() + (dkim.log_problems() if dkim else [])

        yield Endpoint("127.0.0.1", postfix.port, True, roots, diagnose, problems)
    finally:
        await asyncio.to_thread(postfix.stop)
        if dkim is not None:
            await asyncio.to_thread(dkim.stop)
        # What Postfix left behind: children orphaned when master exits. The sink stays.
        await asyncio.to_thread(sweep_descendants, keep=[sink.pid])


@contextlib.asynccontextmanager
async def _on_postgresql(
    kind: str, run_dir: Path, work: Path, sink: Sink, nameserver: str
) -> AsyncIterator[Endpoint]:
    """One or two mailrelay instances on one PostgreSQL (fsync on: as durable as SQLite's
    synchronous=FULL), started here from Debian's package like the tests' (tests/pg.py)."""
    sys.path.insert(0, str(ROOT))
    from tests.pg import Cluster

    cluster = Cluster(durable=True)
    relays: list[Mailrelay] = []
    try:
        await asyncio.to_thread(cluster.start)
        url = await asyncio.to_thread(cluster.new_database)
        await asyncio.to_thread(run_dir.mkdir)
        count = 2 if kind.endswith("-2") else 1
        for n in range(1, count + 1):
            relay = Mailrelay(
                run_dir / f"instance-{n}",
                work,
                sink.port,
                nameserver,
                storage_url=url,
                instance=str(n) if count > 1 else "",
                shared_dir=run_dir,
            )
            relays.append(relay)
            await relay.start()  # in turn: the first sets up the domain and user
        roots = [r.proc.pid for r in relays if r.proc is not None]
        if cluster.process is not None:
            roots.append(cluster.process.pid)

        def diagnose() -> str:
            return "\n".join(f"{r.queue_summary()}\nlog tail:\n{r.log_tail()}" for r in relays)

        def problems() -> list[str]:
            return [line for r in relays for line in r.log_problems()]

        ports = [r.port for r in relays]
        yield Endpoint(
            "127.0.0.1", ports[0], True, roots, diagnose, problems, more_ports=tuple(ports[1:])
        )
    finally:
        for relay in relays:
            await asyncio.to_thread(relay.stop)
        await asyncio.to_thread(cluster.stop)
        await asyncio.to_thread(sweep_descendants, keep=[sink.pid])
