"""The DNS resolver every lookup uses: the configured nameservers, or the system's."""

from __future__ import annotations

from collections.abc import Sequence

import dns.asyncresolver
import dns.nameserver

from mailrelay.config import split_nameserver


def make_resolver(nameservers: Sequence[str], timeout: float) -> dns.asyncresolver.Resolver:
    """A resolver for "ip" / "ip:port" / "[ipv6]:port" nameservers; none: the system's.

    No cache of its own: callers that cache (MX resolution) do so by TTL themselves, and
    `domain check` must see what is published now.
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
    return resolver
