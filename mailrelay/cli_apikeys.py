"""The `mailrelay apikey` commands: make, list and revoke HTTP API keys. A key's token is
printed once, when it is made; the store keeps only its SHA-256."""

from __future__ import annotations

import argparse
import time

from mailrelay.cli_output import NoDatabase, open_existing_db, print_json, when
from mailrelay.config import Config
from mailrelay.store import accounts, apikeys
from mailrelay.store.queue import transaction


def apikey_add(cfg: Config, args: argparse.Namespace) -> int:
    domains = apikeys.normalize_domains(args.domain)
    try:
        conn = open_existing_db(cfg)
    except NoDatabase:
        raise accounts.NotFound(f"no domain {domains[0]}") from None
    with transaction(conn):
        key, token = apikeys.add(
            conn, domains, args.scope, time.time(), new_domains=args.new_domain
        )
    if args.json:
        print_json({**key.to_json(), "token": token})
        return 0
    print(f"API key {key.id} for {', '.join(key.domains)}, scope {key.scope}:")
    print(token)
    print("It is shown this once; send it as: Authorization: Bearer <key>")
    return 0


def apikey_list(cfg: Config, args: argparse.Namespace) -> int:
    keys = apikeys.list_keys(open_existing_db(cfg))
    if args.json:
        print_json([k.to_json() for k in keys])
        return 0
    if not keys:
        print("no API keys")
    for k in keys:
        state = "active" if k.revoked_at is None else f"revoked {when(k.revoked_at)}"
        print(f"{k.id}  {','.join(k.domains)}  {k.scope:<6}  created {when(k.created_at)}  {state}")
    return 0


def apikey_revoke(cfg: Config, args: argparse.Namespace) -> int:
    conn = open_existing_db(cfg)
    with transaction(conn):
        apikeys.revoke(conn, args.id, time.time())
    print(f"API key {args.id.upper()} revoked")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`apikey add|list|revoke` under the top-level command parser."""
    key = sub.add_parser("apikey", help="HTTP API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    h = "make a key for one or more of our domains (its token is printed once)"
    one = key.add_parser("add", help=h, description=h)
    one.set_defaults(func=apikey_add)
    one.add_argument(
        "--domain", required=True, action="append", help="a domain of the key (repeat for more)"
    )
    one.add_argument(
        "--new-domain",
        action="store_true",
        help="allow domains not added yet: the key may add them (POST /v1/domains)",
    )
    one.add_argument("--scope", required=True, choices=apikeys.SCOPES)
    one.add_argument("--json", action="store_true", help="print JSON")
    h = "list keys (never their tokens)"
    one = key.add_parser("list", help=h, description=h)
    one.set_defaults(func=apikey_list)
    one.add_argument("--json", action="store_true", help="print JSON")
    h = "revoke a key: it is refused from the next request on"
    one = key.add_parser("revoke", help=h, description=h)
    one.set_defaults(func=apikey_revoke)
    one.add_argument("id")
