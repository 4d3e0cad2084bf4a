"""What every `mailrelay` command shares: the error it raises, its database, how it prints."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mailrelay.config import Config, redact_url
from mailrelay.store import connect, open_readonly
from mailrelay.store.backend import Connection

if TYPE_CHECKING:
    from mailrelay.dkim import Owner


class UserError(Exception):
    """A mistake the operator can fix; printed as one line, exit status 1."""


class ConfigProblem(UserError):
    """The configuration, or what it points at, cannot work: exit status 78 (sysexits.h
    EX_CONFIG), which the systemd unit does not restart on, since trying again cannot help."""


EXIT_CONFIG = 78


class NoDatabase(UserError):
    """There is no database yet: only `mailrelay serve` and `domain add` make one."""


def open_existing_db(cfg: Config) -> Connection:
    """The database for every command but `domain add` (and `serve`); never creates one, so
    that a mistyped config, or root before the service's first start, leaves nothing behind."""
    shown = redact_url(cfg.storage.database)
    try:
        return open_readonly(cfg.storage.database)
    except FileNotFoundError:
        raise NoDatabase(
            f"no database at {shown} (has `mailrelay serve` or `domain add` run with this config?)"
        ) from None
    except OSError as exc:
        path = cfg.storage.path
        raise UserError(f"cannot open database {path}: {reason(exc, path)}") from exc
    except sqlite3.Error as exc:
        raise UserError(f"cannot open database {shown}: {exc}") from exc


def create_db(cfg: Config, owner: Owner | None) -> Connection:
    """The database for `domain add`, made if missing.

    `owner` (uid, gid), given where root runs the command for the service user, gets every
    directory made for the database and the file itself before SQLite writes to it; `connect`
    gives the -wal and -shm files the database's owner.
    """
    if cfg.storage.url:
        try:
            return connect(cfg.storage.url)
        except sqlite3.Error as exc:  # store.postgres raises sqlite3's DB-API classes
            raise UserError(f"cannot open database {redact_url(cfg.storage.url)}: {exc}") from exc
    path = Path(cfg.storage.path)
    try:
        if owner is not None and not path.exists():
            _make_dirs(path.parent, owner)
            with contextlib.suppress(FileExistsError):  # made meanwhile: connect opens it
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    os.fchown(fd, *owner)
                finally:
                    os.close(fd)
        return connect(str(path))
    except OSError as exc:
        raise UserError(f"cannot open database {path}: {reason(exc, path)}") from exc
    except sqlite3.Error as exc:
        raise UserError(f"cannot open database {path}: {exc}") from exc


def _make_dirs(directory: Path, owner: Owner) -> None:
    """`directory` and its missing parents, each given to `owner`, outermost first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for made in reversed(missing):
        # Mode 0700, as the unit's StateDirectoryMode: the queue holds personal data.
        made.mkdir(mode=0o700, exist_ok=True)
        os.chown(made, *owner)
        os.chmod(made, 0o700)  # mkdir's mode is masked by the umask


def reason(exc: OSError, path: str | Path) -> str:
    """The errno text, and the file it is about where that is not `path`, which the message
    names already (a parent directory, say)."""
    text = exc.strerror or str(exc)
    if exc.filename is None or str(exc.filename) == str(path):
        return text
    return f"{text}: {exc.filename}"


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2, default=str))


def when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def safe(text: str) -> str:
    # Addresses and replies come from SMTP peers: escape control characters so that printing
    # them cannot drive the operator's terminal.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
