"""What a loaded configuration needs from this machine before the service can start.

`config.load` checks what the file says; these check what it points at: the certificate and its
key, the storage and DKIM directories, the listen host names, and a hostname receivers accept.
Each check returns problems as one-line strings naming the key; `check-config` prints them all,
`serve` refuses to start on any. Nothing here exits or changes the file system.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PublicKeyTypes,
)

from mailrelay import dkim
from mailrelay.config import Config


@dataclass(frozen=True)
class Report:
    problems: list[str]
    # When the configured certificate expires; None if it was not read (missing, or to be made).
    certificate_expires: datetime.datetime | None = None


def run(cfg: Config, *, now: datetime.datetime | None = None) -> Report:
    now = now or datetime.datetime.now(datetime.UTC)
    problems = hostname(cfg) + listen_hosts(cfg)
    cert_problems, expires = certificate(cfg, now)
    problems += cert_problems + storage(cfg) + dkim_dir(cfg) + dkim_keys(cfg)
    problems += database(cfg) + dkim_master_key(cfg)
    return Report(problems, expires)


def hostname(cfg: Config) -> list[str]:
    if cfg.allow_local_hostname:
        return []
    name = cfg.hostname.rstrip(".")
    if "." in name and name.lower() != "localhost.localdomain":
        return []
    return [
        f"hostname: {cfg.hostname!r} is not a fully qualified domain name; receivers refuse"
        " EHLO from it: set hostname to this relay's DNS name"
        " (allow_local_hostname = true allows it for development)"
    ]


def listen_hosts(cfg: Config) -> list[str]:
    problems = []
    addresses = [(f"submission.listen[{i}]", a) for i, a in enumerate(cfg.submission.listen)] + [
        (f"submission.implicit_tls_listen[{i}]", a)
        for i, a in enumerate(cfg.submission.implicit_tls_listen)
    ]
    if cfg.metrics.listen is not None:
        addresses.append(("metrics.listen", cfg.metrics.listen))
    for key, address in addresses:
        try:
            socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problems.append(f"{key}: cannot resolve {address.host!r}: {reason}")
    return problems


def certificate(cfg: Config, now: datetime.datetime) -> tuple[list[str], datetime.datetime | None]:
    sub = cfg.submission
    cert_path, key_path = Path(sub.cert_file), Path(sub.key_file)
    if sub.self_signed_if_missing and not cert_path.exists() and not key_path.exists():
        return [], None  # `serve` makes a self-signed pair at its first start
    problems = []
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except OSError as exc:
        problems.append(f"submission.cert_file: cannot read {cert_path}: {exc.strerror}")
        chain = []
    except ValueError:
        problems.append(f"submission.cert_file: {cert_path} holds no PEM certificate")
        chain = []
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        problems.append(f"submission.key_file: cannot read {key_path}: {exc.strerror}")
        key = None
    except (ValueError, TypeError):
        problems.append(f"submission.key_file: {key_path} holds no unencrypted PEM private key")
        key = None
    if not chain:
        return problems, None
    leaf = chain[0]
    expires = leaf.not_valid_after_utc
    if expires <= now:
        problems.append(f"submission.cert_file: {cert_path} expired on {_day(expires)}")
    elif leaf.not_valid_before_utc > now:
        problems.append(
            f"submission.cert_file: {cert_path} is not valid before"
            f" {_day(leaf.not_valid_before_utc)}"
        )
    if key is not None and _spki(key.public_key()) != _spki(leaf.public_key()):
        problems.append(
            f"submission.key_file: {key_path} is not the key of the certificate in {cert_path}"
        )
    return problems, expires


def storage(cfg: Config) -> list[str]:
    path = Path(cfg.storage.path)
    if path.exists():
        if not path.is_file():
            return [f"storage.path: {path} is not a file"]
        if not os.access(path, os.R_OK | os.W_OK):
            return [f"storage.path: {path} is not readable and writable by this user"]
        directory = path.parent
    else:
        # The first existing ancestor must let us create what is missing below it.
        directory = path.parent
        while not directory.exists() and directory != directory.parent:
            directory = directory.parent
    if not directory.is_dir():
        return [f"storage.path: {directory} is not a directory"]
    # SQLite writes its -wal and -shm files beside the database.
    if not os.access(directory, os.W_OK | os.X_OK):
        return [f"storage.path: directory {directory} is not writable by this user"]
    return []


def dkim_dir(cfg: Config) -> list[str]:
    path = Path(cfg.dkim.key_dir)
    if not path.exists():
        return []  # made by the first `domain add`
    if not path.is_dir():
        return [f"dkim.key_dir: {path} is not a directory"]
    if not os.access(path, os.R_OK | os.X_OK):
        return [f"dkim.key_dir: {path} is not readable by this user"]
    return []


def dkim_keys(cfg: Config) -> list[str]:
    """Every signing key's file must be readable, or every message from its domain gets 451:
    a key made by root for a service that runs as its own user is the usual cause."""
    database = Path(cfg.storage.path)
    if not database.is_file():
        return []
    try:
        # Read-only and without migrating: a check must not change the database.
        conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT domain, selector, private_key_path FROM dkim_keys WHERE active = 1"
                " ORDER BY domain, selector"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return []  # no keys table yet, or unreadable: the storage check speaks for it
    return [
        f"dkim: {domain} selector {selector}: cannot read {path} (is it owned by the user"
        " the service runs as?)"
        for domain, selector, path in rows
        if not os.access(path, os.R_OK)
    ]


# PostgreSQL's refusals that no retry can change: no such role or database, a wrong password,
# no pg_hba.conf entry for us. libpq gives no SQLSTATE for a failed connection, so they are
# told by the server's FATAL message. Anything else (not listening yet, a timeout, "the
# database system is starting up", too many clients) passes: `serve`, which exits 1 when it
# cannot connect, is restarted by systemd until it can; a 78 here would keep it down for good.
_CONFIG_REFUSALS = re.compile(
    r"FATAL:\s+(?P<why>(?:database|role) \S+ does not exist|password authentication failed"
    r".*|no pg_hba\.conf entry.*|.*authentication failed.*)"
)
# libpq's own words where the TLS that the URL's sslmode asks for cannot be had: no SSL on the
# server, a CA file missing or unreadable, a certificate that does not verify or names another
# host. Each stays so until someone changes a file: the configuration's to fix, not a wait.
_TLS_REFUSALS = re.compile(
    r"(?P<why>server does not support SSL, but SSL was required|root certificate file .*"
    r" does not exist|could not read root certificate file.*|SSL error: certificate verify"
    r" failed|server certificate for .* does not match host name .*|invalid sslmode value.*)"
)


def database(cfg: Config) -> list[str]:
    """With storage.url: that the database takes our credentials, over the TLS the URL asks
    for (without changing it)."""
    if not cfg.storage.url:
        return []
    from mailrelay.config import redact_url
    from mailrelay.store import postgres  # psycopg: only where PostgreSQL is configured

    try:
        postgres.connect_unmigrated(cfg.storage.url).close()
    except sqlite3.Error as exc:
        refused = _CONFIG_REFUSALS.search(str(exc)) or _TLS_REFUSALS.search(str(exc))
        if refused is not None:
            return [f"storage.url: {redact_url(cfg.storage.url)}: {refused['why'].strip()}"]
    return []


def dkim_master_key(cfg: Config) -> list[str]:
    """On PostgreSQL the DKIM keys are in the database, sealed with dkim.master_key_file: it
    must be set once keys exist, hold a key, and unseal every signing key (else every message
    from that domain would get 451). A database that cannot be read now is the start's to find."""
    if not cfg.storage.url:
        return []
    master: bytes | None = None
    problem = ""
    try:
        master = dkim.read_master_key(cfg.dkim.master_key_file)
    except dkim.MasterKeyError as exc:
        problem = str(exc)
    from mailrelay.store import postgres  # psycopg: only where PostgreSQL is configured

    try:
        conn = postgres.open_readonly(cfg.storage.url)
        try:
            rows = conn.execute(
                "SELECT domain, selector, private_key_enc FROM dkim_keys WHERE active = 1"
                " AND private_key_enc IS NOT NULL ORDER BY domain, selector"
            ).fetchall()
        finally:
            conn.close()
    except (OSError, sqlite3.Error):
        rows = []  # no schema yet, or unreachable: `serve` says so when it connects
    if master is None:
        # Without keys in the database a missing key file harms nothing yet; a bad one does.
        return [problem] if rows or cfg.dkim.master_key_file else []
    problems = []
    for domain, selector, sealed in rows:
        try:
            dkim.unseal(bytes(sealed), master, domain, selector)
        except dkim.MasterKeyError:
            problems.append(
                f"dkim.master_key_file: {cfg.dkim.master_key_file} does not unseal the DKIM key"
                f" {selector} of {domain} in the database (not the master key it was sealed with)"
            )
    return problems


def _spki(public_key: PublicKeyTypes | CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _day(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")
