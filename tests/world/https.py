"""An HTTPS policy host for MTA-STS tests: `mta-sts.<domain>` on its own loopback address.

It answers every request with the test's current `Reply` (body, status, content type, extra
headers such as a redirect's Location, a delay before answering, a body trickled out byte by
byte) and records each request with the TLS SNI it came with. `serve_policy` issues its
certificate from the world's CA and publishes its A record and the `_mta-sts` TXT record.
`serve_collector` is the same server as an endpoint that takes POSTs (a TLS-RPT collector):
it keeps each request's body and answers what its `respond` function says.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.world.certs import Issued
from tests.world.serving import StreamServing

if TYPE_CHECKING:
    from tests.world import World

_REASONS = {
    200: "OK",
    301: "Moved Permanently",
    302: "Found",
    400: "Bad Request",
    404: "Not Found",
    500: "Error",
}
_HEAD_LIMIT = 16 * 1024
_BODY_LIMIT = 1024 * 1024


def policy_text(
    mode: str = "enforce",
    mx: tuple[str, ...] = ("mx1.example.org",),
    max_age: int | str = 86400,
    *,
    eol: str = "\n",
) -> str:
    """A well-formed policy file (RFC 8461 §3.2) with the given fields."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return eol.join(lines) + eol


@dataclass(frozen=True)
class Reply:
    """What the server answers. `content_type=None` sends no Content-Type; `content_length`
    False sends no Content-Length and ends the body by closing the connection."""

    body: bytes | str = b""
    status: int = 200
    content_type: str | None = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds between the request and the status line
    trickle: float = 0.0  # seconds between body bytes (0: all at once)
    content_length: bool = True

    @property
    def body_bytes(self) -> bytes:
        return self.body.encode() if isinstance(self.body, str) else self.body


def redirect(location: str, status: int = 302) -> Reply:
    return Reply(status=status, headers=(("Location", location),), body="moved\n")


@dataclass(frozen=True)
class Request:
    """One request the server read: its line, Host header and the SNI of its TLS session."""

    method: str
    path: str
    host: str | None
    sni: str | None
    headers: dict[str, str] = field(default_factory=dict)  # lowercased names
    body: bytes = b""  # as far as Content-Length said (a POST's; none for a GET)


class PolicyServer(StreamServing):
    """HTTPS on `address`:`port` (0: a free port, read `port` after `start`)."""

    def __init__(
        self,
        address: str,
        port: int = 0,
        *,
        cert_file: Path,
        key_file: Path,
        reply: Reply | None = None,
    ) -> None:
        super().__init__()
        self.address = address
        self._port = port
        self._cert_file = cert_file
        self._key_file = key_file
        self.reply = reply or Reply()
        # When set, each request is answered with what this returns for it (a collector that
        # checks what it is sent), instead of `reply`.
        self.respond: Callable[[Request], Reply] | None = None
        self.requests: list[Request] = []
        self._sni: dict[int, str | None] = {}

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._cert_file, self._key_file)
        context.sni_callback = self._remember_sni
        self._server = await asyncio.start_server(
            self._serve, self.address, self._port, ssl=context
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    def _remember_sni(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext
    ) -> None:
        self._sni[id(ssl_object)] = server_name

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._tracking(writer):
            try:
                await self._answer(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass  # the client went away, as clients that give up do
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _HEAD_LIMIT:
            return
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _version = [*request_line.split(" "), "", "", ""][:3]
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        ssl_object = writer.get_extra_info("ssl_object")
        sni = self._sni.pop(id(ssl_object), None)
        length = headers.get("content-length", "")
        body = b""
        if length.isdigit() and 0 < int(length) <= _BODY_LIMIT:
            body = await reader.readexactly(int(length))
        request = Request(method, path, headers.get("host"), sni, headers, body)
        self.requests.append(request)
        reply = self.reply if self.respond is None else self.respond(request)
        if reply.delay and await _client_left_within(reader, reply.delay):
            return
        body = reply.body_bytes
        lines = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}"]
        if reply.content_type is not None:
            lines.append(f"Content-Type: {reply.content_type}")
        if reply.content_length:
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{name}: {value}" for name, value in reply.headers]
        lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if reply.trickle:
            for i in range(len(body)):
                writer.write(body[i : i + 1])
                await writer.drain()
                if await _client_left_within(reader, reply.trickle):
                    return
        else:
            writer.write(body)
        await writer.drain()


async def _client_left_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Wait `seconds`, or less if the client hangs up (then True): a slow server must not keep
    a test waiting after the client has given up."""
    try:
        async with asyncio.timeout(seconds):
            await reader.read(1)
    except TimeoutError:
        return False
    return True


async def serve_policy(
    world: World,
    domain: str,
    reply: Reply | str,
    *,
    address: str,
    port: int = 0,
    policy_id: str | None = "1",
    cert: Issued | None = None,
) -> PolicyServer:
    """Start `mta-sts.<domain>` on `address` with a certificate from the world's CA (or `cert`),
    publish its A record and, unless `policy_id` is None, "v=STSv1; id=<policy_id>" at
    `_mta-sts.<domain>`. A string `reply` is a policy body served as text/plain. The caller
    stops the server."""
    host = f"mta-sts.{domain}"
    issued = cert or world.ca.issue([host])
    cert_file, key_file = issued.write(world.directory / "certs", f"{host}-{address}")
    server = PolicyServer(
        address,
        port,
        cert_file=cert_file,
        key_file=key_file,
        reply=Reply(body=reply) if isinstance(reply, str) else reply,
    )
    await server.start()
    world.dns.add(host, "A", address)
    if policy_id is not None:
        world.dns.add(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={policy_id}")
    return server


async def serve_collector(
    world: World,
    host: str,
    *,
    address: str,
    respond: Callable[[Request], Reply] | None = None,
    cert: Issued | None = None,
) -> PolicyServer:
    """Start an HTTPS endpoint (a TLS-RPT report collector, say) for `host` on `address`, with a
    certificate from the world's CA (or `cert`), and publish its A record. Requests are
    answered by `respond` (200 with an empty body if None). The caller stops the server."""
    issued = cert or world.ca.issue([host])
    cert_file, key_file = issued.write(world.directory / "certs", f"{host}-{address}")
    server = PolicyServer(
        address, cert_file=cert_file, key_file=key_file, reply=Reply(content_type=None)
    )
    server.respond = respond
    await server.start()
    world.dns.add(host, "A", address)
    return server
