"""A background pass, run again and again beside the queue runner until stopped: the TLS-RPT
reporter and the webhook dispatcher. A pass that fails (a store or DNS error, a bug) is logged
and the next one tries again; nothing it claimed is lost, since claims carry leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging


class Periodic:
    """Subclasses give `_pass`, which returns how long to wait before the next one."""

    retry_after = 60.0  # seconds after a failed pass

    def __init__(self, name: str, log: logging.Logger, failed_event: str) -> None:
        self._name = name  # the asyncio task's
        self._log = log
        self._failed_event = failed_event
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        # A pass cut short leaves what it claimed to be tried again when the lease runs out.
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _pass(self) -> float:
        raise NotImplementedError

    async def _loop(self) -> None:
        while True:
            wait = await self._guarded()
            await asyncio.sleep(wait)

    async def _guarded(self) -> float:
        try:
            return await self._pass()
        except asyncio.CancelledError:
            raise
        except Exception:
            self._log.exception("event=%s", self._failed_event)
            return self.retry_after
