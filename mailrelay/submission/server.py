"""The submission listeners: aiosmtpd's protocol made strict, and their start/stop lifecycle."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import sqlite3
import ssl
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any, AnyStr, Literal, cast

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from mailrelay.config import Config, LimitsConfig
from mailrelay.store.writer import StoreClosed
from mailrelay.submission import paths, replies
from mailrelay.submission.auth import AuthBackoff, PasswordChecker
from mailrelay.submission.handler import Stage, SubmissionHandler
from mailrelay.submission.tls import CertificateError, ReloadableContext

log = logging.getLogger("mailrelay.submission")

# The whole of one DATA may take `timeout` plus the size limit at this rate (64 kbit/s, a poor
# mobile uplink): 25 MiB at most ~58 minutes. Each read has `timeout` on its own, as Postfix's
# smtpd_timeout; this caps a client that sends a byte just often enough, for ever.
DATA_FLOOR_RATE = 8192  # bytes per second

ConnectionLimit = Literal["connections", "connections_per_ip", "unauthenticated_per_ip"]
LimitName = ConnectionLimit | Literal["pre_auth_timeout", "auth_backoff"]

_CONNECTION_REFUSALS: dict[ConnectionLimit, str] = {
    "connections": replies.TOO_MANY_CONNECTIONS,
    "connections_per_ip": replies.TOO_MANY_CONNECTIONS_FROM_CLIENT,
    "unauthenticated_per_ip": replies.TOO_MANY_UNAUTHENTICATED,
}


class ConnectionCounts:
    """Open sessions in all, per client address, and per client address not yet authenticated
    (Postfix's anvil). `admit` counts a new session in, or names the cap it would pass."""

    def __init__(self, limits: LimitsConfig) -> None:
        self._limits = limits
        self.total = 0
        self._per_client: Counter[str] = Counter()
        self._unauthenticated: Counter[str] = Counter()

    def admit(self, client: str) -> ConnectionLimit | None:
        limits = self._limits
        if self.total >= limits.max_connections:
            return "connections"
        if self._per_client[client] >= limits.max_connections_per_ip:
            return "connections_per_ip"
        if self._unauthenticated[client] >= limits.max_unauthenticated_per_ip:
            return "unauthenticated_per_ip"
        self.total += 1
        self._per_client[client] += 1
        self._unauthenticated[client] += 1
        return None

    def authenticated(self, client: str) -> None:
        _decrement(self._unauthenticated, client)

    def release(self, client: str, *, authenticated: bool) -> None:
        self.total -= 1
        _decrement(self._per_client, client)
        if not authenticated:
            _decrement(self._unauthenticated, client)

    def open_from(self, client: str) -> tuple[int, int]:
        """(sessions, of which not authenticated) open from `client`."""
        return self._per_client[client], self._unauthenticated[client]


def _decrement(counts: Counter[str], key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]  # an address that has gone costs no memory


class _Unverified(AuthResult):
    """Credentials parsed by aiosmtpd's mechanism code, not yet checked (that is async)."""


class SubmissionSMTP(SMTP):
    """One connection. Adds what aiosmtpd leaves out: enhanced codes on every reply, RFC 5321
    path syntax, async password checks with a failure limit and back-off, connection caps, a
    deadline for AUTH, a DATA timeout per read, and a 421 before every close of our own."""

    def __init__(self, server: SubmissionServer, *, implicit_tls: bool) -> None:
        cfg = server.config.submission
        with warnings.catch_warnings():
            # aiosmtpd warns when AUTH is allowed without STARTTLS; on an implicit-TLS port the
            # connection was encrypted before the first byte, which is what that check is for.
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            super().__init__(
                server.handler,
                data_size_limit=cfg.max_message_size,
                # Not offered: addresses are checked as ASCII (handler.split_address), and
                # offering SMTPUTF8 while refusing every UTF-8 address would be a broken promise.
                # 8-bit and UTF-8 text in headers and body still pass (8BITMIME).
                enable_SMTPUTF8=False,
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
        self._implicit_tls = implicit_tls
        self._greeted = False
        self._in_ehlo = False
        self._auth_failures = 0
        self.in_transaction = False
        self._client: str | None = None  # the peer's address, known at connection_made
        self._refused = False  # over a connection cap: answered 421, nothing else happens
        self._path_arg: str | None = None  # the last MAIL or RCPT argument, for refusal logs
        self._counted = False
        self._authenticated = False
        self._pre_auth: asyncio.TimerHandle | None = None
        self._in_data = False
        self._data_cap = cfg.timeout_seconds + cfg.max_message_size / DATA_FLOOR_RATE

    def _peer_ip(self) -> str:
        return self._client or "unknown"

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
        # The address the client gave, for the log: MAIL before AUTH names the stranger's sender.
        written = _PATH.search(self._path_arg or "") if stage != "data" else None
        address = written.group(1) if written else None
        self._relay.handler.refuse(
            self.session, envelope, replies.enhance(status), stage, rcpts, address
        )

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
        login = creds.login.decode("utf-8", "replace")
        password = creds.password.decode("utf-8", "replace")
        # Another identity is refused before the password is looked at, so the answer (and its
        # timing) says nothing about the password; to the client it is one more failure.
        foreign = authzid.decode("utf-8", "replace").lower() not in ("", login.lower())

        async def verify() -> bool:
            return not foreign and await self._relay.checker.check(login, password)

        try:
            ok = await self._relay.backoff.attempt(client, login, verify)
        except (StoreClosed, sqlite3.Error) as exc:
            # Not the client's failure: it counts toward no limit, and RFC 4954 section 6 has
            # the reply that tells the client to come back.
            log.error("event=auth_unavailable client=%s error=%r", client, str(exc))
            return AuthResult(success=False, handled=False, message=replies.AUTH_TEMPORARY_FAILURE)
        if ok:
            self._now_authenticated()
            log.info("event=auth_ok client=%s user=%s", client, login.lower())
            return AuthResult(success=True, auth_data=LoginPassword(login.lower().encode(), b""))
        self._auth_failures += 1
        self._relay.on_auth_failure()
        # The login name may be a mistyped password: log neither.
        # A refusal like the others: info, once (a wrong password is the client's business; a
        # flood of them shows in mailrelay_smtpd_sasl_authentication_failures_total).
        log.info(
            "event=auth_failed client=%s failures=%d reason=%s",
            client,
            self._auth_failures,
            "authzid" if foreign else "credentials",
        )
        return AuthResult(success=False, handled=False, message=replies.AUTH_FAILED)

    def _now_authenticated(self) -> None:
        """No longer subject to the pre-AUTH deadline nor counted as unauthenticated."""
        if self._pre_auth is not None:
            self._pre_auth.cancel()
            self._pre_auth = None
        if self._counted and not self._authenticated:
            self._relay.counts.authenticated(self._peer_ip())
        self._authenticated = True

    def _pre_auth_expired(self) -> None:
        self._pre_auth = None
        if self._authenticated:
            return
        self._relay.on_limit("pre_auth_timeout")
        log.info("event=pre_auth_timeout client=%s", self._peer_ip())
        self._close_with(replies.PRE_AUTH_TIMEOUT)

    async def smtp_AUTH(self, arg: str) -> None:
        await super().smtp_AUTH(arg)
        if self._auth_failures >= self._relay.config.submission.max_auth_failures:
            await self.push(replies.TOO_MANY_AUTH_FAILURES)
            if self.transport is not None:
                self.transport.close()

    # ---- transactions and shutdown ---------------------------------------------------------

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._path_arg = arg
        if self._ready_for_path() and await self._bad_path(arg, "mail"):
            return
        # REQUIRETLS (RFC 8689 §4.1) is ours to read: aiosmtpd refuses parameters it does not
        # know (555) before any hook sees them.
        requiretls = False
        if arg is not None:
            taken = _take_requiretls(arg)
            if taken is None:
                await self.push(replies.REQUIRETLS_VALUE)
                return
            arg, requiretls = taken
        await super().smtp_MAIL(arg)
        self.in_transaction = self.envelope is not None and self.envelope.mail_from is not None
        if requiretls and self.envelope is not None and self.in_transaction:
            # Read by the handler at DATA; a new transaction gets a new envelope.
            setattr(self.envelope, "requiretls", True)  # noqa: B010 -- aiosmtpd's type has no such field

    @property
    def encrypted(self) -> bool:
        """Whether the session is under TLS: from the first byte (465) or after STARTTLS."""
        return self._implicit_tls or (self.session is not None and self.session.ssl is not None)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._path_arg = arg
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
        handler = self._relay.handler
        await self.push(
            handler.refuse(self.session, self.envelope, reply, stage, rcpts, bad.written)
        )
        return True

    async def smtp_RSET(self, arg: str) -> None:
        await super().smtp_RSET(arg)
        self.in_transaction = False

    async def smtp_DATA(self, arg: str) -> None:
        self._in_data = True
        cap = asyncio.get_running_loop().call_later(self._data_cap, self._data_too_slow)
        try:
            await super().smtp_DATA(arg)
        finally:
            self._in_data = False
            cap.cancel()
        self.in_transaction = bool(self.envelope and self.envelope.mail_from)
        if self._relay.stopping and not self.in_transaction:
            self.close_for_shutdown()

    def _reading_data(self) -> bool:
        """Between 354 and the final dot: once aiosmtpd has the content, the handler is at work
        and the time is ours, not the client's."""
        return (
            self._in_data and self.envelope is not None and self.envelope.original_content is None
        )

    def _data_too_slow(self) -> None:
        if self._reading_data():
            log.info("event=timeout client=%s stage=data_total", self._peer_ip())
            self._close_with(replies.DATA_TOO_SLOW)

    def _timeout_cb(self) -> None:
        """aiosmtpd's idle timer (`submission.timeout`) fired: reset by each command, and in DATA
        by each read (see data_received). Say why before closing, as Postfix does."""
        if self._in_data and not self._reading_data():
            self._reset_timeout()  # the handler is still working on the message
            return
        log.info(
            "event=timeout client=%s stage=%s",
            self._peer_ip(),
            "data" if self._in_data else "command",
        )
        self._close_with(replies.TIMEOUT)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_data:
            self._reset_timeout()  # per read, not per DATA: a slow but live client goes on
        super().data_received(data)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()

    def close_for_shutdown(self) -> None:
        self._close_with(replies.SHUTTING_DOWN)

    def _close_with(self, reply: str) -> None:
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(reply.encode() + b"\r\n")
            transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._client is None:  # aiosmtpd calls this again after STARTTLS; count once
            peer = transport.get_extra_info("peername")
            self._client = str(peer[0]) if peer else "unknown"
            refusal = self._relay.counts.admit(self._client)
            if refusal is not None:
                self._refuse_connection(cast(asyncio.WriteTransport, transport), refusal)
                return
            self._counted = True
            self._pre_auth = asyncio.get_running_loop().call_later(
                self._relay.config.limits.pre_auth_timeout, self._pre_auth_expired
            )
        super().connection_made(transport)
        self._relay.connections.add(self)

    def _refuse_connection(self, transport: asyncio.WriteTransport, limit: ConnectionLimit) -> None:
        """Over a cap: the reply instead of the banner, and closed before anything else is read
        (on an implicit-TLS port, after the handshake: the reply has to be encrypted)."""
        self._refused = True
        self._relay.on_limit(limit)
        log.warning("event=connection_refused limit=%s client=%s", limit, self._client)
        transport.write(_CONNECTION_REFUSALS[limit].encode() + b"\r\n")
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return  # aiosmtpd never saw this connection: nothing of its to clean up
        if self._pre_auth is not None:
            self._pre_auth.cancel()
            self._pre_auth = None
        if self._counted:
            self._counted = False
            self._relay.counts.release(self._peer_ip(), authenticated=self._authenticated)
        self._relay.connections.discard(self)
        if self._relay.stopping and not self._relay.connections:
            self._relay._drained.set()
        super().connection_lost(error)


# aiosmtpd's own refusals, by the stage they end ("address": MAIL or RCPT, decided at the time).
_PATH = re.compile(r"<([^<>]*)>")


def _take_requiretls(arg: str) -> tuple[str, bool] | None:
    """`arg` without a REQUIRETLS parameter, and whether it had one; None if it had one with a
    value (RFC 8689 §4.1: the parameter takes none)."""
    path_end = arg.find(">") + 1
    if path_end == 0:
        return arg, False  # not a path aiosmtpd will accept: its refusal, not ours
    kept, found = [], False
    for param in arg[path_end:].split():
        keyword = param.partition("=")[0].upper()
        if keyword != "REQUIRETLS":
            kept.append(param)
        elif "=" in param:
            return None
        else:
            found = True
    return " ".join([arg[:path_end], *kept]), found


_NATIVE_REFUSALS: dict[str, Stage | Literal["address"]] = {
    "552 Error: Too much mail data": "data",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "data",
    "552 Error: message size exceeds fixed maximum message size": "mail",
    "553 5.1.3 Error: malformed address": "address",
    # MAIL (or RCPT, DATA) before AUTH: the relay refused to relay for a stranger.
    "530 5.7.0 Authentication required": "mail",
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
        on_limit: Callable[[LimitName], None] = lambda _limit: None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.checker = checker
        self.on_auth_failure = on_auth_failure
        self.on_limit = on_limit
        self.counts = ConnectionCounts(config.limits)
        self.backoff = AuthBackoff(
            config.limits.auth_backoff_max, on_delay=lambda _delay: on_limit("auth_backoff")
        )
        self.tls = ReloadableContext(config.submission.cert_file, config.submission.key_file)
        self.tls_context: ssl.SSLContext = self.tls.context
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
                    # The protocol (and so the connection caps) sees a connection only once its
                    # handshake is done: a handshake gets no longer than AUTH as a whole.
                    ssl_handshake_timeout=(
                        min(60.0, self.config.limits.pre_auth_timeout) if implicit else None
                    ),
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

    def reload_tls(self) -> float | None:
        """Load the certificate and key again (SIGHUP, after a renewal): new handshakes get the
        new pair, open sessions go on. A pair that cannot be loaded is logged and the old one
        stays. Returns the loaded certificate's notAfter, or None if the reload failed."""
        try:
            not_after = self.tls.reload()
        except CertificateError as exc:
            log.error("event=tls_reload_failed error=%r (the previous certificate stays)", str(exc))
            return None
        log.info(
            "event=tls_reloaded cert_file=%s not_after=%s",
            self.tls.cert_file,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(not_after)),
        )
        return not_after

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
