"""Receiving SMTP servers for the test world, each with chosen TLS settings and misbehaviour."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import assert_never

from tests.world.certs import KeyType
from tests.world.channel import LINE_LIMIT, Channel, TlsSession, note_sni
from tests.world.serving import StreamServing


class Starttls(Enum):
    """What the server does about STARTTLS."""

    OFFER = "offer"  # advertise it and hand-shake
    NOT_ADVERTISED = "not-advertised"  # absent from EHLO; 502 if a client sends it anyway
    REPLY_454 = "454"  # advertised, then refused with 454 4.7.0
    GARBAGE = "garbage"  # advertised, 220, then bytes that are not a TLS handshake


class TlsMode(Enum):
    """The protocol versions and cipher suites the server accepts."""

    MODERN = "modern"  # TLS 1.2 and 1.3, OpenSSL defaults: a current client gets TLS 1.3
    TLS13_ONLY = "tls13-only"
    TLS12_ECDHE_GCM = "tls12-ecdhe-gcm"
    TLS10 = "tls10"  # TLS 1.0 only, which OpenSSL 3 allows only at security level 0
    RSA_KEY_EXCHANGE = "rsa-kx"  # TLS 1.2, AES128-GCM-SHA256: no forward secrecy
    CBC = "cbc"  # TLS 1.2, ECDHE with AES-CBC suites only


class CertKind(Enum):
    """Which certificate `World` gives an MX (an `MxServer` made by hand takes files)."""

    CA_SIGNED = "ca-signed"  # by the world's CA, for the MX host name
    SELF_SIGNED = "self-signed"
    EXPIRED = "expired"  # by the world's CA, for the right name, expired yesterday
    WRONG_HOST = "wrong-host"  # by the world's CA, for another name


WRONG_HOST_NAME = "wrong-host.invalid"

_CIPHERS: dict[TlsMode, str] = {
    TlsMode.TLS12_ECDHE_GCM: "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384",
    TlsMode.TLS10: "DEFAULT:@SECLEVEL=0",
    TlsMode.RSA_KEY_EXCHANGE: "AES128-GCM-SHA256",
    TlsMode.CBC: "ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES128-SHA:"
    "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA",
}


@dataclass(frozen=True)
class Behaviour:
    """How one MX behaves. Replies are complete lines ("451 4.3.0 Try later"); a multi-line
    reply is lines joined with "\\n", each with its own code and separator."""

    starttls: Starttls = Starttls.OFFER
    tls: TlsMode = TlsMode.MODERN
    cert: CertKind = CertKind.CA_SIGNED
    key: KeyType | None = None  # None: RSA where the suites need it, EC otherwise
    greeting: str = "220 {hostname} ESMTP test world"
    mail_reply: str = "250 2.1.0 Sender OK"
    rcpt_reply: str = "250 2.1.5 Recipient OK"
    # Per recipient (lowercased address as in RCPT TO:<...>), overriding rcpt_reply.
    rcpt_replies: Mapping[str, str] = field(default_factory=dict)
    # None hangs up after the final dot without replying, like a server that crashed.
    data_reply: str | None = "250 2.0.0 Message accepted"
    # Seconds to wait after the final dot before the reply (or the hang-up): a slow server, or
    # with data_reply=None one that holds the client until it gives up (or dies).
    data_stall: float = 0.0
    # A 421 here closes the connection after the reply: a server that timed out an idle client
    # but whose close the client has not noticed yet (a stale pooled session).
    rset_reply: str = "250 2.0.0 OK"
    # False: EHLO does not offer 8BITMIME (a 7-bit-only server, RFC 6152).
    eight_bit_mime: bool = True
    # True: EHLO after STARTTLS offers REQUIRETLS (RFC 8689), and MAIL takes the parameter.
    requiretls: bool = False

    @property
    def key_type(self) -> KeyType:
        if self.key is not None:
            return self.key
        return "rsa" if self.tls in (TlsMode.RSA_KEY_EXCHANGE, TlsMode.CBC) else "ec"


MODERN = Behaviour()
TLS13_ONLY = Behaviour(tls=TlsMode.TLS13_ONLY)
TLS12_SELF_SIGNED = Behaviour(tls=TlsMode.TLS12_ECDHE_GCM, cert=CertKind.SELF_SIGNED)
NO_STARTTLS = Behaviour(starttls=Starttls.NOT_ADVERTISED)
TLS10_ONLY = Behaviour(tls=TlsMode.TLS10)
RSA_KEY_EXCHANGE_ONLY = Behaviour(tls=TlsMode.RSA_KEY_EXCHANGE)
CBC_ONLY = Behaviour(tls=TlsMode.CBC)
STARTTLS_454 = Behaviour(starttls=Starttls.REPLY_454)
GARBAGE_AFTER_STARTTLS = Behaviour(starttls=Starttls.GARBAGE)
EXPIRED_CERT = Behaviour(cert=CertKind.EXPIRED)
WRONG_HOST_CERT = Behaviour(cert=CertKind.WRONG_HOST)


@dataclass(frozen=True)
class Command:
    line: str  # without CRLF
    tls: bool  # whether it arrived inside TLS


@dataclass(frozen=True)
class Message:
    mail_from: str
    rcpt_tos: tuple[str, ...]  # the accepted recipients only
    data: bytes  # dot-unstuffed, CRLF line ends as sent, without the final "."
    tls: bool
    reply: str  # the reply to the final dot; "" if the server hung up instead

    @property
    def accepted(self) -> bool:
        return self.reply.startswith("2")


@dataclass
class Connection:
    """What one client connection did, in order."""

    peer: str
    commands: list[Command] = field(default_factory=list)
    tls: TlsSession | None = None
    tls_error: str | None = None  # the server's view of a failed handshake
    sni: str | None = None  # the server name the client asked for in its ClientHello, if any
    messages: list[Message] = field(default_factory=list)
    closed: bool = False


_ENVELOPE_VERBS = ("MAIL", "RCPT", "DATA", "BDAT")
_MAIL_RE = re.compile(r"FROM:\s*<([^>]*)>", re.IGNORECASE)
_RCPT_RE = re.compile(r"TO:\s*<([^>]*)>", re.IGNORECASE)
WAIT_SECONDS = 5.0
_SIZE_LIMIT = 50 * 1024 * 1024


def server_context(mode: TlsMode, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The server-side TLS context for `mode`; it notes the SNI each client sends."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sni_callback = note_sni
    ctx.load_cert_chain(cert_file, key_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    match mode:
        case TlsMode.MODERN:
            pass
        case TlsMode.TLS13_ONLY:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        case TlsMode.TLS10:
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1
        case TlsMode.TLS12_ECDHE_GCM | TlsMode.RSA_KEY_EXCHANGE | TlsMode.CBC:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        case _:
            assert_never(mode)
    if mode in _CIPHERS:
        # Only TLS 1.2 and older suites are chosen here; TLS 1.3 is off in these modes.
        ctx.set_ciphers(_CIPHERS[mode])
    return ctx


class MxServer(StreamServing):
    """A small SMTP server that records everything it is sent.

    `behaviour` may be replaced while running (e.g. 451 first, then 250); each command reads
    the current value. `sock`, a socket already bound to `address` and `port`, is listened on
    instead of binding anew: the world hands its reserved port over this way.
    """

    def __init__(
        self,
        address: str,
        port: int,
        behaviour: Behaviour = MODERN,
        *,
        hostname: str = "mx.test",
        cert_file: Path | None = None,
        key_file: Path | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        super().__init__()
        self.behaviour = behaviour
        self.hostname = hostname
        self.connections: list[Connection] = []
        self._address = address
        self._port = port
        self._sock = sock
        self._cert = (cert_file, key_file)
        self._contexts: dict[TlsMode, ssl.SSLContext] = {}
        self._changed = asyncio.Event()

    # -- what happened -------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self._address, self._port

    @property
    def all_messages(self) -> list[Message]:
        return [m for c in self.connections for m in c.messages]

    @property
    def messages(self) -> list[Message]:
        """Messages the server accepted (2xx after the final dot)."""
        return [m for m in self.all_messages if m.accepted]

    @property
    def commands(self) -> list[Command]:
        return [cmd for c in self.connections for cmd in c.commands]

    @property
    def tls_sessions(self) -> list[TlsSession]:
        return [c.tls for c in self.connections if c.tls is not None]

    @property
    def saw_mail_from_without_tls(self) -> bool:
        return any(c.line.upper().startswith("MAIL") and not c.tls for c in self.commands)

    @property
    def received_message_bytes_before_tls(self) -> bool:
        """True if any envelope command, DATA, or message content came in plaintext."""
        plain = (c.line.upper() for c in self.commands if not c.tls)
        return any(line.startswith(_ENVELOPE_VERBS) for line in plain) or any(
            not m.tls for m in self.all_messages
        )

    async def wait_until(self, predicate: Callable[[MxServer], bool]) -> None:
        """Return once `predicate(self)` holds. A test that waits for something that never
        happens fails with TimeoutError after WAIT_SECONDS instead of hanging; wrap the call in
        `asyncio.timeout()` for a shorter wait."""
        async with asyncio.timeout(WAIT_SECONDS):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

    async def wait_for_messages(self, count: int = 1) -> list[Message]:
        """The accepted messages, once there are at least `count`."""
        await self.wait_until(lambda s: len(s.messages) >= count)
        return self.messages

    def _notify(self) -> None:
        self._changed.set()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.behaviour.starttls is Starttls.OFFER:
            self._context(self.behaviour.tls)  # a missing certificate fails here, not mid-test
        if self._sock is not None:
            self._server = await asyncio.start_server(
                self._serve, sock=self._sock, limit=LINE_LIMIT
            )
            self._sock = None  # the server owns it now and closes it; a restart binds anew
        else:
            self._server = await asyncio.start_server(
                self._serve, self._address, self._port, limit=LINE_LIMIT
            )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._sock is not None:  # handed over, but start() failed before listening on it
            self._sock.close()
            self._sock = None
        await super().stop()

    def _context(self, mode: TlsMode) -> ssl.SSLContext:
        cert_file, key_file = self._cert
        if cert_file is None or key_file is None:
            raise RuntimeError(f"MX {self.hostname} offers STARTTLS but has no certificate")
        if mode not in self._contexts:
            self._contexts[mode] = server_context(mode, cert_file, key_file)
        return self._contexts[mode]

    # -- the SMTP session ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._tracking(writer):
            peer = writer.get_extra_info("peername")
            conn = Connection(peer=f"{peer[0]}:{peer[1]}")
            self.connections.append(conn)
            channel = Channel(reader, writer)
            try:
                await self._session(conn, channel)
            except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
                pass
            except ValueError:  # a line longer than the limit
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await channel.reply("500 5.5.2 Line too long")
            finally:
                conn.closed = True
                self._notify()
                # Nothing here waits for the client (no TLS close_notify exchange): abort is safe.
                writer.transport.abort()

    async def _session(self, conn: Connection, channel: Channel) -> None:
        greeting = self.behaviour.greeting.format(hostname=self.hostname)
        await channel.reply(greeting)
        in_service = greeting.startswith("220")
        greeted = False
        mail_from: str | None = None
        rcpts: list[str] = []
        while raw := await channel.readline():
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            conn.commands.append(Command(line, conn.tls is not None))
            self._notify()
            b = self.behaviour
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            reply: str
            if verb == "QUIT":
                await channel.reply("221 2.0.0 Bye")
                return
            if not in_service:
                reply = "503 5.5.1 No service, only QUIT"
            elif verb in ("EHLO", "HELO"):
                greeted, mail_from, rcpts = True, None, []
                reply = self._hello(verb, arg, conn.tls is not None)
            elif verb == "RSET":
                mail_from, rcpts = None, []
                reply = b.rset_reply
                if reply.startswith("421"):
                    await channel.reply(reply)
                    return
            elif verb == "NOOP":
                reply = "250 2.0.0 OK"
            elif verb == "STARTTLS":
                if not await self._starttls(conn, channel, bool(arg) or conn.tls is not None):
                    return
                if conn.tls is not None:
                    # RFC 3207: forget everything from before the handshake.
                    greeted, mail_from, rcpts = False, None, []
                continue
            elif not greeted:
                reply = "503 5.5.1 Say EHLO first"
            elif verb == "MAIL":
                match = _MAIL_RE.match(arg)
                if match is None:
                    reply = "501 5.5.4 Syntax: MAIL FROM:<address>"
                elif mail_from is not None:
                    reply = "503 5.5.1 Nested MAIL command"
                else:
                    reply = b.mail_reply
                    if reply.startswith("2"):
                        mail_from, rcpts = match.group(1), []
            elif verb == "RCPT":
                match = _RCPT_RE.match(arg)
                if match is None:
                    reply = "501 5.5.4 Syntax: RCPT TO:<address>"
                elif mail_from is None:
                    reply = "503 5.5.1 Need MAIL first"
                else:
                    reply = b.rcpt_replies.get(match.group(1).lower(), b.rcpt_reply)
                    if reply.startswith("2"):
                        rcpts.append(match.group(1))
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    await channel.reply("503 5.5.1 Need MAIL and RCPT first")
                    continue
                await channel.reply("354 End data with <CR><LF>.<CR><LF>")
                data = await self._read_data(channel)
                if data is None:
                    return
                final = b.data_reply
                if b.data_stall:
                    await asyncio.sleep(b.data_stall)
                tls = conn.tls is not None
                conn.messages.append(Message(mail_from, tuple(rcpts), data, tls, final or ""))
                self._notify()
                mail_from, rcpts = None, []
                if final is None:
                    return
                reply = final
            else:
                reply = "500 5.5.2 Command not recognised"
            await channel.reply(reply)

    def _hello(self, verb: str, arg: str, tls: bool) -> str:
        if verb == "HELO":
            return f"250 {self.hostname}"
        lines = [f"{self.hostname} greets {arg}", f"SIZE {_SIZE_LIMIT}"]
        if self.behaviour.eight_bit_mime:
            lines.append("8BITMIME")
        lines.append("ENHANCEDSTATUSCODES")
        if tls and self.behaviour.requiretls:
            lines.append("REQUIRETLS")
        if not tls and self.behaviour.starttls is not Starttls.NOT_ADVERTISED:
            lines.append("STARTTLS")
        return "\n".join(f"250-{x}" for x in lines[:-1]) + f"\n250 {lines[-1]}"

    async def _starttls(self, conn: Connection, channel: Channel, bad: bool) -> bool:
        """Answer STARTTLS; False when the connection is over."""
        b = self.behaviour
        match b.starttls:
            case Starttls.NOT_ADVERTISED:
                await channel.reply("502 5.5.1 STARTTLS not offered")
            case _ if bad:
                await channel.reply("503 5.5.1 TLS already active or bad syntax")
            case Starttls.REPLY_454:
                await channel.reply("454 4.7.0 TLS not available due to temporary reason")
            case Starttls.GARBAGE:
                await channel.reply("220 2.0.0 Ready to start TLS")
                # Wait for the ClientHello so the garbage reaches the client's TLS layer, not
                # the buffer its SMTP reader was using for the 220 line.
                await channel.reader.read(1)
                await channel.reply("500 5.5.2 What is this? This is not a TLS handshake.")
                return False
            case Starttls.OFFER:
                ctx = self._context(b.tls)
                await channel.reply("220 2.0.0 Ready to start TLS")
                try:
                    conn.tls = await channel.start_tls(ctx)
                except (ssl.SSLError, ConnectionError, TimeoutError) as e:
                    conn.tls_error = str(e) or type(e).__name__
                    return False
                finally:
                    conn.sni = channel.sni
                self._notify()
            case _:
                assert_never(b.starttls)
        return True

    async def _read_data(self, channel: Channel) -> bytes | None:
        lines: list[bytes] = []
        while line := await channel.readline():
            # Only CRLF.CRLF ends the data: a bare-LF dot is content (SMTP smuggling).
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)
        return None
