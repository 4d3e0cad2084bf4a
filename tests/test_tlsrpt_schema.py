"""RFC 8460 §4.4's report format as a checker the tests hold every report to (the HTTPS collector
of the delivery tests runs it on what it is sent), and the checker itself checked against the
RFC's own example (Appendix B, with erratum 6241's mx-host as a list).

The checker is written from the RFC, not from our code: field names, types, the date-range, the
three policy types, the registered result types (§4.3, IANA "STARTTLS Validation Result Types")
and summary counts that add up.
"""

from __future__ import annotations

import copy
import datetime as dt
import ipaddress
import json
import re
from typing import Any

import pytest

from mailrelay.store import connect, tlsrpt
from mailrelay.tlsrpt import report
from mailrelay.tlsrpt.model import AppliedPolicy, Session

REPORT_FIELDS = {"organization-name", "date-range", "contact-info", "report-id", "policies"}
POLICY_TYPES = {"tlsa", "sts", "no-policy-found"}
RESULT_TYPES = {
    # §4.3.1 negotiation failures
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    # §4.3.2.1 DANE
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    # §4.3.2.2 MTA-STS
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
}
POLICY_FIELDS = {"policy-type", "policy-string", "policy-domain", "mx-host"}
SUMMARY_FIELDS = {"total-successful-session-count", "total-failure-session-count"}
FAILURE_FIELDS = {
    "result-type",
    "sending-mta-ip",
    "receiving-mx-hostname",
    "receiving-mx-helo",
    "receiving-ip",
    "failed-session-count",
    "additional-information",
    "failure-reason-code",
}
# RFC 3339 §5.6 date-time.
DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
HOSTNAME = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}\.?", re.I)

# RFC 8460 Appendix B, as corrected by erratum 6241 (mx-host is a list of patterns).
RFC_EXAMPLE: dict[str, Any] = {
    "organization-name": "Company-X",
    "date-range": {
        "start-datetime": "2016-04-01T00:00:00Z",
        "end-datetime": "2016-04-01T23:59:59Z",
    },
    "contact-info": "sts-reporting@company-x.example",
    "report-id": "5065427c-23d3-47ca-b6e0-946ea0e8c4be",
    "policies": [
        {
            "policy": {
                "policy-type": "sts",
                "policy-string": [
                    "version: STSv1",
                    "mode: testing",
                    "mx: *.mail.company-y.example",
                    "max_age: 86400",
                ],
                "policy-domain": "company-y.example",
                "mx-host": ["*.mail.company-y.example"],
            },
            "summary": {
                "total-successful-session-count": 5326,
                "total-failure-session-count": 303,
            },
            "failure-details": [
                {
                    "result-type": "certificate-expired",
                    "sending-mta-ip": "2001:db8:abcd:0012::1",
                    "receiving-mx-hostname": "mx1.mail.company-y.example",
                    "failed-session-count": 100,
                },
                {
                    "result-type": "starttls-not-supported",
                    "sending-mta-ip": "2001:db8:abcd:0013::1",
                    "receiving-mx-hostname": "mx2.mail.company-y.example",
                    "receiving-ip": "203.0.113.56",
                    "failed-session-count": 200,
                    "additional-information": "https://reports.company-x.example/"
                    "report_info?id=5065427c-23d3#StarttlsNotSupported",
                },
                {
                    "result-type": "validation-failure",
                    "sending-mta-ip": "198.51.100.62",
                    "receiving-ip": "203.0.113.58",
                    "receiving-mx-hostname": "mx-backup.mail.company-y.example",
                    "failed-session-count": 3,
                    "failure-reason-code": "X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED",
                },
            ],
        }
    ],
}


def problems(value: Any) -> list[str]:
    """What makes `value` not an RFC 8460 aggregate report; [] when it is one."""
    found: list[str] = []
    if not isinstance(value, dict):
        return ["the report is not a JSON object"]
    _fields(found, "report", value, REPORT_FIELDS, REPORT_FIELDS)
    for name in ("organization-name", "contact-info", "report-id"):
        if name in value and not _text(value[name]):
            found.append(f"{name} is not a non-empty string")
    date_range = value.get("date-range")
    if isinstance(date_range, dict):
        _fields(found, "date-range", date_range, {"start-datetime", "end-datetime"}, None)
        times = [
            _date_time(found, date_range.get(k), k) for k in ("start-datetime", "end-datetime")
        ]
        if None not in times and not times[0] < times[1]:  # type: ignore[operator]
            found.append("date-range: start-datetime is not before end-datetime")
    elif "date-range" in value:
        found.append("date-range is not an object")
    policies = value.get("policies")
    if not isinstance(policies, list) or not policies:
        found.append("policies is not a non-empty array")
        return found
    for i, entry in enumerate(policies):
        _policy_entry(found, f"policies[{i}]", entry)
    return found


