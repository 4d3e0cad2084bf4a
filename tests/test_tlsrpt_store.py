"""TLS-RPT in the store: sessions aggregated per policy domain, UTC day, policy and failure (never a
row per session), the report made from a day (exactly the JSON RFC 8460 §4.4 describes), the
deliveries claimed, settled and pruned, and the marker that keeps a report's own sessions out."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from mailrelay.store import connect, tlsrpt
from mailrelay.store.backend import Connection
from mailrelay.store.queue import NewMessage, enqueue, transaction
from mailrelay.tlsrpt import report
from mailrelay.tlsrpt.model import AppliedPolicy, Session

DAY = "2024-05-01"
START = report.day_start(DAY)  # 2024-05-01T00:00:00Z
NEXT = START + 86400
STS_LINES = ("version: STSv1", "mode: enforce", "mx: mx1.sts.example", "max_age: 86400")
STS = AppliedPolicy("sts", "sts.example", STS_LINES, ("mx1.sts.example",))
TLSA = AppliedPolicy("tlsa", "sts.example", ("3 1 1 0123abcd", "2 0 1 4567ef01"))
NONE = AppliedPolicy("no-policy-found", "plain.example")
WHO = report.Identity(
    organization_name="Example Relay B.V.",
    contact_info="tlsrpt@example.org",
    submitter="example.org",
    from_address="noreply-tlsrpt@example.org",
    hostname="relay.test",
)


@pytest.fixture
def conn(database: str) -> Iterator[Connection]:
    """On each backend (SQLite and PostgreSQL, tests/conftest.py `database`)."""
    db = connect(database)
    yield db
    db.close()


def ok(at: float, policy: AppliedPolicy = STS) -> Session:
    return Session(at, policy, None, "127.0.0.1", "mx1.sts.example", "127.0.90.1")


def expired(at: float, receiving_ip: str = "127.0.90.1", reason: str | None = None) -> Session:
    return Session(
        at, STS, "certificate-expired", "127.0.0.1", "mx1.sts.example", receiving_ip, reason
    )


def rows(conn: Connection, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608


def test_a_thousand_sessions_are_one_policy_row_and_one_row_per_distinct_failure(
    conn: Connection,
) -> None:
    sessions = [ok(START + i) for i in range(600)]
    sessions += [expired(START + i, f"127.0.90.{1 + i % 2}") for i in range(400)]
    with transaction(conn):
        tlsrpt.record_sessions(conn, sessions[:500])
    with transaction(conn):
        tlsrpt.record_sessions(conn, sessions[500:])

    assert (rows(conn, "tlsrpt_policies"), rows(conn, "tlsrpt_failures")) == (1, 2)
    [policy] = tlsrpt.aggregates(conn, "sts.example", DAY)
    assert (policy.successful, policy.failed) == (600, 400)
    assert [(f.receiving_ip, f.sessions) for f in policy.failures] == [
        ("127.0.90.1", 200),
        ("127.0.90.2", 200),
    ]


def test_sessions_are_filed_under_their_utc_day_domain_and_policy(conn: Connection) -> None:
    tlsrpt.record_sessions(
        conn,
        [
            ok(NEXT - 1),  # 23:59:59Z on the 1st
            ok(NEXT),  # 00:00:00Z on the 2nd
            ok(START, TLSA),
            ok(START, AppliedPolicy("sts", "STS.Example.", STS_LINES, ("mx1.sts.example",))),
            ok(START, NONE),
        ],
    )
    assert tlsrpt.days_with_sessions(conn, "2024-05-03") == [
        ("plain.example", DAY),
        ("sts.example", DAY),
        ("sts.example", "2024-05-02"),
    ]
    assert tlsrpt.days_with_sessions(conn, "2024-05-02") == [
        ("plain.example", DAY),
        ("sts.example", DAY),
    ]
    assert [(p.policy_type, p.successful) for p in tlsrpt.aggregates(conn, "sts.example", DAY)] == [
        ("sts", 2),
        ("tlsa", 1),
    ]


def test_a_failure_keeps_its_latest_reason_and_an_unknown_type_is_a_validation_failure(
    conn: Connection,
) -> None:
    tlsrpt.record_sessions(conn, [expired(START, reason="notAfter 2024-04-30")])
    tlsrpt.record_sessions(conn, [expired(START + 1), expired(START + 2, reason="still expired")])
    tlsrpt.record_sessions(conn, [Session(START, STS, "something-new", "127.0.0.1")])
    [policy] = tlsrpt.aggregates(conn, "sts.example", DAY)
    assert [(f.result_type, f.sessions, f.reason) for f in policy.failures] == [
        ("certificate-expired", 3, "still expired"),
        ("validation-failure", 1, None),
    ]
    assert policy.failed == 4


def test_the_report_of_a_day(conn: Connection) -> None:
    tlsrpt.record_sessions(
        conn,
        [
            ok(START + 1),
            ok(START + 2),
            expired(START + 3, reason="certificate has expired"),
            Session(START + 4, STS, "sts-policy-fetch-error", failure_reason_code="HTTP 404"),
            Session(START + 5, TLSA, "tlsa-invalid", "127.0.0.1", "mx2.sts.example", "127.0.90.2"),
            ok(NEXT + 5),  # the next day: not in this report
        ],
    )
    policies = tlsrpt.aggregates(conn, "sts.example", DAY)
    assert report.build(WHO, "0A1B2C3D4E5F6A7B", "sts.example", DAY, policies) == {
        "organization-name": "Example Relay B.V.",
        "date-range": {
            "start-datetime": "2024-05-01T00:00:00Z",
            "end-datetime": "2024-05-01T23:59:59Z",
        },
        "contact-info": "tlsrpt@example.org",
        "report-id": "0A1B2C3D4E5F6A7B@relay.test",
        "policies": [
            {
                "policy": {
                    "policy-type": "sts",
                    "policy-string": list(STS_LINES),
                    "policy-domain": "sts.example",
                    "mx-host": ["mx1.sts.example"],
                },
                "summary": {
                    "total-successful-session-count": 2,
                    "total-failure-session-count": 2,
                },
                "failure-details": [
                    {
                        "result-type": "certificate-expired",
                        "sending-mta-ip": "127.0.0.1",
                        "receiving-mx-hostname": "mx1.sts.example",
                        "receiving-ip": "127.0.90.1",
                        "failed-session-count": 1,
                        "failure-reason-code": "certificate has expired",
                    },
                    {
                        "result-type": "sts-policy-fetch-error",
                        "failed-session-count": 1,
                        "failure-reason-code": "HTTP 404",
                    },
                ],
            },
            {
                "policy": {
                    "policy-type": "tlsa",
                    "policy-string": ["3 1 1 0123abcd", "2 0 1 4567ef01"],
                    "policy-domain": "sts.example",
                },
                "summary": {
                    "total-successful-session-count": 0,
                    "total-failure-session-count": 1,
                },
                "failure-details": [
                    {
                        "result-type": "tlsa-invalid",
                        "sending-mta-ip": "127.0.0.1",
                        "receiving-mx-hostname": "mx2.sts.example",
                        "receiving-ip": "127.0.90.2",
                        "failed-session-count": 1,
                    }
                ],
            },
        ],
    }
    assert report.filename(WHO, "0A1B2C3D4E5F6A7B", "sts.example", DAY) == (
        f"example.org!sts.example!{START}!{NEXT - 1}!0A1B2C3D4E5F6A7B.json.gz"
    )


def add_report(conn: Connection, key: str = "AAAA", day: str = DAY) -> None:
    tlsrpt.add_report(
        conn,
        report_key=key,
        report_id=f"{key}@relay.test",
        domain="sts.example",
        day=day,
        report_json='{"report-id":"' + key + '@relay.test"}',
        destinations=[("mailto:tlsrpt@rpt.example", "mailto"), ("https://c.rpt.example/", "https")],
        now=START + 86400 + 7200,
    )


def test_a_report_takes_its_day_out_of_the_aggregates(conn: Connection) -> None:
    tlsrpt.record_sessions(conn, [expired(START), ok(NEXT)])
    add_report(conn)
    assert tlsrpt.days_with_sessions(conn, "2024-05-03") == [("sts.example", "2024-05-02")]
    assert rows(conn, "tlsrpt_failures") == 0  # they went with their policy row
    assert tlsrpt.has_report(conn, "sts.example", DAY)
    assert tlsrpt.get_report(conn, "aaaa") == tlsrpt.get_report(conn, "AAAA@relay.test")
    assert json.loads(tlsrpt.get_report(conn, "AAAA") or "") == {"report-id": "AAAA@relay.test"}
    assert tlsrpt.get_report(conn, "BBBB") is None


def test_deliveries_are_claimed_once_until_the_lease_runs_out(conn: Connection) -> None:
    add_report(conn)
    now = START + 100000
    first = tlsrpt.claim_due(conn, now, lease=600)
    assert [(d.uri, d.method, d.attempts, d.first_attempt_at) for d in first] == [
        ("https://c.rpt.example/", "https", 1, now),
        ("mailto:tlsrpt@rpt.example", "mailto", 1, now),
    ]
    assert tlsrpt.claim_due(conn, now + 599, lease=600) == []
    again = tlsrpt.claim_due(conn, now + 600, lease=600)  # the first claimant died
    assert sorted((d.uri, d.attempts, d.first_attempt_at) for d in again) == [
        ("https://c.rpt.example/", 2, now),
        ("mailto:tlsrpt@rpt.example", 2, now),
    ]
    tlsrpt.finish(conn, "AAAA", "https://c.rpt.example/", "sent", now + 601)
    tlsrpt.finish(
        conn, "AAAA", "mailto:tlsrpt@rpt.example", "pending", now + 601, next_attempt_at=now + 900
    )
    assert tlsrpt.claim_due(conn, now + 899, lease=600) == []
    assert [d.uri for d in tlsrpt.claim_due(conn, now + 900, lease=600)] == [
        "mailto:tlsrpt@rpt.example"
    ]


def queue_report_mail(conn: Connection, key: str) -> str:
    message = NewMessage(
        "", ("tlsrpt@rpt.example",), b"From: x@example.org\r\n\r\n", None, None, None
    )
    message_id = enqueue(conn, message, START)
    tlsrpt.mark_report_message(conn, message_id)
    tlsrpt.finish(conn, key, "mailto:tlsrpt@rpt.example", "queued", START, message_id=message_id)
    return message_id


def test_mailed_reports_settle_when_their_message_does(conn: Connection) -> None:
    add_report(conn, "AAAA")
    add_report(conn, "BBBB", "2024-04-30")
    add_report(conn, "CCCC", "2024-04-29")
    sent, bounced, deleted = (queue_report_mail(conn, k) for k in ("AAAA", "BBBB", "CCCC"))
    assert tlsrpt.settle_queued(conn, START) == []  # all three still queued

    conn.execute("UPDATE recipients SET state = 'sent' WHERE message_id = ?", (sent,))
    conn.execute(
        "UPDATE recipients SET state = 'bounced', reply = '5.7.4 no STARTTLS' WHERE message_id = ?",
        (bounced,),
    )
    conn.execute("DELETE FROM messages WHERE id = ?", (deleted,))
    outcomes = tlsrpt.settle_queued(conn, START + 60)
    assert sorted((o.report_key, o.state, o.detail) for o in outcomes) == [
        ("AAAA", "sent", None),
        ("BBBB", "failed", "5.7.4 no STARTTLS"),
        ("CCCC", "failed", "removed from the queue"),
    ]
    assert tlsrpt.settle_queued(conn, START + 120) == []
    states = {r["id"]: r["state"] for r in tlsrpt.list_reports(conn)}
    # The https destinations are still pending, so every report is.
    assert states == {"AAAA": "pending", "BBBB": "pending", "CCCC": "pending"}
    for key, state in (("AAAA", "failed"), ("BBBB", "failed"), ("CCCC", "sent")):
        tlsrpt.finish(conn, key, "https://c.rpt.example/", state, START + 180)  # type: ignore[arg-type]
    listed = tlsrpt.list_reports(conn)
    # Sent as soon as one destination took it (RFC 8460 §3); newest day first.
    assert [(r["id"], r["state"]) for r in listed] == [
        ("AAAA", "sent"),
        ("BBBB", "failed"),
        ("CCCC", "sent"),
    ]


def test_only_report_messages_are_marked(conn: Connection) -> None:
    add_report(conn)
    report_mail = queue_report_mail(conn, "AAAA")
    other = enqueue(
        conn, NewMessage("a@example.org", ("b@x.example",), b"", "a@example.org", None, None), START
    )
    assert tlsrpt.is_report_message(conn, report_mail)
    assert not tlsrpt.is_report_message(conn, other)
    assert not tlsrpt.is_report_message(conn, "NO-SUCH-ID")


def test_prune_keeps_what_is_still_under_way(conn: Connection) -> None:
    add_report(conn, "OLD", "2024-03-01")
    add_report(conn, "BUSY", "2024-03-02")
    add_report(conn, "NEW", "2024-04-20")
    for uri in ("mailto:tlsrpt@rpt.example", "https://c.rpt.example/"):
        tlsrpt.finish(conn, "OLD", uri, "sent", START)
    tlsrpt.record_sessions(conn, [ok(START - 5 * 86400), ok(START)])
    tlsrpt.prune(conn, reports_before_day="2024-04-01", aggregates_before_day="2024-04-28")
    assert [r["id"] for r in tlsrpt.list_reports(conn)] == ["NEW", "BUSY"]
    assert tlsrpt.days_with_sessions(conn, "2024-05-02") == [("sts.example", DAY)]


def test_a_malformed_session_is_dropped_not_the_commit(conn: Connection) -> None:
    # record_sessions runs in the delivery runner's commit: it must not fail it.
    tlsrpt.record_sessions(conn, [Session(float("nan"), STS, None), ok(START)])
    [policy] = tlsrpt.aggregates(conn, "sts.example", DAY)
    assert (policy.successful, policy.failed) == (1, 0)


def test_policy_domains_are_kept_in_a_labels(conn: Connection) -> None:
    tlsrpt.record_sessions(conn, [ok(START, AppliedPolicy("no-policy-found", "Bücher.Example."))])
    assert tlsrpt.days_with_sessions(conn, "2024-05-02") == [("xn--bcher-kva.example", DAY)]
