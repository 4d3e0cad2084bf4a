"""An authoritative DNS server on loopback (UDP and TCP) whose records and failures tests set."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import struct
from dataclasses import dataclass, field
from typing import Literal, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

from tests.world.serving import StreamServing

Transport = Literal["udp", "tcp"]

# A UDP answer larger than this (or the client's EDNS size) goes out truncated (TC), so the
# client retries over TCP exactly as it must against a real server.
_UDP_LIMIT_WITHOUT_EDNS = 512
_TXT_STRING_MAX = 255
# More CNAME hops than any real chain; stops a loop a test set up by mistake.
_MAX_CNAME_HOPS = 8


@dataclass(frozen=True)
class Query:
    """One question the server was asked: lowercased name without the trailing dot.

    `dnssec` says whether the query asked for DNSSEC status (the AD flag, or DO in EDNS); it is
    left out of comparisons so that tests about which questions were asked need not spell it.
    """

    name: str
    rdtype: str
    transport: Transport
    dnssec: bool = field(default=False, compare=False)


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text, origin=dns.name.root)


def _txt_chunks(data: bytes) -> list[bytes]:
    # A TXT character-string holds at most 255 bytes; longer values (DKIM keys) are published as
    # several strings in one record, and readers concatenate them.
    return [data[i : i + _TXT_STRING_MAX] for i in range(0, len(data), _TXT_STRING_MAX)] or [b""]


class DnsServer(StreamServing):
    """Answers authoritatively (AA) for every name from records added with `add`.

    A name with no records, and no records below it, is NXDOMAIN; a name with records of other
    types is NOERROR with an empty answer (NODATA). Negative answers carry an SOA for "." whose
    minimum is `negative_ttl`, so resolvers can cache them as they would a real zone's.
    CNAMEs inside the server's data are followed, as an authoritative server does in its zone.

    It also plays the validating resolver the relay is configured with: the relay trusts DNSSEC
    only through the AD flag of that resolver's answers, so names marked with `secure` get an
    answer with AD set and nothing is signed (see `secure`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, negative_ttl: int = 60) -> None:
        super().__init__()  # the TCP side; UDP needs no connections ended
        self._host = host
        self._port = port
        self._records: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
        self._servfail: set[dns.name.Name] = set()
        self._dropped: set[dns.name.Name] = set()
        # name -> (secure, applies to the names below it too)
        self._dnssec: dict[dns.name.Name, tuple[bool, bool]] = {}
        self._soa = dns.rrset.from_text(
            dns.name.root,
            negative_ttl,
            "IN",
            "SOA",
            f"ns.test. hostmaster.test. 1 3600 600 86400 {negative_ttl}",
        )
        self._udp: asyncio.DatagramTransport | None = None
        self.queries: list[Query] = []

    # -- records -------------------------------------------------------------------------------

    def add(self, name: str, rdtype: str, value: str, ttl: int = 300) -> None:
        """Add one record; adding to an existing (name, type) sets the RRset's TTL to `ttl`.

        `value` is presentation format ("10 mx1.example.org", "127.0.1.1"; names may omit the
        final dot) except for TXT, where it is the raw text a domain owner publishes, with no
        quotes: it is split into 255-byte strings here. Use `add_txt` to choose the strings.
        """
        rdatatype = dns.rdatatype.from_text(rdtype)
        if rdatatype == dns.rdatatype.TXT:
            self.add_txt(name, [value], ttl)
            return
        rdata = dns.rdata.from_text(
            dns.rdataclass.IN, rdatatype, value, origin=dns.name.root, relativize=False
        )
        self._add_rdata(_name(name), rdata, ttl)

    def add_txt(self, name: str, strings: list[str | bytes], ttl: int = 300) -> None:
        """Add one TXT record made of the given strings in order; any over 255 bytes is split."""
        chunks: list[bytes] = []
        for s in strings:
            chunks.extend(_txt_chunks(s.encode() if isinstance(s, str) else s))
        rdata = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)
        self._add_rdata(_name(name), rdata, ttl)

    def _add_rdata(self, name: dns.name.Name, rdata: dns.rdata.Rdata, ttl: int) -> None:
        node = self._records.setdefault(name, {})
        rrset = node.get(rdata.rdtype)
        if rrset is None:
            rrset = node[rdata.rdtype] = dns.rrset.RRset(name, dns.rdataclass.IN, rdata.rdtype)
        rrset.add(rdata)
        rrset.ttl = ttl

    def remove(self, name: str, rdtype: str) -> None:
        """Remove every record of `rdtype` at `name` (none there is fine)."""
        key = _name(name)
        node = self._records.get(key, {})
        node.pop(dns.rdatatype.from_text(rdtype), None)
        if not node:
            self._records.pop(key, None)

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL for every question about `name` until `heal`."""
        self._servfail.add(_name(name))

    def drop(self, name: str) -> None:
        """Never answer questions about `name` until `heal`: the client times out."""
        self._dropped.add(_name(name))

    def heal(self, name: str) -> None:
        """Undo `servfail` and `drop` for `name`."""
        self._servfail.discard(_name(name))
        self._dropped.discard(_name(name))

    def secure(self, name: str, *, subtree: bool = True) -> None:
        """Treat `name` (with `subtree`, every name below it too: a signed zone) as DNSSEC-signed
        and validated: answers about it carry the AD flag when the query asked for it (AD or DO,
        RFC 6840 §5.7).

        An answer gets AD only if every owner name in it is secure: each name along a followed
        CNAME chain and, for NODATA or NXDOMAIN, the name that has no data. The nearest mark
        wins, so `insecure` below a `secure` zone is an unsigned delegation. A "bogus" answer is
        what a validating resolver turns into SERVFAIL: use `servfail`.
        """
        self._dnssec[_name(name)] = (True, subtree)

    def insecure(self, name: str, *, subtree: bool = True) -> None:
        """Undo `secure` for `name` (and, with `subtree`, the names below it): no AD flag."""
        self._dnssec[_name(name)] = (False, subtree)

    def is_secure(self, name: str | dns.name.Name) -> bool:
        """Whether answers about `name` count as validated (see `secure`); unmarked: no."""
        key = name if isinstance(name, dns.name.Name) else _name(name)
        exact = self._dnssec.get(key)
        if exact is not None:
            return exact[0]
        while key != dns.name.root:
            key = key.parent()
            mark = self._dnssec.get(key)
            if mark is not None and mark[1]:
                return mark[0]
        return False

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        if self._udp is None:
            raise RuntimeError("DnsServer is not started")
        return self._host, self._port

    @property
    def nameserver(self) -> str:
        """The "ip:port" form that `delivery.nameservers` takes."""
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # With port 0, UDP picks the port and TCP must get the same one; another process can
        # hold that TCP port, so try a few.
        for _attempt in range(20):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self._host, self._port)
            )
            port = int(udp.get_extra_info("sockname")[1])
            try:
                self._server = await asyncio.start_server(self._serve_tcp, self._host, port)
            except OSError as e:
                udp.close()
                if e.errno != errno.EADDRINUSE or self._port != 0:
                    raise
                continue
            self._udp, self._port = udp, port
            return
        raise RuntimeError("no free port for UDP and TCP together")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        await super().stop()

    # -- answering -----------------------------------------------------------------------------

    def _exists(self, name: dns.name.Name) -> bool:
        # A name with records below it exists even without records of its own (an "empty
        # non-terminal", such as _domainkey.example.org), so it is NODATA, not NXDOMAIN.
        return any(owner.is_subdomain(name) for owner in self._records)

    def reply(self, wire: bytes, transport: Transport) -> bytes | None:
        """The wire-format answer to a wire-format query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not DNS; a real server ignores it too
        response = self._answer(query, transport)
        if response is None:
            return None
        limit = 65535
        if transport == "udp":
            limit = max(_UDP_LIMIT_WITHOUT_EDNS, query.payload if query.edns >= 0 else 0)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire(max_size=limit)

    def _answer(
        self, query: dns.message.Message, transport: Transport
    ) -> dns.message.Message | None:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP if len(query.question) == 1 else dns.rcode.FORMERR)
            return response
        question = query.question[0]
        rdtype = dns.rdatatype.RdataType(question.rdtype)
        # RFC 6840 §5.7: a resolver sets AD only for a client that asked, with AD or with DO.
        wants_dnssec = bool(query.flags & dns.flags.AD) or bool(query.ednsflags & dns.flags.DO)
        self.queries.append(
            Query(
                question.name.to_text(omit_final_dot=True).lower(),
                dns.rdatatype.to_text(rdtype),
                transport,
                wants_dnssec,
            )
        )
        owners = [question.name]  # every owner name the answer speaks for
        answered = self._answer_chain(response, question.name, rdtype, owners)
        if answered is None:
            return None
        answered.flags &= ~dns.flags.AD
        secure = answered.rcode() != dns.rcode.SERVFAIL and all(map(self.is_secure, owners))
        if wants_dnssec and secure:
            answered.flags |= dns.flags.AD
        return answered

    def _answer_chain(
        self,
        response: dns.message.Message,
        name: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        owners: list[dns.name.Name],
    ) -> dns.message.Message | None:
        for _hop in range(_MAX_CNAME_HOPS):
            if name in self._dropped:
                return None
            if name in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
                response.answer.clear()
                return response
            node = self._records.get(name, {})
            if rdtype == dns.rdatatype.ANY and node:
                response.answer.extend(node.values())
                return response
            if rdtype in node:
                response.answer.append(node[rdtype])
                return response
            cname = node.get(dns.rdatatype.CNAME)
            if cname is None or rdtype == dns.rdatatype.CNAME:
                break
            response.answer.append(cname)
            name = next(iter(cname)).target
            owners.append(name)
        if not self._exists(name):
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(self._soa)
        return response

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._tracking(writer):
            try:
                # RFC 7766: several length-prefixed queries may share one connection.
                while True:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    answer = self.reply(await reader.readexactly(length), "tcp")
                    if answer is not None:
                        writer.write(struct.pack("!H", len(answer)) + answer)
                        await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not inherit from DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        answer = self._server.reply(data, "udp")
        if answer is not None and self._transport is not None:
            self._transport.sendto(answer, addr)
