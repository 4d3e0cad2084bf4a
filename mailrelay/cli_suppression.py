"""The `mailrelay suppression` commands: list, add and remove the recipients a sending domain no
longer mails (store/suppressions.py; README, "Suppression list")."""

from __future__ import annotations

import argparse
import time

from mailrelay import config as configmod
from mailrelay.cli_output import UserError, open_existing_db, print_json, safe, when
from mailrelay.config import Config
from mailrelay.store import suppressions
from mailrelay.store.queue import transaction


def suppression_list(cfg: Config, args: argparse.Namespace) -> int:
    entries = suppressions.list_suppressions(open_existing_db(cfg), time.time(), domain=args.domain)
    if args.json:
        print_json([e.to_json() for e in entries])
        return 0
    if not entries:
        off = "" if cfg.suppression.enabled else " (suppression.enabled is false)"
        print("no suppressed addresses" + off)
    for e in entries:
        expires = "never" if e.expires_at is None else when(e.expires_at)
        print(
            f"{e.domain}\t{safe(e.address)}\t{e.source}\tsince {when(e.created_at)}"
            f"\texpires {expires}\t{safe(e.reason)}"
        )
    return 0


def suppression_add(cfg: Config, args: argparse.Namespace) -> int:
    now = time.time()
    expires_at = None
    if args.expires is not None:
        seconds = configmod.parse_duration(args.expires, zero=True)
        if seconds is None:
            raise UserError(
                f"--expires: {args.expires!r} is not a duration like 30d or 12h (0: never)"
            )
        expires_at = now + seconds if seconds else None
    conn = open_existing_db(cfg)
    try:
        with transaction(conn):
            entry = suppressions.add(
                conn,
                args.domain,
                args.address,
                now,
                reason=args.reason or suppressions.MANUAL_REASON,
                expires_at=expires_at,
            )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    until = "for good" if entry.expires_at is None else f"until {when(entry.expires_at)}"
    print(f"{safe(entry.address)} suppressed for {entry.domain} {until}")
    return 0


def suppression_remove(cfg: Config, args: argparse.Namespace) -> int:
    conn = open_existing_db(cfg)
    with transaction(conn):
        suppressions.remove(conn, args.domain, args.address)
    print(f"{safe(args.address.strip().lower())} no longer suppressed for {args.domain.lower()}")
    return 0