def _policy_entry(found: list[str], where: str, entry: Any) -> None:
    if not isinstance(entry, dict):
        found.append(f"{where} is not an object")
        return
    _fields(found, where, entry, {"policy", "summary"}, {"policy", "summary", "failure-details"})
    policy = entry.get("policy")
    if isinstance(policy, dict):
        _fields(found, f"{where}.policy", policy, {"policy-type", "policy-domain"}, POLICY_FIELDS)
        kind = policy.get("policy-type")
        if kind not in POLICY_TYPES:
            found.append(
                f"{where}.policy.policy-type {kind!r} is not one of {sorted(POLICY_TYPES)}"
            )
        if kind in ("tlsa", "sts") and "policy-string" not in policy:
            found.append(f"{where}.policy: a {kind} policy without policy-string")
        if kind == "sts" and "mx-host" not in policy:
            found.append(f"{where}.policy: an sts policy without mx-host")
        for name in ("policy-string", "mx-host"):
            if name in policy and not _strings(policy[name]):
                found.append(f"{where}.policy.{name} is not an array of strings")
        domain = policy.get("policy-domain")
        if not (isinstance(domain, str) and HOSTNAME.fullmatch(domain) and domain.isascii()):
            found.append(f"{where}.policy.policy-domain {domain!r} is not a domain in A-labels")
    summary = entry.get("summary")
    if isinstance(summary, dict):
        _fields(found, f"{where}.summary", summary, SUMMARY_FIELDS, SUMMARY_FIELDS)
        for name in SUMMARY_FIELDS:
            if name in summary and not _count(summary[name], 0):
                found.append(f"{where}.summary.{name} is not a count")
    details = entry.get("failure-details", [])
    if not isinstance(details, list):
        found.append(f"{where}.failure-details is not an array")
        return
    failed = 0
    for j, detail in enumerate(details):
        failed += _failure(found, f"{where}.failure-details[{j}]", detail)
    total = summary.get("total-failure-session-count") if isinstance(summary, dict) else None
    if _count(total, 0) and failed != total:
        found.append(f"{where}: failed-session-counts add up to {failed}, the summary says {total}")


def _failure(found: list[str], where: str, detail: Any) -> int:
    if not isinstance(detail, dict):
        found.append(f"{where} is not an object")
        return 0
    _fields(found, where, detail, {"result-type", "failed-session-count"}, FAILURE_FIELDS)
    if detail.get("result-type") not in RESULT_TYPES:
        found.append(f"{where}.result-type {detail.get('result-type')!r} is not registered")
    for name in ("sending-mta-ip", "receiving-ip"):
        if name in detail:
            try:
                ipaddress.ip_address(detail[name])
            except ValueError:
                found.append(f"{where}.{name} {detail[name]!r} is not an IP address")
    for name in ("receiving-mx-hostname", "receiving-mx-helo"):
        if name in detail and not (
            isinstance(detail[name], str) and HOSTNAME.fullmatch(detail[name])
        ):
            found.append(f"{where}.{name} {detail[name]!r} is not a host name")
    for name in ("additional-information", "failure-reason-code"):
        if name in detail and not _text(detail[name]):
            found.append(f"{where}.{name} is not a non-empty string")
    count = detail.get("failed-session-count")
    if not _count(count, 1):
        found.append(f"{where}.failed-session-count {count!r} is not a count of at least 1")
        return 0
    assert isinstance(count, int)
    return count


def _fields(
    found: list[str],
    where: str,
    value: dict[str, Any],
    required: set[str],
    allowed: set[str] | None,
) -> None:
    for name in sorted(required - value.keys()):
        found.append(f"{where}: {name} is missing")
    if allowed is not None:
        for name in sorted(value.keys() - allowed):
            found.append(f"{where}: {name} is not a field of the report format")


