"""One MX connection's bytes, plaintext or TLS, with TLS over memory BIOs so that a failed
handshake still sends its alert."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import weakref
from dataclasses import dataclass

LINE_LIMIT = 1 << 20

# The server name each handshake asked for. A context (and its callback) is shared by every
# connection, so the name is kept by TLS object until the connection reads it.
_SNI: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()


def note_sni(tls: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
    """The `sni_callback` of a server context, so that `Channel.sni` can tell what was asked."""
    if server_name is not None:
        _SNI[tls] = server_name


@dataclass(frozen=True)
class TlsSession:
    version: str  # "TLSv1.3"
    cipher: str  # OpenSSL name, "TLS_AES_256_GCM_SHA384" or "ECDHE-RSA-AES128-GCM-SHA256"


class Channel:
    """One connection's bytes, plaintext or TLS.

    TLS runs here over memory BIOs instead of StreamWriter.start_tls because asyncio drops the
    alert of a failed handshake and resets the connection; real MX hosts send the alert
    ("protocol version", "handshake failure"), and clients must be tested against that.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._buffer = bytearray()
        self.sni: str | None = None  # known once a handshake has read the ClientHello

    async def reply(self, text: str) -> None:
        data = text.replace("\n", "\r\n").encode() + b"\r\n"
        if self._tls is None:
            self.writer.write(data)
        else:
            self._tls.write(data)
        await self._flush()

    async def readline(self) -> bytes:
        """A line with its ending, b"" at end of stream; ValueError past the length limit."""
        if self._tls is None:
            return await self.reader.readline()
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > LINE_LIMIT:
                raise ValueError("line too long")
            chunk = await self._read_tls()
            if not chunk:
                line, self._buffer = bytes(self._buffer), bytearray()
                return line
            self._buffer += chunk
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line

    async def start_tls(self, ctx: ssl.SSLContext) -> TlsSession:
        tls = ctx.wrap_bio(self._incoming, self._outgoing, server_side=True)
        try:
            async with asyncio.timeout(5.0):
                while True:
                    try:
                        tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        await self._flush()
                        await self._receive()
                    except ssl.SSLError:
                        with contextlib.suppress(ConnectionError):
                            await self._flush()  # the alert: the reason this class exists
                        raise
        finally:
            self.sni = _SNI.pop(tls, None)
        await self._flush()  # TLS 1.3 session tickets
        self._tls = tls
        cipher = tls.cipher()
        return TlsSession(tls.version() or "", cipher[0] if cipher else "")

    async def _read_tls(self) -> bytes:
        assert self._tls is not None
        while True:
            try:
                return self._tls.read(65536)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._receive():
                    return b""
            except ssl.SSLZeroReturnError:  # the client's close_notify
                return b""

    async def _receive(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def _flush(self) -> None:
        if pending := self._outgoing.read():
            self.writer.write(pending)
        await self.writer.drain()
