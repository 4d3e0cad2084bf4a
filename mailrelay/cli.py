"""The `mailrelay` command: parses arguments, calls into the package, prints, sets exit codes.

This is the only module that exits. User errors print one line to stderr and exit 1 (2 for a
usage error, as argparse does); they never show a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mailrelay import config as configmod
from mailrelay import logs, onboarding
from mailrelay.config import Config, ConfigError
from mailrelay.store import accounts, connect, events, queue, senders
from mailrelay.store.queue import transaction
from mailrelay.submission.auth import hash_password
from mailrelay.submission.handler import split_address


class UserError(Exception):
    """A mistake the operator can fix; printed as one line, exit status 1."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        path = args.config or os.environ.get("MAILRELAY_CONFIG")
        cfg = configmod.load(path)
        status = args.func(cfg, args)
    except (
        UserError,
        ConfigError,
        accounts.NotFound,
        accounts.AlreadyExists,
        accounts.KeyInUse,
    ) as exc:
        print(f"mailrelay: {exc}", file=sys.stderr)
        sys.exit(1)
    except sqlite3.Error as exc:
        print(f"mailrelay: database error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(status or 0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailrelay", description=__doc__.splitlines()[0])
    p.add_argument("--config", metavar="PATH", help="TOML file (default: $MAILRELAY_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(
        parent: Any, name: str, func: Callable[[Config, argparse.Namespace], int | None], h: str
    ) -> argparse.ArgumentParser:
        one: argparse.ArgumentParser = parent.add_parser(name, help=h, description=h)
        one.set_defaults(func=func)
        return one

    cmd(sub, "serve", _serve, "run the service")
    cmd(sub, "check-config", _check_config, "validate the configuration and print it")

    user = sub.add_parser("user", help="submission users").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    one = cmd(user, "add", _user_add, "add a user (its domain must exist)")
    one.add_argument("address")
    one.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    _may_send_as(one)
    one = cmd(user, "modify", _user_modify, "change what a user may send as")
    one.add_argument("address")
    _may_send_as(one)
    one.add_argument(
        "--may-not-send-as",
        action="append",
        default=[],
        metavar="ADDRESS|@DOMAIN",
        help="take back a --may-send-as (repeatable)",
    )
    _json(cmd(user, "list", _user_list, "list users and what each may send as"))
    one = cmd(user, "passwd", _user_passwd, "set a user's password")
    one.add_argument("address")
    one.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    cmd(user, "delete", _user_delete, "delete a user").add_argument("address")

    dom = sub.add_parser("domain", help="sending domains").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    one = _json(cmd(dom, "add", _domain_add, "add a domain and make its DKIM key"))
    one.add_argument("domain")
    one.add_argument("--notify", required=True, metavar="ADDRESS", help="gets bounce copies")
    _json(cmd(dom, "records", _domain_records, "DNS records to publish")).add_argument("domain")
    _json(cmd(dom, "check", _domain_check, "check the published records")).add_argument("domain")
    _json(cmd(dom, "rotate-dkim", _domain_rotate, "sign with a new DKIM key")).add_argument(
        "domain"
    )
    one = _json(cmd(dom, "retire-dkim", _domain_retire, "stop listing a rotated-out DKIM key"))
    one.add_argument("domain")
    one.add_argument("selector")
    _json(cmd(dom, "list", _domain_list, "list domains"))
    _json(cmd(sub, "tls-check", _tls_check, "probe every MX of a domain")).add_argument("domain")

    q = sub.add_parser("queue", help="the delivery queue").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    one = _json(cmd(q, "list", _queue_list, "messages not yet delivered or bounced"))
    one.add_argument("--limit", metavar="N", type=int, default=100, help="messages per page")
    one.add_argument("--cursor", metavar="C", help="the id printed after 'more:' last time")
    _json(cmd(q, "show", _queue_show, "one message with its recipients")).add_argument("id")
    one = cmd(q, "retry", _queue_retry, "make deferred recipients due now")
    group = one.add_mutually_exclusive_group(required=True)
    group.add_argument("id", nargs="?")
    group.add_argument("--all", action="store_true")
    cmd(q, "delete", _queue_delete, "remove a message from the queue").add_argument("id")

    one = _json(cmd(sub, "log", _log, "recipients' events, newest first"))
    one.add_argument("--domain", help="recipient domain")
    one.add_argument("--since", metavar="T", help="ISO 8601 time (local unless zoned), or 1h, 2d")
    one.add_argument("--status", metavar="S", help=f"one of {', '.join(events.EVENTS)}")
    one.add_argument("--cursor", metavar="C", help="next_cursor of the previous page")
    one.add_argument("--limit", metavar="N", type=int, default=50, help="events per page")
    return p


