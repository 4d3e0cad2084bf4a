"""Moving a single-machine install (SQLite) into an empty PostgreSQL database (issue 16).

`mailrelay storage migrate --from sqlite:PATH --to postgresql://…` copies every table, parents
before children (foreign-key order), in one PostgreSQL transaction, and checks each table's row
count before it commits: the target gets all of it or nothing. DKIM key files named in
`dkim_keys` are read, checked against the record published for them, and stored sealed with
the master key (dkim.seal), since other instances cannot read this machine's files. The
source is only read, under its instance lock, so no `serve` can change it meanwhile.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailrelay import dkim
from mailrelay.instance import AlreadyRunning, InstanceLock
from mailrelay.store import db, postgres
from mailrelay.store.backend import Connection

_BATCH_ROWS = 1000
_BATCH_BYTES = 16 << 20  # message bodies are up to max_message_size each: bound the batch by size
# Table and column names go into SQL text: they come from the source's own schema, and are
# refused unless they are plain identifiers.
_NAME = re.compile(r"[a-z_][a-z0-9_]*")


class MigrateError(Exception):
    """The migration cannot be done (or was not); the message says why and what to do."""


@dataclass(frozen=True)
class Copied:
    table: str
    rows: int


def sqlite_path(source: str) -> str:
    """PATH from `sqlite:PATH`, the form --from takes."""
    if not source.startswith("sqlite:") or not source[len("sqlite:") :]:
        raise MigrateError(f"--from: {source!r} is not sqlite:PATH")
    return source[len("sqlite:") :]


def migrate(
    source: str,
    target_url: str,
    master_key: Callable[[], bytes],
) -> list[Copied]:
    """Copy the SQLite database at `source` into the PostgreSQL database at `target_url`.

    `master_key` is called only when there are DKIM keys to seal (it may raise MasterKeyError).
    Refuses a source that a `serve` holds (its `<path>.lock`) and a target with any row in it.
    """
    if not Path(source).is_file():
        raise MigrateError(f"no database at {source}")
    lock = InstanceLock(source)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        raise MigrateError(
            f"{exc}: the SQLite instance is running; stop it (systemctl stop mailrelay) so that"
            " nothing changes while it is copied, then migrate"
        ) from None
    try:
        src = db.connect_sqlite(source)  # migrated to the schema the target gets
        try:
            target = postgres.connect(target_url)
            try:
                return _copy(src, target, master_key)
            finally:
                target.close()
        finally:
            src.close()
    finally:
        lock.release()


def _copy(
    src: sqlite3.Connection, target: Connection, master_key: Callable[[], bytes]
) -> list[Copied]:
    tables = _tables_in_order(src)
    src.execute("BEGIN")  # one snapshot of the source
    try:
        counts = {t: _count(src, t) for t in tables}
        dkim_rows = counts.get("dkim_keys", 0)
        master = master_key() if dkim_rows else b""
        target.execute("BEGIN")
        try:
            for table in tables:
                found = _count(target, table)
                if found:
                    raise MigrateError(
                        f"the target database is not empty ({table} has {found} rows);"
                        " migrate into a new, empty database"
                    )
            for table in tables:
                _copy_table(src, target, table, master)
            _advance_identities(target, tables)
            copied = []
            for table in tables:
                n = _count(target, table)
                if n != counts[table]:
                    raise MigrateError(
                        f"{table}: {counts[table]} rows in the source, {n} copied; nothing was"
                        " committed"
                    )
                copied.append(Copied(table, n))
            target.execute("COMMIT")
        except BaseException:
            target.execute("ROLLBACK")
            raise
    finally:
        src.execute("ROLLBACK")
    return copied


def _tables_in_order(src: sqlite3.Connection) -> list[str]:
    """The tables, each after those its foreign keys reference (then by name)."""
    names = sorted(
        str(r[0])
        for r in src.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    )
    parents = {
        name: {str(r["table"]) for r in src.execute(f"PRAGMA foreign_key_list({name})")} - {name}
        for name in names
    }
    for name in names:
        _identifier(name)
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = [n for n in names if n not in ordered and parents[n] <= set(ordered)]
        if not ready:
            cycle = sorted(set(names) - set(ordered))
            raise MigrateError(f"foreign keys form a cycle among {cycle}")
        ordered += ready
    return ordered


def _copy_table(src: sqlite3.Connection, target: Connection, table: str, master: bytes) -> None:
    columns = [_identifier(str(r["name"])) for r in src.execute(f"PRAGMA table_info({table})")]
    names, marks = ", ".join(columns), ", ".join("?" for _ in columns)
    insert = f"INSERT INTO {table} ({names}) VALUES ({marks})"  # noqa: S608 -- see _NAME
    cursor = src.execute(f"SELECT {names} FROM {table}")  # noqa: S608
    batch: list[tuple[object, ...]] = []
    size = 0
    for source_row in cursor:
        row = tuple(source_row)
        if table == "dkim_keys":
            row = _sealed_row(dict(zip(columns, row, strict=True)), master, columns)
        batch.append(row)
        size += sum(len(v) for v in row if isinstance(v, (bytes, str)))
        if len(batch) >= _BATCH_ROWS or size >= _BATCH_BYTES:
            target.executemany(insert, batch)
            batch, size = [], 0
    if batch:
        target.executemany(insert, batch)


def _sealed_row(row: dict[str, object], master: bytes, columns: list[str]) -> tuple[object, ...]:
    """A dkim_keys row with its key file read, checked and sealed into private_key_enc."""
    domain, selector, path = str(row["domain"]), str(row["selector"]), str(row["private_key_path"])
    if row.get("private_key_enc") is None:
        try:
            pem = Path(path).read_bytes()
            record = dkim.public_record(path)
        except OSError as exc:
            raise MigrateError(
                f"DKIM key {selector} of {domain}: cannot read {path}: {exc.strerror or exc}"
            ) from None
        except ValueError as exc:
            raise MigrateError(f"DKIM key {selector} of {domain}: {path}: {exc}") from None
        if record != row["public_record"]:
            raise MigrateError(
                f"DKIM key {selector} of {domain}: {path} is not the key of its published record"
            )
        row["private_key_enc"] = dkim.seal(pem, master, domain, selector)
        row["private_key_path"] = ""
    return tuple(row[c] for c in columns)


def _advance_identities(target: Connection, tables: list[str]) -> None:
    """The copied ids were given explicitly: move each identity past them, or the next row
    PostgreSQL numbers itself would collide with a copied one."""
    for row in target.execute(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND is_identity = 'YES'"
    ).fetchall():
        table, column = str(row[0]), _identifier(str(row[1]))
        if table not in tables:
            continue
        target.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), max({column}))"  # noqa: S608
            f" FROM {table} HAVING max({column}) IS NOT NULL"
        )


def _count(conn: Connection | sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608


def _identifier(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise MigrateError(f"{name!r}: not a table or column name this migration copies")
    return name
