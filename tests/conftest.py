"""Fixtures every test can use: a real mailrelay service on loopback and a real SMTP client."""

from __future__ import annotations

import contextlib
import os
import random
import smtplib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailrelay import config as configmod
from mailrelay.config import Config
from mailrelay.service import Service
from mailrelay.store import accounts, connect
from mailrelay.store.queue import transaction
from mailrelay.submission.auth import hash_password
from mailrelay.submission.tls import ensure_self_signed
from tests.pg import Cluster, PostgresUnavailable

PASSWORD = "correct horse battery staple"

# The CLI, run as root, refuses to make files a service user named "mailrelay" could not read
# (onboarding.key_owner). The tests run as root and own everything they make, whether or not this
# machine has such a user (an install walk may have made one): they name one that does not exist.
# A test of that refusal names its own user.
os.environ["MAILRELAY_SERVICE_USER"] = "mailrelay-tests-no-such-user"


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports for servers the tests start are chosen below the kernel's ephemeral range: a port the
# OS hands out for bind(0) is also the source port of some outgoing connection (to an MX, to
# PostgreSQL) a moment later, and a server that binds it after that fails with EADDRINUSE.
# Chosen at random, per process, and checked free: the two test workers rarely pick the same.
_PORTS = range(20000, min(_ephemeral_low(), 32768))
_random = random.Random(os.getpid() ^ time.time_ns())


def free_port(host: str = "127.0.0.1") -> int:
    for _ in range(500 if len(_PORTS) > 1000 else 0):
        port = _random.choice(_PORTS)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range on this machine
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Relay:
    """A running service and what a test needs to talk to it."""

    service: Service
    config: Config
    port: int
    implicit_port: int
    cert_file: str

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cert_file)
        ctx.check_hostname = False  # the certificate names "localhost"; we dial 127.0.0.1
        return ctx

    def smtp(self) -> smtplib.SMTP:
        """A plain connection on the submission port, before STARTTLS."""
        client = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=10)
        return client

    def session(self, user: str = "alice@example.org", password: str = PASSWORD) -> smtplib.SMTP:
        """EHLO, STARTTLS, EHLO, AUTH: ready for MAIL."""
        client = self.smtp()
        client.starttls(context=self.client_context())
        client.login(user, password)
        return client

    def db(self) -> Any:
        return connect(self.config.storage.database)


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    cert, key = str(tmp_path / "tls" / "cert.pem"), str(tmp_path / "tls" / "key.pem")
    ensure_self_signed(cert, key, "localhost")
    raw: dict[str, Any] = {
        "hostname": "relay.test",
        "submission": {
            "listen": [f"127.0.0.1:{free_port()}"],
            "implicit_tls_listen": [f"127.0.0.1:{free_port()}"],
            "cert_file": cert,
            "key_file": key,
        },
        "storage": {"path": str(tmp_path / "queue.sqlite3")},
        "dkim": {"key_dir": str(tmp_path / "dkim"), "rsa_bits": 1024},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        # The HTTP API's default port is fixed (8025): off, unless a test of the API gives one.
        "api": {"listen": ""},
        # Never the real Internet: a loopback port and nameserver where nothing answers. Tests
        # of delivery replace these with their world; tests of submission hold the queue.
        "delivery": {
            "hold": True,
            # In-process, so that tests can look at the delivery side's state and metrics;
            # the separate delivery process is tested through `serve` in test_service.
            "separate_process": False,
            "port": free_port(),
            "nameservers": [f"127.0.0.1:{free_port()}"],
            "dns_timeout": 1,
        },
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return configmod.parse(raw, base_dir=tmp_path)


def write_config_file(
    directory: Path, extra: str = "", *, delivery: str | None = None, metrics_port: int = 0
) -> tuple[Path, int]:
    """A TOML config for running mailrelay as a separate process (the CLI, `serve`), loopback
    only and with delivery held unless `delivery` gives the [delivery] table's body; returns
    its path and the submission port. `extra` is appended (TOML tables not used here, e.g.
    "[records]")."""
    port = free_port()
    if delivery is None:
        delivery = (
            f'hold = true\nport = {free_port()}\nnameservers = ["127.0.0.1:{free_port()}"]\n'
            "dns_timeout = 1\n"
        )
    path = directory / "mailrelay.toml"
    path.write_text(
        f"""
hostname = "relay.test"
[submission]
listen = ["127.0.0.1:{port}"]
cert_file = "tls/cert.pem"
key_file = "tls/key.pem"
self_signed_if_missing = true
allow_unverified_domains = true
[storage]
path = "queue.sqlite3"
[dkim]
key_dir = "dkim"
rsa_bits = 1024
[metrics]
listen = "127.0.0.1:{metrics_port or free_port()}"
[api]
listen = ""
[delivery]
{delivery}
{extra}"""
    )
    return path, port


def add_user(cfg: Config, address: str, password: str = PASSWORD, *, valid: bool = True) -> None:
    conn = connect(cfg.storage.database)
    domain = address.rpartition("@")[2]
    with transaction(conn):
        if accounts.get_domain(conn, domain) is None:
            accounts.add_domain(conn, domain, f"postmaster@{domain}", time.time())
            if valid:
                accounts.set_domain_state(conn, domain, "valid", time.time())
        accounts.add_user(conn, address, hash_password(password), time.time())
    conn.close()


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """Where `mailrelay serve`, started with NOTIFY_SOCKET naming it, says READY=1 and
    STOPPING=1, as it would to systemd."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(30)
    yield sock
    sock.close()


@pytest.fixture
async def relay_factory(tmp_path: Path) -> AsyncIterator[RelayFactory]:
    """Start a service (from a config, or with section overrides); all are stopped at teardown."""
    started: list[Service] = []

    async def start(cfg: Config | None = None, **sections: dict[str, Any]) -> Relay:
        cfg = cfg or make_config(tmp_path, **sections)
        service = Service(cfg)
        await service.start()
        started.append(service)
        return Relay(
            service,
            cfg,
            cfg.submission.listen[0].port,
            cfg.submission.implicit_tls_listen[0].port,
            cfg.submission.cert_file,
        )

    yield start
    for service in started:
        await service.stop()


@pytest.fixture
async def relay(tmp_path: Path, relay_factory: RelayFactory) -> Relay:
    cfg = make_config(tmp_path)
    add_user(cfg, "alice@example.org")
    return await relay_factory(cfg)


# ---- PostgreSQL (issue 16) ---------------------------------------------------------------------


@contextlib.contextmanager
def running_cluster(
    prepare: Callable[[Cluster], None] = lambda cluster: None, **options: Any
) -> Iterator[Cluster]:
    """A PostgreSQL server (tests.pg.Cluster with `options`), `prepare`d before it starts, and
    stopped and removed afterwards. One that cannot start fails the test: never a skip."""
    try:
        cluster = Cluster(**options)
        prepare(cluster)
        cluster.start()
    except PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """One PostgreSQL server per test session (per xdist worker), started on first use."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(postgres_cluster: Cluster) -> str:
    """The URL of a fresh, empty PostgreSQL database for this test."""
    return postgres_cluster.new_database()


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """What `Store` and `connect` open for this test, on each backend: a SQLite file in the
    test's directory, or a fresh PostgreSQL database (storage.database)."""
    if backend == "postgresql":
        url: str = request.getfixturevalue("pg_url")
        return url
    return str(tmp_path / "q.sqlite3")
