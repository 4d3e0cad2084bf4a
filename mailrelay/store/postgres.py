"""The store on PostgreSQL (issue 16): psycopg 3 connections that speak the store's SQLite SQL.

psycopg's synchronous API, because the store already runs every operation in a worker thread on
a blocking connection (writer.Store); an async driver would mean rewriting every store function.
Connections run in autocommit mode so that BEGIN, SAVEPOINT and COMMIT are the store's own, as
with sqlite3's isolation_level=None. synchronous_commit stays on (the server default, and set
again here): COMMIT returns once the WAL is flushed, which is what a 250 reply promises.
"""

from __future__ import annotations

import contextlib
import functools
import re
import select
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar, overload

import psycopg
import psycopg_pool
from psycopg.pq import TransactionStatus

from mailrelay.config import redact_url
from mailrelay.store.backend import Connection

T = TypeVar("T")

# Any constant will do, as long as it is the same for every instance: migrations take this lock
# so that two relays starting at once do not both apply the same migration.
_MIGRATION_LOCK = 0x6D61696C72656C79  # "mailrely"


class Row:
    """A result row as sqlite3.Row has it: by index, by column name, `keys()`, `dict(row)`."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: tuple[Any, ...], index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    @overload
    def __getitem__(self, key: int | str) -> Any: ...
    @overload
    def __getitem__(self, key: slice) -> tuple[Any, ...]: ...
    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._index[key.lower()]]
            except KeyError:
                raise IndexError(f"no such column: {key}") from None
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Row):
            return self._values == other._values and self._index == other._index
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self.keys(), self._values, strict=True))!r})"

    def keys(self) -> list[str]:
        names = [""] * len(self._values)
        for name, i in self._index.items():
            names[i] = name
        return names


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    index: dict[str, int] = {}
    for i, column in enumerate(cursor.description or ()):
        # sqlite3.Row answers a repeated name with its first column; so does this.
        index.setdefault(column.name.lower(), i)
    return lambda values: Row(tuple(values), index)


_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|\?|%")


# Cached: the store sends the same few hundred statement texts over and over, and the regex
# pass costs more than the lookup. Bounded for the texts built with a varying `IN (?, ...)`.
@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """SQLite's `?` placeholders as psycopg's `%s`; a literal `%` doubled. Quoted strings,
    quoted names and comments keep their `?` (their `%` is doubled: psycopg reads the whole
    query for placeholders)."""

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        return "%s" if text == "?" else text.replace("%", "%%")

    return _TOKEN.sub(replace, sql)


def _adapt(parameters: Sequence[Any]) -> tuple[Any, ...]:
    # The schema keeps SQLite's 0/1 INTEGER flags; psycopg would send a Python bool as boolean,
    # which PostgreSQL will not compare with or store in an integer column.
    return tuple(int(p) if isinstance(p, bool) else p for p in parameters)


# psycopg's DB-API classes, most specific first, and the sqlite3 ones the service catches.
_ERRORS: tuple[tuple[type[psycopg.Error], type[sqlite3.Error]], ...] = (
    (psycopg.IntegrityError, sqlite3.IntegrityError),
    (psycopg.OperationalError, sqlite3.OperationalError),
    (psycopg.ProgrammingError, sqlite3.ProgrammingError),
    (psycopg.DataError, sqlite3.DataError),
    (psycopg.NotSupportedError, sqlite3.NotSupportedError),
    (psycopg.InternalError, sqlite3.InternalError),
    (psycopg.InterfaceError, sqlite3.InterfaceError),
    (psycopg.DatabaseError, sqlite3.DatabaseError),
)


def _as_sqlite_error(exc: psycopg.Error) -> sqlite3.Error:
    for theirs, ours in _ERRORS:
        if isinstance(exc, theirs):
            error = ours(str(exc).strip())
            break
    else:
        error = sqlite3.Error(str(exc).strip())
    error.sqlstate = exc.sqlstate  # type: ignore[attr-defined]
    return error


class PgConnection:
    """A psycopg connection behind the store's `Connection` protocol."""

    dialect: Literal["postgresql"] = "postgresql"

    def __init__(self, conn: psycopg.Connection[Any], *, owned: bool = True) -> None:
        self.raw = conn
        # False for a pool's connection lent for one operation: the pool keeps it open.
        self.owned = owned

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor[Any]:
        try:
            return self.raw.execute(translate(sql), _adapt(parameters))
        except psycopg.Error as exc:
            raise _as_sqlite_error(exc) from exc

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> psycopg.Cursor[Any]:
        cursor = self.raw.cursor()
        rows = [_adapt(p) for p in parameters]
        try:
            if len(rows) == 1:
                # psycopg runs executemany in pipeline mode, entered and synced for the one row
                # a delivery's record mostly has: a plain execute is the same statement, cheaper.
                cursor.execute(translate(sql), rows[0])
            else:
                cursor.executemany(translate(sql), rows)
        except psycopg.Error as exc:
            raise _as_sqlite_error(exc) from exc
        return cursor

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[None]:
        """The block's statements go out as they come and their results come back together
        when it ends (psycopg's pipeline mode): one round trip for statements whose results
        are read only after the block, not one each. A failing statement raises in the block,
        at the latest as it ends, and the statements after it do nothing; the transaction is
        then in error, as after any failed statement (the caller rolls back to its savepoint)."""
        try:
            with self.raw.pipeline():
                yield
        except psycopg.Error as exc:
            raise _as_sqlite_error(exc) from exc

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()

    def __del__(self) -> None:
        # As a sqlite3 connection does: one dropped without close() is closed, not warned about
        # (the CLI and the tests open short-lived readers and let them go).
        raw = getattr(self, "raw", None)
        if raw is not None and getattr(self, "owned", False) and not raw.closed:
            raw.close()


