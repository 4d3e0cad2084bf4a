"""The submission listeners: aiosmtpd's protocol made strict, and their start/stop lifecycle."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import sqlite3
import ssl
import warnings
from collections.abc import Callable
from typing import Any, AnyStr, Literal, cast

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from mailrelay.config import Config
from mailrelay.store.writer import StoreClosed
from mailrelay.submission import paths, replies
from mailrelay.submission.auth import FailureThrottle, PasswordChecker
from mailrelay.submission.handler import Stage, SubmissionHandler
from mailrelay.submission.tls import server_context

log = logging.getLogger("mailrelay.submission")


class _Unverified(AuthResult):
    """Credentials parsed by aiosmtpd's mechanism code, not yet checked (that is async)."""


class SubmissionSMTP(SMTP):
    """One connection. Adds what aiosmtpd leaves out: enhanced codes on every reply, RFC 5321
    path syntax, async password checks with a failure limit and tarpit, and a clean 421 on
    shutdown."""

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
        """RFC 4616. Not aiosmtpd's own, which drops the authorization identity unread: section
        2 says a server must refuse one it does not allow, and we allow none but the login's."""
        if len(args) == 1:
            response = await self.challenge_auth("")
            if not isinstance(response, bytes):
                return AuthResult(success=False)  # "*" or not base64: aiosmtpd has replied
        else:
            try:
                response = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False)
        parts = response.split(b"\0")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False)
        authzid, login, password = parts
        return await self._check(LoginPassword(login, password), authzid)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        result = await super().auth_LOGIN(_, args)
        if not isinstance(result, _Unverified):
            return result  # malformed exchange; aiosmtpd has already replied
        return await self._check(cast(LoginPassword, result.auth_data))

    async def _check(self, creds: LoginPassword, authzid: bytes = b"") -> AuthResult:
        client = self._peer_ip()
        delay = self._relay.throttle.delay(client)
        if delay:
            await asyncio.sleep(delay)
        login = creds.login.decode("utf-8", "replace")
        password = creds.password.decode("utf-8", "replace")
        # Another identity is refused before the password is looked at, so the answer (and its
        # timing) says nothing about the password; to the client it is one more failure.
        foreign = authzid.decode("utf-8", "replace").lower() not in ("", login.lower())
        try:
            ok = not foreign and await self._relay.checker.check(login, password)
        except (StoreClosed, sqlite3.Error) as exc:
            # Not the client's failure: it counts toward no limit, and RFC 4954 section 6 has
            # the reply that tells the client to come back.
            log.error("event=auth_unavailable client=%s error=%r", client, str(exc))
            return AuthResult(success=False, handled=False, message=replies.AUTH_TEMPORARY_FAILURE)
        if ok:
            self._relay.throttle.succeeded(client)
            log.info("event=auth_ok client=%s user=%s", client, login.lower())
            return AuthResult(success=True, auth_data=LoginPassword(login.lower().encode(), b""))
        self._relay.throttle.failed(client)
        self._auth_failures += 1
        self._relay.on_auth_failure()
        # The login name may be a mistyped password: log neither.
        log.warning(
            "event=auth_failed client=%s failures=%d reason=%s",
            client,
            self._auth_failures,
            "authzid" if foreign else "credentials",
        )
        return AuthResult(success=False, handled=False, message=replies.AUTH_FAILED)

    async def smtp_AUTH(self, arg: str) -> None:
        await super().smtp_AUTH(arg)
        if self._auth_failures >= self._relay.config.submission.max_auth_failures:
            await self.push(replies.TOO_MANY_AUTH_FAILURES)
            if self.transport is not None:
                self.transport.close()

    # ---- transactions and shutdown ---------------------------------------------------------

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self._ready_for_path() and await self._bad_path(arg, "mail"):
            return
        await super().smtp_MAIL(arg)
        self.in_transaction = self.envelope is not None and self.envelope.mail_from is not None

    async def smtp_RCPT(self, arg: str | None) -> None:
        has_sender = self.envelope is not None and self.envelope.mail_from is not None
        if self._ready_for_path() and has_sender and await self._bad_path(arg, "rcpt"):
            return
        await super().smtp_RCPT(arg)

    def _ready_for_path(self) -> bool:
        """Whether aiosmtpd would get as far as reading the path: refusals for a missing EHLO or
        AUTH (or, in RCPT, MAIL) come first, and stay aiosmtpd's."""
        session = self.session
        return session is not None and bool(session.host_name) and bool(session.authenticated)

    async def _bad_path(self, arg: str | None, stage: Literal["mail", "rcpt"]) -> bool:
        """Refuse (answer, count, log) a MAIL or RCPT argument that is not RFC 5321 syntax."""
        keyword = "FROM:" if stage == "mail" else "TO:"
        bad = paths.check(arg, keyword, null_allowed=stage == "mail")
        if bad is None:
            return False
        if bad.problem is paths.Problem.PARAMETERS:
            reply = replies.BAD_PATH_PARAMETERS
        else:
            reply = replies.BAD_SENDER_SYNTAX if stage == "mail" else replies.BAD_RECIPIENT_SYNTAX
        # A refused recipient is recorded as written, as the handler's own refusals are.
        rcpts = [bad.written] if stage == "rcpt" else []
        await self.push(
            self._relay.handler.refuse(self.session, self.envelope, reply, stage, rcpts)
        )
        return True

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
