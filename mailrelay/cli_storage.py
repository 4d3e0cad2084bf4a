"""`mailrelay storage migrate` (a single-machine install into PostgreSQL) and
`mailrelay dkim make-master-key` (the key that seals DKIM keys kept in PostgreSQL)."""

from __future__ import annotations

import argparse
import os

from mailrelay import dkim
from mailrelay.cli_output import ConfigProblem, UserError, print_json
from mailrelay.config import Config, redact_url
from mailrelay.store import migrate
from mailrelay.store.backend import is_url


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`storage migrate` and `dkim make-master-key` under the top-level command parser."""
    storage = sub.add_parser("storage", help="the store itself").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    h = "copy a SQLite install into an empty PostgreSQL database, DKIM keys sealed"
    one = storage.add_parser("migrate", help=h, description=h)
    one.set_defaults(func=storage_migrate)
    one.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH")
    one.add_argument("--to", dest="target", required=True, metavar="postgresql://…")
    one.add_argument(
        "--master-key-file",
        metavar="PATH",
        help="the key to seal the DKIM keys with (default: [dkim] master_key_file)",
    )
    one.add_argument("--json", action="store_true", help="print JSON")
    keys = sub.add_parser("dkim", help="DKIM key material").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    h = "write a new master key (32 random bytes, base64) to PATH, mode 0600"
    one = keys.add_parser("make-master-key", help=h, description=h)
    one.set_defaults(func=dkim_make_master_key)
    one.add_argument("path")


def storage_migrate(cfg: Config, args: argparse.Namespace) -> int:
    try:
        source = migrate.sqlite_path(args.source)
    except migrate.MigrateError as exc:
        raise UserError(str(exc)) from None
    target = args.target
    if not is_url(target):
        raise UserError(f"--to: {redact_url(target)!r} is not a postgresql:// URL")
    key_file = args.master_key_file or cfg.dkim.master_key_file

    def master_key() -> bytes:
        try:
            return dkim.read_master_key(key_file)
        except dkim.MasterKeyError as exc:
            raise ConfigProblem(f"{exc} (the DKIM keys are stored sealed with it)") from None

    try:
        copied = migrate.migrate(source, target, master_key)
    except (migrate.MigrateError, dkim.MasterKeyError) as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print_json({"tables": {c.table: c.rows for c in copied}})
        return 0
    width = max(len(c.table) for c in copied)
    for c in copied:
        print(f"{c.table:<{width}}  {c.rows:>8} rows, verified")
    print(
        f"Copied {len(copied)} tables into {redact_url(target)} in one transaction. Now set"
        f' [storage] url = "{redact_url(target)}"'
        + (f' and [dkim] master_key_file = "{key_file}"' if key_file else "")
        + " on every instance."
    )
    return 0


def dkim_make_master_key(cfg: Config, args: argparse.Namespace) -> int:
    try:
        fd = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(
            f"{args.path} exists already; a master key is never overwritten (the DKIM keys"
            " sealed with it could not be read any more)"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot write {args.path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(dkim.make_master_key())
        f.flush()
        os.fsync(f.fileno())
    print(
        f"Wrote {args.path}. Name it in [dkim] master_key_file and copy it, mode 0600 and owned"
        " by the service user, to every instance; keep a copy where backups go."
    )
    return 0