def _may_send_as(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--may-send-as",
        action="append",
        default=[],
        metavar="ADDRESS|@DOMAIN",
        help="also send as this address, or as any address of this domain of ours (repeatable);"
        " a user may always send as their own address",
    )


def _json(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _db(cfg: Config) -> sqlite3.Connection:
    try:
        return connect(cfg.storage.path)
    except (OSError, sqlite3.Error) as exc:
        raise UserError(f"cannot open database {cfg.storage.path}: {exc}") from exc


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, default=str))


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# ---- service ---------------------------------------------------------------------------------


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    import uvloop  # the service's event loop; the library code runs on any asyncio loop

    from mailrelay.instance import AlreadyRunning
    from mailrelay.service import ServiceFailed, serve  # the other commands need none of it
    from mailrelay.submission.tls import CertificateError

    logs.setup(cfg.log)
    try:
        uvloop.run(serve(cfg, on_started=_print_started))
    except (CertificateError, AlreadyRunning, ServiceFailed) as exc:
        raise UserError(str(exc)) from exc
    except OSError as exc:
        raise UserError(f"cannot start: {exc}") from exc
    return 0


def _print_started(service: Any) -> None:
    cfg: Config = service.config
    lines = [
        f"mailrelay is listening for submission on {', '.join(map(str, cfg.submission.listen))}"
    ]
    if cfg.submission.implicit_tls_listen:
        lines.append(f"  implicit TLS on {', '.join(map(str, cfg.submission.implicit_tls_listen))}")
    if cfg.metrics.listen:
        lines.append(f"  metrics on http://{cfg.metrics.listen}/metrics")
    if cfg.submission.listen:
        first = cfg.submission.listen[0]
        conf = (
            f" --config {sys.argv[sys.argv.index('--config') + 1]}"
            if "--config" in sys.argv
            else ""
        )
        lines += [
            "Add a domain and a user, then send a first message:",
            f"  .venv/bin/mailrelay{conf} domain add example.org --notify postmaster@example.org",
            f"  .venv/bin/mailrelay{conf} user add alice@example.org",
            f"  swaks --server {first.host}:{first.port} -tls --auth-user alice@example.org \\",
            "        --from alice@example.org --to bob@example.net",
        ]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _check_config(cfg: Config, args: argparse.Namespace) -> int:
    print(f"configuration ok: hostname={cfg.hostname} database={cfg.storage.path}")
    return 0


# ---- users -----------------------------------------------------------------------------------


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise UserError("passwords do not match")
    if len(password) < 8:
        raise UserError("password too short: use at least 8 characters")
    return password


def _user_add(cfg: Config, args: argparse.Namespace) -> int:
    if split_address(args.address) is None:
        raise UserError(f"{args.address!r} is not an e-mail address")
    conn = _db(cfg)
    if accounts.get_domain(conn, args.address.rpartition("@")[2]) is None:
        domain = args.address.rpartition("@")[2].lower()
        raise UserError(
            f"domain {domain} is not set up;"
            f" first run: mailrelay domain add {domain} --notify ADDRESS"
        )
    grants = [_sender(value, "--may-send-as") for value in args.may_send_as]
    for sender in grants:  # before the password is asked for, not after
        _require_our_domain(conn, sender)
    hashed = hash_password(_read_password(args.password_stdin))
    now = time.time()
    with transaction(conn):
        accounts.add_user(conn, args.address, hashed, now)
        for sender in grants:
            senders.grant(conn, args.address, sender, now)
    print(f"user {args.address.lower()} added")
    if grants:
        _print_send_as(senders.send_as(conn, args.address))
    return 0


