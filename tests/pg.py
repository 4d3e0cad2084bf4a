"""A real PostgreSQL server for the tests (issue 16), started by the tests themselves.

Debian's `postgresql` package (.ci/run installs it where it is missing): `initdb` on a temporary
directory and `postgres` listening on a Unix socket only. PostgreSQL refuses to run as root, so
as root the cluster belongs to an unprivileged user (`nobody`) and runs through `runuser`. One
cluster per test session (so one per pytest-xdist worker); each test gets a database of its own.
Nothing here is faked: if the server cannot start, the tests that need it fail and say why.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import psycopg

USER = "nobody"  # the unprivileged owner of the cluster when the tests run as root
STARTUP_TIMEOUT = 60.0


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed or would not start; the message says which and what to do."""


def bin_dir() -> Path:
    """The newest /usr/lib/postgresql/*/bin holding initdb, or the one on PATH."""

    def version(initdb: str) -> int:
        name = Path(initdb).parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise PostgresUnavailable(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run .ci/run, or"
        " apt-get install --no-install-recommends postgresql"
    )


class Cluster:
    """One running PostgreSQL server on a Unix socket in a temporary directory."""

    def __init__(
        self,
        *,
        durable: bool = False,
        tcp_port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        # durable: fsync on, as a real server (the benchmark); the tests' clusters are
        # throwaways and skip it.
        self.durable = durable
        # tcp_port: also listen on 127.0.0.1 (initdb's trust lines cover it): for TLS, which
        # libpq never speaks over a Unix socket. settings: more `-c name=value`.
        self.tcp_port = tcp_port
        self.settings = dict(settings or {})
        self.bin = bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="mailrelay-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.socket_dir.mkdir()
        self.process: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(USER)
            except KeyError:
                raise PostgresUnavailable(
                    f"the tests run as root and PostgreSQL will not: no user {USER!r} to run it as"
                ) from None
            for path in (self.root, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", USER, "--"]

    def start(self) -> None:
        initdb = subprocess.run(
            [
                *self._as,
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",  # only the socket in our private directory reaches it
                "-E",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            check=False,
        )
        if initdb.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {initdb.stderr.decode(errors='replace')}")
        self.log = self.root / "server.log"
        self.launch()

    def launch(self) -> None:
        """Start the server on the data directory `start` made; return once it answers."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *self._as,
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-k",
                    str(self.socket_dir),
                    "-c",
                    "listen_addresses=127.0.0.1" if self.tcp_port else "listen_addresses=",
                    *(["-p", str(self.tcp_port)] if self.tcp_port else []),
                    *(
                        arg
                        for name, value in self.settings.items()
                        for arg in ("-c", f"{name}={value}")
                    ),
                    # A throwaway test cluster: no fsync to the disk. Commits still wait for
                    # the WAL write (synchronous_commit, which the store sets on).
                    "-c",
                    "fsync=on" if self.durable else "fsync=off",
                    "-c",
                    "full_page_writes=on" if self.durable else "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: a ^C to pytest must not reach it before we stop it.
                start_new_session=True,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise PostgresUnavailable(
                    f"postgres exited ({self.process.returncode}): {self.log.read_text()[-2000:]}"
                )
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(f"postgres did not answer: {exc}") from exc
                time.sleep(0.1)

    def url(self, database: str) -> str:
        port = f"&port={self.tcp_port}" if self.tcp_port else ""
        return f"postgresql:///{database}?host={self.socket_dir}{port}&user=postgres"

    def give(self, path: Path) -> None:
        """Make `path` the server's own (a key file it must read, mode 0600)."""
        if self._as:
            owner = pwd.getpwnam(USER)
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def shut_down(self) -> None:
        """Stop the server, keeping its data: `launch` starts it again (a server restart)."""
        if self.process is not None and self.process.poll() is None:
            # runuser passes the signal on; SIGINT is PostgreSQL's "fast" shutdown.
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def stop(self) -> None:
        self.shut_down()
        shutil.rmtree(self.root, ignore_errors=True)
