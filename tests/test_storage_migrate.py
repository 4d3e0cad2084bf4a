"""`mailrelay storage migrate`: a single-machine install (SQLite, DKIM key files) moved into
PostgreSQL with nothing lost, then delivering from there (issue 16). Real PostgreSQL (tests/pg.py),
a real relay and a real MX world on this file's own 127.0.106.x."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import dkim as dkimpy

from mailrelay import dkim, onboarding
from mailrelay.store import accounts, apikeys, connect, postgres, suppressions, webhooks
from mailrelay.store.queue import transaction
from tests.conftest import RelayFactory, add_user, make_config
from tests.test_cli import cli, config_error, ok, user_error
from tests.test_delivery import BODY_MARKER, delivery_config, submit
from tests.world import MODERN, World

FIRST_ADDRESS = "127.0.106.1"  # this file's own 127.0.106.x

# Every table of the schema, as `storage migrate --json` reports the rows it copied and verified.
TABLES = (
    "api_idempotency", "api_key_domains", "api_keys", "attempts", "dkim_keys", "domains",
    "events", "messages", "recipients", "sender_grants", "sts_policies", "suppressions",
    "tlsrpt_deliveries", "tlsrpt_failures", "tlsrpt_policies", "tlsrpt_reports", "user_usage",
    "users", "webhook_deliveries", "webhook_endpoints",
)  # fmt: skip


def cli_config(
    tmp_path: Path, name: str, *, path: Path, url: str = "", master_key: Path | None = None
) -> Path:
    """A config file for the CLI: the SQLite install at `path`, or PostgreSQL at `url`."""
    tls = tmp_path / "tls"
    file = tmp_path / f"{name}.toml"
    file.write_text(
        f"""