def _date_time(found: list[str], value: Any, name: str) -> dt.datetime | None:
    if not (isinstance(value, str) and DATE_TIME.fullmatch(value)):
        found.append(f"date-range.{name} {value!r} is not an RFC 3339 date-time")
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) for s in value)


def _count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def report_json_problems(body: bytes) -> list[str]:
    """`problems` of a report as bytes (already gunzipped)."""
    try:
        value = json.loads(body)
    except ValueError as exc:
        return [f"not JSON: {exc}"]
    return problems(value)


# ---- the checker, checked ------------------------------------------------------------------


def test_the_rfc_example_is_a_report() -> None:
    assert problems(RFC_EXAMPLE) == []


def _broken(change: Any) -> dict[str, Any]:
    value = copy.deepcopy(RFC_EXAMPLE)
    change(value)
    return value


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda r: r.pop("report-id"), "report: report-id is missing"),
        (lambda r: r.update(extra=1), "report: extra is not a field of the report format"),
        (
            lambda r: r["date-range"].update({"end-datetime": "2016-04-01 23:59:59"}),
            "date-range.end-datetime '2016-04-01 23:59:59' is not an RFC 3339 date-time",
        ),
        (
            lambda r: r["date-range"].update({"end-datetime": "2016-03-31T00:00:00Z"}),
            "date-range: start-datetime is not before end-datetime",
        ),
        (
            lambda r: r["policies"][0]["policy"].update({"policy-type": "dane"}),
            "policies[0].policy.policy-type 'dane' is not one of"
            " ['no-policy-found', 'sts', 'tlsa']",
        ),
        (
            lambda r: r["policies"][0]["policy"].update({"mx-host": "*.mail.company-y.example"}),
            "policies[0].policy.mx-host is not an array of strings",
        ),
        (
            lambda r: r["policies"][0]["summary"].update({"total-failure-session-count": 302}),
            "policies[0]: failed-session-counts add up to 303, the summary says 302",
        ),
        (
            lambda r: r["policies"][0]["failure-details"][0].update({"result-type": "expired"}),
            "policies[0].failure-details[0].result-type 'expired' is not registered",
        ),
        (
            lambda r: r["policies"][0]["failure-details"][0].update({"sending-mta-ip": "mx1"}),
            "policies[0].failure-details[0].sending-mta-ip 'mx1' is not an IP address",
        ),
        (
            lambda r: r["policies"][0]["failure-details"][2].pop("failed-session-count"),
            "policies[0].failure-details[2]: failed-session-count is missing",
        ),
    ],
)
def test_the_checker_names_what_is_wrong(change: Any, problem: str) -> None:
    assert problem in problems(_broken(change))


# ---- our reports, held to it ---------------------------------------------------------------

DAY = "2024-05-01"
START = report.day_start(DAY)
STS = AppliedPolicy(
    "sts",
    "sts.example",
    ("version: STSv1", "mode: enforce", "mx: mx1.sts.example", "max_age: 86400"),
    ("mx1.sts.example",),
)
TLSA = AppliedPolicy("tlsa", "sts.example", ("3 1 1 0123abcd",))
NONE = AppliedPolicy("no-policy-found", "sts.example")


def test_a_report_built_from_the_store_is_an_rfc_8460_report() -> None:
    conn = connect(":memory:")
    tlsrpt.record_sessions(
        conn,
        [
            Session(START + 10, STS, None, "127.0.0.1", "mx1.sts.example", "127.0.90.1"),
            Session(
                START + 20, STS, "certificate-expired", "127.0.0.1", "mx1.sts.example", "127.0.90.1"
            ),
            Session(START + 30, STS, "sts-policy-fetch-error", failure_reason_code="HTTP 404"),
            Session(START + 40, TLSA, "tlsa-invalid", "127.0.0.1", "mx2.sts.example", "127.0.90.2"),
            Session(START + 50, NONE, "starttls-not-supported", "::1", "mx3.sts.example", "::2"),
            Session(START + 60, NONE, None, "::1", "mx3.sts.example", "::2"),
        ],
    )
    who = report.Identity("Relay", "tlsrpt@relay.test", "relay.test", "x@relay.test", "relay.test")
    built = report.build(
        who, "ABC", "sts.example", DAY, tlsrpt.aggregates(conn, "sts.example", DAY)
    )
    assert problems(json.loads(report.encode(built))) == []
