"""MTA-STS discovery and retrieval (RFC 8461 §3): the `_mta-sts` TXT record, the policy file
fetched over HTTPS, and the parsing of both. No caching here: that is `mta_sts.MtaSts`.

Every failure is a `StsFailure` named as TLS-RPT names it (RFC 8460 §4.3.2.2), so that the
evidence and any later report say the same thing.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.rdtypes.ANY.TXT
import dns.resolver
import httpx

from mailrelay.delivery.certificates import mtime
from mailrelay.store.sts_cache import StsMode

StsError = Literal["sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"]

WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"
# RFC 8461 §3.3 suggests 64 KiB as the largest policy a sender need accept; real ones are tiny.
MAX_POLICY_BYTES = 64 * 1024
# §3.2: "maximum value of 31557600" (one year); the syntax allows up to ten digits, so a larger
# number is a valid policy that we keep for a year at most.
MAX_AGE_CAP = 31557600

_MODES: dict[str, StsMode] = {"enforce": "enforce", "testing": "testing", "none": "none"}
_TXT_VERSION = "v=STSv1"
_TXT_ID = re.compile(r"id=([A-Za-z0-9]{1,32})")
_TXT_EXTENSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+")
_POLICY_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31}):[ \t]*(.*?)[ \t]*")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class StsFailure(Exception):
    """Discovery or retrieval failed; `error` is the TLS-RPT result type, `detail` says why."""

    def __init__(self, error: StsError, detail: str) -> None:
        super().__init__(detail)
        self.error: StsError = error
        self.detail = detail


@dataclass(frozen=True)
class ParsedPolicy:
    mode: StsMode
    mx: tuple[str, ...]  # lowercase patterns without a final dot, "*." kept
    max_age: int  # capped at MAX_AGE_CAP


# -- the TXT record (§3.1) -------------------------------------------------------------------------


async def discover(resolver: dns.asyncresolver.Resolver, domain: str) -> str | None:
    """The policy id published at `_mta-sts.<domain>`, or None when there is no usable record.

    Raises StsFailure when DNS itself fails (SERVFAIL, timeout): that is not "no record".
    """
    name = f"_mta-sts.{domain}."
    try:
        answer = await resolver.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
        return None
    except dns.exception.DNSException as exc:
        raise StsFailure(
            "sts-policy-fetch-error", f"TXT lookup for {name} failed: {_dns_reason(exc)}"
        ) from None
    texts: list[str] = []
    for rdata in answer:
        if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT):
            # §3.1: a record made of several strings is read as their concatenation.
            raw = b"".join(rdata.strings)
            try:
                texts.append(raw.decode("ascii"))
            except UnicodeDecodeError:
                continue  # not an STS record, whatever else it is
    return policy_id_from_txt(texts)


def policy_id_from_txt(texts: Sequence[str]) -> str | None:
    """§3.1: keep the records that start with "v=STSv1"; unless exactly one remains and it
    parses, the domain has no usable record (which does not by itself drop a cached policy)."""
    candidates = [t for t in texts if _is_sts_record(t)]
    if len(candidates) != 1:
        return None
    return _parse_txt(candidates[0])


def _is_sts_record(text: str) -> bool:
    # The version must be the first field; "v=STSv1 ;" (space before the semicolon) is allowed
    # by the ABNF's field delimiter, so it counts as an STS record too.
    return text.startswith(_TXT_VERSION) and text[len(_TXT_VERSION) :].lstrip(" \t")[:1] == ";"


def _parse_txt(text: str) -> str | None:
    fields = [f.strip(" \t") for f in text[len(_TXT_VERSION) :].lstrip(" \t")[1:].split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # a trailing ";" is allowed
    policy_id: str | None = None
    for field in fields:
        if match := _TXT_ID.fullmatch(field):
            # §3.2 (for both records): of a repeated field only the first counts.
            policy_id = policy_id or match.group(1)
        elif field.startswith("id=") or not _TXT_EXTENSION.fullmatch(field):
            return None  # a bad id, an empty field, or bytes no field may hold
    return policy_id


# -- the policy file (§3.2) ------------------------------------------------------------------------


def parse_policy(text: str) -> ParsedPolicy:
    """Parse a policy file; raises StsFailure("sts-policy-invalid") when it is not one."""
    first: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip(" \t"):
            continue  # blank lines (a trailing newline, mostly) carry nothing
        match = _POLICY_LINE.fullmatch(line)
        if match is None:
            raise _invalid(f"line {number} is not 'key: value': {line[:80]!r}")
        key, value = match.groups()
        if key == "mx":
            pattern = mx_pattern(value)
            if pattern is None:
                raise _invalid(f"mx {value!r} is not a host name or *.pattern")
            mx.append(pattern)
        else:
            # Unknown keys are extensions and ignored; of a repeated key only the first counts.
            first.setdefault(key, value)
    if first.get("version") != "STSv1":
        raise _invalid(f"version is {first.get('version')!r}, not 'STSv1'")
    if "mode" not in first or first["mode"] not in _MODES:
        raise _invalid(f"mode is {first.get('mode')!r}, not enforce, testing or none")
    mode = _MODES[first["mode"]]
    if "max_age" not in first or not _MAX_AGE.fullmatch(first["max_age"]):
        raise _invalid(f"max_age is {first.get('max_age')!r}, not a number of seconds")
    if not mx and mode != "none":
        raise _invalid(f"a policy in mode {mode} must name at least one mx")
    max_age = min(int(first["max_age"]), MAX_AGE_CAP)
    return ParsedPolicy(mode=mode, mx=tuple(mx), max_age=max_age)


def mx_pattern(value: str) -> str | None:
    """A policy's `mx` value, normalised (lowercase, no final dot), or None if malformed.

    §3.2: a host name in A-labels, optionally behind "*." for exactly one left-most label.
    """
    pattern = value.lower().removesuffix(".")
    host = pattern.removeprefix("*.")
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return pattern


def _invalid(detail: str) -> StsFailure:
    return StsFailure("sts-policy-invalid", detail)


# -- fetching the policy file (§3.3) ---------------------------------------------------------------


async def fetch_policy_text(
    resolver: dns.asyncresolver.Resolver,
    domain: str,
    *,
    ca_file: str = "",
    port: int = 443,
    time_limit: float = 10.0,
) -> str:
    """GET https://mta-sts.<domain>/.well-known/mta-sts.txt and return the body.

    The host is resolved with `resolver` (the configured nameservers, not the system's) and each
    address is tried in turn until one answers; the certificate must be valid for the host name
    under the system roots plus `ca_file`. `time_limit` (seconds) bounds the whole fetch.
    Raises StsFailure.
    """
    host = f"mta-sts.{domain}"
    try:
        async with asyncio.timeout(time_limit):
            addresses = await _addresses(resolver, host)
            try:
                context = https_context(ca_file, mtime(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise StsFailure(
                    "sts-policy-fetch-error", f"cannot load trust anchors {ca_file!r}: {exc}"
                ) from None
            failure: StsFailure | None = None
            for address in addresses:
                try:
                    return await _get(address, host, port, context, time_limit)
                except _Unreachable as exc:
                    # A certificate failure is the more telling one to report when several
                    # addresses fail.
                    if failure is None or failure.error != "sts-webpki-invalid":
                        failure = exc.failure
            assert failure is not None  # _addresses never returns an empty tuple
            raise failure
    except TimeoutError:
        raise StsFailure(
            "sts-policy-fetch-error", f"no policy from {host} within {time_limit:g} s"
        ) from None


class _Unreachable(Exception):
    """This address gave no HTTP answer; another address of the host may."""

    def __init__(self, failure: StsFailure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


async def _addresses(resolver: dns.asyncresolver.Resolver, host: str) -> tuple[str, ...]:
    found: list[str] = []
    problems: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(f"{host}.", rdtype)
        except dns.resolver.NXDOMAIN:
            raise StsFailure(
                "sts-policy-fetch-error", f"{host} does not exist (NXDOMAIN)"
            ) from None
        except dns.resolver.NoAnswer:
            continue
        except dns.exception.DNSException as exc:
            problems.append(f"{rdtype}: {_dns_reason(exc)}")
            continue
        found.extend(rdata.to_text() for rdata in answer)
    if not found:
        why = "; ".join(problems) or "no A or AAAA records"
        raise StsFailure("sts-policy-fetch-error", f"no address for {host}: {why}")
    return tuple(found)


@functools.lru_cache(maxsize=8)
def https_context(ca_file: str, _mtime_ns: int) -> ssl.SSLContext:
    """The client context of our HTTPS requests (MTA-STS policies, TLS-RPT reports)."""
    # The same trust as certificate verification under "verify": the system's roots plus the
    # configured extra anchors. The modification time is part of the cache key so that a
    # replaced ca_file is read again. Hostname checking is on (the default).
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


async def _get(
    address: str, host: str, port: int, context: ssl.SSLContext, time_limit: float
) -> str:
    url_host = f"[{address}]" if ":" in address else address
    url = f"https://{url_host}:{port}{WELL_KNOWN_PATH}"
    headers = {
        "Host": host if port == 443 else f"{host}:{port}",
        "User-Agent": "mailrelay (MTA-STS)",
        # A compressed body could expand far beyond the size cap before we could count it.
        "Accept-Encoding": "identity",
    }
    where = f"{host}[{address}]"
    # One client per fetch, never pooled: connections are dialled by address, and a pooled one
    # verified for one domain's name must not carry another domain's request. No proxies from
    # the environment either: the policy host is the one our own resolver found.
    try:
        async with (
            httpx.AsyncClient(
                verify=context, timeout=time_limit, follow_redirects=False, trust_env=False
            ) as client,
            client.stream(
                "GET", url, headers=headers, extensions={"sni_hostname": host}
            ) as response,
        ):
            return await _read_policy(response, where)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise _Unreachable(_connect_failure(exc, where)) from None
    except httpx.TimeoutException:
        raise StsFailure("sts-policy-fetch-error", f"{where}: timed out") from None
    except (httpx.HTTPError, OSError) as exc:
        raise StsFailure(
            "sts-policy-fetch-error", f"{where}: {exc or type(exc).__name__}"
        ) from None


async def _read_policy(response: httpx.Response, where: str) -> str:
    status = response.status_code
    if 300 <= status < 400:
        location = response.headers.get("location", "")
        raise StsFailure(
            "sts-policy-fetch-error",
            f"{where}: HTTP {status} redirect to {location!r} refused (RFC 8461 §3.3)",
        )
    if status != 200:
        raise StsFailure("sts-policy-fetch-error", f"{where}: HTTP status {status}, not 200")
    content_type = response.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "text/plain":
        # §3.2: only text/plain, so that a server hosting user content under that path in
        # another type (HTML, images) cannot be taken for a policy.
        raise StsFailure(
            "sts-policy-invalid", f"{where}: Content-Type {content_type!r}, not text/plain"
        )
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise StsFailure("sts-policy-fetch-error", f"{where}: Content-Encoding {encoding!r}")
    too_big = f"{where}: policy larger than {MAX_POLICY_BYTES} bytes"
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_POLICY_BYTES:
        raise StsFailure("sts-policy-fetch-error", too_big)
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > MAX_POLICY_BYTES:
            raise StsFailure("sts-policy-fetch-error", too_big)
    try:
        # ASCII in practice; extension values may be UTF-8, whatever charset is claimed.
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise StsFailure("sts-policy-invalid", f"{where}: the policy is not UTF-8") from None


def _connect_failure(exc: httpx.HTTPError, where: str) -> StsFailure:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = cause.verify_message or str(cause)
            return StsFailure("sts-webpki-invalid", f"{where}: certificate not valid: {why}")
        if isinstance(cause, ssl.SSLError):
            return StsFailure("sts-policy-fetch-error", f"{where}: TLS handshake failed: {cause}")
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ConnectTimeout):
        return StsFailure("sts-policy-fetch-error", f"{where}: connection timed out")
    return StsFailure("sts-policy-fetch-error", f"{where}: cannot connect: {exc}")


def _dns_reason(exc: dns.exception.DNSException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "SERVFAIL"
    return str(exc) or type(exc).__name__