hostname = "relay.test"
[submission]
listen = ["127.0.0.1:1"]
cert_file = "{tls / "cert.pem"}"
key_file = "{tls / "key.pem"}"
[storage]
path = "{path}"
url = "{url}"
[dkim]
key_dir = "{tmp_path / "dkim"}"
rsa_bits = 1024
master_key_file = "{master_key or ""}"
[api]
listen = ""
"""
    )
    return file


def master_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "dkim-master.key"
    path.write_text(dkim.make_master_key())
    return path


def single_machine(tmp_path: Path, **sections: dict[str, Any]) -> Any:
    """The SQLite install: example.org with its DKIM key file, alice, a suppression, an API key
    and a webhook endpoint."""
    cfg = make_config(tmp_path, **sections)
    conn = connect(cfg.storage.database)
    onboarding.add(conn, cfg, "example.org", "postmaster@example.org")
    now = time.time()
    with transaction(conn):
        accounts.set_domain_state(conn, "example.org", "valid", now)
        suppressions.add(conn, "example.org", "carol@dest.example", now, reason="550 5.1.1 gone")
        apikeys.add(conn, "example.org", "send", now)
        webhooks.add_endpoint(conn, "example.org", "https://hooks.example/in", ["delivered"], now)
    conn.close()
    add_user(cfg, "alice@example.org")
    return cfg


def dkim_rows(url: str) -> list[tuple[str, str, bytes | None]]:
    conn = postgres.open_readonly(url)
    rows = conn.execute(
        "SELECT selector, private_key_path, private_key_enc FROM dkim_keys ORDER BY id"
    ).fetchall()
    conn.close()
    return [(str(r[0]), str(r[1]), None if r[2] is None else bytes(r[2])) for r in rows]


async def test_migrated_install_delivers_from_postgresql_signed_with_its_key(
    tmp_path: Path, relay_factory: RelayFactory, pg_url: str
) -> None:
    async with World(tmp_path / "world", first_address=FIRST_ADDRESS) as world:
        await world.add_mx("example.org", MODERN)  # bounces would go here
        mx = await world.add_mx("dest.example", MODERN)

        # One machine: a message queued (delivery held), signed with the key file.
        single = await asyncio.to_thread(single_machine, tmp_path)
        relay = await relay_factory(single)
        queue_id = await asyncio.to_thread(submit, relay, ["bob@dest.example"])
        await relay.service.stop()
        conn = connect(single.storage.database)
        [stored] = accounts.keys(conn, "example.org", active_only=True)
        conn.close()
        pem = await asyncio.to_thread(Path(stored.private_key_path).read_bytes)

        master = master_key_file(tmp_path)
        config = cli_config(tmp_path, "single", path=Path(single.storage.path), master_key=master)
        done = await asyncio.to_thread(
            ok,
            config,
            "storage",
            "migrate",
            "--from",
            f"sqlite:{single.storage.path}",
            "--to",
            pg_url,
            "--json",
        )
        copied = json.loads(done)["tables"]
        assert sorted(copied) == sorted(TABLES)
        assert {t: n for t, n in copied.items() if n} == {
            "api_key_domains": 1,
            "api_keys": 1,
            "dkim_keys": 1,
            "domains": 1,
            "events": 1,
            "messages": 1,
            "recipients": 1,
            "suppressions": 1,
            "user_usage": 3,
            "users": 1,
            "webhook_endpoints": 1,
        }

        # The key material is in the database, sealed: not the PEM, and no path.
        [(selector, path, sealed)] = dkim_rows(pg_url)
        assert (selector, path) == (stored.selector, "")
        assert sealed is not None
        assert b"PRIVATE KEY" not in sealed and pem not in sealed
        master_key = dkim.read_master_key(str(master))
        assert dkim.unseal(sealed, master_key, "example.org", selector) == pem

        # The files are gone: whatever signs now reads the key from the database.
        (tmp_path / "dkim").rename(tmp_path / "dkim-moved")
        pg_config = cli_config(
            tmp_path, "pg", path=tmp_path / "pg-lock.sqlite3", url=pg_url, master_key=master
        )
        records = json.loads(
            await asyncio.to_thread(ok, pg_config, "domain", "records", "example.org", "--json")
        )["records"]
        [dns] = [r for r in records if r["name"] == f"{selector}._domainkey.example.org"]
        assert dns["value"] == stored.public_record

        shared = make_config(
            tmp_path,
            storage={"url": pg_url, "path": str(tmp_path / "pg-lock.sqlite3")},
            dkim={"master_key_file": str(master), "key_dir": str(tmp_path / "no-keys")},
            delivery=delivery_config(world),
        )
        relay = await relay_factory(shared)
        # The held message goes out; alice logs in with her old password (`submit` does AUTH
        # PLAIN with PASSWORD) and sends another, signed here with the key from the database.
        await mx.wait_until(lambda s: len(s.messages) >= 1)
        second = await asyncio.to_thread(submit, relay, ["dave@dest.example"])
        await mx.wait_until(lambda s: len(s.messages) >= 2)
        assert second != queue_id
        assert [m.rcpt_tos for m in mx.messages] == [("bob@dest.example",), ("dave@dest.example",)]

        def txt(name: bytes | str, timeout: float = 5) -> bytes | None:
            wanted = f"{selector}._domainkey.example.org."
            got = name.decode() if isinstance(name, bytes) else name
            return dns["value"].encode() if got == wanted else None

        for received in mx.messages:
            assert BODY_MARKER in received.data
            assert f"s={selector};".encode() in received.data.replace(b" ", b"")
            assert dkimpy.verify(received.data, dnsfunc=txt) is True


def test_migrate_refuses_a_target_that_is_not_empty(tmp_path: Path, pg_url: str) -> None:
    single = single_machine(tmp_path)
    master = master_key_file(tmp_path)
    config = cli_config(tmp_path, "single", path=Path(single.storage.path), master_key=master)
    taken = make_config(tmp_path, storage={"url": pg_url})
    add_user(taken, "zed@other.example")  # a domain and a user already there

    done = cli(
        config, "storage", "migrate", "--from", f"sqlite:{single.storage.path}", "--to", pg_url
    )
    assert user_error(done) == (
        "the target database is not empty (domains has 1 rows); migrate into a new, empty database"
    )
    conn = postgres.open_readonly(pg_url)
    assert [d.name for d in accounts.list_domains(conn)] == ["other.example"]
    assert [tuple(r) for r in conn.execute("SELECT count(*) FROM dkim_keys")] == [(0,)]
    conn.close()


async def test_migrate_refuses_while_the_sqlite_instance_runs(
    tmp_path: Path, relay_factory: RelayFactory, pg_url: str
) -> None:
    single = await asyncio.to_thread(single_machine, tmp_path)
    await relay_factory(single)
    master = master_key_file(tmp_path)
    config = cli_config(tmp_path, "single", path=Path(single.storage.path), master_key=master)
    source = single.storage.path
    done = await asyncio.to_thread(
        cli, config, "storage", "migrate", "--from", f"sqlite:{source}", "--to", pg_url
    )
    assert user_error(done) == (
        f"another mailrelay (pid {os.getpid()}) is serving {source}; stop it first: the SQLite"
        " instance is running; stop it (systemctl stop mailrelay) so that nothing changes while"
        " it is copied, then migrate"
    )
    # Refused before the target was touched: not even the schema was made.
    done = await asyncio.to_thread(cli, config_for(tmp_path, pg_url), "domain", "list")
    assert user_error(done) == (
        f"no database at {pg_url} (has `mailrelay serve` or `domain add` run with this config?)"
    )


def config_for(tmp_path: Path, url: str) -> Path:
    return cli_config(tmp_path, "pg", path=tmp_path / "pg-lock.sqlite3", url=url)


def test_migrate_needs_the_master_key_for_dkim_keys(tmp_path: Path, pg_url: str) -> None:
    single = single_machine(tmp_path)
    config = cli_config(tmp_path, "single", path=Path(single.storage.path))
    done = cli(
        config, "storage", "migrate", "--from", f"sqlite:{single.storage.path}", "--to", pg_url
    )
    assert config_error(done) == (
        "dkim.master_key_file: not set, and with storage.url the DKIM keys are kept in the"
        " database sealed with it; make one with: mailrelay dkim make-master-key PATH"
        " (the DKIM keys are stored sealed with it)"
    )
    conn = postgres.open_readonly(pg_url)  # the schema was made; no row was committed
    assert accounts.list_domains(conn) == []
    conn.close()


def test_migrate_prints_each_table_verified(tmp_path: Path, pg_url: str) -> None:
    single = single_machine(tmp_path)
    master = master_key_file(tmp_path)
    config = cli_config(tmp_path, "single", path=Path(single.storage.path), master_key=master)
    out = ok(
        config, "storage", "migrate", "--from", f"sqlite:{single.storage.path}", "--to", pg_url
    )
    lines = out.splitlines()
    assert len(lines) == len(TABLES) + 1
    width = max(len(t) for t in TABLES)
    assert f"{'dkim_keys':<{width}}         1 rows, verified" in lines
    assert f"{'users':<{width}}         1 rows, verified" in lines
    assert lines[-1] == (
        f"Copied {len(TABLES)} tables into {pg_url} in one transaction. Now set"
        f' [storage] url = "{pg_url}" and [dkim] master_key_file = "{master}" on every instance.'
    )
    # Parents before children: a domain before its keys, a message before its recipients.
    order = [line.split()[0] for line in lines[:-1]]
    assert order.index("domains") < order.index("dkim_keys")
    assert order.index("messages") < order.index("recipients")
    assert order.index("api_keys") < order.index("api_key_domains")
    # New rows number past the copied ones (the identities were moved on): a domain added on
    # PostgreSQL gets its key sealed in the database, in the row after the migrated key's.
    shared = make_config(tmp_path, storage={"url": pg_url}, dkim={"master_key_file": str(master)})
    conn = connect(shared.storage.database)
    onboarding.add(conn, shared, "other.example", "postmaster@other.example")
    rows = conn.execute("SELECT id, domain, private_key_path FROM dkim_keys ORDER BY id").fetchall()
    conn.close()
    assert [tuple(r) for r in rows] == [(1, "example.org", ""), (2, "other.example", "")]
    assert not (tmp_path / "dkim" / "other.example").exists()


def test_migrate_from_must_name_sqlite(tmp_path: Path, pg_url: str) -> None:
    config = config_for(tmp_path, pg_url)
    done = cli(config, "storage", "migrate", "--from", "/var/lib/x.sqlite3", "--to", pg_url)
    assert user_error(done) == "--from: '/var/lib/x.sqlite3' is not sqlite:PATH"
    done = cli(config, "storage", "migrate", "--from", f"sqlite:{tmp_path}/none", "--to", pg_url)
    assert user_error(done) == f"no database at {tmp_path}/none"
