"""Claims of webhook and TLS-report deliveries by several instances on one PostgreSQL database
(issue 16): two transactions claiming at once never take the same delivery. The recipients'
claims have the same tests in test_store_postgres.py."""

from __future__ import annotations

import time
from collections.abc import Callable

from mailrelay.store import accounts, connect, tlsrpt, webhooks
from mailrelay.store.backend import Connection, begin
from mailrelay.store.queue import transaction
from mailrelay.store.suppressions import Suppression

LEASE = 600.0

Claim = Callable[[Connection, float], list[str]]


def _side_by_side(url: str, claim_first: Claim, claim_second: Claim) -> tuple[list[str], list[str]]:
    """What each of two connections claims while the other's claim is still open."""
    first, second = connect(url), connect(url)
    try:
        # Were the second claim to wait for the first one's locks, fail rather than hang.
        second.execute("SET lock_timeout = '5s'")
        begin(first)
        mine = claim_first(first, time.time())
        begin(second)  # while the first claim is still open
        theirs = claim_second(second, time.time())
        first.execute("COMMIT")
        second.execute("COMMIT")
        begin(first)  # and nothing is left for anyone
        assert claim_first(first, time.time()) == []
        first.execute("COMMIT")
    finally:
        first.close()
        second.close()
    return mine, theirs


def _queue_webhooks(url: str, count: int) -> None:
    conn = connect(url)
    try:
        with transaction(conn):
            accounts.add_domain(conn, "example.org", "postmaster@example.org", 1.0)
            webhooks.add_endpoint(
                conn, "example.org", "https://hooks.example/x", ["suppressed"], 1.0
            )
            for n in range(count):
                entry = Suppression(
                    "example.org", f"u{n}@dest.example", "550 5.1.1 no", "manual", None, 1.0, None
                )
                assert webhooks.enqueue_suppressed(conn, entry, None, 1.0) == 1
    finally:
        conn.close()


def test_two_connections_claiming_webhooks_at_once_never_get_the_same_delivery(
    pg_url: str,
) -> None:
    _queue_webhooks(pg_url, 20)

    def claim(limit: int) -> Claim:
        return lambda conn, now: [d.id for d in webhooks.claim_due(conn, now, LEASE, limit)]

    mine, theirs = _side_by_side(pg_url, claim(8), claim(100))
    assert len(mine) == 8 and len(theirs) == 12
    assert set(mine).isdisjoint(theirs)


def _queue_reports(url: str, count: int) -> None:
    """`count` reports of two deliveries each: the first half due at 1, the rest at 100."""
    conn = connect(url)
    try:
        with transaction(conn):
            for n in range(count):
                tlsrpt.add_report(
                    conn,
                    report_key=f"K{n:03}",
                    report_id=f"K{n:03}@relay.test",
                    domain="sts.example",
                    day=f"2024-05-{n + 1:02}",
                    report_json="{}",
                    destinations=[
                        ("mailto:tlsrpt@rpt.example", "mailto"),
                        ("https://c.rpt.example/", "https"),
                    ],
                    now=1.0 if n < count // 2 else 100.0,
                )
    finally:
        conn.close()


def test_two_connections_claiming_tls_reports_at_once_never_get_the_same_delivery(
    pg_url: str,
) -> None:
    _queue_reports(pg_url, 10)

    def claim_early(conn: Connection, now: float) -> list[str]:
        # tlsrpt.claim_due takes every due delivery: claiming at 50 takes the first half.
        return [f"{d.report_key} {d.uri}" for d in tlsrpt.claim_due(conn, 50.0, LEASE)]

    def claim(conn: Connection, now: float) -> list[str]:
        return [f"{d.report_key} {d.uri}" for d in tlsrpt.claim_due(conn, now, LEASE)]

    mine, theirs = _side_by_side(pg_url, claim_early, claim)
    assert len(mine) == 10 and len(theirs) == 10
    assert set(mine).isdisjoint(theirs)
