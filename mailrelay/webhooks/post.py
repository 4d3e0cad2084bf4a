"""One webhook POST: JSON to the endpoint over HTTPS, by `mailrelay.https_post` (our resolver,
the certificate verified, no redirects, the answer's body never read), to public addresses
only unless `[webhooks] allow_private_addresses`."""

from __future__ import annotations

from collections.abc import Mapping

import dns.asyncresolver

from mailrelay import https_post
from mailrelay.https_post import PostFailed

__all__ = ["USER_AGENT", "PostFailed", "post"]

USER_AGENT = "mailrelay (webhooks)"


async def post(
    resolver: dns.asyncresolver.Resolver,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    ca_file: str = "",
    time_limit: float = 10.0,
    allow_private: bool = False,
) -> int:
    """POST `body` as application/json to `url`; the HTTP status (2xx), else PostFailed.

    Whoever holds a manage key chooses the URL: unless `allow_private`, only public addresses
    are dialled, so that a key cannot make the relay POST into the network it sits in."""
    sent = {**headers, "Content-Type": "application/json", "User-Agent": USER_AGENT}
    return await https_post.post(
        resolver,
        url,
        body,
        sent,
        ca_file=ca_file,
        time_limit=time_limit,
        public_only=None if allow_private else "webhooks.allow_private_addresses",
    )