def _open(url: str, *, connect_timeout: float = 10.0) -> psycopg.Connection[Any]:
    try:
        conn = psycopg.connect(
            url,
            autocommit=True,
            row_factory=_row_factory,
            connect_timeout=max(1, round(connect_timeout)),
            application_name="mailrelay",
        )
    except psycopg.Error as exc:
        # libpq's message names host and database, never the password.
        raise _as_sqlite_error(exc) from exc
    conn.execute("SET synchronous_commit = on")
    return conn


def connect_unmigrated(url: str) -> PgConnection:
    """A connection to the database at `url` as it is (for tests of the migrations)."""
    return PgConnection(_open(url))


def connect(url: str) -> PgConnection:
    """Open a connection to the database at `url`, migrated to the latest schema."""
    conn = PgConnection(_open(url))
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def open_readonly(url: str) -> PgConnection:
    """A connection for listings and reports; like db.open_readonly it makes no schema: a
    database that has none yet raises FileNotFoundError (the CLI's "no database at ...")."""
    conn = PgConnection(_open(url))
    if schema_version(conn) == 0:
        conn.close()
        raise FileNotFoundError(f"no mailrelay schema in {redact_url(url)}")
    return conn


def _check_lent(conn: psycopg.Connection[Any]) -> None:
    """The pool's check before it lends a connection: raise if it is dead, so that the pool
    drops it and a read after a server restart or a terminated backend does not fail.

    An idle connection's socket has nothing to read unless the server said something: when it
    ends a backend (pg_terminate_backend, a shutdown, a crash) it sends the FATAL error and
    closes the socket. Only then is the round trip of the usual check (an empty query) spent;
    otherwise it would be one more round trip for every read, most of a read's cost here."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    idle = select.poll()
    idle.register(conn.fileno(), select.POLLIN)
    if idle.poll(0):
        psycopg_pool.ConnectionPool.check_connection(conn)


# How long a read waits for a connection of the pool: all 4 busy (reads take milliseconds, so
# only an overload waits this long), or the server down: then the read fails, and a client
# hears 4xx (SMTP) or 503 (the API) in seconds rather than wait on a database that is not there.
WAIT_FOR_READER = 3.0
RECONNECT_GIVE_UP = 5.0


class Pool:
    """Read connections for `Store.read`: several readers at once, each on its own
    connection, where SQLite shares one."""

    def __init__(self, url: str, *, max_size: int = 4) -> None:
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            kwargs={"autocommit": True, "row_factory": _row_factory},
            check=_check_lent,
            # The pool's own reconnection backs off without a cap (1, 2, 4 ... s): after a
            # minute's outage, reads would stay refused for another half minute or so while the
            # writer was long back. Given up after a few seconds instead, the next read asks
            # for a connection afresh, at once.
            reconnect_timeout=RECONNECT_GIVE_UP,
            name="mailrelay-store-readers",
            open=False,
        )

    def open(self) -> None:
        self._pool.open(wait=True, timeout=30.0)

    def run(self, op: Callable[[Connection], T]) -> T:
        try:
            with self._pool.connection(timeout=WAIT_FOR_READER) as conn:
                return op(PgConnection(conn, owned=False))
        except psycopg_pool.PoolTimeout as exc:  # no connection to be had: the server is down
            raise _as_sqlite_error(exc) from exc

    def close(self) -> None:
        self._pool.close()


# --- schema ------------------------------------------------------------------------------------

_DDL = (
    # A SQLite rowid alias is an identity column; BY DEFAULT, as SQLite lets an insert name it.
    (re.compile(r"\bINTEGER PRIMARY KEY\b"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    # SQLite integers are 64-bit.
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\)\s*WITHOUT ROWID\b"), ")"),
)


def translate_ddl(statement: str) -> str:
    """One statement of db.MIGRATIONS (SQLite DDL) as PostgreSQL DDL. The migrations are the one
    schema definition; this is the mechanical difference, tested on every migration."""
    for pattern, replacement in _DDL:
        statement = pattern.sub(replacement, statement)
    return statement


# What PostgreSQL adds to a migration, by its number: what SQLite has no words for.
PG_ONLY: dict[int, tuple[str, ...]] = {
    14: (
        # xid8 as a number: 64 bits with the epoch, never wrapping.
        "ALTER TABLE events ALTER COLUMN txid SET DEFAULT (pg_current_xact_id()::text::bigint)",
        "CREATE INDEX events_commit_order ON events (txid, id)",
        "CREATE INDEX events_domain_commit_order ON events (domain, txid, id)",
    ),
}


def schema_version(conn: Connection) -> int:
    """How far `conn`'s database is migrated (PRAGMA user_version on SQLite); 0 if not at all."""
    if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def migrate(conn: Connection) -> None:
    # Imported here: db imports this module lazily, so that SQLite alone never loads psycopg.
    from mailrelay.store.db import MIGRATIONS, statements

    conn.execute("BEGIN")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),"
            " version BIGINT NOT NULL)"
        )
        conn.execute("INSERT INTO schema_version (version) VALUES (0) ON CONFLICT (one) DO NOTHING")
        (version,) = conn.execute("SELECT version FROM schema_version").fetchone()
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in statements(script):
                conn.execute(translate_ddl(statement))
            for statement in PG_ONLY.get(number, ()):
                conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (number,))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
