"""The single writer: one thread owns the write connection and commits operations in groups.

Every SMTP session that accepts a message needs an fsync before it may answer 250. One fsync per
message would cap throughput at the disk's fsync rate, so operations that arrive while a commit
is in progress wait together and share the next one (group commit). Each operation runs inside
its own SAVEPOINT, so one that fails is rolled back alone and the others still commit.

On PostgreSQL (a postgresql:// URL for `path`) the writer is one psycopg connection and reads
take a connection from a small pool; the same operations run on both (store.backend). A server
that goes away (a restart, a failover) fails the group in hand, like a full disk, and the
writer connects again; until it has, each write fails at once, so that an SMTP client hears 451
and keeps its message rather than wait on a commit that cannot come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from mailrelay.store.backend import Connection, begin, is_lost, is_url, together
from mailrelay.store.db import connect

if TYPE_CHECKING:
    from mailrelay.store.postgres import Pool

T = TypeVar("T")
log = logging.getLogger(__name__)

# A group is bounded so that one huge burst cannot hold the write lock for long.
MAX_GROUP = 512
# After a lost PostgreSQL connection: the first new attempt is at once, then they back off.
RECONNECT_FIRST = 0.5
RECONNECT_MAX = 5.0
# PostgreSQL's deadlock_detected and serialization_failure: two instances' groups touched the
# same rows in opposite orders. The server fails one statement; its group is run once more
# rather than fail a submission over a race.
_RACE_LOST = frozenset({"40P01", "40001"})


@dataclass
class _Operation:
    op: Callable[[Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


class StoreClosed(RuntimeError):
    """The store is stopping or stopped; nothing more can be written."""


class StoreFailed(StoreClosed):
    """The writer met an error it cannot recover from; nothing more will be written."""


class Store:
    """Async front of the database: `write` is group-committed, `read` runs off the event loop."""

    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float = 30.0,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.path = path
        # How long a commit waits for a lock another process holds before it fails.
        self.busy_timeout = busy_timeout
        # Called on the event loop if the writer breaks for good (the service then exits and
        # systemd starts it again): every write from then on fails at once with StoreFailed.
        self.on_failure = on_failure
        self.failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: queue.SimpleQueue[_Operation | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._reader: Connection | None = None
        self._readers: Pool | None = None  # on PostgreSQL, instead of the one reader
        self._read_lock = threading.Lock()
        self._closed = True
        self.commits = 0  # number of COMMITs, for the benchmark's group-size figure

    async def start(self) -> None:
        # Open (and migrate) synchronously so that a broken database fails the start, not later.
        writer = connect(self.path, busy_timeout=self.busy_timeout)
        if is_url(self.path):
            from mailrelay.store import postgres

            self._readers = postgres.Pool(self.path)
            try:
                await asyncio.to_thread(self._readers.open)
            except BaseException:
                writer.close()
                raise
        else:
            self._reader = connect(self.path, busy_timeout=self.busy_timeout)
        self._thread = threading.Thread(
            target=self._run, args=(writer,), name="mailrelay-store-writer", daemon=True
        )
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._thread.start()

    async def stop(self) -> None:
        """Commit everything already submitted, then close."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._reader is not None:
            self._reader.close()
        if self._readers is not None:
            await asyncio.to_thread(self._readers.close)

    async def write(self, op: Callable[[Connection], T]) -> T:
        """Run `op` in a transaction; return once its effects are committed to disk."""
        return await self.submit(op)

    def submit(self, op: Callable[[Connection], T]) -> asyncio.Future[T]:
        """Queue `op` for the writer now, on the calling (event loop) thread; the future is done
        once it is committed or has failed. For a write nobody waits on: queued before `stop`,
        it is committed before `stop` returns, and no task has to outlive its caller for it.
        Raises StoreClosed (or StoreFailed) at once if nothing more can be written."""
        if self.failure is not None:
            raise StoreFailed(f"the store failed: {self.failure!r}")
        if self._closed:
            raise StoreClosed("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Operation(op, future, loop))
        return future

    async def read(self, op: Callable[[Connection], T]) -> T:
        """Run a query on the read connection, in a worker thread."""
        return await asyncio.to_thread(self.read_blocking, op)

    def read_blocking(self, op: Callable[[Connection], T]) -> T:
        """Run a query on the read connection in the calling thread: for code that already runs
        in a worker thread. Never call it on the event loop."""
        if self._closed:
            raise StoreClosed("the store is closed")
        if self._readers is not None:
            return self._readers.run(op)
        if self._reader is None:
            raise StoreClosed("the store is closed")
        with self._read_lock:
            return op(self._reader)

    def _run(self, conn: Connection) -> None:
        group: list[_Operation] = []
        try:
            while True:
                first = self._jobs.get()
                if first is None:
                    return
                group = [first]
                stopping = False
                while len(group) < MAX_GROUP:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stopping = True
                        break
                    group.append(job)
                self._commit(conn, group)
                group = []
                if stopping:
                    return
                if is_lost(conn):
                    with contextlib.suppress(sqlite3.Error, OSError):
                        conn.close()
                    reconnected = self._reconnect()
                    if reconnected is None:
                        return  # stopped while the database was away
                    conn = reconnected
        except BaseException as exc:  # a writer that dies must say so, whatever killed it
            self._broken(exc, group)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _reconnect(self) -> Connection | None:
        """Connect again after the PostgreSQL connection was lost; None if the store is stopped
        meanwhile. Writes that arrive before the connection is back fail at once (a 451 for a
        submission, a retry later for a delivery's record): nothing waits on a commit that
        cannot come, and nothing is claimed to be stored that is not."""
        started = time.monotonic()
        delay = RECONNECT_FIRST
        while True:
            try:
                conn = connect(self.path, busy_timeout=self.busy_timeout)
            except (sqlite3.Error, OSError) as exc:
                log.error("event=store_reconnect_failed retry_in=%.1f error=%r", delay, str(exc))
            else:
                log.warning("event=store_reconnected after=%.1fs", time.monotonic() - started)
                return conn
            until = time.monotonic() + delay
            while (left := until - time.monotonic()) > 0:
                try:
                    job = self._jobs.get(timeout=left)
                except queue.Empty:
                    break
                if job is None:
                    return None
                unavailable = sqlite3.OperationalError(
                    "the database connection was lost; connecting again"
                )
                job.loop.call_soon_threadsafe(_settle, job.future, None, unavailable)
            delay = min(delay * 2, RECONNECT_MAX)

    def _broken(self, exc: BaseException, group: list[_Operation]) -> None:
        """The writer cannot go on (say ROLLBACK itself failed). Fail the group in hand and
        every operation after it, at once: a caller waiting for a commit that will never come
        would hang its SMTP session while the server still answers EHLO."""
        log.critical("event=store_failed error=%r", exc)
        self.failure = exc
        failed = StoreFailed(f"the store failed: {exc!r}")
        for job in group:
            job.loop.call_soon_threadsafe(_settle, job.future, None, failed)
        if self._loop is not None and self.on_failure is not None:
            self._loop.call_soon_threadsafe(self.on_failure, exc)
        while (pending := self._jobs.get()) is not None:
            pending.loop.call_soon_threadsafe(_settle, pending.future, None, failed)

    def _commit(self, conn: Connection, group: list[_Operation]) -> None:
        outcomes: list[tuple[_Operation, Any, BaseException | None]] = []
        for attempt in (1, 2):
            try:
                outcomes = self._transaction(conn, group, may_retry=attempt == 1)
            except _LostRace as lost:
                # Another instance's transaction and ours each waited on a row the other held
                # (two users' rate counters taken in opposite orders, say) and PostgreSQL broke
                # the tie by failing ours. Retrying the one operation would wait again on what
                # the group's earlier operations hold: the whole group goes again, once.
                log.warning("event=store_group_retried reason=%r", str(lost.__cause__))
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as exc:  # the connection went meanwhile: `_run` sees it
                    outcomes = [(job, None, exc) for job in group]
                    break
                continue
            except sqlite3.Error as exc:
                # Disk full, I/O error, lock timeout, a lost connection: nothing of this group
                # is known to be stored, so every caller hears so and none of them may claim
                # the data is safe. (A connection lost during COMMIT may have committed it: a
                # client told 451 then sends its message again, twice rather than never.)
                if is_lost(conn):
                    log.error("event=store_connection_lost error=%r", str(exc))
                else:
                    log.error("store commit failed: %s", exc)
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                outcomes = [(job, None, exc) for job in group]
            break
        for job, result, error in outcomes:
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)

    def _transaction(
        self, conn: Connection, group: list[_Operation], *, may_retry: bool
    ) -> list[tuple[_Operation, Any, BaseException | None]]:
        """Run the group in one transaction, each operation in its own SAVEPOINT (one that
        fails is rolled back alone and the others still commit), and COMMIT."""
        outcomes: list[tuple[_Operation, Any, BaseException | None]] = []
        begin(conn, "SAVEPOINT op")
        for n, job in enumerate(group, start=1):
            try:
                result = job.op(conn)
            except Exception as exc:
                if isinstance(exc, sqlite3.Error) and (not conn.in_transaction or is_lost(conn)):
                    # SQLite rolled the whole transaction back itself (disk full, I/O error),
                    # or the server is gone: the group fails, with this as the cause.
                    raise
                if may_retry and getattr(exc, "sqlstate", None) in _RACE_LOST:
                    raise _LostRace from exc
                conn.execute("ROLLBACK TO op")
                outcomes.append((job, None, exc))
            else:
                outcomes.append((job, result, None))
            # Between two operations, or after the last: what fails here is the group's.
            together(conn, "RELEASE op", "SAVEPOINT op" if n < len(group) else "COMMIT")
        self.commits += 1
        return outcomes


class _LostRace(Exception):
    """An operation lost a deadlock (or a serialization race) to another instance."""


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
