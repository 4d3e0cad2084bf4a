"""A report by HTTPS POST (RFC 8460 §5.4): the gzipped JSON as application/tlsrpt+gzip.

§3 lets submitters ignore certificate errors here; we do not. The collector's certificate must
be valid for the URL's host under the system roots plus `delivery.ca_file`, as for MTA-STS
policies: a report says which of a domain's MX hosts failed and how, which is worth keeping from
whoever can divert the connection. The POST itself is `mailrelay.https_post`'s.
"""

from __future__ import annotations

import dns.asyncresolver

from mailrelay import https_post
from mailrelay.https_post import PostFailed

__all__ = ["CONTENT_TYPE", "PostFailed", "post"]

CONTENT_TYPE = "application/tlsrpt+gzip"


async def post(
    resolver: dns.asyncresolver.Resolver,
    url: str,
    body: bytes,
    *,
    ca_file: str = "",
    time_limit: float = 30.0,
) -> int:
    """POST the gzipped report `body` to `url`; the HTTP status (2xx), else PostFailed."""
    headers = {"Content-Type": CONTENT_TYPE, "User-Agent": "mailrelay (TLS-RPT)"}
    return await https_post.post(
        resolver, url, body, headers, ca_file=ca_file, time_limit=time_limit
    )
