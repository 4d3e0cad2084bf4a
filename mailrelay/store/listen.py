"""New mail wakes every instance on one PostgreSQL database (issue 16): LISTEN/NOTIFY.

The commit that queues a message also notifies `mailrelay_queue` (queue.enqueue, and `queue
retry`; PostgreSQL delivers it once the transaction commits, and not at all if it rolls back).
Each instance with a delivery side listens on a connection of its own, in a thread, and sets
its runner's wake event, so mail accepted by any instance starts at once on whichever is idle;
the poll (delivery.poll_interval) stays only for what sends no notification (retries coming
due, leases running out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from mailrelay.config import redact_url

log = logging.getLogger("mailrelay.store")

CHANNEL = "mailrelay_queue"
# How long the thread waits for a notification before it looks whether it should stop.
STOP_CHECK_SECONDS = 0.5
RECONNECT_SECONDS = 2.0


class QueueListener:
    """LISTEN on its own connection; `on_notify` runs on the event loop for each notification.
    `start`/`stop` like every long-lived part. A lost connection is opened again, and
    `on_notify` then runs once, for whatever was queued while nobody listened."""

    def __init__(self, url: str, on_notify: Callable[[], None]) -> None:
        self.url = url
        self.on_notify = on_notify
        self.notifications = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        # Listening before start returns: mail committed after it wakes us.
        conn = await asyncio.to_thread(self._connect)
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(conn,), name="mailrelay-queue-listener", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self.url, autocommit=True, connect_timeout=10, application_name="mailrelay-listen"
        )
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    def _wake(self) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed while we were stopping
            self._loop.call_soon_threadsafe(self.on_notify)

    def _run(self, conn: psycopg.Connection[Any] | None) -> None:
        try:
            while not self._stop.is_set():
                if conn is None:
                    try:
                        conn = self._connect()
                    except psycopg.Error as exc:
                        log.error(
                            "event=listen_failed url=%s error=%r",
                            redact_url(self.url),
                            str(exc).strip(),
                        )
                        self._stop.wait(RECONNECT_SECONDS)
                        continue
                    log.info("event=listen_reconnected")
                    self._wake()
                try:
                    for _ in conn.notifies(timeout=STOP_CHECK_SECONDS):
                        self.notifications += 1
                        self._wake()
                except psycopg.Error as exc:
                    log.error("event=listen_lost error=%r", str(exc).strip())
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                    conn = None
                    self._stop.wait(RECONNECT_SECONDS)
        finally:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
