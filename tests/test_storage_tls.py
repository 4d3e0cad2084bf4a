"""The relays' connection to PostgreSQL over TLS, as README "Several machines" sets it up
(`sslmode=verify-full`, `sslrootcert`): a real server listening on 127.0.0.1 with its own
certificate. The store speaks TLS to it; `check-config` names each TLS setting that cannot work
(exit 78) instead of letting `serve` fail and be restarted forever."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from mailrelay.store import Store
from mailrelay.store.backend import Connection
from tests.conftest import free_port, running_cluster
from tests.pg import Cluster
from tests.test_cli import cli, config_error, ok
from tests.test_dkim_shared import pg_config
from tests.world.certs import TestCA

DB_NAME = "db.test"  # the name in the server's certificate; the URL reaches it at 127.0.0.1


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("database CA")


@pytest.fixture(scope="module")
def tls_cluster(ca: TestCA) -> Iterator[Cluster]:
    def certificate(cluster: Cluster) -> None:
        # In the cluster's own directory: the server runs as another user when we are root.
        files = cluster.root / "tls"
        cert, key = ca.issue([DB_NAME]).write(files, "server")
        for path in (files, cert, key):
            cluster.give(path)
        cluster.settings.update(ssl="on", ssl_cert_file=str(cert), ssl_key_file=str(key))

    with running_cluster(certificate, tcp_port=free_port("127.0.0.1")) as cluster:
        yield cluster


def _url(cluster: Cluster, host: str = DB_NAME, **params: str) -> str:
    query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in params.items())
    return f"postgresql://postgres@{host}:{cluster.tcp_port}/postgres?hostaddr=127.0.0.1&{query}"


def _encrypted(conn: Connection) -> bool:
    return bool(
        conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
    )


async def test_the_store_speaks_verified_tls_to_the_database(
    tmp_path: Path, tls_cluster: Cluster, ca: TestCA
) -> None:
    url = _url(
        tls_cluster, sslmode="verify-full", sslrootcert=str(ca.write_ca(tmp_path / "ca.pem"))
    )
    assert ok(pg_config(tmp_path, url, None), "check-config").startswith("configuration ok")
    store = Store(url)
    await store.start()
    try:
        assert await store.write(_encrypted) is True  # the writer
        assert await store.read(_encrypted) is True  # a reader
    finally:
        await store.stop()


def test_check_config_names_tls_that_cannot_work(
    tmp_path: Path, tls_cluster: Cluster, ca: TestCA
) -> None:
    right = str(ca.write_ca(tmp_path / "ca.pem"))
    other = str(TestCA("another CA").write_ca(tmp_path / "other.pem"))
    missing = str(tmp_path / "no-such-ca.pem")
    cases = {
        _url(tls_cluster, sslmode="verify-full", sslrootcert=missing): (
            f'root certificate file "{missing}" does not exist'
        ),
        _url(tls_cluster, sslmode="verify-full", sslrootcert=other): (
            "SSL error: certificate verify failed"
        ),
        _url(tls_cluster, host="other.test", sslmode="verify-full", sslrootcert=right): (
            f'server certificate for "{DB_NAME}" does not match host name "other.test"'
        ),
    }
    for n, (url, why) in enumerate(cases.items()):
        config = pg_config(tmp_path / str(n), url, None)
        assert config_error(cli(config, "check-config")) == f"storage.url: {url}: {why}"


def test_check_config_names_a_server_without_tls(tmp_path: Path) -> None:
    with running_cluster(tcp_port=free_port("127.0.0.1"), settings={"ssl": "off"}) as cluster:
        url = _url(cluster, sslmode="require")
        assert config_error(cli(pg_config(tmp_path, url, None), "check-config")) == (
            f"storage.url: {url}: server does not support SSL, but SSL was required"
        )