def _user_modify(cfg: Config, args: argparse.Namespace) -> int:
    address = args.address.lower()
    grants = [_sender(value, "--may-send-as") for value in args.may_send_as]
    revokes = [_sender(value, "--may-not-send-as") for value in args.may_not_send_as]
    if not grants and not revokes:
        raise UserError("nothing to change: give --may-send-as or --may-not-send-as")
    both = sorted(set(grants) & set(revokes))
    if both:
        raise UserError(f"{both[0]} is given to both --may-send-as and --may-not-send-as")
    if address in revokes:
        raise UserError(f"{address} may always send as their own address")
    conn = _db(cfg)
    now = time.time()
    with transaction(conn):
        for sender in revokes:
            senders.revoke(conn, address, sender)
        for sender in grants:
            senders.grant(conn, address, sender, now)
    _print_send_as(senders.send_as(conn, address))
    return 0


def _sender(value: str, option: str) -> str:
    """An ADDRESS or @DOMAIN argument, normalized; a user error if it is neither."""
    sender = senders.normalize(value)
    as_address = f"postmaster{sender}" if sender.startswith("@") else sender
    if split_address(as_address) is None:
        raise UserError(f"{option}: {value!r} is not an address or @domain")
    return sender


def _require_our_domain(conn: sqlite3.Connection, sender: str) -> None:
    domain = sender.rpartition("@")[2]
    if accounts.get_domain(conn, domain) is None:
        raise UserError(
            f"domain {domain} is not one of ours; first run: mailrelay domain add {domain}"
            " --notify ADDRESS"
        )


def _print_send_as(send_as: senders.SendAs) -> None:
    print(f"user {send_as.user} may send as {', '.join(send_as.addresses)}")


def _user_list(cfg: Config, args: argparse.Namespace) -> int:
    conn = _db(cfg)
    users = accounts.list_users(conn)
    send_as = senders.all_send_as(conn)
    for u in users:
        u["may_send_as"] = send_as[str(u["address"])].addresses
    if args.json:
        _print_json(users)
    else:
        for u in users:
            allowed = ", ".join(send_as[str(u["address"])].addresses)
            print(
                f"{u['address']}\tadded {_when(float(str(u['created_at'])))}\tmay send as {allowed}"
            )
    return 0


def _user_passwd(cfg: Config, args: argparse.Namespace) -> int:
    conn = _db(cfg)
    if accounts.password_hash(conn, args.address) is None:
        raise accounts.NotFound(f"no user {args.address.lower()}")
    hashed = hash_password(_read_password(args.password_stdin))
    with transaction(conn):
        accounts.set_password(conn, args.address, hashed)
    print(f"password of {args.address.lower()} changed")
    return 0


def _user_delete(cfg: Config, args: argparse.Namespace) -> int:
    conn = _db(cfg)
    with transaction(conn):
        accounts.delete_user(conn, args.address)
    print(f"user {args.address.lower()} deleted")
    return 0


# ---- domains ---------------------------------------------------------------------------------


def _print_records(report: onboarding.DomainReport, as_json: bool) -> None:
    if as_json:
        _print_json(report.to_json())
        return
    print(
        f"domain {report.domain.name}: {report.domain.state},"
        f" bounce copies to {report.domain.notify}"
    )
    print("Publish these DNS records:")
    for r in report.records:
        print(f'  {r.name}. IN {r.type} "{r.value}"')


