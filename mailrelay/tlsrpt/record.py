"""The `_smtp._tls` TXT record (RFC 8460 §3): where a domain wants its reports, if anywhere.

Records that do not start with "v=TLSRPTv1" are someone else's; unless exactly one record is
left, the domain does not take reports. Of its rua URIs only `mailto:` (one address) and
`https:` are used, and only the first `max_rua` of those: a record is written by a stranger,
and a list of a thousand collectors must not make us send a thousand reports. Plain `http:`
is never used, whatever the record says: reports leave encrypted, like all our mail.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdtypes.ANY.TXT
import dns.resolver

from mailrelay.store.tlsrpt import Method

_VERSION = "v=TLSRPTv1"
# §3 ABNF: tlsrpt-ext-name and tlsrpt-ext-value.
_EXTENSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")


@dataclass(frozen=True)
class Destination:
    uri: str  # as published
    method: Method
    target: str  # mailto: the address; https: the URL


@dataclass(frozen=True)
class Lookup:
    """What `_smtp._tls.<domain>` said: `destinations` (empty: no reports wanted, or none we
    can use), or `temporary` when DNS did not answer (try again later; that is not "no")."""

    destinations: tuple[Destination, ...] = ()
    temporary: str | None = None
    ignored: tuple[str, ...] = ()  # rua URIs left out, and why, for the log


async def lookup(resolver: dns.asyncresolver.Resolver, domain: str, max_rua: int) -> Lookup:
    name = f"_smtp._tls.{domain}."
    try:
        answer = await resolver.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
        return Lookup()
    except dns.exception.DNSException as exc:
        why = "timed out" if isinstance(exc, dns.exception.Timeout) else type(exc).__name__
        return Lookup(temporary=f"TXT lookup for {name} failed: {why}")
    texts = []
    for rdata in answer:
        if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT):
            # §3: the strings of one record are read as one, without spaces between them.
            try:
                texts.append(b"".join(rdata.strings).decode("ascii"))
            except UnicodeDecodeError:
                continue  # not a TLSRPT record, whatever else it is
    return parse_records(texts, max_rua)


def parse_records(texts: Sequence[str], max_rua: int) -> Lookup:
    """The destinations of the one TLSRPTv1 record among `texts` (the TXT records found)."""
    candidates = [t for t in texts if _is_tlsrpt(t)]
    if len(candidates) != 1:
        # §3: none, or more than one: "senders MUST assume the recipient domain does not
        # implement TLSRPT".
        return Lookup()
    uris = _rua(candidates[0])
    if uris is None:
        return Lookup(ignored=("the record does not parse",))
    destinations: list[Destination] = []
    ignored: list[str] = []
    for uri in uris:
        destination = destination_for(uri)
        if destination is None:
            ignored.append(f"{uri[:200]}: not a mailto: address or https: URL")
        elif destination.uri in {d.uri for d in destinations}:
            continue
        elif len(destinations) >= max_rua:
            ignored.append(f"{uri[:200]}: more than {max_rua} (tlsrpt.max_rua)")
        else:
            destinations.append(destination)
    return Lookup(destinations=tuple(destinations), ignored=tuple(ignored))


def _is_tlsrpt(text: str) -> bool:
    # The version must be the first field, followed by the field delimiter (*WSP ";" *WSP).
    return text.startswith(_VERSION) and text[len(_VERSION) :].lstrip(" \t")[:1] == ";"


def _rua(text: str) -> list[str] | None:
    """The URIs of the record's rua fields, in order; None when the record does not parse.

    §3: tlsrpt-record = tlsrpt-version 1*(field-delim tlsrpt-field) [field-delim]; unknown
    fields (extensions) are ignored; commas and "!" inside a URI are percent-encoded, so a
    comma always separates two URIs.
    """
    fields = [f.strip(" \t") for f in text[len(_VERSION) :].lstrip(" \t")[1:].split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # the optional trailing delimiter
    uris: list[str] = []
    for field in fields:
        if field.startswith("rua="):
            parts = [u.strip(" \t") for u in field[len("rua=") :].split(",")]
            if not all(parts):
                return None
            uris += parts
        elif not _EXTENSION.fullmatch(field):
            return None
    return uris or None


def destination_for(uri: str) -> Destination | None:
    scheme, sep, rest = uri.partition(":")
    if not sep:
        return None
    match scheme.lower():
        case "mailto":
            address = _mailto_address(rest)
            return None if address is None else Destination(uri, "mailto", address)
        case "https":
            url = _https_url(uri)
            return None if url is None else Destination(uri, "https", url)
        case _:
            return None


def _mailto_address(rest: str) -> str | None:
    """The one address of a mailto: URI (RFC 6068); hfields (?subject=...) are not ours to
    follow. Several addresses, or anything that is not a plain address, is refused."""
    address = urllib.parse.unquote(rest.partition("?")[0])
    local, at, domain = address.rpartition("@")
    if not at or not _LOCAL_PART.fullmatch(local) or not _is_domain(domain):
        return None
    return f"{local}@{domain.lower().rstrip('.')}"


def _https_url(uri: str) -> str | None:
    if any(c.isspace() or not c.isprintable() for c in uri):
        return None
    try:
        parts = urllib.parse.urlsplit(uri)
        if parts.port == 0:  # .port raises ValueError for a port that is not one
            return None
    except ValueError:
        return None
    host = parts.hostname
    if not host or parts.username is not None or parts.password is not None:
        return None
    if not (_is_domain(host) or _is_ip_literal(host)):
        return None
    return urllib.parse.urlunsplit(("https", parts.netloc, parts.path or "/", parts.query, ""))


def _is_domain(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return len(name) <= 253 and len(labels) >= 2 and all(_LABEL.fullmatch(x) for x in labels)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
