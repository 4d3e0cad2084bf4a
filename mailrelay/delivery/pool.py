"""Open secure sessions kept for reuse: the next message to the same MX skips the TCP, EHLO,
STARTTLS and handshake round trips. A session is used by one worker at a time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mailrelay.config import Config
from mailrelay.delivery.policy import TlsRequirement
from mailrelay.delivery.result import Result
from mailrelay.delivery.session import Session, open_session
from mailrelay.metrics import Metrics

# Receivers commonly drop idle clients after 30-60 s (Postfix smtpd_timeout is 300 s, but many
# large providers are stricter); reusing a session that old risks a wasted attempt.
IDLE_SECONDS = 20.0
# Postfix's smtp_connection_reuse_count_limit: spread long runs over fresh connections.
MAX_USES = 100


@dataclass
class _Idle:
    session: Session
    since: float
    uses: int


_Key = tuple[str, str, TlsRequirement]


async def open_configured(
    config: Config, mx_name: str, address: str, requirement: TlsRequirement
) -> Session | Result:
    """A new session to one MX address with the port, names and timeouts of `config`."""
    d = config.delivery
    return await open_session(
        mx_name,
        address,
        requirement,
        port=d.port,
        ehlo_name=config.hostname,
        connect_timeout=d.connect_timeout,
        command_timeout=d.command_timeout,
    )


class SessionPool:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._idle: dict[_Key, list[_Idle]] = {}
        self._uses: dict[int, tuple[_Key, int]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="mailrelay-session-reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        idle = [i.session for sessions in self._idle.values() for i in sessions]
        self._idle.clear()
        await asyncio.gather(*(s.close() for s in idle), *self._closing, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def session(
        self, mx_name: str, address: str, requirement: TlsRequirement, *, fresh: bool = False
    ) -> AsyncIterator[Session | Result]:
        """A session to one MX address that meets `requirement` (an idle one unless `fresh`),
        or how opening one ended. It goes back to the pool, or is closed, however the block
        ends."""
        opened = await self._acquire(mx_name, address, requirement, fresh)
        try:
            yield opened
        except BaseException:
            # Cancelled (the attempt's deadline, a shutdown) or broken mid-transaction: the
            # session is in an unknown state, so it is closed, never offered again.
            if isinstance(opened, Session):
                self._discard(opened)
            raise
        if isinstance(opened, Session):
            self._release(opened)

    async def _acquire(
        self, mx_name: str, address: str, requirement: TlsRequirement, fresh: bool
    ) -> Session | Result:
        # The requirement is part of the key: a session judged under "encrypt" must not carry
        # mail for a destination that requires "verify", DANE or MTA-STS.
        key: _Key = (mx_name, address, requirement)
        while not fresh and (idle_sessions := self._idle.get(key)):
            idle = idle_sessions.pop()
            if not idle_sessions:
                del self._idle[key]
            if idle.session.alive and time.monotonic() - idle.since < IDLE_SECONDS:
                self._uses[id(idle.session)] = (key, idle.uses)
                return idle.session
            await idle.session.close()
        opened = await open_configured(self.config, mx_name, address, requirement)
        if isinstance(opened, Session):
            tls = opened.tls
            self.metrics.smtp_tls_connections.labels(
                protocol=tls.protocol,
                cipher=tls.cipher,
                trust="verified" if tls.verified else "unverified",
                policy=tls.policy or "encrypt",
            ).inc()
            self._uses[id(opened)] = (key, 0)
        return opened

    def _release(self, session: Session) -> None:
        key, uses = self._uses.pop(id(session))
        if session.alive and uses + 1 < MAX_USES:
            self._idle.setdefault(key, []).append(_Idle(session, time.monotonic(), uses + 1))
        else:
            self._close_later(session)

    def _discard(self, session: Session) -> None:
        self._uses.pop(id(session), None)
        session.abort()

    def _close_later(self, session: Session) -> None:
        task = asyncio.get_running_loop().create_task(session.close())
        self._closing.add(task)  # a task nobody references may be collected mid-QUIT
        task.add_done_callback(self._closing.discard)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(IDLE_SECONDS / 2)
            now = time.monotonic()
            for key, sessions in list(self._idle.items()):
                stale = [i for i in sessions if now - i.since >= IDLE_SECONDS]
                fresh = [i for i in sessions if now - i.since < IDLE_SECONDS]
                if fresh:
                    self._idle[key] = fresh
                else:
                    del self._idle[key]  # keys of hosts no longer used do not pile up
                for i in stale:
                    await i.session.close()

    @property
    def idle_keys(self) -> int:
        """How many (MX, address, requirement) keys hold idle sessions now."""
        return len(self._idle)
