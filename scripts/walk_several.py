"""Walk the README's "Several machines": two relay instances on one PostgreSQL, on this machine.

Run as root, from the clone: `.venv/bin/python scripts/walk_several.py [--keep]` (any Python 3.11
with `cryptography` and dnspython, for tests/world). The walk takes its commands and the config
from README.md itself (step 1's `psql` lines and `hostssl` line, step 2's TOML and its
`make-master-key` block), so it follows what the README says today, and runs them in a tree of
its own (PREFIX/etc/mailrelay, PREFIX/opt/mailrelay, PREFIX/var/lib/mailrelay; default PREFIX
/tmp/mailrelay-walk-several) with a service user of its own (mailrelay-several). Paths and the
user name in the README's lines are rewritten into these (scripts/walk_install.py's rewrite);
nothing else is.

0. "Operating"'s install, in short (scripts/walk_install.py walks it in full, systemd's sandbox
   included): the user, `/usr/bin/python3 -m venv` + `pip install` of a copy of the clone,
   /etc/mailrelay (0750, group of the user) and the state directory (0700, the user's). The
   instances run as that user (setpriv, as the unit's User=/Group=), as systemd would run
   `mailrelay-relay1` and `mailrelay-relay2`; the admin commands run as root, as the README's.
1. The database: a PostgreSQL 15 cluster of the walk's own (`pg_createcluster 15 mailrelaywalk`
   on a free port, `--start-conf=manual`, started with `pg_ctlcluster`); no other cluster is
   touched. The README's `sudo -u postgres psql ...` lines run as `runuser -u postgres -- psql
   ...` (no sudo here) with PGCLUSTER naming the walk's cluster. The operator's edits are the
   walk's: `listen_addresses = '127.0.0.1'` (the relays' network here is 127.0.0.0/8),
   `ssl = on` with a certificate for db.example.internal from a CA of the walk's (written where
   the URL's `sslrootcert` points), and the README's `hostssl` line with 127.0.0.0/8 for its
   network, above Debian's `host all all 127.0.0.1/32` line. The URL's host stays
   db.example.internal (which does not resolve): the walk adds its port and
   `hostaddr=127.0.0.1`, so libpq connects to loopback and still checks the certificate
   against that name (`sslmode=verify-full`). The relays' connections must all show in
   `pg_stat_ssl`.
2. Two instances, relay1 and relay2, each with a config made as "Operating" makes it (a copy of
   config/mailrelay.example.toml, 0640, group of the user) with the README's keys set as
   written, and what two on one machine need: their own `storage.path`
   (PREFIX/var/lib/mailrelay/ID.sqlite3: only the lock), listen ports, `metrics.listen` and
   `api.listen`, all on 127.0.0.1; and a certificate for smtp.example.org (step 4). The
   README's master-key block makes the one key both read; `check-config` runs as the user.
3. Delivery never leaves the machine: a DNS server and an MX for example.net from the test world
   (tests/world, on 127.0.223.x) are the relays' `delivery.nameservers`, `delivery.port` and
   `delivery.ca_file`. The MX first answers RCPT with 451, so the messages stay queued for
   `queue list`; then it accepts, `queue retry --all` runs on one instance, and every message
   must arrive exactly once, DKIM-signed with the sealed key. `allow_unverified_domains = true`:
   no record can be published for example.org (`domain check` is not run).
4. Step 3 (start relay1, which makes the schema; `domain add` with relay1's config, `user add`
   with relay2's; start relay2) and step 4 (smtplib: STARTTLS + AUTH and implicit TLS on
   both, the certificate verified), `queue list` on both showing every message,
   `mailrelay_instance_info{instance_id="..."}` on each one's metrics; the state directory
   holds only the user's files; SIGTERM must stop each with exit 0.

At the end the instances, the MX, the cluster (`pg_dropcluster --stop`), the user and the tree
are removed (--keep keeps the cluster, the user and the tree). Exit 0 when every step worked,
else 1 with the failed step named.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import pwd
import re
import shlex
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import walk_install  # noqa: E402
from scripts.walk_install import WalkFailed, set_key  # noqa: E402
from tests.world import MODERN, MxServer, World  # noqa: E402
from tests.world.certs import TestCA  # noqa: E402

USER = "mailrelay-several"
CLUSTER = "mailrelaywalk"
PG_VERSION = "15"
DB_HOST = "db.example.internal"
CLIENT_NAME = "smtp.example.org"
PASSWORD = "correct horse battery staple"
MESSAGES_PER_INSTANCE = 3
WORLD_ADDRESS = "127.0.223.1"
SEQ = re.compile(rb"^X-Seq: (\d+)\r$", re.MULTILINE)
T = TypeVar("T")


@dataclasses.dataclass
class Instance:
    id: str
    hostname: str
    config: Path
    submission_port: int
    implicit_tls_port: int
    metrics_port: int
    api_port: int
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@dataclasses.dataclass
class Walk:
    prefix: Path
    user: str = USER
    pg_port: int = 0
    user_made: bool = False
    tree_made: bool = False
    steps: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    instances: list[Instance] = dataclasses.field(default_factory=list)
    cluster_made: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    world: World | None = None
    mx: MxServer | None = None

    # ---- helpers -----------------------------------------------------------------------------

    def at(self, path: str) -> Path:
        return self.prefix / path.lstrip("/")

    def step(self, what: str, outcome: str = "ok") -> None:
        self.steps.append((what, outcome))
        print(f"walk: {what}: {outcome}", flush=True)

    def run(
        self,
        argv: list[str],
        *,
        what: str | None = None,
        stdin: str | None = None,
        config: Path | None = None,
    ) -> str:
        shown = what or shlex.join(argv)
        print(f"walk: $ {shown}", flush=True)
        env = dict(os.environ, PGCLUSTER=f"{PG_VERSION}/{CLUSTER}")
        env["PATH"] = f"{self.at('/opt/mailrelay/bin')}:{env.get('PATH', '/usr/bin:/bin')}"
        env.pop("VIRTUAL_ENV", None)
        if config is not None:
            env["MAILRELAY_CONFIG"] = str(config)
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=self.prefix,
            env=env,
        )
        output = [
            x
            for x in (done.stdout + done.stderr).strip().splitlines()
            if not x.startswith("WARNING: Location ")  # this machine's pip configuration
        ]
        if output:
            print("\n".join(f"      {x}" for x in output[-15:]), flush=True)
        if done.returncode != 0:
            self.step(shown, f"FAILED (exit {done.returncode})")
            raise WalkFailed(f"{shown}: exit {done.returncode}")
        self.step(shown)
        return done.stdout

    def mailrelay(self, instance: Instance, line: str, *, stdin: str | None = None) -> str:
        """A README line (`mailrelay ...`, `runuser -u mailrelay -- mailrelay ...`, `chown
        ...`) with its paths and user moved to the walk's, MAILRELAY_CONFIG naming the
        instance's config and the installed `mailrelay` first on PATH."""
        rewritten = self.rewrite(line)
        return self.run(
            ["/bin/bash", "-e", "-o", "pipefail", "-c", rewritten],
            what=f"[{instance.id}] {rewritten}",
            stdin=stdin,
            config=instance.config,
        )

    def rewrite(self, line: str) -> str:
        return walk_install.Walk(self.prefix, self.user, 0, 0, 0).rewrite(line)

    def psql(self, sql: str) -> str:
        argv = ["runuser", "-u", "postgres", "--", "psql", "-d", "mailrelay", "-XAtc", sql]
        return self.run(argv, what=f'runuser -u postgres -- psql -d mailrelay -XAtc "{sql}"')

    def in_world(self, coroutine: Coroutine[Any, Any, T]) -> T:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    # ---- preparation -------------------------------------------------------------------------

    def prepare(self) -> None:
        if os.geteuid() != 0:
            raise WalkFailed("run as root: the walk makes a PostgreSQL cluster")
        if not Path(f"/usr/lib/postgresql/{PG_VERSION}/bin/postgres").exists():
            raise WalkFailed(f"no PostgreSQL {PG_VERSION} here (apt-get install postgresql)")
        if self.prefix.exists():
            raise WalkFailed(f"{self.prefix} exists already; the walk wants a fresh tree")
        if Path(f"/etc/postgresql/{PG_VERSION}/{CLUSTER}").exists():
            raise WalkFailed(f"cluster {PG_VERSION}/{CLUSTER} exists already (pg_dropcluster it)")
        with contextlib.suppress(KeyError):
            pwd.getpwnam(self.user)
            raise WalkFailed(f"user {self.user} exists already; the walk wants its own")
        self.tree_made = True
        for sub in ("etc", "opt", "var/lib", "walk"):
            self.at(sub).mkdir(parents=True, mode=0o755)
        os.chmod(self.prefix, 0o755)  # noqa: S103 (as /etc, /opt and /var are)
        self.pg_port = free_port()
        self.step(f"prepare {self.prefix}")

    def install(self) -> None:
        """ "Operating"'s install, in short (scripts/walk_install.py walks it in full): the
        service user, the package in a venv of /usr/bin/python3, /etc/mailrelay and the state
        directory with their modes and owners."""
        # The clone as `pip install .` sees it, without the build's leftovers in the work tree.
        shutil.copytree(
            ROOT,
            self.at("/walk/src"),
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".*_cache"
            ),
        )
        for line in (
            "useradd --system --user-group --home-dir /var/lib/mailrelay --no-create-home"
            " --shell /usr/sbin/nologin mailrelay",
            "/usr/bin/python3 -m venv /opt/mailrelay && /opt/mailrelay/bin/pip install -q"
            f" {self.at('/walk/src')}",
            "install -d -m 0750 -g mailrelay /etc/mailrelay /etc/mailrelay/tls",
            "install -d -m 0700 -o mailrelay -g mailrelay /var/lib/mailrelay",
        ):
            rewritten = self.rewrite(line)
            self.run(["/bin/bash", "-e", "-o", "pipefail", "-c", rewritten], what=rewritten)
            self.user_made = True

    def start_world(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.world = World(self.at("/walk/world"), first_address=WORLD_ADDRESS)
        self.in_world(self.world.start())
        deferring = dataclasses.replace(MODERN, rcpt_reply="451 4.3.0 Try again later")
        self.mx = self.in_world(self.world.add_mx("example.net", deferring))
        self.in_world(self.world.add_mx("example.org", MODERN))  # where a bounce would go
        self.step(
            f"a DNS server and MX servers on 127.0.223.x, SMTP port {self.world.smtp_port}:"
            " example.net answers RCPT with 451 for now"
        )

    # ---- 1. the database ---------------------------------------------------------------------

    def database(self) -> None:
        self.run(
            [
                "pg_createcluster",
                PG_VERSION,
                CLUSTER,
                "-p",
                str(self.pg_port),
                "--start-conf=manual",
                "-q",
            ]
        )
        self.cluster_made = True
        self.run(["pg_ctlcluster", PG_VERSION, CLUSTER, "start"])
        section = readme_section()
        for line in sh_lines(section):
            if not line.startswith("sudo -u postgres psql "):
                raise WalkFailed(f"step 1 has a line the walk does not know: {line}")
            args = shlex.split(line)
            # No sudo here: runuser does what `sudo -u postgres` does.
            argv = ["runuser", "-u", "postgres", "--", *args[3:]]
            self.run(argv, what=line.replace("sudo -u postgres", "runuser -u postgres --", 1))
        # Let the relays in: listen_addresses (restart), TLS on the server, the hostssl line.
        conf_dir = Path(f"/etc/postgresql/{PG_VERSION}/{CLUSTER}")
        tls = self.at("/walk/pg-tls")
        tls.mkdir(mode=0o755)
        ca_pem, cert_pem, key_pem = make_ca_and_cert(DB_HOST)
        self.install_file(self.db_ca(), ca_pem, 0o640)
        (tls / "server.crt").write_bytes(cert_pem)
        key_path = tls / "server.key"
        key_path.write_bytes(key_pem)
        shutil.chown(key_path, "postgres", "postgres")
        os.chmod(key_path, 0o600)
        with open(conf_dir / "postgresql.conf", "a") as f:
            f.write(
                '\n# walk_several.py: README "Several machines", step 1\n'
                "listen_addresses = '127.0.0.1'\n"
                "ssl = on\n"
                f"ssl_cert_file = '{tls / 'server.crt'}'\n"
                f"ssl_key_file = '{key_path}'\n"
            )
        self.step(
            "postgresql.conf: listen_addresses = '127.0.0.1', ssl = on with a certificate"
            f" for {DB_HOST}"
        )
        self.run(["pg_ctlcluster", PG_VERSION, CLUSTER, "restart"])
        found = re.search(r"`(hostssl \S+ \S+ \S+ scram-sha-256)`", section)
        if found is None:
            raise WalkFailed("step 1 names no `hostssl ... scram-sha-256` line")
        hba_line = re.sub(r"\d+\.\d+\.\d+\.\d+/\d+", "127.0.0.0/8", found.group(1))
        hba = conf_dir / "pg_hba.conf"
        lines = hba.read_text().splitlines()
        first = next(i for i, x in enumerate(lines) if x.strip() and not x.startswith("#"))
        lines.insert(first, hba_line)
        hba.write_text("\n".join(lines) + "\n")
        self.step(f"pg_hba.conf: {hba_line} (first)")
        self.run(["pg_ctlcluster", PG_VERSION, CLUSTER, "reload"])
        listening = subprocess.run(
            ["ss", "-Hltn", f"sport = :{self.pg_port}"], capture_output=True, text=True, check=True
        ).stdout
        addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines()}
        if not addresses or any(not ipaddress.ip_address(a).is_loopback for a in addresses):
            raise WalkFailed(f"the cluster listens on {addresses}")
        self.step(f"the cluster listens on {', '.join(sorted(addresses))}:{self.pg_port} only")

    # ---- 2. each relay -----------------------------------------------------------------------

    def install_file(self, path: Path, data: bytes, mode: int) -> None:
        """`install -m MODE -g mailrelay`: root's, readable by the service's group."""
        path.write_bytes(data)
        shutil.chown(path, "root", self.user)
        os.chmod(path, mode)

    def configure(self) -> None:
        section = readme_section()
        found = re.search(r"```toml\n(.*?)```", section, flags=re.S)
        if found is None:
            raise WalkFailed("step 2 has no TOML block")
        readme_toml = tomllib.loads(found.group(1))
        key_block = re.search(r"```sh\n(mailrelay dkim make-master-key .*?)```", section, re.S)
        if key_block is None:
            raise WalkFailed("the section has no ```sh block with `mailrelay dkim make-master-key`")
        assert self.world is not None
        for n in (1, 2):
            instance = Instance(
                id=f"relay{n}",
                hostname=f"relay{n}.example.org",
                config=self.at(f"/etc/mailrelay/relay{n}.toml"),
                submission_port=free_port(),
                implicit_tls_port=free_port(),
                metrics_port=free_port(),
                api_port=free_port(),
            )
            text = (ROOT / "config" / "mailrelay.example.toml").read_text()
            text = text.replace("/etc/mailrelay", str(self.at("/etc/mailrelay")))
            state = self.at("/var/lib/mailrelay")
            text = text.replace("/var/lib/mailrelay", str(state))
            # The README's keys as written, with this machine's names.
            for table, keys in readme_toml.items():
                if not isinstance(keys, dict):
                    value = keys
                    if table == "hostname":
                        value = instance.hostname
                    text = re.sub(
                        rf"^{table} = .*$", f"{table} = {toml_value(value)}", text, flags=re.M
                    )
                    continue
                for key, value in keys.items():
                    if (table, key) == ("storage", "url"):
                        value = self.rewrite_url(value)
                    elif (table, key) == ("instance", "id"):
                        value = instance.id
                    elif isinstance(value, str) and value.startswith("/etc/mailrelay"):
                        value = value.replace("/etc/mailrelay", str(self.at("/etc/mailrelay")))
                    text = set_key(text, table, key, toml_value(value))
            # What two instances on one machine need, and the walk's loopback world.
            for table, key, value in (
                ("storage", "path", f"{state}/{instance.id}.sqlite3"),
                ("submission", "listen", [f"127.0.0.1:{instance.submission_port}"]),
                ("submission", "implicit_tls_listen", [f"127.0.0.1:{instance.implicit_tls_port}"]),
                ("submission", "allow_unverified_domains", True),
                ("metrics", "listen", f"127.0.0.1:{instance.metrics_port}"),
                ("api", "listen", f"127.0.0.1:{instance.api_port}"),
                ("delivery", "port", self.world.smtp_port),
                ("delivery", "nameservers", self.world.nameservers),
                ("delivery", "ca_file", str(self.world.ca_file)),
                ("delivery", "dns_timeout", "2s"),
                ("delivery", "connect_timeout", "5s"),
            ):
                text = set_key(text, table, key, toml_value(value))
            self.install_file(instance.config, text.encode(), 0o640)
            self.instances.append(instance)
            self.step(
                f"{instance.config}: the README's keys; id {instance.id}, storage.path"
                f" {state}/{instance.id}.sqlite3, submission"
                f" 127.0.0.1:{instance.submission_port} and :{instance.implicit_tls_port},"
                f" metrics :{instance.metrics_port}, api :{instance.api_port}"
            )
        # The certificate for the name clients use (step 4), the same on both instances.
        ca_pem, cert_pem, key_pem = make_ca_and_cert(CLIENT_NAME, ip="127.0.0.1")
        tls = self.at("/etc/mailrelay/tls")
        self.install_file(tls / "fullchain.pem", cert_pem + ca_pem, 0o640)
        self.install_file(tls / "privkey.pem", key_pem, 0o640)
        self.at("/walk/client-ca.pem").write_bytes(ca_pem)
        self.step(f"{tls}: a certificate for {CLIENT_NAME} (and 127.0.0.1)")
        for line in key_block.group(1).splitlines():
            if line.strip():
                self.mailrelay(self.instances[0], line.split(" #")[0].strip())
        key_file = self.at(str(readme_toml["dkim"]["master_key_file"]))
        made = os.stat(key_file)
        owner = pwd.getpwuid(made.st_uid).pw_name
        if made.st_mode & 0o777 != 0o600 or owner != self.user:
            raise WalkFailed(f"{key_file}: mode {made.st_mode & 0o777:o}, owner {owner}")
        self.step(f"{key_file}: mode 0600, owned by {self.user}")
        # Both instances are on this machine: the copy to the other is the same file.
        for instance in self.instances:
            self.mailrelay(instance, "runuser -u mailrelay -- mailrelay check-config")

    def db_ca(self) -> Path:
        """Where the README's URL wants the CA of the database's certificate (`sslrootcert`)."""
        found = re.search(r"```toml\n.*?sslrootcert=([^&\"]+)", readme_section(), flags=re.S)
        if found is None:
            raise WalkFailed("the README's storage.url names no sslrootcert")
        return self.at(found.group(1))

    def rewrite_url(self, url: str) -> str:
        """The README's URL with the walk's port, `hostaddr` (the name does not resolve here)
        and the CA file under the prefix."""
        if f"@{DB_HOST}/" not in url:
            raise WalkFailed(f"storage.url {url!r} does not name {DB_HOST}")
        url = url.replace(f"@{DB_HOST}/", f"@{DB_HOST}:{self.pg_port}/")
        url = url.replace("/etc/mailrelay", str(self.at("/etc/mailrelay")))
        return url + ("&" if "?" in url else "?") + "hostaddr=127.0.0.1"

    # ---- 3. start ----------------------------------------------------------------------------

    def start(self, instance: Instance) -> None:
        instance.log = self.at(f"/walk/{instance.id}.log")
        print(f"walk: $ [{instance.id}] mailrelay serve (as {self.user})", flush=True)
        with open(instance.log, "wb") as log:
            # What the unit runs, as its User=/Group=; setpriv execs, so SIGTERM reaches serve.
            instance.process = subprocess.Popen(
                [
                    "setpriv",
                    "--reuid",
                    self.user,
                    "--regid",
                    self.user,
                    "--init-groups",
                    "--",
                    str(self.at("/opt/mailrelay/bin/mailrelay")),
                    "--config",
                    str(instance.config),
                    "serve",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
                env={
                    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG": "C.UTF-8",
                },
            )
        deadline = time.monotonic() + 60
        while True:
            if instance.process.poll() is not None:
                tail = instance.log.read_text().strip().splitlines()[-10:]
                self.step(f"[{instance.id}] serve", f"FAILED (exit {instance.process.returncode})")
                print("\n".join(f"      {x}" for x in tail), flush=True)
                raise WalkFailed(f"{instance.id} exited {instance.process.returncode}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", instance.submission_port), 1).close()
                break
            if time.monotonic() > deadline:
                raise WalkFailed(f"{instance.id} did not open its submission port")
            time.sleep(0.1)
        self.step(f"[{instance.id}] mailrelay serve: listening")

    def start_and_set_up(self) -> None:
        first, second = self.instances
        self.start(first)
        tables = self.psql("SELECT count(*) FROM pg_tables WHERE tableowner = 'mailrelay'")
        if int(tables) == 0:
            raise WalkFailed("the first start made no tables")
        self.step(f"the first start made the schema ({tables.strip()} tables)")
        self.mailrelay(first, "mailrelay domain add example.org --notify postmaster@example.org")
        # "on any one machine": the user is added with the other instance's config.
        self.mailrelay(
            second, "mailrelay user add alice@example.org --password-stdin", stdin=PASSWORD + "\n"
        )
        self.start(second)
        for instance in self.instances:
            listed = self.mailrelay(instance, "mailrelay user list")
            if "alice@example.org" not in listed:
                raise WalkFailed(f"{instance.id}: user list does not show alice@example.org")
            listed = self.mailrelay(instance, "mailrelay domain list")
            if "example.org" not in listed:
                raise WalkFailed(f"{instance.id}: domain list does not show example.org")

    # ---- 4. clients --------------------------------------------------------------------------

    def submit(self) -> list[str]:
        context = ssl.create_default_context(cafile=str(self.at("/walk/client-ca.pem")))
        ids = []
        seq = 0
        for instance in self.instances:
            with smtplib.SMTP("127.0.0.1", instance.submission_port, timeout=30) as smtp:
                smtp.starttls(context=context)
                smtp.login("alice@example.org", PASSWORD)
                for _ in range(MESSAGES_PER_INSTANCE):
                    message = (
                        f"From: alice@example.org\r\nTo: r{seq}@example.net\r\n"
                        f"Subject: walk {seq} via {instance.id}\r\nX-Seq: {seq}\r\n\r\n"
                        f"hello {seq}\r\n"
                    ).encode()
                    smtp.mail("alice@example.org")
                    smtp.rcpt(f"r{seq}@example.net")
                    code, reply = smtp.data(message)
                    queued = re.search(rb"queued as (\S+)", reply)
                    if code != 250 or queued is None:
                        raise WalkFailed(f"{instance.id}: DATA answered {code} {reply!r}")
                    ids.append(queued.group(1).decode())
                    seq += 1
            self.step(
                f"smtplib: STARTTLS + AUTH on {instance.id} (127.0.0.1:{instance.submission_port},"
                f" {CLIENT_NAME} certificate verified): {MESSAGES_PER_INSTANCE} messages queued"
            )
            with smtplib.SMTP_SSL(
                "127.0.0.1", instance.implicit_tls_port, context=context, timeout=30
            ) as smtp:
                smtp.login("alice@example.org", PASSWORD)
            self.step(f"smtplib: implicit TLS + AUTH on {instance.id}")
        return ids

    def queue_on_both(self, ids: list[str]) -> None:
        assert self.mx is not None
        # Each message is tried once (451) before queue list looks, so that it shows the
        # deferred state; whichever instance tried it.
        self.until(lambda: len(self.mx_rcpts()) >= len(ids), 60, "every message tried once (451)")
        for instance in self.instances:
            listing = self.mailrelay(instance, "mailrelay queue list")
            missing = [i for i in ids if i not in listing]
            if missing:
                raise WalkFailed(f"{instance.id}: queue list does not show {missing}")
            self.step(f"[{instance.id}] queue list shows all {len(ids)} messages")

    def mx_rcpts(self) -> list[str]:
        assert self.mx is not None
        return [
            c.line
            for conn in self.mx.connections
            for c in conn.commands
            if c.line.upper().startswith("RCPT")
        ]

    def metrics(self) -> None:
        for instance in self.instances:
            url = f"http://127.0.0.1:{instance.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as answer:
                body = answer.read().decode()
            wanted = f'mailrelay_instance_info{{instance_id="{instance.id}"}} 1'
            if wanted not in body:
                raise WalkFailed(f"{url} has no {wanted}")
            self.step(f"{url}: {wanted}")

    def ssl_in_use(self) -> None:
        counts = self.psql(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s"
            " JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'mailrelay'"
        ).strip()
        with_ssl, total = (int(x) for x in counts.split("|"))
        if total == 0 or with_ssl != total:
            raise WalkFailed(f"{with_ssl} of the relays' {total} connections use TLS")
        self.step(f"all {total} connections of the relays to PostgreSQL use TLS")

    def deliver(self, ids: list[str]) -> None:
        assert self.mx is not None
        self.mx.behaviour = MODERN
        self.step("the MX for example.net now accepts")
        self.mailrelay(self.instances[1], "mailrelay queue retry --all")
        self.until(
            lambda: len(self.mx.messages) >= len(ids) if self.mx else False,
            60,
            f"the MX received {len(ids)} messages",
        )
        time.sleep(2)  # a second delivery of anything would show by now
        seqs: Counter[int] = Counter()
        for message in self.mx.messages:
            found = SEQ.search(message.data)
            if found is None or b"DKIM-Signature:" not in message.data:
                raise WalkFailed(f"no X-Seq or no DKIM-Signature: {message.data[:300]!r}")
            seqs[int(found.group(1))] += 1
        if seqs != {n: 1 for n in range(len(ids))}:
            raise WalkFailed(f"not each message exactly once: {dict(seqs)}")
        self.step(f"each of the {len(ids)} messages arrived exactly once, DKIM-signed, over TLS")
        for instance in self.instances:
            listing = self.mailrelay(instance, "mailrelay queue list --json")
            if listing.strip() not in ("[]", ""):
                raise WalkFailed(f"{instance.id}: the queue is not empty: {listing}")
        counts = []
        for instance in self.instances:
            assert instance.log is not None
            counts.append(f"{instance.id} {instance.log.read_text().count('event=delivery ')}")
        self.step(f"deliveries logged per instance: {', '.join(counts)}")
        state = self.at("/var/lib/mailrelay")
        uid = pwd.getpwnam(self.user).pw_uid
        strays = [str(p) for p in [state, *state.rglob("*")] if p.lstat().st_uid != uid]
        if strays:
            raise WalkFailed(f"not the service user's: {strays}")
        listed = ", ".join(sorted(p.name for p in state.iterdir()))
        self.step(f"{state} holds only the service user's lock files: {listed}")

    def until(self, predicate: Any, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not predicate():
            if time.monotonic() > deadline:
                self.step(what, f"FAILED after {seconds} s")
                raise WalkFailed(what)
            time.sleep(0.1)
        self.step(what)

    def stop(self) -> None:
        for instance in self.instances:
            assert instance.process is not None
            instance.process.send_signal(signal.SIGTERM)
            code = instance.process.wait(timeout=30)
            instance.process = None
            if code != 0:
                self.step(f"[{instance.id}] SIGTERM", f"FAILED (exit {code})")
                raise WalkFailed(f"{instance.id} exited {code} on SIGTERM")
            self.step(f"[{instance.id}] SIGTERM: exit 0")

    # ---- clean up ----------------------------------------------------------------------------

    def clean_up(self, keep: bool) -> None:
        for instance in self.instances:
            if instance.process is not None and instance.process.poll() is None:
                instance.process.send_signal(signal.SIGTERM)
                try:
                    instance.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    instance.process.kill()
                    instance.process.wait()
        if self.world is not None and self.loop is not None:
            with contextlib.suppress(Exception):
                self.in_world(self.world.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
        if keep:
            print(
                f"walk: kept {self.prefix}, user {self.user} and cluster {PG_VERSION}/{CLUSTER}",
                flush=True,
            )
            if self.cluster_made:
                print(
                    f"walk: drop it with pg_dropcluster --stop {PG_VERSION} {CLUSTER}", flush=True
                )
            return
        if self.cluster_made:
            subprocess.run(["pg_dropcluster", "--stop", PG_VERSION, CLUSTER], check=False)
        if self.user_made:
            subprocess.run(["userdel", self.user], check=False)
        if self.tree_made:
            shutil.rmtree(self.prefix, ignore_errors=True)


# ---- the README ----------------------------------------------------------------------------


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Several machines\n")
    return text[start : text.index("\n## ", start + 1)]


def sh_lines(section: str) -> list[str]:
    """The lines of the section's first ```sh block."""
    block = section[section.index("```sh\n") + 6 :]
    return [x.strip() for x in block[: block.index("```")].splitlines() if x.strip()]


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise WalkFailed(f"cannot write {value!r} as TOML")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_ca_and_cert(name: str, ip: str | None = None) -> tuple[bytes, bytes, bytes]:
    """A CA of the walk's, and a certificate it issues for `name`: CA PEM, cert PEM, key PEM."""
    ca = TestCA("walk_several CA")
    issued = ca.issue([name] if ip is None else [name, ip], chain="leaf")
    return ca.cert_pem, issued.cert_pem, issued.key_pem


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--prefix",
        type=Path,
        default=Path("/tmp/mailrelay-walk-several"),  # noqa: S108
    )
    p.add_argument("--keep", action="store_true", help="keep the tree, the user and the cluster")
    args = p.parse_args()
    walk = Walk(args.prefix.resolve())
    failed: BaseException | None = None
    try:
        walk.prepare()
        walk.install()
        walk.start_world()
        walk.database()
        walk.configure()
        walk.start_and_set_up()
        ids = walk.submit()
        walk.queue_on_both(ids)
        walk.metrics()
        walk.ssl_in_use()
        walk.deliver(ids)
        walk.stop()
    except (WalkFailed, OSError, subprocess.SubprocessError, smtplib.SMTPException) as exc:
        failed = exc
    finally:
        walk.clean_up(args.keep)
    return walk_install.summary(walk.steps, failed)


if __name__ == "__main__":
    sys.exit(main())
