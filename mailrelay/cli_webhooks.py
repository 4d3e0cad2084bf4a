"""The `mailrelay webhook` commands: add, list and remove a domain's webhook endpoints, and look
at recent deliveries. An endpoint's signing secret is printed once, when it is added."""

from __future__ import annotations

import argparse
import time

from mailrelay.cli_output import NoDatabase, UserError, open_existing_db, print_json, safe, when
from mailrelay.config import Config
from mailrelay.store import accounts
from mailrelay.store import webhooks as store
from mailrelay.store.queue import transaction


def webhook_add(cfg: Config, args: argparse.Namespace) -> int:
    domain = args.domain.lower().rstrip(".")
    try:
        conn = open_existing_db(cfg)
    except NoDatabase:
        raise accounts.NotFound(f"no domain {domain}") from None
    try:
        with transaction(conn):
            endpoint = store.add_endpoint(
                conn, domain, args.url, args.events.split(","), time.time()
            )
    except store.InvalidEndpoint as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print_json(endpoint.to_json(with_secret=True))
        return 0
    print(f"webhook {endpoint.id} for {endpoint.domain}: {endpoint.url}")
    print(f"events: {','.join(endpoint.events)}")
    print(endpoint.secret)
    print("The signing secret is shown this once (Standard Webhooks; see docs/webhooks.md).")
    return 0


def webhook_list(cfg: Config, args: argparse.Namespace) -> int:
    endpoints = store.list_endpoints(open_existing_db(cfg), _domain(args))
    if args.json:
        print_json([e.to_json() for e in endpoints])
        return 0
    if not endpoints:
        print("no webhooks")
    for e in endpoints:
        state = "disabled" if e.disabled else "active"
        print(
            f"{e.id}  {e.domain}  {safe(e.url)}  {','.join(e.events)}"
            f"  created {when(e.created_at)}  {state}"
        )
    return 0


def webhook_remove(cfg: Config, args: argparse.Namespace) -> int:
    conn = open_existing_db(cfg)
    with transaction(conn):
        store.remove_endpoint(conn, args.id)
    print(f"webhook {args.id.lower()} removed, with its pending deliveries")
    return 0


def webhook_deliveries(cfg: Config, args: argparse.Namespace) -> int:
    found = store.recent(open_existing_db(cfg), args.limit, _domain(args))
    if args.json:
        print_json([d.to_json() for d in found])
        return 0
    if not found:
        print("no webhook deliveries")
    for d in found:
        due = f"  next {when(d.next_attempt_at)}" if d.state == "pending" else ""
        error = f"  last error: {safe(d.last_error)}" if d.last_error else ""
        print(
            f"{d.id}  {when(d.created_at)}  {d.endpoint_id}  {d.event:<10}  {d.state:<7}"
            f"  attempts {d.attempts}{due}{error}"
        )
    return 0


def _domain(args: argparse.Namespace) -> str | None:
    return args.domain.lower().rstrip(".") if args.domain else None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`webhook add|list|remove|deliveries` under the top-level command parser."""
    hook = sub.add_parser("webhook", help="webhook endpoints of our domains").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    h = "add an HTTPS endpoint for a domain's events (its signing secret is printed once)"
    one = hook.add_parser("add", help=h, description=h)
    one.set_defaults(func=webhook_add)
    one.add_argument("--domain", required=True)
    one.add_argument("--url", required=True, help="https:// only")
    one.add_argument(
        "--events",
        required=True,
        metavar="LIST",
        help=f"comma-separated, of: {','.join(store.EVENT_TYPES)}",
    )
    one.add_argument("--json", action="store_true", help="print JSON")
    h = "list endpoints (never their secrets)"
    one = hook.add_parser("list", help=h, description=h)
    one.set_defaults(func=webhook_list)
    one.add_argument("--domain", metavar="D", help="only this domain's")
    one.add_argument("--json", action="store_true", help="print JSON")
    h = "remove an endpoint and its pending deliveries"
    one = hook.add_parser("remove", help=h, description=h)
    one.set_defaults(func=webhook_remove)
    one.add_argument("id")
    h = "recent deliveries, newest first, with their payloads"
    one = hook.add_parser("deliveries", help=h, description=h)
    one.set_defaults(func=webhook_deliveries)
    one.add_argument("--domain", metavar="D", help="only this domain's")
    one.add_argument("--limit", metavar="N", type=int, default=50, help="deliveries to list")
    one.add_argument("--json", action="store_true", help="print JSON")
