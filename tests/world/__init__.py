"""The test world: a DNS server and misbehaving MX servers on loopback, with their certificates.

`World` wires them together; see README.md in this folder.
"""

from __future__ import annotations

import datetime
import errno
import socket
from pathlib import Path
from typing import Self, assert_never

from tests.world.certs import Issued, TestCA, self_signed, tlsa_data, tlsa_record
from tests.world.channel import TlsSession
from tests.world.dns import DnsServer, Query
from tests.world.mx import (
    CBC_ONLY,
    EXPIRED_CERT,
    GARBAGE_AFTER_STARTTLS,
    MODERN,
    NO_STARTTLS,
    RSA_KEY_EXCHANGE_ONLY,
    STARTTLS_454,
    TLS10_ONLY,
    TLS12_SELF_SIGNED,
    TLS13_ONLY,
    WRONG_HOST_CERT,
    WRONG_HOST_NAME,
    Behaviour,
    CertKind,
    Command,
    Connection,
    Message,
    MxServer,
    Starttls,
    TlsMode,
)

__all__ = [
    "CBC_ONLY",
    "EXPIRED_CERT",
    "GARBAGE_AFTER_STARTTLS",
    "MODERN",
    "NO_STARTTLS",
    "RSA_KEY_EXCHANGE_ONLY",
    "STARTTLS_454",
    "TLS10_ONLY",
    "TLS12_SELF_SIGNED",
    "TLS13_ONLY",
    "WRONG_HOST_CERT",
    "WRONG_HOST_NAME",
    "Behaviour",
    "CertKind",
    "Command",
    "Connection",
    "DnsServer",
    "Issued",
    "Message",
    "MxServer",
    "Query",
    "Starttls",
    "TestCA",
    "TlsMode",
    "TlsSession",
    "World",
    "self_signed",
    "tlsa_data",
    "tlsa_record",
]


class World:
    """A DNS server and MX servers on 127.0.x.y addresses, all on one SMTP port, with one CA.

    Without `smtp_port`, `start()` takes a free port from the OS (see `smtp_port`).
    """

    def __init__(
        self, directory: Path, *, smtp_port: int | None = None, first_address: str = "127.0.1.1"
    ) -> None:
        self.directory = directory
        self.first_address = first_address
        self.ca = TestCA()
        self.ca_file = directory / "ca.pem"
        self.dns = DnsServer()
        self.servers: list[MxServer] = []
        self._smtp_port = smtp_port
        self._port_given = smtp_port is not None
        # The port taken from the OS, held on first_address until the MX there listens on it.
        self._reserved: socket.socket | None = None
        _net, b, c, d = (int(x) for x in first_address.split("."))
        self._next = (b << 16) | (c << 8) | d

    @property
    def smtp_port(self) -> int:
        """The port every MX of this world listens on: the relay's `delivery.port`."""
        if self._smtp_port is None:
            raise RuntimeError("the world takes its SMTP port from the OS in start()")
        return self._smtp_port

    @property
    def nameservers(self) -> list[str]:
        """The value for `delivery.nameservers`."""
        return [self.dns.nameserver]

    async def start(self) -> None:
        self.ca.write_ca(self.ca_file)
        await self.dns.start()
        if self._smtp_port is None:
            try:
                self._reserved = reserve_port(self.first_address)
            except OSError:
                await self.dns.stop()
                raise
            self._smtp_port = int(self._reserved.getsockname()[1])

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        await self.dns.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def certificate(self, hostname: str, behaviour: Behaviour) -> Issued:
        """The certificate `behaviour.cert` asks for, for an MX called `hostname`."""
        key = behaviour.key_type
        match behaviour.cert:
            case CertKind.CA_SIGNED:
                return self.ca.issue([hostname], key=key)
            case CertKind.SELF_SIGNED:
                return self_signed(hostname, key=key)
            case CertKind.EXPIRED:
                now = datetime.datetime.now(datetime.UTC)
                return self.ca.issue(
                    [hostname],
                    not_before=now - datetime.timedelta(days=60),
                    not_after=now - datetime.timedelta(days=1),
                    key=key,
                )
            case CertKind.WRONG_HOST:
                return self.ca.issue([WRONG_HOST_NAME], key=key)
            case _:
                assert_never(behaviour.cert)

    def _allocate_address(self) -> str:
        # Skip .0 and .255 in each /24 so no address looks like a network or broadcast address.
        while self._next & 0xFF in (0, 255):
            self._next += 1
        n, self._next = self._next, self._next + 1
        return f"127.{n >> 16 & 0xFF}.{n >> 8 & 0xFF}.{n & 0xFF}"

    async def add_mx(
        self,
        domain: str,
        behaviour: Behaviour = MODERN,
        *,
        preference: int = 10,
        hostname: str | None = None,
        address: str | None = None,
        ttl: int = 300,
        issued: Issued | None = None,
    ) -> MxServer:
        """Start an MX for `domain` (named mxN.`domain` unless told) and publish its MX and A
        records. Several MX hosts for one domain: call this again.

        `issued` gives the MX that chain and key instead of the one `behaviour.cert` names, e.g.
        a leaf from a private CA that only a TLSA record vouches for."""
        hostname = hostname or f"mx{len(self.servers) + 1}.{domain}"
        address = address or self._allocate_address()
        issued = issued or self.certificate(hostname, behaviour)
        cert_file, key_file = issued.write(self.directory / "certs", hostname)
        sock = None
        if self._reserved is not None and address == self.first_address:
            sock, self._reserved = self._reserved, None
        server = MxServer(
            address,
            self.smtp_port,
            behaviour,
            hostname=hostname,
            cert_file=cert_file,
            key_file=key_file,
            sock=sock,
        )
        try:
            await server.start()
        except OSError as e:
            await server.stop()
            if e.errno != errno.EADDRINUSE:
                raise
            # Every MX must be on the one port the relay dials; another port would only make
            # the relay fail later, far from the cause.
            origin = "given to World" if self._port_given else f"from {self.first_address}"
            raise RuntimeError(
                f"MX {hostname} cannot listen on {address}:{self.smtp_port}, which is in use. "
                f"Every MX of a world listens on its one SMTP port ({origin}), the port the "
                f"relay dials; is something else, another test run, using {address}?"
            ) from e
        self.servers.append(server)
        self.dns.add(domain, "MX", f"{preference} {hostname}.", ttl)
        self.dns.add(hostname, "A", address, ttl)
        return server


def reserve_port(address: str) -> socket.socket:
    """A TCP socket bound to a free port on `address`, not listening.

    Holding it, rather than closing it and binding the port again later, leaves no moment in
    which another process could be given the port. Without SO_REUSEADDR no other socket can
    bind that address and port meanwhile, and connections to it are refused until an MX
    listens on this very socket.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((address, 0))
    except BaseException:
        sock.close()
        raise
    return sock
