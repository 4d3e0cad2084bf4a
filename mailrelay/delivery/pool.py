"""Open secure sessions kept for reuse: the next message to the same MX skips the TCP, EHLO,
STARTTLS and handshake round trips. A session is used by one worker at a time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from mailrelay.config import CipherProfile, Config, SecurityLevel
from mailrelay.delivery.session import Failure, Session, open_session
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


_Key = tuple[str, str, SecurityLevel, CipherProfile]


async def open_configured(
    config: Config,
    mx_name: str,
    address: str,
    security_level: SecurityLevel,
    cipher_profile: CipherProfile,
) -> Session | Failure:
    """A new session to one MX address with the port, names and timeouts of `config`."""
    d = config.delivery
    return await open_session(
        mx_name,
        address,
        port=d.port,
        ehlo_name=config.hostname,
        security_level=security_level,
        cipher_profile=cipher_profile,
        ca_file=d.ca_file,
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

    async def acquire(
        self,
        mx_name: str,
        address: str,
        *,
        security_level: SecurityLevel,
        cipher_profile: CipherProfile,
    ) -> Session | Failure:
        # The policy is part of the key: a session graded under "encrypt" must not carry mail
        # for a destination that requires "verify".
        key: _Key = (mx_name, address, security_level, cipher_profile)
        while self._idle.get(key):
            idle = self._idle[key].pop()
            if idle.session.alive and time.monotonic() - idle.since < IDLE_SECONDS:
                self._uses[id(idle.session)] = (key, idle.uses)
                return idle.session
            await idle.session.close()
        opened = await open_configured(
            self.config, mx_name, address, security_level, cipher_profile
        )
        if isinstance(opened, Session):
            tls = opened.tls
            self.metrics.smtp_tls_connections.labels(
                protocol=tls.protocol,
                cipher=tls.cipher,
                trust="verified" if tls.verified else "unverified",
            ).inc()
            self._uses[id(opened)] = (key, 0)
        return opened

    def release(self, session: Session) -> None:
        key, uses = self._uses.pop(id(session))
        if session.alive and uses + 1 < MAX_USES:
            self._idle.setdefault(key, []).append(_Idle(session, time.monotonic(), uses + 1))
        else:
            task = asyncio.get_running_loop().create_task(session.close())
            self._closing.add(task)  # a task nobody references may be collected mid-QUIT
            task.add_done_callback(self._closing.discard)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(IDLE_SECONDS / 2)
            now = time.monotonic()
            for key, sessions in list(self._idle.items()):
                stale = [i for i in sessions if now - i.since >= IDLE_SECONDS]
                self._idle[key] = [i for i in sessions if now - i.since < IDLE_SECONDS]
                for i in stale:
                    await i.session.close()
