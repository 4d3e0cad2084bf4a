"""TLS-RPT end to end: a relay with sessions in its store makes the day's report for a domain that
publishes `_smtp._tls`, and delivers it the two ways RFC 8460 §5 describes: as DKIM-signed mail
through its own queue (over TLS, to the rua mailbox's MX in the test world) and by HTTPS POST to
a collector that checks it against the RFC's format. What cannot go properly does not go: no
plaintext for a report mail, no POST without a valid certificate, no unsigned report mail, and
never a bounce about a report.

The sessions are put in the store with `record_sessions`, as the delivery runner does after an
attempt; the report task's passes are run by the test (its once-a-minute loop is stopped, so
that it cannot run a pass of its own in the middle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import email
import email.message
import email.policy
import gzip
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest

from mailrelay import onboarding
from mailrelay.service import InlineDelivery
from mailrelay.store import accounts, connect, tlsrpt
from mailrelay.store.queue import transaction
from mailrelay.tlsrpt import report
from mailrelay.tlsrpt.model import AppliedPolicy, Session
from mailrelay.tlsrpt.reporter import Reporter
from tests.conftest import Relay, RelayFactory, make_config
from tests.test_delivery import delivery_config, final_or_deferred, settled
from tests.test_tlsrpt_schema import report_json_problems
from tests.world import MODERN, NO_STARTTLS, Behaviour, TestCA, World
from tests.world.https import PolicyServer, Reply, Request, serve_collector
from tests.world.mx import MxServer

FIRST_ADDRESS = "127.0.91.1"  # this file's MX servers: 127.0.91.x
COLLECTORS = "127.0.92"  # and its HTTPS collectors: 127.0.92.x
DOMAIN = "sts.example"  # the policy domain reported on
RUA_DOMAIN = "rpt.example"  # where its reports go
MAILBOX = f"tlsrpt@{RUA_DOMAIN}"
COLLECTOR = f"collector.{RUA_DOMAIN}"
STS_LINES = ("version: STSv1", "mode: enforce", "mx: mx1.sts.example", "max_age: 86400")
STS = AppliedPolicy("sts", DOMAIN, STS_LINES, ("mx1.sts.example",))
# The test's "now": 01:00 UTC today. Passes run at this time, whatever the clock says as the
# test goes on, so that a test running over midnight still sees one day as yesterday.
TODAY = tlsrpt.utc_day(time.time())
NOW = report.day_start(TODAY) + 3600.0
YESTERDAY = tlsrpt.utc_day(NOW - 86400)
TLSRPT = {
    "enabled": True,
    "organization_name": "Example Relay B.V.",
    "contact_info": "tlsrpt@example.org",
    "from_address": "noreply-tlsrpt@example.org",
    "send_hour": 0,
}


def collector_reply(request: Request) -> Reply:
    """What a collector that holds reports to RFC 8460 answers: 200, or 400 saying why not."""
    if request.method != "POST":
        return Reply(status=400, body=f"{request.method}: only POST\n")
    if request.headers.get("content-type") != "application/tlsrpt+gzip":
        return Reply(status=400, body=f"Content-Type {request.headers.get('content-type')}\n")
    try:
        body = gzip.decompress(request.body)
    except OSError as exc:
        return Reply(status=400, body=f"not gzip: {exc}\n")
    problems = report_json_problems(body)
    return Reply(status=400, body="; ".join(problems)) if problems else Reply(body="thanks\n")


@dataclasses.dataclass
class Env:
    tmp_path: Path
    world: World
    relay_factory: RelayFactory
    servers: list[PolicyServer] = dataclasses.field(default_factory=list)

    async def rua_mx(self, behaviour: Behaviour = MODERN) -> MxServer:
        return await self.world.add_mx(RUA_DOMAIN, behaviour)

    async def collector(self, host: str = COLLECTOR, **options: Any) -> PolicyServer:
        address = f"{COLLECTORS}.{len(self.servers) + 1}"
        server = await serve_collector(self.world, host, address=address, **options)
        self.servers.append(server)
        return server

    def publish(self, domain: str, *uris: str) -> None:
        self.world.dns.add(f"_smtp._tls.{domain}", "TXT", "v=TLSRPTv1; rua=" + ",".join(uris))

    async def relay(self, **tlsrpt_options: Any) -> Relay:
        cfg = make_config(
            self.tmp_path,
            delivery=delivery_config(self.world),
            tlsrpt={**TLSRPT, **tlsrpt_options},
        )
        conn = connect(cfg.storage.path)
        onboarding.add(conn, cfg, "example.org", "postmaster@example.org")  # makes its DKIM key
        conn.close()
        relay = await self.relay_factory(cfg)
        # The test runs the passes itself: none of the task's own may come in between.
        await the_reporter(relay).stop()
        return relay


@pytest.fixture
async def env(tmp_path: Path, relay_factory: RelayFactory) -> AsyncIterator[Env]:
    async with World(tmp_path / "world", first_address=FIRST_ADDRESS) as world:
        e = Env(tmp_path, world, relay_factory)
        yield e
        for server in e.servers:
            await server.stop()


def the_reporter(relay: Relay) -> Reporter:
    delivery = relay.service.delivery
    assert isinstance(delivery, InlineDelivery)
    return delivery.reporter


def record(relay: Relay, sessions: list[Session]) -> None:
    """What the delivery runner does after an attempt, in one transaction."""
    with contextlib.closing(relay.db()) as conn, transaction(conn):
        tlsrpt.record_sessions(conn, sessions)


def a_days_sessions(day: str) -> list[Session]:
    start = report.day_start(day)
    good = Session(start + 3600, STS, None, "127.0.0.1", "mx1.sts.example", "127.0.93.1")
    expired = dataclasses.replace(
        good,
        result_type="certificate-expired",
        failure_reason_code="certificate has expired (notAfter 2024-04-30 00:00 UTC)",
    )
    fetch = Session(start + 7200, STS, "sts-policy-fetch-error", failure_reason_code="HTTP 404")
    return [good, good, good, expired, expired, fetch]


def count(relay: Relay, method: str, result: str) -> float:
    value = relay.service.metrics.tlsrpt_reports.labels(method=method, result=result)._value.get()
    return float(value)


def deliveries(relay: Relay) -> dict[str, tuple[str, str | None]]:
    [listed] = tlsrpt.list_reports(relay.db())
    return {d["uri"]: (d["state"], d["detail"]) for d in listed["deliveries"]}  # type: ignore[attr-defined]


def dkim_dns(relay: Relay) -> Any:
    """dkimpy's DNS lookup, answered from the store's keys (what `domain records` publishes)."""
    conn = relay.db()
    records = {
        f"{k.selector}._domainkey.example.org.": k.public_record
        for k in accounts.keys(conn, "example.org", active_only=True)
    }

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        value = records.get(name.decode())
        return value.encode() if value is not None else None

    return lookup


async def test_a_days_report_arrives_by_mail_and_by_https_and_validates(env: Env) -> None:
    mx = await env.rua_mx()
    collector = await env.collector(respond=collector_reply)
    env.publish(DOMAIN, f"mailto:{MAILBOX}", f"https://{COLLECTOR}:{collector.port}/v1/tlsrpt")
    # Domains that get no report: no record, and two records (RFC 8460 §3: none then).
    env.world.dns.add("_smtp._tls.two.example", "TXT", f"v=TLSRPTv1; rua=mailto:{MAILBOX}")
    env.world.dns.add("_smtp._tls.two.example", "TXT", f"v=TLSRPTv1; rua=mailto:a@{RUA_DOMAIN}")
    relay = await env.relay()
    day = YESTERDAY
    others = [
        Session(report.day_start(day), AppliedPolicy("no-policy-found", d), None)
        for d in ("plain.example", "two.example")
    ]
    record(relay, a_days_sessions(day) + others)
    record(relay, [Session(NOW, STS, None)])  # today's: not reported before tomorrow

    done = await the_reporter(relay).run_once(NOW)

    [key] = done.reports
    assert (done.queued, done.sent, done.failed, done.retrying) == (1, 1, 0, 0)
    report_id = f"{key}@relay.test"
    start = report.day_start(day)
    expected = {
        "organization-name": "Example Relay B.V.",
        "date-range": {
            "start-datetime": f"{day}T00:00:00Z",
            "end-datetime": f"{day}T23:59:59Z",
        },
        "contact-info": "tlsrpt@example.org",
        "report-id": report_id,
        "policies": [
            {
                "policy": {
                    "policy-type": "sts",
                    "policy-string": list(STS_LINES),
                    "policy-domain": DOMAIN,
                    "mx-host": ["mx1.sts.example"],
                },
                "summary": {
                    "total-successful-session-count": 3,
                    "total-failure-session-count": 3,
                },
                "failure-details": [
                    {
                        "result-type": "certificate-expired",
                        "sending-mta-ip": "127.0.0.1",
                        "receiving-mx-hostname": "mx1.sts.example",
                        "receiving-ip": "127.0.93.1",
                        "failed-session-count": 2,
                        "failure-reason-code": (
                            "certificate has expired (notAfter 2024-04-30 00:00 UTC)"
                        ),
                    },
                    {
                        "result-type": "sts-policy-fetch-error",
                        "failed-session-count": 1,
                        "failure-reason-code": "HTTP 404",
                    },
                ],
            }
        ],
    }

    # By HTTPS: one POST, verified against the world's CA, that the collector took.
    [request] = collector.requests
    assert (request.method, request.path, request.sni) == ("POST", "/v1/tlsrpt", COLLECTOR)
    assert request.headers["content-type"] == "application/tlsrpt+gzip"
    posted = gzip.decompress(request.body)
    assert report_json_problems(posted) == []
    assert json.loads(posted) == expected

    # By mail: from <>, over TLS, DKIM-signed, in RFC 8460 §5.3's shape.
    [message] = await mx.wait_for_messages(1)
    assert (message.mail_from, message.rcpt_tos, message.tls) == ("", (MAILBOX,), True)
    assert not mx.received_message_bytes_before_tls
    assert dkimpy.verify(message.data, dnsfunc=dkim_dns(relay))
    mail = email.message_from_bytes(message.data, policy=email.policy.default)
    assert isinstance(mail, email.message.EmailMessage)
    assert (mail["From"], mail["To"]) == ("noreply-tlsrpt@example.org", MAILBOX)
    assert mail["Subject"] == (
        f"Report Domain: {DOMAIN} Submitter: example.org Report-ID: <{report_id}>"
    )
    assert (mail["TLS-Report-Domain"], mail["TLS-Report-Submitter"]) == (DOMAIN, "example.org")
    assert mail["Message-ID"] == f"<{report_id}>"
    assert mail.get_content_type() == "multipart/report"
    assert mail.get_param("report-type") == "tlsrpt"
    text, attachment = mail.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_filename() == (
        f"example.org!{DOMAIN}!{start}!{start + 86399}!{key}.json.gz"
    )
    mailed = attachment.get_payload(decode=True)
    assert isinstance(mailed, bytes)
    assert gzip.decompress(mailed) == posted  # the same report, byte for byte

    # The report mail is marked, so that delivery never counts its sessions; it is delivered.
    queue_id = relay.db().execute(
        "SELECT message_id FROM tlsrpt_deliveries WHERE method = 'mailto'"
    )
    [(queue_id,)] = queue_id.fetchall()
    assert tlsrpt.is_report_message(relay.db(), queue_id)
    await settled(relay, queue_id, lambda r: r["state"] == "sent")
    later = await the_reporter(relay).run_once(NOW + 60)
    assert (later.reports, later.sent, later.failed) == ([], 1, 0)
    assert deliveries(relay) == {
        f"mailto:{MAILBOX}": ("sent", None),
        f"https://{COLLECTOR}:{collector.port}/v1/tlsrpt": ("sent", None),
    }
    assert [count(relay, m, "sent") for m in ("mailto", "https")] == [1, 1]
    assert [count(relay, m, "failed") for m in ("mailto", "https")] == [0, 0]
    # What stays: the report (for `tlsrpt show`) and today's sessions; no other report.
    assert json.loads(tlsrpt.get_report(relay.db(), key) or "") == expected
    assert tlsrpt.days_with_sessions(relay.db(), "9999-12-31") == [(DOMAIN, TODAY)]
    print(json.dumps(json.loads(posted), indent=2))  # the example in docs/tlsrpt.md


async def test_a_report_mail_gets_no_plaintext_and_no_bounce(env: Env) -> None:
    mx = await env.rua_mx(NO_STARTTLS)
    env.publish(DOMAIN, f"mailto:{MAILBOX}")
    relay = await env.relay()
    record(relay, a_days_sessions(YESTERDAY))

    done = await the_reporter(relay).run_once(NOW)

    assert (len(done.reports), done.queued) == (1, 1)
    [(queue_id,)] = relay.db().execute("SELECT id FROM messages").fetchall()
    msg = await settled(relay, queue_id, final_or_deferred)
    [recipient] = msg["recipients"]
    # Insecure, like any mail to an MX without STARTTLS: it never left in the clear.
    assert (recipient["state"], recipient["status"]) == ("bounced", "5.7.4")
    assert mx.all_messages == [] and not mx.saw_mail_from_without_tls
    # And no bounce about it: the report went from <> with no sending domain to tell.
    # (A DSN would have been queued in the commit that recorded the bounce.)
    assert [r["id"] for r in relay.db().execute("SELECT id FROM messages")] == [queue_id]
    later = await the_reporter(relay).run_once(NOW + 60)
    assert (later.sent, later.failed) == (0, 1)
    assert deliveries(relay) == {f"mailto:{MAILBOX}": ("failed", recipient["reply"])}
    assert count(relay, "mailto", "failed") == 1
    [listed] = tlsrpt.list_reports(relay.db())
    assert listed["state"] == "failed"


async def test_https_needs_a_valid_certificate_and_a_2xx_and_mail_needs_a_dkim_key(
    env: Env,
) -> None:
    refusing = await env.collector(respond=lambda _request: Reply(status=500, body="down\n"))
    untrusted = TestCA("a CA the relay does not trust").issue(["untrusted.rpt.example"])
    stranger = await env.collector("untrusted.rpt.example", respond=collector_reply, cert=untrusted)
    good = await env.collector("good.rpt.example", respond=collector_reply)
    urls = [
        f"https://{COLLECTOR}:{refusing.port}/",
        f"https://untrusted.rpt.example:{stranger.port}/",
        f"https://good.rpt.example:{good.port}/",
    ]
    env.publish(DOMAIN, f"mailto:{MAILBOX}", *urls)
    relay = await env.relay(from_address="noreply-tlsrpt@unsigned.example")
    record(relay, a_days_sessions(YESTERDAY))

    done = await the_reporter(relay).run_once(NOW)

    assert (len(done.reports), done.queued, done.sent, done.failed, done.retrying) == (
        1,
        0,
        1,
        1,
        2,
    )
    state = deliveries(relay)
    assert state[f"mailto:{MAILBOX}"] == (
        "failed",
        "no active DKIM key for unsigned.example (tlsrpt.from_address"
        " noreply-tlsrpt@unsigned.example): RFC 8460 reports by mail must be DKIM-signed;"
        " use an address at one of our domains",
    )
    assert state[urls[0]] == (
        "pending",
        f"{COLLECTOR}[127.0.92.1]:{refusing.port}: HTTP status 500",
    )
    why = state[urls[1]][1] or ""
    assert state[urls[1]][0] == "pending"
    assert why.startswith(
        f"untrusted.rpt.example[127.0.92.2]:{stranger.port}: certificate not valid:"
    )
    assert stranger.requests == []  # nothing was sent to it: the handshake failed first
    assert state[urls[2]] == ("sent", None)
    assert len(good.requests) == 1 and len(refusing.requests) == 1

    # Retried with backoff for a day (RFC 8460 §5.5), then given up.
    soon = await the_reporter(relay).run_once(NOW + 60)
    assert (soon.sent, soon.failed, soon.retrying) == (0, 0, 0)  # not due yet
    late = await the_reporter(relay).run_once(NOW + 86400 + 60)
    assert (late.sent, late.failed, late.retrying) == (0, 2, 0)
    assert len(refusing.requests) == 2
    assert [deliveries(relay)[u][0] for u in urls] == ["failed", "failed", "sent"]
    assert [count(relay, "https", r) for r in ("sent", "failed")] == [1, 2]
    assert count(relay, "mailto", "failed") == 1
    [listed] = tlsrpt.list_reports(relay.db())
    assert listed["state"] == "sent"  # one collector took it
