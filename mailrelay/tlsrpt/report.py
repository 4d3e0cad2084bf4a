"""The aggregate report itself (RFC 8460 §4): one policy domain's UTC day as JSON, with the
report id, the §5.1 file name and the gzip form both transports carry."""

from __future__ import annotations

import calendar
import gzip
import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mailrelay.config import Config
from mailrelay.store.tlsrpt import FailureAggregate, PolicyAggregate

DAY_SECONDS = 86400
_HOSTNAME = re.compile(r"([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class Identity:
    """Who the reports are from: the names in the report, in the mail, and in the file name."""

    organization_name: str
    contact_info: str
    # §5.3: TLS-Report-Submitter "MUST match the value found in the domain of the contact-info";
    # the file name's "sender" (§5.1) is the same domain.
    submitter: str
    from_address: str
    hostname: str  # the right-hand side of every report-id


def identity(config: Config) -> Identity:
    """The [tlsrpt] names with the empty ones derived: organization the hostname, contact
    postmaster@hostname, From: noreply-tlsrpt@ the contact's domain."""
    t = config.tlsrpt
    hostname = config.hostname.lower().rstrip(".")
    contact = t.contact_info or f"postmaster@{hostname}"
    local, at, domain = contact.rpartition("@")
    domain = domain.lower().rstrip(".")
    # The submitter goes into a header and a file name: a host name in A-labels, or ours.
    submitter = domain if local and at and _HOSTNAME.fullmatch(domain) else hostname
    return Identity(
        organization_name=t.organization_name or hostname,
        contact_info=contact,
        submitter=submitter,
        from_address=t.from_address or f"noreply-tlsrpt@{submitter}",
        hostname=hostname,
    )


def new_report_key() -> str:
    # As queue ids: 64 random bits, letters and digits only (§5.1's unique-id is 1*(ALPHA/DIGIT)).
    return secrets.token_hex(8).upper()


def report_id(key: str, who: Identity) -> str:
    """id@hostname: a msg-id's shape, which the §5.3 Subject wants for Report-ID."""
    return f"{key}@{who.hostname}"


def day_start(day: str) -> int:
    """Unix time of 00:00:00 UTC on `day` (YYYY-MM-DD)."""
    return calendar.timegm(time.strptime(day, "%Y-%m-%d"))


def date_range(day: str) -> dict[str, str]:
    """§4.1: the report covers the whole UTC day; the RFC's example ends it at 23:59:59Z."""
    start = day_start(day)
    return {
        "start-datetime": _datetime(start),
        "end-datetime": _datetime(start + DAY_SECONDS - 1),
    }


def _datetime(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))  # RFC 3339 date-time in UTC


def build(
    who: Identity, key: str, domain: str, day: str, policies: Sequence[PolicyAggregate]
) -> dict[str, object]:
    """The §4.4 report object for `domain`'s `day`."""
    return {
        "organization-name": who.organization_name,
        "date-range": date_range(day),
        "contact-info": who.contact_info,
        "report-id": report_id(key, who),
        "policies": [_policy(domain, p) for p in policies],
    }


def _policy(domain: str, p: PolicyAggregate) -> dict[str, object]:
    policy: dict[str, object] = {"policy-type": p.policy_type}
    if p.strings:
        policy["policy-string"] = list(p.strings)
    policy["policy-domain"] = domain
    if p.mx_hosts:
        policy["mx-host"] = list(p.mx_hosts)
    return {
        "policy": policy,
        "summary": {
            "total-successful-session-count": p.successful,
            "total-failure-session-count": p.failed,
        },
        "failure-details": [_failure(f) for f in p.failures],
    }


def _failure(f: FailureAggregate) -> dict[str, object]:
    # Fields we do not know (no connection was made: a policy fetch failed) are left out
    # rather than sent empty.
    detail: dict[str, object] = {"result-type": f.result_type}
    if f.sending_ip:
        detail["sending-mta-ip"] = f.sending_ip
    if f.receiving_mx:
        detail["receiving-mx-hostname"] = f.receiving_mx
    if f.receiving_ip:
        detail["receiving-ip"] = f.receiving_ip
    detail["failed-session-count"] = f.sessions
    if f.reason:
        detail["failure-reason-code"] = f.reason
    return detail


def encode(report: dict[str, object]) -> str:
    """The JSON as sent and stored: compact, keys in the order the RFC lists them."""
    return json.dumps(report, separators=(",", ":"), ensure_ascii=True)


def compress(report_json: str) -> bytes:
    # mtime=0: the same report always compresses to the same bytes.
    return gzip.compress(report_json.encode("ascii"), mtime=0)


def filename(who: Identity, key: str, domain: str, day: str) -> str:
    """§5.1: sender "!" policy-domain "!" begin-timestamp "!" end-timestamp "!" unique-id
    ".json.gz"; the timestamps are those of the report's date-range."""
    start = day_start(day)
    return f"{who.submitter}!{domain}!{start}!{start + DAY_SECONDS - 1}!{key}.json.gz"
