"""The connection every store function takes, whichever database is behind it (issue 16).

The store functions were written against sqlite3 and use only a small part of it: `execute` and
`executemany` with `?` placeholders, `fetchone`, `fetchall`, iteration and `rowcount` on the
cursor, rows addressable by index and by column name, `in_transaction`, `close`. `Connection`
names that part. A `sqlite3.Connection` meets it as it is; `postgres.PgConnection` meets it over
psycopg 3 (placeholders translated, rows like `sqlite3.Row`, errors raised as sqlite3's DB-API
classes so that every `except sqlite3.Error` in the service holds on both).

SQL that differs between the two branches on `dialect(conn)`; SQL that can be written once for
both (`ON CONFLICT ... DO NOTHING`) is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, Protocol

Dialect = Literal["sqlite", "postgresql"]

URL_SCHEMES = ("postgresql://", "postgres://")


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    # No `lastrowid`: nothing in the store uses it, and PostgreSQL has none (use RETURNING id).

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor: ...

    @property
    def in_transaction(self) -> bool: ...

    def close(self) -> None: ...


def dialect(conn: Connection) -> Dialect:
    """Which SQL `conn` speaks; a plain sqlite3.Connection has no `dialect` attribute."""
    name: Dialect = getattr(conn, "dialect", "sqlite")
    return name


def is_url(database: str) -> bool:
    """Whether `database` (storage.url or storage.path) names a PostgreSQL server."""
    return database.startswith(URL_SCHEMES)


def is_lost(conn: Connection) -> bool:
    """Whether `conn` can no longer be used: a PostgreSQL connection whose server went away (a
    restart, a failover, a terminated backend). A SQLite connection is a file; it is never lost.
    """
    raw = getattr(conn, "raw", None)  # postgres.PgConnection's psycopg connection
    return raw is not None and bool(raw.broken or raw.closed)


def batch(conn: Connection) -> contextlib.AbstractContextManager[None]:
    """A block of statements whose results are read only after it: on PostgreSQL they go out
    in one round trip (pipeline mode); on SQLite, in process, there is no trip to save."""
    pipeline: Callable[[], contextlib.AbstractContextManager[None]] | None = getattr(
        conn, "pipeline", None
    )
    return pipeline() if pipeline is not None else contextlib.nullcontext()


def begin(conn: Connection, *then: str) -> None:
    """Open a write transaction (and run `then`, statements without parameters, in it). SQLite
    takes the write lock at once (IMMEDIATE), so that a transaction never fails half-way on a
    lock; PostgreSQL locks rows as they are written."""
    together(conn, "BEGIN IMMEDIATE" if dialect(conn) == "sqlite" else "BEGIN", *then)


def together(conn: Connection, *statements: str) -> None:
    """Statements without parameters whose results nobody reads (BEGIN, SAVEPOINT, RELEASE,
    COMMIT), in order: on PostgreSQL as one query, one round trip for all; sqlite3 takes one
    statement per call, and in process there is no trip to save."""
    if dialect(conn) == "postgresql":
        conn.execute("; ".join(statements))
        return
    for statement in statements:
        conn.execute(statement)


def greatest(conn: Connection) -> str:
    """The two-argument maximum: SQLite's scalar max(), PostgreSQL's GREATEST()."""
    return "max" if dialect(conn) == "sqlite" else "greatest"
