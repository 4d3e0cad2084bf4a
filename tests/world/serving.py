"""The lifecycle the test world's stream servers share: track each connection, end them on stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Self


class StreamServing:
    """Base of a server built on `asyncio.start_server`.

    A subclass's `start` sets `_server`; its connection handler runs inside `_tracking(writer)`,
    so that `stop` can end connections that are still open. `async with` starts and stops it.
    """

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await end_connections(self._writers, self._tasks)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def _tracking(self, writer: asyncio.StreamWriter) -> Iterator[None]:
        """Count the running handler and its connection as open until the block ends."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            yield
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)


async def end_connections(
    writers: set[asyncio.StreamWriter], tasks: set[asyncio.Task[None]]
) -> None:
    """End a server's accepted connections, which Python 3.11's Server.close() leaves open.

    Aborting the sockets lets each handler see end-of-stream and return. Cancelling handlers
    would work too, but Python 3.11 logs every cancelled client_connected_cb task as an error.
    """
    for writer in list(writers):
        writer.transport.abort()
    if tasks:
        _done, stuck = await asyncio.wait(set(tasks), timeout=2.0)
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
