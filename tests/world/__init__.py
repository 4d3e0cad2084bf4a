"""The test world: a DNS server and misbehaving MX servers on loopback, with their certificates.

`World` wires them together; see README.md in this folder.
"""

from __future__ import annotations

import datetime
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
    """A DNS server and MX servers on 127.0.x.y addresses, all on `smtp_port`, with one CA."""

    def __init__(
        self, directory: Path, *, smtp_port: int, first_address: str = "127.0.1.1"
    ) -> None:
        self.directory = directory
        self.smtp_port = smtp_port
        self.ca = TestCA()
        self.ca_file = directory / "ca.pem"
        self.dns = DnsServer()
        self.servers: list[MxServer] = []
        _net, b, c, d = (int(x) for x in first_address.split("."))
        self._next = (b << 16) | (c << 8) | d

    @property
    def nameservers(self) -> list[str]:
        """The value for `delivery.nameservers`."""
        return [self.dns.nameserver]

    async def start(self) -> None:
        self.ca.write_ca(self.ca_file)
        await self.dns.start()

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()
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
        server = MxServer(
            address,
            self.smtp_port,
            behaviour,
            hostname=hostname,
            cert_file=cert_file,
            key_file=key_file,
        )
        await server.start()
        self.servers.append(server)
        self.dns.add(domain, "MX", f"{preference} {hostname}.", ttl)
        self.dns.add(hostname, "A", address, ttl)
        return server
