"""The `mailrelay user` and `mailrelay domain` commands: submission users and sending domains."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import time
from pathlib import Path

from mailrelay import dkim, onboarding
from mailrelay.cli_output import (
    ConfigProblem,
    NoDatabase,
    UserError,
    create_db,
    open_existing_db,
    print_json,
    reason,
    when,
)
from mailrelay.config import Config
from mailrelay.store import accounts, senders
from mailrelay.store.backend import Connection
from mailrelay.store.queue import transaction
from mailrelay.submission.auth import hash_password
from mailrelay.submission.handler import split_address

# ---- users -----------------------------------------------------------------------------------


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif not sys.stdin.isatty():
        # getpass would fall back to reading stdin with a warning, or fail at its end.
        raise UserError("no terminal to ask for the password on; pipe it in with --password-stdin")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise UserError("passwords do not match")
    if len(password) < 8:
        raise UserError("password too short: use at least 8 characters")
    return password


def user_add(cfg: Config, args: argparse.Namespace) -> int:
    if split_address(args.address) is None:
        raise UserError(f"{args.address!r} is not an e-mail address")
    domain = args.address.rpartition("@")[2].lower()
    try:
        conn: Connection | None = open_existing_db(cfg)
    except NoDatabase:
        conn = None  # no database, so no domain: `domain add` makes both
    if conn is None or accounts.get_domain(conn, domain) is None:
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


def user_modify(cfg: Config, args: argparse.Namespace) -> int:
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
    conn = open_existing_db(cfg)
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


def _require_our_domain(conn: Connection, sender: str) -> None:
    domain = sender.rpartition("@")[2]
    if accounts.get_domain(conn, domain) is None:
        raise UserError(
            f"domain {domain} is not one of ours; first run: mailrelay domain add {domain}"
            " --notify ADDRESS"
        )


def _print_send_as(send_as: senders.SendAs) -> None:
    print(f"user {send_as.user} may send as {', '.join(send_as.addresses)}")


def user_list(cfg: Config, args: argparse.Namespace) -> int:
    conn = open_existing_db(cfg)
    users = accounts.list_users(conn)
    send_as = senders.all_send_as(conn)
    for u in users:
        u["may_send_as"] = send_as[str(u["address"])].addresses
    if args.json:
        print_json(users)
    else:
        for u in users:
            allowed = ", ".join(send_as[str(u["address"])].addresses)
            print(
                f"{u['address']}\tadded {when(float(str(u['created_at'])))}\tmay send as {allowed}"
            )
    return 0


def user_passwd(cfg: Config, args: argparse.Namespace) -> int:
    conn = open_existing_db(cfg)
    if accounts.password_hash(conn, args.address) is None:
        raise accounts.NotFound(f"no user {args.address.lower()}")
    hashed = hash_password(_read_password(args.password_stdin))
    with transaction(conn):
        accounts.set_password(conn, args.address, hashed)
    print(f"password of {args.address.lower()} changed")
    return 0


def user_delete(cfg: Config, args: argparse.Namespace) -> int:
    conn = open_existing_db(cfg)
    with transaction(conn):
        accounts.delete_user(conn, args.address)
    print(f"user {args.address.lower()} deleted")
    return 0


# ---- domains ---------------------------------------------------------------------------------


_ROLE_NOTES = {
    "next": "next DKIM key, not signing yet: publish it, then run: mailrelay domain activate-dkim",
    "rotated_out": "rotated-out DKIM key: keep it until: mailrelay domain retire-dkim",
}


def _print_records(report: onboarding.DomainReport, as_json: bool) -> None:
    if as_json:
        print_json(report.to_json())
        return
    print(
        f"domain {report.domain.name}: {report.domain.state},"
        f" bounce copies to {report.domain.notify}"
    )
    print("Publish these DNS records:")
    for r in report.records:
        role = report.role(r)
        if role in _ROLE_NOTES:
            print(f"  ; {_ROLE_NOTES[role]} {report.domain.name}")
        print(f"  {r.zone_line(ttl=None)}")


def _key_owner(cfg: Config) -> dkim.Owner | None:
    """Run as root, who the files made for the service (the database, DKIM keys and the
    directories for them) must belong to, so that the service can read them.

    The owner of the database, of the key directory, or of the directory the database goes in
    (the unit's StateDirectory, which systemd makes for the service user at its first start, and
    the README's install step before that), when that is not root. With none of them to follow,
    `onboarding.key_owner` decides: root-owned files where there is no service user, else an
    error naming the user to run as. Not root: None, the caller's own files.
    """
    if os.geteuid() != 0 or cfg.storage.url:
        return None  # on PostgreSQL the keys go into the database: no file is made
    database = Path(cfg.storage.path)
    directory = database.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    for path in (database, Path(cfg.dkim.key_dir), directory):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_uid != 0:
            return st.st_uid, st.st_gid
    try:
        return onboarding.key_owner(cfg)
    except onboarding.WrongUser as exc:
        raise UserError(str(exc)) from exc


def domain_add(cfg: Config, args: argparse.Namespace) -> int:
    domain = args.domain.lower().rstrip(".")
    if split_address(f"postmaster@{domain}") is None:
        raise UserError(f"{args.domain!r} is not a domain name")
    if split_address(args.notify) is None:
        raise UserError(f"--notify: {args.notify!r} is not an e-mail address")
    owner = _key_owner(cfg)  # before anything is made: it may refuse
    conn = create_db(cfg, owner)
    try:
        report = onboarding.add(conn, cfg, domain, args.notify, owner)
    except dkim.MasterKeyError as exc:
        raise ConfigProblem(str(exc)) from exc
    except OSError as exc:
        raise UserError(
            f"cannot write the DKIM key under {cfg.dkim.key_dir}: {reason(exc, cfg.dkim.key_dir)}"
        ) from exc
    _print_records(report, args.json)
    if not args.json:
        print(f"Then run: mailrelay domain check {domain}")
    return 0


def _domain_db(cfg: Config, name: str) -> Connection:
    """The database for a command on one domain: without one there is no such domain (and none
    is made)."""
    try:
        return open_existing_db(cfg)
    except NoDatabase:
        raise accounts.NotFound(f"no domain {name.lower().rstrip('.')}") from None


def domain_records(cfg: Config, args: argparse.Namespace) -> int:
    _print_records(onboarding.records(_domain_db(cfg, args.domain), cfg, args.domain), args.json)
    return 0


def domain_check(cfg: Config, args: argparse.Namespace) -> int:
    report = asyncio.run(onboarding.check(_domain_db(cfg, args.domain), cfg, args.domain))
    if args.json:
        print_json(report.to_json())
    else:
        for r in report.records:
            mark = "valid  " if r.valid else "INVALID"
            print(f"{mark} {r.record.type} {r.record.name}")
            print(f"        expected: {r.record.value}")
            print(f"        found:    {' | '.join(r.found) if r.found else '(nothing)'}")
            if r.reason:
                print(f"        why:      {r.reason}")
        for r in report.next_dkim:
            mark = "published, matches" if r.valid else f"not ready: {r.reason}"
            print(f"next DKIM key {r.record.name}: {mark}")
        if report.next_dkim and all(r.valid for r in report.next_dkim):
            print(f"Switch signing to it with: mailrelay domain activate-dkim {report.domain}")
        print(f"domain {report.domain}: {'valid' if report.valid else 'not valid'}")
    return 0 if report.valid else 1


def domain_rotate(cfg: Config, args: argparse.Namespace) -> int:
    conn = _domain_db(cfg, args.domain)  # first: _key_owner could refuse for a domain not there
    owner = _key_owner(cfg)
    try:
        report = onboarding.rotate(conn, cfg, args.domain, owner)
    except onboarding.RotationError as exc:
        raise UserError(str(exc)) from exc
    except dkim.MasterKeyError as exc:
        raise ConfigProblem(str(exc)) from exc
    except OSError as exc:
        raise UserError(
            f"cannot write the DKIM key under {cfg.dkim.key_dir}: {reason(exc, cfg.dkim.key_dir)}"
        ) from exc
    _print_records(report, args.json)
    if not args.json:
        print(
            "Signing is unchanged. Publish the next key's record, then run:"
            f" mailrelay domain activate-dkim {report.domain.name}"
        )
    return 0


def domain_activate(cfg: Config, args: argparse.Namespace) -> int:
    try:
        conn = _domain_db(cfg, args.domain)
        report = asyncio.run(onboarding.activate(conn, cfg, args.domain, force=args.force))
    except onboarding.RotationError as exc:
        raise UserError(str(exc)) from exc
    if not args.json:
        print(f"DKIM signing of {report.domain.name} now uses {', '.join(report.dkim['signing'])}")
    _print_records(report, args.json)
    return 0


def domain_retire(cfg: Config, args: argparse.Namespace) -> int:
    conn = _domain_db(cfg, args.domain)
    key = onboarding.retire_key(conn, args.domain, args.selector)
    report = onboarding.records(conn, cfg, args.domain)
    if not args.json:
        name = f"{key.selector}._domainkey.{report.domain.name}"
        print(f"DKIM key {key.selector} retired; you may now remove {name} from DNS")
    _print_records(report, args.json)
    return 0


def domain_list(cfg: Config, args: argparse.Namespace) -> int:
    rows = accounts.list_domains(open_existing_db(cfg))
    if args.json:
        print_json(
            [
                {"domain": d.name, "state": d.state, "notify": d.notify, "checked_at": d.checked_at}
                for d in rows
            ]
        )
    else:
        for d in rows:
            print(f"{d.name}\t{d.state}\tnotify {d.notify}\tchecked {when(d.checked_at)}")
    return 0
