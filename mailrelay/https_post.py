"""One HTTPS POST the relay makes on its own (TLS-RPT reports, webhooks): the URL's host
resolved with our own resolver, each address tried in turn, the certificate verified for the
host under the system roots plus `delivery.ca_file` (as for MTA-STS policies), no redirects (one
could point anywhere, and the body would go with it), no proxies from the environment, and the
answer's body never read: only its status counts, and a receiver must not be able to make us
download anything."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import urllib.parse
from collections.abc import Mapping

import dns.asyncresolver
import dns.exception
import dns.resolver
import httpx

from mailrelay.delivery.certificates import mtime
from mailrelay.delivery.sts_fetch import https_context


class PostFailed(Exception):
    """The receiver did not take the body; the message says why (for the log and the CLI)."""


async def post(
    resolver: dns.asyncresolver.Resolver,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    ca_file: str = "",
    time_limit: float = 30.0,
    public_only: str | None = None,
) -> int:
    """POST `body` with `headers` to `url`; the HTTP status (2xx), else PostFailed.

    `public_only`, when given, is the setting that would allow otherwise: only global unicast
    addresses are dialled (checked after resolving, and the checked address is the one connected
    to, so DNS cannot point us elsewhere in between)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or 443
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    try:
        context = https_context(ca_file, mtime(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise PostFailed(f"cannot load trust anchors {ca_file!r}: {exc}") from None
    sent = {**headers, "Host": host if port == 443 else f"{host}:{port}"}
    try:
        async with asyncio.timeout(time_limit):
            addresses = await _addresses(resolver, host)
            if public_only is not None:
                addresses = _public(host, addresses, public_only)
            problems = []
            for address in addresses:
                try:
                    return await _post_to(
                        address, host, port, target, body, sent, context, time_limit
                    )
                except _Unreachable as exc:
                    problems.append(str(exc))
            raise PostFailed("; ".join(problems))
    except TimeoutError:
        raise PostFailed(f"{host}: no answer within {time_limit:g} s") from None


def _public(host: str, addresses: list[str], setting: str) -> list[str]:
    """The global unicast addresses among `addresses`; PostFailed if there are none."""
    public = [a for a in addresses if ipaddress.ip_address(a).is_global]
    if not public:
        raise PostFailed(
            f"{host} resolves only to non-public addresses ({', '.join(addresses)}); refused"
            f" ({setting})"
        )
    return public


class _Unreachable(Exception):
    """No HTTP answer from this address; another address of the host may give one."""


async def _addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    found: list[str] = []
    problems: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(f"{host}.", rdtype)
        except dns.resolver.NXDOMAIN:
            raise PostFailed(f"{host} does not exist (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            continue
        except dns.exception.DNSException as exc:
            problems.append(f"{rdtype}: {type(exc).__name__}")
            continue
        found.extend(rdata.to_text() for rdata in answer)
    if not found:
        raise PostFailed(f"no address for {host}: {'; '.join(problems) or 'no A or AAAA records'}")
    return found


async def _post_to(
    address: str,
    host: str,
    port: int,
    target: str,
    body: bytes,
    headers: Mapping[str, str],
    context: ssl.SSLContext,
    time_limit: float,
) -> int:
    url_host = f"[{address}]" if ":" in address else address
    where = f"{host}[{address}]:{port}"
    # One client per POST, dialled by address with the URL's host as SNI and as the name the
    # certificate must carry: a pooled connection verified for one receiver must not carry
    # another's body.
    try:
        async with (
            httpx.AsyncClient(
                verify=context, timeout=time_limit, follow_redirects=False, trust_env=False
            ) as client,
            client.stream(
                "POST",
                f"https://{url_host}:{port}{target}",
                content=body,
                headers=dict(headers),
                extensions={"sni_hostname": host},
            ) as response,
        ):
            status = response.status_code
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise _Unreachable(f"{where}: {_why(exc)}") from None
    except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
        raise PostFailed(f"{where}: {exc or type(exc).__name__}") from None
    if not 200 <= status < 300:
        raise PostFailed(f"{where}: HTTP status {status}")
    return status


def _why(exc: httpx.HTTPError) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate not valid: {cause.verify_message or cause}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed: {cause}"
        cause = cause.__cause__ or cause.__context__
    return f"cannot connect: {exc or type(exc).__name__}"
