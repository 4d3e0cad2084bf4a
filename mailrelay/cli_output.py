"""What every `mailrelay` command shares: the error it raises, its database, how it prints."""

from __future__ import annotations

import json
import sqlite3
import time

from mailrelay.config import Config
from mailrelay.store import connect, open_readonly


class UserError(Exception):
    """A mistake the operator can fix; printed as one line, exit status 1."""


class ConfigProblem(UserError):
    """The configuration, or what it points at, cannot work: exit status 78 (sysexits.h
    EX_CONFIG), which the systemd unit does not restart on, since trying again cannot help."""


EXIT_CONFIG = 78


def open_db(cfg: Config) -> sqlite3.Connection:
    try:
        return connect(cfg.storage.path)
    except (OSError, sqlite3.Error) as exc:
        raise UserError(f"cannot open database {cfg.storage.path}: {exc}") from exc


def open_existing_db(cfg: Config) -> sqlite3.Connection:
    """The database for a command that only reads it; never creates one."""
    try:
        return open_readonly(cfg.storage.path)
    except FileNotFoundError:
        raise UserError(
            f"no database at {cfg.storage.path}"
            " (has `mailrelay serve` or `domain add` run with this config?)"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot open database {cfg.storage.path}: {exc.strerror}") from exc
    except sqlite3.Error as exc:
        raise UserError(f"cannot open database {cfg.storage.path}: {exc}") from exc


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2, default=str))


def when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def safe(text: str) -> str:
    # Addresses and replies come from SMTP peers: escape control characters so that printing
    # them cannot drive the operator's terminal.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
