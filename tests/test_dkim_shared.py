"""DKIM keys in the shared store (issue 16): on PostgreSQL the private keys live in the database,
sealed with AES-256-GCM under dkim.master_key_file, so that every instance signs with them; on
SQLite they stay files in dkim.key_dir. Real PostgreSQL (tests/pg.py), the real CLI."""

from __future__ import annotations

import base64
import os
import stat
import time
from datetime import UTC, datetime
from pathlib import Path

import dkim as dkimpy
import httpx
import pytest

from mailrelay import dkim, signing
from mailrelay.store import accounts, apikeys, connect, postgres
from mailrelay.store.queue import transaction
from tests.conftest import RelayFactory, add_user, free_port, make_config
from tests.pg import Cluster
from tests.test_cli import cli, config_error, ok, user_error
from tests.test_storage_migrate import cli_config, master_key_file

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"
NO_MASTER_KEY = (
    "dkim.master_key_file: not set, and with storage.url the DKIM keys are kept in the"
    " database sealed with it; make one with: mailrelay dkim make-master-key PATH"
)


def pg_config(tmp_path: Path, url: str, master: Path | None) -> Path:
    make_config(tmp_path)  # the certificate check-config and serve want
    return cli_config(tmp_path, "pg", path=tmp_path / "lock.sqlite3", url=url, master_key=master)


def test_a_sealed_key_opens_only_with_its_master_key_domain_and_selector() -> None:
    master, other = os.urandom(32), os.urandom(32)
    pem = b"-----BEGIN PRIVATE KEY-----\nexample\n-----END PRIVATE KEY-----\n"
    sealed = dkim.seal(pem, master, "example.org", "mr20261130")
    assert pem not in sealed and b"PRIVATE KEY" not in sealed
    assert len(sealed) == 1 + 12 + len(pem) + 16  # version, nonce, ciphertext, GCM tag
    assert dkim.unseal(sealed, master, "example.org", "mr20261130") == pem
    assert dkim.seal(pem, master, "example.org", "mr20261130") != sealed  # a fresh nonce
    with pytest.raises(dkim.MasterKeyError, match="holds another master key"):
        dkim.unseal(sealed, other, "example.org", "mr20261130")
    # Copied onto another domain's or selector's row, it does not open either.
    with pytest.raises(dkim.MasterKeyError, match="holds another master key"):
        dkim.unseal(sealed, master, "example.net", "mr20261130")
    with pytest.raises(dkim.MasterKeyError, match="holds another master key"):
        dkim.unseal(sealed, master, "example.org", "mr20261130-2")
    with pytest.raises(dkim.MasterKeyError, match="not a sealed key"):
        dkim.unseal(pem, master, "example.org", "mr20261130")


def test_make_master_key_writes_a_new_key_and_never_overwrites_one(tmp_path: Path) -> None:
    make_config(tmp_path)
    config = cli_config(tmp_path, "c", path=tmp_path / "q.sqlite3")
    path = tmp_path / "master.key"
    out = ok(config, "dkim", "make-master-key", str(path))
    assert out.startswith(f"Wrote {path}. Name it in [dkim] master_key_file")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_text().strip(), validate=True)) == 32
    assert len(dkim.read_master_key(str(path))) == 32
    first = path.read_bytes()
    assert user_error(cli(config, "dkim", "make-master-key", str(path))) == (
        f"{path} exists already; a master key is never overwritten (the DKIM keys sealed with"
        " it could not be read any more)"
    )
    assert path.read_bytes() == first