def _domain_add(cfg: Config, args: argparse.Namespace) -> int:
    domain = args.domain.lower().rstrip(".")
    if split_address(f"postmaster@{domain}") is None:
        raise UserError(f"{args.domain!r} is not a domain name")
    if split_address(args.notify) is None:
        raise UserError(f"--notify: {args.notify!r} is not an e-mail address")
    try:
        report = onboarding.add(_db(cfg), cfg, domain, args.notify)
    except OSError as exc:
        raise UserError(f"cannot write the DKIM key under {cfg.dkim.key_dir}: {exc}") from exc
    _print_records(report, args.json)
    if not args.json:
        print(f"Then run: mailrelay domain check {domain}")
    return 0


def _domain_records(cfg: Config, args: argparse.Namespace) -> int:
    _print_records(onboarding.records(_db(cfg), cfg, args.domain), args.json)
    return 0


def _domain_check(cfg: Config, args: argparse.Namespace) -> int:
    report = asyncio.run(onboarding.check(_db(cfg), cfg, args.domain))
    if args.json:
        _print_json(report.to_json())
    else:
        for r in report.records:
            mark = "valid  " if r.valid else "INVALID"
            print(f"{mark} {r.record.type} {r.record.name}")
            print(f"        expected: {r.record.value}")
            print(f"        found:    {' | '.join(r.found) if r.found else '(nothing)'}")
            if r.reason:
                print(f"        why:      {r.reason}")
        print(f"domain {report.domain}: {'valid' if report.valid else 'not valid'}")
    return 0 if report.valid else 1


def _domain_rotate(cfg: Config, args: argparse.Namespace) -> int:
    report = onboarding.rotate(_db(cfg), cfg, args.domain)
    _print_records(report, args.json)
    return 0


def _domain_retire(cfg: Config, args: argparse.Namespace) -> int:
    conn = _db(cfg)
    key = onboarding.retire_key(conn, args.domain, args.selector)
    report = onboarding.records(conn, cfg, args.domain)
    if not args.json:
        name = f"{key.selector}._domainkey.{report.domain.name}"
        print(f"DKIM key {key.selector} retired; you may now remove {name} from DNS")
    _print_records(report, args.json)
    return 0


def _tls_check(cfg: Config, args: argparse.Namespace) -> int:
    from mailrelay.delivery.mta_sts import ConnectionStsCache
    from mailrelay.delivery.probe import tls_check  # only this command needs the TLS client

    # The service's MTA-STS cache where there is one (a policy it holds is the one it applies,
    # and what is fetched here serves it too); a throw-away one before the first start.
    path = cfg.storage.path
    conn = connect(path if Path(path).exists() else ":memory:")
    try:
        report = asyncio.run(tls_check(cfg, args.domain, ConnectionStsCache(conn)))
    finally:
        conn.close()
    if args.json:
        _print_json(report.to_json())
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
            print(f"  MTA-STS {sts.error}: {_safe(sts.detail)}")
    elif sts is not None:
        print("  MTA-STS: no policy")
    for m in report.mx:
        starttls = {True: "yes", False: "no", None: "?"}[m.starttls]
        print(f"  MX {m.preference} {m.host} [{m.address}]: {m.verdict} ({m.status})")
        print(f"      DNSSEC {'yes' if m.dnssec else 'no'}; TLSA {m.tlsa}: {_safe(m.tlsa_detail)}")
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
                f"      policy {m.policy}{': ' + _safe(m.policy_detail) if m.policy_detail else ''}"
            )
        print(f"      {_safe(m.detail)}")
    return 0 if report.verdict == "secure" else 1


def _domain_list(cfg: Config, args: argparse.Namespace) -> int:
    rows = accounts.list_domains(_db(cfg))
    if args.json:
        _print_json(
            [
                {"domain": d.name, "state": d.state, "notify": d.notify, "checked_at": d.checked_at}
                for d in rows
            ]
        )
    else:
        for d in rows:
            print(f"{d.name}\t{d.state}\tnotify {d.notify}\tchecked {_when(d.checked_at)}")
    return 0


# ---- queue -----------------------------------------------------------------------------------


