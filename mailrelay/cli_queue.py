"""The `mailrelay queue`, `log` and `tls-check` commands: what is queued, what happened, and why."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from mailrelay.cli_output import UserError, open_existing_db, print_json, safe, when
from mailrelay.config import Config
from mailrelay.store import connect, events, queue
from mailrelay.store.backend import is_url
from mailrelay.store.queue import transaction

# ---- queue -----------------------------------------------------------------------------------


def queue_list(cfg: Config, args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    # The JSON keeps to address and state per recipient (scripts read it), and for an active
    # one which instance holds it (claimed_by, lease_until); `queue show --json` has everything.
    rows = queue.list_queue(
        open_existing_db(cfg), limit=args.limit + 1, after=args.cursor, detail=not args.json
    )
    more = len(rows) > args.limit
    rows = rows[: args.limit]
    if more:
        # On stderr, as `log` does, so that stdout stays exactly the listing (or its JSON).
        print(f"more: --cursor {rows[-1]['id']}", file=sys.stderr)
    if args.json:
        print_json(rows)
        return 0
    for m in rows:
        sender = m["sender"] or "<>"
        print(f"{m['id']}  {m['size']:>9}  {when(float(str(m['created_at'])))}  {sender}")
        for r in m["recipients"]:  # type: ignore[attr-defined]
            print(f"    {r['state']:<9} {safe(r['address'])}{_pending(r)}")
    if not rows:
        print("queue is empty")
    return 0


def _pending(r: dict[str, Any]) -> str:
    """When a recipient goes next, and why the last attempt did not finish it."""
    if r["state"] in ("queued", "deferred"):
        text = f", next {when(r['next_attempt_at'])}"
    elif r["state"] == "active":
        text = ", being delivered"
        if r["claimed_by"] is not None:
            text += f" by {safe(r['claimed_by'])}"
            if r["lease_until"] is not None:
                text += f" (lease until {when(r['lease_until'])})"
    else:
        text = ""
    if r["attempts"]:
        text += f", attempts {r['attempts']}"
    if r["reply"] and r["state"] != "sent":
        text += f" ({safe(r['reply'])})"
    return text


def queue_show(cfg: Config, args: argparse.Namespace) -> int:
    msg = events.story(open_existing_db(cfg), args.id)
    if msg is None:
        raise UserError(f"no message or refusal with id {args.id}")
    if args.json:
        print_json(msg)
        return 0
    if "sender" not in msg:
        gone = "was deleted from the queue" if msg["removed"] else "was never accepted"
        print(f"message {msg['id']} {gone}; what the events record:")
    else:
        print(f"message {msg['id']} from {msg['sender'] or '<>'} ({msg['size']} bytes)")
        print(f"  accepted {when(msg['created_at'])} from user {msg['auth_user'] or '-'}")
    for r in msg["recipients"] + msg["refused"]:
        if "state" in r:
            due = f", next {when(r['next_attempt_at'])}" if r["state"] == "deferred" else ""
            print(f"  {safe(r['address'])}: {r['state']} after {r['attempts']} attempt(s){due}")
        else:
            print(f"  {safe(r['address'])}:")
        for e in r["events"]:
            print(f"    {when(e['at'])} {e['event']}{_event_detail(e)}")
        for a in r.get("delivery_attempts", []):
            print(f"    attempt {when(a['at'])} {_attempt_detail(a)}")
    return 0


def _attempt_detail(a: dict[str, Any]) -> str:
    """One MX connection of an attempt, with the evidence `--json` has: the certificate the MX
    showed and the policy that accepted or refused it."""
    tls = "/".join(a[k] for k in ("tls_protocol", "tls_cipher") if a[k]) or "none"
    text = f"{a['mx_host']}[{a['mx_address']}] {a['verdict']}, tls={tls}"
    if a["cert_fingerprint"]:
        trust = {True: "verified", False: "unverified", None: "?"}[a["cert_verified"]]
        text += f", cert=sha256:{a['cert_fingerprint']} ({trust})"
    if a["policy"]:
        how = f" [{safe(a['policy_detail'])}]" if a["policy_detail"] else ""
        text += f", policy={a['policy']}{how}"
    return text + (f" ({safe(a['reply'])})" if a["reply"] else "")


def _event_detail(e: dict[str, Any]) -> str:
    tls = "/".join(e[k] for k in ("tls_protocol", "tls_cipher") if e[k])
    detail = (f", mx={e['mx']}" if e["mx"] else "") + (f", tls={tls}" if tls else "")
    if e.get("policy"):
        # The evidence of how the session was authenticated: dane-ee with the TLSA record,
        # mta-sts with the policy id, verify, or encrypt.
        how = f" [{safe(e['policy_detail'])}]" if e.get("policy_detail") else ""
        detail += f", policy={e['policy']}{how}"
    return detail + (f" ({safe(e['reply'])})" if e["reply"] else "")


def queue_retry(cfg: Config, args: argparse.Namespace) -> int:
    conn = open_existing_db(cfg)
    with transaction(conn):
        n = queue.retry(conn, None if args.all else args.id, time.time())
    if n == 0 and not args.all:
        raise UserError(f"no queued recipients for message {args.id}")
    print(f"{n} recipient(s) due now")
    return 0


def queue_delete(cfg: Config, args: argparse.Namespace) -> int:
    conn = open_existing_db(cfg)
    with transaction(conn):
        deleted = queue.delete(conn, args.id)
    if not deleted:
        raise UserError(f"no message {args.id}")
    print(f"message {args.id.upper()} deleted")
    return 0


# ---- log -------------------------------------------------------------------------------------


def log(cfg: Config, args: argparse.Namespace) -> int:
    try:
        since = None if args.since is None else events.parse_since(args.since)
        page = events.query(
            open_existing_db(cfg),
            domain=args.domain,
            since=since,
            status=args.status,
            cursor=args.cursor,
            limit=args.limit,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if args.json:
        print_json(page.to_json())
        return 0
    for e in page.events:
        print(
            f"{when(e['at'])} {e['queue_id']}: to=<{safe(e['recipient'])}>, {e['event']}"
            + _event_detail(e)
        )
    if page.next_cursor is not None:
        print(f"more: --cursor {page.next_cursor}", file=sys.stderr)
    return 0


# ---- tls-check -------------------------------------------------------------------------------


def tls_check(cfg: Config, args: argparse.Namespace) -> int:
    from mailrelay.delivery import probe  # only this command needs the TLS client
    from mailrelay.delivery.mta_sts import ConnectionStsCache

    # The service's MTA-STS cache where there is one (a policy it holds is the one it applies,
    # and what is fetched here serves it too); a throw-away one before the first start.
    path = cfg.storage.database
    conn = connect(path if is_url(path) or Path(path).exists() else ":memory:")
    try:
        report = asyncio.run(probe.tls_check(cfg, args.domain, ConnectionStsCache(conn)))
    finally:
        conn.close()
    if args.json:
        print_json(report.to_json())
        return 0 if report.verdict == "secure" else 1
    print(
        f"{report.domain}: {report.verdict.upper()} ({report.detail})"
        f" [security_level={report.security_level} cipher_profile={report.cipher_profile}]"
    )
    sts = report.mta_sts
    if sts is not None and (sts.mode or sts.error):
        if sts.mode:
            print(
                f"  MTA-STS: mode {sts.mode}, id {sts.policy_id}, mx {', '.join(sts.mx)},"
                f" max_age {sts.max_age}, {sts.source}"
            )
        if sts.error:
            print(f"  MTA-STS {sts.error}: {safe(sts.detail)}")
    elif sts is not None:
        print("  MTA-STS: no policy")
    for m in report.mx:
        starttls = {True: "yes", False: "no", None: "?"}[m.starttls]
        print(f"  MX {m.preference} {m.host} [{m.address}]: {m.verdict} ({m.status})")
        print(f"      DNSSEC {'yes' if m.dnssec else 'no'}; TLSA {m.tlsa}: {safe(m.tlsa_detail)}")
        for record in m.tlsa_records:
            print(f"        TLSA {record}")
        print(f"      STARTTLS {starttls}; {m.protocol or '-'} {m.cipher or ''}".rstrip())
        if m.certificate_subject:
            verified = {True: "verified", False: "not verified", None: "?"}
            print(
                f"      certificate {m.certificate_subject}, issuer {m.certificate_issuer},"
                f" valid {m.certificate_not_before} to {m.certificate_not_after},"
                f" {verified[m.certificate_verified]}"
            )
        if m.policy:
            print(
                f"      policy {m.policy}{': ' + safe(m.policy_detail) if m.policy_detail else ''}"
            )
        print(f"      {safe(m.detail)}")
    return 0 if report.verdict == "secure" else 1