def test_a_bad_master_key_file_is_named(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_text(base64.b64encode(b"x" * 16).decode())
    with pytest.raises(dkim.MasterKeyError) as caught:
        dkim.read_master_key(str(short))
    assert str(caught.value) == (
        f"dkim.master_key_file: {short} does not hold 32 bytes in base64; make one with:"
        " mailrelay dkim make-master-key PATH"
    )
    with pytest.raises(dkim.MasterKeyError) as caught:
        dkim.read_master_key(str(tmp_path / "missing.key"))
    assert str(caught.value) == (
        f"dkim.master_key_file: cannot read {tmp_path / 'missing.key'}: No such file or directory"
    )
    with pytest.raises(dkim.MasterKeyError) as caught:
        dkim.read_master_key("")
    assert str(caught.value) == NO_MASTER_KEY


def test_domain_keys_on_postgresql_are_sealed_in_the_database(tmp_path: Path, pg_url: str) -> None:
    master = master_key_file(tmp_path)
    config = pg_config(tmp_path, pg_url, master)
    ok(config, "domain", "add", "example.org", "--notify", "postmaster@example.org")
    ok(config, "domain", "rotate-dkim", "example.org")
    ok(config, "domain", "activate-dkim", "example.org", "--force")
    day = datetime.now(UTC).strftime("%Y%m%d")
    ok(config, "domain", "retire-dkim", "example.org", f"mr{day}")
    ok(config, "domain", "rotate-dkim", "example.org")
    assert not (tmp_path / "dkim").exists()  # no key file anywhere

    conn = postgres.open_readonly(pg_url)
    stored = accounts.keys(conn, "example.org", active_only=False)
    conn.close()
    # A retired key's selector is never given to another key, even on the same day.
    assert [(k.selector, k.private_key_path, k.active, k.pending) for k in stored] == [
        (f"mr{day}-2", "", True, False),
        (f"mr{day}-3", "", False, True),
    ]
    key = dkim.read_master_key(str(master))
    for k in stored:
        assert k.sealed_key is not None and b"PRIVATE KEY" not in k.sealed_key
        pem = dkim.unseal(k.sealed_key, key, "example.org", k.selector)
        assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")

    # Signing unseals the active key (with the master key given, or the process's).
    [active] = [signing.signing_key(k) for k in stored if k.active]
    signed = dkim.sign(MESSAGE, domain="example.org", keys=[active], master_key=key)

    def txt(name: bytes | str, timeout: float = 5) -> bytes:
        return active.public_record.encode()

    assert dkimpy.verify(signed, dnsfunc=txt) is True
    with pytest.raises(dkim.MasterKeyError, match=r"no dkim\.master_key_file was loaded"):
        dkim.sign(MESSAGE, domain="example.org", keys=[active])


def test_domain_add_on_postgresql_without_the_master_key_is_a_config_error(
    tmp_path: Path, pg_url: str
) -> None:
    config = pg_config(tmp_path, pg_url, None)
    done = cli(config, "domain", "add", "example.org", "--notify", "postmaster@example.org")
    assert config_error(done) == NO_MASTER_KEY


def test_check_config_and_serve_on_postgresql_want_the_master_key_of_the_keys(
    tmp_path: Path, pg_url: str
) -> None:
    master = master_key_file(tmp_path)
    ok(pg_config(tmp_path, pg_url, master), "domain", "add", "example.org", "--notify", "p@x.org")
    assert ok(pg_config(tmp_path, pg_url, master), "check-config").startswith("configuration ok")

    # Keys in the database and no master key: neither check-config nor serve goes on (78).
    config = pg_config(tmp_path, pg_url, None)
    assert config_error(cli(config, "check-config")) == NO_MASTER_KEY
    assert config_error(cli(config, "serve")) == NO_MASTER_KEY

    # Another master key: named, with the key it does not open.
    other = tmp_path / "other.key"
    other.write_text(dkim.make_master_key())
    config = pg_config(tmp_path, pg_url, other)
    conn = postgres.open_readonly(pg_url)
    [key] = accounts.keys(conn, "example.org", active_only=True)
    conn.close()
    expected = (
        f"dkim.master_key_file: {other} does not unseal the DKIM key {key.selector} of"
        " example.org in the database (not the master key it was sealed with)"
    )
    assert config_error(cli(config, "check-config")) == expected  # serve runs the same checks


def test_without_keys_in_the_database_no_master_key_is_needed(tmp_path: Path, pg_url: str) -> None:
    config = pg_config(tmp_path, pg_url, None)
    assert ok(config, "check-config").startswith("configuration ok")  # no schema yet
    add_user(make_config(tmp_path, storage={"url": pg_url}), "alice@example.org")
    assert ok(config, "check-config").startswith("configuration ok")  # a domain, no key


async def test_the_api_without_the_master_key_says_so(
    tmp_path: Path, pg_url: str, relay_factory: RelayFactory
) -> None:
    """On PostgreSQL a key is made sealed: over HTTP, without dkim.master_key_file, that is a
    503 naming the setting, not a 500."""
    port = free_port()
    cfg = make_config(tmp_path, storage={"url": pg_url}, api={"listen": f"127.0.0.1:{port}"})
    add_user(cfg, "alice@example.org")  # the domain, without a key
    conn = connect(pg_url)
    try:
        with transaction(conn):
            _key, token = apikeys.add(conn, "example.org", "manage", time.time())
    finally:
        conn.close()
    await relay_factory(cfg)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers) as api:
        got = await api.post("/v1/domains/example.org/rotate-dkim")
    assert got.status_code == 503
    error = got.json()["error"]
    assert error["code"] == "not_configured" and "dkim.master_key_file" in error["message"]


def test_check_config_names_a_database_that_refuses_us_and_lets_a_down_one_pass(
    tmp_path: Path, postgres_cluster: Cluster
) -> None:
    """A wrong database or role is the configuration's (exit 78, named); a server that does not
    answer yet is not: check-config passes, and `serve` (exit 1, restarted) waits it out."""
    missing = postgres_cluster.url("nosuchdb")
    config = pg_config(tmp_path, missing, None)
    assert config_error(cli(config, "check-config")) == (
        f'storage.url: {missing}: database "nosuchdb" does not exist'
    )
    down = "postgresql:///mailrelay?host=/nonexistent-socket-dir&user=postgres"
    config = pg_config(tmp_path, down, None)
    assert ok(config, "check-config").startswith("configuration ok")
