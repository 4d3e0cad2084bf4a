"""The DNS resolver every lookup uses: the configured nameservers, or the system's."""

from __future__ import annotations

from collections.abc import Sequence

import dns.asyncresolver
import dns.flags
import dns.message
import dns.nameserver

from mailrelay.config import split_nameserver


def make_resolver(nameservers: Sequence[str], timeout: float) -> dns.asyncresolver.Resolver:
    """A resolver for "ip" / "ip:port" / "[ipv6]:port" nameservers; none: the system's.

    No cache of its own: callers that cache (MX resolution) do so by TTL themselves, and
    `domain check` must see what is published now.

    Every query sets the AD flag. DNSSEC is trusted only through the AD flag of the configured
    (local, validating) resolver, and a resolver sets AD in an answer only for a client that
    asked with AD or DO (RFC 6840 §5.7); AD asks without making the resolver send signatures.
    """
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port)
            for host, port in (split_nameserver(ns) for ns in nameservers)
        ]
    else:
        resolver = dns.asyncresolver.Resolver()
    # `lifetime` bounds each question including retries and TCP fallback; `timeout` alone is
    # per nameserver and would let several slow servers add up.
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.cache = None
    resolver.flags = dns.flags.RD | dns.flags.AD
    return resolver


def authenticated(response: dns.message.Message | None) -> bool:
    """Whether the resolver vouches that `response` was DNSSEC-validated (its AD flag).

    Meaningful only for a resolver from `make_resolver` and only as far as the path to that
    resolver can be trusted: use a validating resolver on the same host (127.0.0.1, ::1).
    """
    return response is not None and bool(response.flags & dns.flags.AD)
