"""The submission listeners: aiosmtpd's protocol made strict, and their start/stop lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import warnings
from collections.abc import Callable
from typing import Any, AnyStr, Literal, cast

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from mailrelay.config import Config
from mailrelay.submission import replies
from mailrelay.submission.auth import FailureThrottle, PasswordChecker
from mailrelay.submission.handler import Stage, SubmissionHandler
from mailrelay.submission.tls import server_context

log = logging.getLogger("mailrelay.submission")


class _Unverified(AuthResult):
    """Credentials parsed by aiosmtpd's mechanism code, not yet checked (that is async)."""


class SubmissionSMTP(SMTP):
    """One connection. Adds what aiosmtpd leaves out: enhanced codes on every reply, async
    password checks with a failure limit and tarpit, and a clean 421 on shutdown."""

    def __init__(self, server: SubmissionServer, *, implicit_tls: bool) -> None:
        cfg = server.config.submission
        with warnings.catch_warnings():
            # aiosmtpd warns when AUTH is allowed without STARTTLS; on an implicit-TLS port the
            # connection was encrypted before the first byte, which is what that check is for.
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            super().__init__(
                server.handler,
                data_size_limit=cfg.max_message_size,
                enable_SMTPUTF8=True,
                hostname=server.config.hostname,
                ident="mailrelay",
                tls_context=None if implicit_tls else server.tls_context,
                require_starttls=not implicit_tls,
                auth_required=True,
                auth_require_tls=not implicit_tls,
                authenticator=_parsed_only,
                timeout=cfg.timeout_seconds,
                loop=asyncio.get_running_loop(),
            )
        self._relay = server
        self._greeted = False
        self._in_ehlo = False
        self._auth_failures = 0
        self.in_transaction = False

    def _peer_ip(self) -> str:
        peer = self.session.peer if self.session else None
        return str(peer[0]) if peer else "unknown"

    # ---- replies ---------------------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and self._greeted and not self._in_ehlo:
            self._report_native_refusal(status)
            status = replies.enhance(status)
        self._greeted = True
        await super().push(status)

    def _report_native_refusal(self, status: str) -> None:
        """aiosmtpd refuses some things itself, before any hook runs (size, line length,
        unparsable address); count and record those like the hooks' own refusals."""
        native = _NATIVE_REFUSALS.get(status)
        if native is None:
            return
        envelope = self.envelope
        stage: Stage
        if native == "address":
            stage = "rcpt" if envelope is not None and envelope.mail_from else "mail"
        else:
            stage = native
        # An unparsable address names no recipient; a refused DATA refuses all given so far.
        rcpts = list(envelope.rcpt_tos) if envelope is not None and stage == "data" else []
        self._relay.handler.refuse(self.session, envelope, replies.enhance(status), stage, rcpts)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_ehlo = False

    # ---- authentication --------------------------------------------------------------------

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check(await super().auth_LOGIN(_, args))

    async def _check(self, result: AuthResult) -> AuthResult:
        if not isinstance(result, _Unverified):
            return result  # malformed exchange; aiosmtpd has already replied
        creds = cast(LoginPassword, result.auth_data)
        client = self._peer_ip()
        delay = self._relay.throttle.delay(client)
        if delay:
            await asyncio.sleep(delay)
        login = creds.login.decode("utf-8", "replace")
        password = creds.password.decode("utf-8", "replace")
        if await self._relay.checker.check(login, password):
            self._relay.throttle.succeeded(client)
            log.info("event=auth_ok client=%s user=%s", client, login.lower())
            return AuthResult(success=True, auth_data=LoginPassword(login.lower().encode(), b""))
        self._relay.throttle.failed(client)
        self._auth_failures += 1
        self._relay.on_auth_failure()
        # The login name may be a mistyped password: log neither.
        log.warning("event=auth_failed client=%s failures=%d", client, self._auth_failures)
        return AuthResult(success=False, handled=False, message=replies.AUTH_FAILED)

    async def smtp_AUTH(self, arg: str) -> None:
        await super().smtp_AUTH(arg)
        if self._auth_failures >= self._relay.config.submission.max_auth_failures:
            await self.push(replies.TOO_MANY_AUTH_FAILURES)
            if self.transport is not None:
                self.transport.close()

    # ---- transactions and shutdown ---------------------------------------------------------

    async def smtp_MAIL(self, arg: str) -> None:
        await super().smtp_MAIL(arg)
        self.in_transaction = self.envelope is not None and self.envelope.mail_from is not None

    async def smtp_RSET(self, arg: str) -> None:
        await super().smtp_RSET(arg)
        self.in_transaction = False

    async def smtp_DATA(self, arg: str) -> None:
        await super().smtp_DATA(arg)
        self.in_transaction = bool(self.envelope and self.envelope.mail_from)
        if self._relay.stopping and not self.in_transaction:
            self.close_for_shutdown()

    def close_for_shutdown(self) -> None:
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(replies.SHUTTING_DOWN.encode() + b"\r\n")
            transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._relay.connections.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._relay.connections.discard(self)
        if self._relay.stopping and not self._relay.connections:
            self._relay._drained.set()
        super().connection_lost(error)


# aiosmtpd's own refusals, by the stage they end ("address": MAIL or RCPT, decided at the time).
_NATIVE_REFUSALS: dict[str, Stage | Literal["address"]] = {
    "552 Error: Too much mail data": "data",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "data",
    "552 Error: message size exceeds fixed maximum message size": "mail",
    "553 5.1.3 Error: malformed address": "address",
}


def _parsed_only(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    return _Unverified(success=False, handled=False, auth_data=auth_data)


class SubmissionServer:
    """Owns the listening sockets; `stop` lets open transactions finish before closing."""

    def __init__(
        self,
        config: Config,
        handler: SubmissionHandler,
        checker: PasswordChecker,
        on_auth_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.checker = checker
        self.throttle = FailureThrottle()
        self.on_auth_failure = on_auth_failure
        self.tls_context: ssl.SSLContext = server_context(
            config.submission.cert_file, config.submission.key_file
        )
        self.connections: set[SubmissionSMTP] = set()
        self.stopping = False
        self._drained = asyncio.Event()
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config.submission
        listeners = [(a, False) for a in cfg.listen] + [(a, True) for a in cfg.implicit_tls_listen]
        try:
            for address, implicit in listeners:
                server = await loop.create_server(
                    lambda implicit=implicit: SubmissionSMTP(self, implicit_tls=implicit),
                    host=address.host,
                    port=address.port,
                    ssl=self.tls_context if implicit else None,
                    reuse_address=True,
                )
                self._servers.append(server)
                log.info(
                    "event=listening address=%s tls=%s",
                    address,
                    "implicit" if implicit else "starttls",
                )
        except OSError:
            await self.stop()
            raise

    @property
    def bound_ports(self) -> list[int]:
        return [s.sockets[0].getsockname()[1] for s in self._servers if s.sockets]

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; close idle sessions with 421; give open transactions `grace` seconds."""
        self.stopping = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if not conn.in_transaction:
                conn.close_for_shutdown()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        for conn in list(self.connections):
            conn.close_for_shutdown()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        await self.handler.flush()  # refusals recorded so far reach the store before it stops
        self.checker.close()
