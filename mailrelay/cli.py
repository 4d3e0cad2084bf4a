"""The `mailrelay` command: parses arguments, calls into the package, prints, sets exit codes.

This is the only module that exits. User errors print one line to stderr and exit 1 (2 for a
usage error, as argparse does); they never show a traceback. The commands themselves live in
`cli_accounts` (user, domain) and `cli_queue` (queue, log, tls-check); they raise `UserError`
(from `cli_output`), and `main` turns it into the exit.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mailrelay import checks, logs
from mailrelay import config as configmod
from mailrelay.cli_accounts import (
    domain_activate,
    domain_add,
    domain_check,
    domain_list,
    domain_records,
    domain_retire,
    domain_rotate,
    user_add,
    user_delete,
    user_list,
    user_modify,
    user_passwd,
)
from mailrelay.cli_apikeys import register as register_apikeys
from mailrelay.cli_output import EXIT_CONFIG, ConfigProblem, UserError, open_existing_db
from mailrelay.cli_queue import log, queue_delete, queue_list, queue_retry, queue_show, tls_check
from mailrelay.cli_storage import register as register_storage
from mailrelay.cli_suppression import suppression_add, suppression_list, suppression_remove
from mailrelay.cli_tlsrpt import tlsrpt_list, tlsrpt_send_now, tlsrpt_show
from mailrelay.cli_webhooks import register as register_webhooks
from mailrelay.config import Config, ConfigError, redact_url
from mailrelay.store import accounts, events

__all__ = ["UserError", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        path = args.config or os.environ.get("MAILRELAY_CONFIG")
        if path is None and not os.path.exists(configmod.DEFAULT_PATH):
            # Not the embedded defaults: they would point a listing at an empty new database.
            raise ConfigProblem(
                f"no configuration at {configmod.DEFAULT_PATH} (the default);"
                " give --config PATH or set MAILRELAY_CONFIG"
            )
        cfg = configmod.load(path or configmod.DEFAULT_PATH)
        status = args.func(cfg, args)
    except (ConfigError, ConfigProblem) as exc:
        print(f"mailrelay: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except (
        UserError,
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
    p.add_argument(
        "--config",
        metavar="PATH",
        help=f"TOML file (default: $MAILRELAY_CONFIG, else {configmod.DEFAULT_PATH})",
    )
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
    one = cmd(user, "add", user_add, "add a user (its domain must exist)")
    one.add_argument("address")
    one.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    _may_send_as(one)
    one = cmd(user, "modify", user_modify, "change what a user may send as")
    one.add_argument("address")
    _may_send_as(one)
    one.add_argument(
        "--may-not-send-as",
        action="append",
        default=[],
        metavar="ADDRESS|@DOMAIN",
        help="take back a --may-send-as (repeatable)",
    )
    _json(cmd(user, "list", _existing_db(user_list), "list users and what each may send as"))
    one = cmd(user, "passwd", user_passwd, "set a user's password")
    one.add_argument("address")
    one.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    cmd(user, "delete", user_delete, "delete a user").add_argument("address")

    dom = sub.add_parser("domain", help="sending domains").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    one = _json(cmd(dom, "add", domain_add, "add a domain and make its DKIM key"))
    one.add_argument("domain")
    one.add_argument("--notify", required=True, metavar="ADDRESS", help="gets bounce copies")
    _json(cmd(dom, "records", domain_records, "DNS records to publish")).add_argument("domain")
    _json(cmd(dom, "check", domain_check, "check the published records")).add_argument("domain")
    _json(cmd(dom, "rotate-dkim", domain_rotate, "make the next DKIM key")).add_argument("domain")
    one = _json(cmd(dom, "activate-dkim", domain_activate, "sign with the next DKIM key"))
    one.add_argument("domain")
    one.add_argument("--force", action="store_true", help="without checking its DNS record")
    one = _json(cmd(dom, "retire-dkim", domain_retire, "stop listing a rotated-out DKIM key"))
    one.add_argument("domain")
    one.add_argument("selector")
    _json(cmd(dom, "list", _existing_db(domain_list), "list domains"))
    _json(cmd(sub, "tls-check", tls_check, "probe every MX of a domain")).add_argument("domain")

    rpt = sub.add_parser("tlsrpt", help="TLS reports (RFC 8460)").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    one = _json(cmd(rpt, "list", _existing_db(tlsrpt_list), "reports, newest first"))
    one.add_argument("--limit", metavar="N", type=int, default=100, help="reports to list")
    one = cmd(rpt, "show", tlsrpt_show, "one report's JSON")
    one.add_argument("id", help="the report's id, or its report-id")
    one.add_argument("--raw", action="store_true", help="as sent, not indented")
    cmd(rpt, "send-now", tlsrpt_send_now, "make every finished day's reports and send them")
    register_apikeys(sub)
    register_webhooks(sub)
    register_storage(sub)

    sup = sub.add_parser(
        "suppression", help="addresses a sending domain no longer mails (hard bounces)"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    one = _json(cmd(sup, "list", _existing_db(suppression_list), "suppressed addresses"))
    one.add_argument("--domain", metavar="D", help="only this sending domain's")
    one = cmd(sup, "add", suppression_add, "stop a sending domain of ours mailing an address")
    one.add_argument("domain")
    one.add_argument("address")
    one.add_argument("--reason", metavar="TEXT", help="shown in the refusal")
    one.add_argument("--expires", metavar="DURATION", help="e.g. 30d, 12h; default and 0: never")
    one = cmd(sup, "remove", suppression_remove, "let a sending domain mail an address again")
    one.add_argument("domain")
    one.add_argument("address")

    q = sub.add_parser("queue", help="the delivery queue").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    one = _json(cmd(q, "list", queue_list, "messages not yet delivered or bounced"))
    one.add_argument("--limit", metavar="N", type=int, default=100, help="messages per page")
    one.add_argument("--cursor", metavar="C", help="the id printed after 'more:' last time")
    _json(cmd(q, "show", queue_show, "one message with its recipients")).add_argument("id")
    one = cmd(q, "retry", queue_retry, "make deferred recipients due now")
    group = one.add_mutually_exclusive_group(required=True)
    group.add_argument("id", nargs="?")
    group.add_argument("--all", action="store_true")
    cmd(q, "delete", queue_delete, "remove a message from the queue").add_argument("id")

    one = _json(cmd(sub, "log", log, "recipients' events, newest first"))
    one.add_argument("--domain", help="recipient domain")
    one.add_argument("--since", metavar="T", help="ISO 8601 time (local unless zoned), or 1h, 2d")
    one.add_argument("--status", metavar="S", help=f"one of {', '.join(events.EVENTS)}")
    one.add_argument("--cursor", metavar="C", help="next_cursor of the previous page")
    one.add_argument("--limit", metavar="N", type=int, default=50, help="events per page")
    return p


def _existing_db(
    func: Callable[[Config, argparse.Namespace], int | None],
) -> Callable[[Config, argparse.Namespace], int | None]:
    """A listing that must not create the database it lists (as `open_existing_db` ensures)."""

    def run(cfg: Config, args: argparse.Namespace) -> int | None:
        open_existing_db(cfg).close()
        return func(cfg, args)

    return run


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


# ---- service ---------------------------------------------------------------------------------


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    import uvloop  # the service's event loop; the library code runs on any asyncio loop

    from mailrelay.instance import AlreadyRunning
    from mailrelay.service import ServiceFailed, serve  # the other commands need none of it
    from mailrelay.submission.tls import CertificateError

    problems = checks.run(cfg).problems
    if problems:
        # As check-config (which the systemd unit runs first): every problem, then refuse.
        for problem in problems[:-1]:
            print(f"mailrelay: {problem}", file=sys.stderr)
        raise ConfigProblem(problems[-1])
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
    # Where it listens is logged (event=listening). The first-steps hint is for a person at a
    # terminal trying it out: only while there is no domain yet, and never in JSON mode, where
    # every line on stderr must be one JSON object.
    if cfg.log.format == "json" or not cfg.submission.listen:
        return
    if service.store.read_blocking(accounts.list_domains):
        return
    first = cfg.submission.listen[0]
    conf = f" --config {sys.argv[sys.argv.index('--config') + 1]}" if "--config" in sys.argv else ""
    # The command as this one was run: `.venv/bin/mailrelay` from a checkout (`make run`), plain
    # `mailrelay` where it is installed on the PATH.
    command = ".venv/bin/mailrelay" if ".venv" in Path(sys.prefix).parts else "mailrelay"
    wildcard = first.host in ("0.0.0.0", "::", "")  # noqa: S104 -- recognised, not bound
    host = "127.0.0.1" if wildcard else first.host
    lines = [
        "No sending domain yet. Add a domain and a user, then send a first message:",
        f"  {command}{conf} domain add example.org --notify postmaster@example.org",
        f"  {command}{conf} user add alice@example.org",
        f"  swaks --server {host}:{first.port} -tls --auth-user alice@example.org \\",
        "        --from alice@example.org --to bob@example.net",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _check_config(cfg: Config, args: argparse.Namespace) -> int:
    report = checks.run(cfg)
    for problem in report.problems:
        print(f"mailrelay: {problem}", file=sys.stderr)
    if report.problems:
        return EXIT_CONFIG
    print(f"configuration ok: hostname={cfg.hostname} database={redact_url(cfg.storage.database)}")
    if report.certificate_expires is not None:
        days = (report.certificate_expires - datetime.datetime.now(datetime.UTC)).days
        print(
            f"certificate {cfg.submission.cert_file} expires"
            f" {report.certificate_expires:%Y-%m-%d %H:%M} UTC (in {days} days)"
        )
    return 0