def _queue_list(cfg: Config, args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    rows = queue.list_queue(_db(cfg), limit=args.limit + 1, after=args.cursor)
    more = len(rows) > args.limit
    rows = rows[: args.limit]
    if more:
        # On stderr, as `log` does, so that stdout stays exactly the listing (or its JSON).
        print(f"more: --cursor {rows[-1]['id']}", file=sys.stderr)
    if args.json:
        _print_json(rows)
        return 0
    for m in rows:
        sender = m["sender"] or "<>"
        print(f"{m['id']}  {m['size']:>9}  {_when(float(str(m['created_at'])))}  {sender}")
        for r in m["recipients"]:  # type: ignore[attr-defined]
            print(f"    {r['state']:<9} {r['address']}")
    if not rows:
        print("queue is empty")
    return 0


def _queue_show(cfg: Config, args: argparse.Namespace) -> int:
    msg = events.story(_db(cfg), args.id)
    if msg is None:
        raise UserError(f"no message or refusal with id {args.id}")
    if args.json:
        _print_json(msg)
        return 0
    if "sender" not in msg:
        gone = "was deleted from the queue" if msg["removed"] else "was never accepted"
        print(f"message {msg['id']} {gone}; what the events record:")
    else:
        print(f"message {msg['id']} from {msg['sender'] or '<>'} ({msg['size']} bytes)")
        print(f"  accepted {_when(msg['created_at'])} from user {msg['auth_user'] or '-'}")
    for r in msg["recipients"] + msg["refused"]:
        if "state" in r:
            due = f", next {_when(r['next_attempt_at'])}" if r["state"] == "deferred" else ""
            print(f"  {_safe(r['address'])}: {r['state']} after {r['attempts']} attempt(s){due}")
        else:
            print(f"  {_safe(r['address'])}:")
        for e in r["events"]:
            print(f"    {_when(e['at'])} {e['event']}{_event_detail(e)}")
    return 0


def _event_detail(e: dict[str, Any]) -> str:
    tls = "/".join(e[k] for k in ("tls_protocol", "tls_cipher") if e[k])
    detail = (f", mx={e['mx']}" if e["mx"] else "") + (f", tls={tls}" if tls else "")
    if e.get("policy"):
        # The evidence of how the session was authenticated: dane-ee with the TLSA record,
        # mta-sts with the policy id, verify, or encrypt.
        how = f" [{_safe(e['policy_detail'])}]" if e.get("policy_detail") else ""
        detail += f", policy={e['policy']}{how}"
    return detail + (f" ({_safe(e['reply'])})" if e["reply"] else "")


def _safe(text: str) -> str:
    # Addresses and replies come from SMTP peers: escape control characters so that printing
    # them cannot drive the operator's terminal.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _log(cfg: Config, args: argparse.Namespace) -> int:
    try:
        since = None if args.since is None else events.parse_since(args.since)
        page = events.query(
            _db(cfg),
            domain=args.domain,
            since=since,
            status=args.status,
            cursor=args.cursor,
            limit=args.limit,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if args.json:
        _print_json(page.to_json())
        return 0
    for e in page.events:
        print(
            f"{_when(e['at'])} {e['queue_id']}: to=<{_safe(e['recipient'])}>, {e['event']}"
            + _event_detail(e)
        )
    if page.next_cursor is not None:
        print(f"more: --cursor {page.next_cursor}", file=sys.stderr)
    return 0


def _queue_retry(cfg: Config, args: argparse.Namespace) -> int:
    conn = _db(cfg)
    with transaction(conn):
        n = queue.retry(conn, None if args.all else args.id, time.time())
    if n == 0 and not args.all:
        raise UserError(f"no queued recipients for message {args.id}")
    print(f"{n} recipient(s) due now")
    return 0


def _queue_delete(cfg: Config, args: argparse.Namespace) -> int:
    conn = _db(cfg)
    with transaction(conn):
        deleted = queue.delete(conn, args.id)
    if not deleted:
        raise UserError(f"no message {args.id}")
    print(f"message {args.id.upper()} deleted")
    return 0
