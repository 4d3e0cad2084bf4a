"""The `mailrelay` command's contract with operators, run as they run it: a separate process.

Exit 0 on success; a user error prints one line to stderr and exits 1 with no traceback; every
listing takes --json. Delivery is held and every address is on loopback, so nothing leaves.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError

from mailrelay.store import accounts, connect, queue
from tests.conftest import PASSWORD, write_config_file

NEW_PASSWORD = "another long passphrase"


def run(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`mailrelay ARGS`; without `env`, MAILRELAY_CONFIG is cleared so only --config counts."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "mailrelay", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run("--config", str(config), *args, stdin=stdin)


def ok(config: Path, *args: str, stdin: str | None = None) -> str:
    """Run a command that must succeed; its stdout."""
    done = cli(config, *args, stdin=stdin)
    assert (done.returncode, done.stderr) == (0, ""), done
    return done.stdout


def ok_json(config: Path, *args: str) -> Any:
    return json.loads(ok(config, *args, "--json"))


def user_error(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The one line a user error prints (without "mailrelay: " and the newline)."""
    assert done.returncode == code, done
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("mailrelay: ") and done.stderr.count("\n") == 1, done.stderr
    return done.stderr.removeprefix("mailrelay: ").removesuffix("\n")


def config_error(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a configuration error prints; its exit status is 78 (EX_CONFIG), which
    the systemd unit does not restart on."""
    return user_error(done, code=78)


def write_config(directory: Path) -> Path:
    return write_config_file(directory)[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def database(config: Path) -> str:
    return str(config.parent.resolve() / "queue.sqlite3")


# ---- configuration -----------------------------------------------------------------------------


def test_check_config_accepts_a_good_file(config: Path) -> None:
    assert ok(config, "check-config") == (
        f"configuration ok: hostname=relay.test database={database(config)}\n"
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[delivery]\nholdd = true\n", "delivery.holdd: unknown key"),
        ('[delivery]\nport = "25"\n', "delivery.port: expected an integer, got '25'"),
        (
            '[delivery]\nsecurity_level = "maybe"\n',
            "delivery.security_level: 'maybe' is not one of 'encrypt', 'verify', 'dane'",
        ),
        (
            '[delivery]\nmax_queue_lifetime = "5 weeks"\n',
            "delivery.max_queue_lifetime: '5 weeks' is not a positive duration"
            ' (e.g. 30, "90s", "5m", "5d")',
        ),
        (
            '[submission]\nlisten = ["localhost"]\n',
            "submission.listen[0]: 'localhost' is not an address:port",
        ),
        (
            '[delivery]\nnameservers = ["dns.example"]\n',
            "delivery.nameservers[0]: 'dns.example' is not an IP address (optionally with :port)",
        ),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "bad-choice",
        "bad-duration",
        "bad-listen",
        "bad-nameserver",
    ],
)
def test_check_config_names_the_key_and_the_value(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert config_error(cli(path, "check-config")) == f"{path}: {error}"


def test_unreadable_config(tmp_path: Path) -> None:
    # The tests may run as root, for whom no file mode makes a file unreadable: a directory is.
    assert config_error(cli(tmp_path, "check-config")) == f"{tmp_path}: cannot read: Is a directory"
    missing = tmp_path / "missing.toml"
    assert config_error(cli(missing, "check-config")) == (
        f"{missing}: cannot read: No such file or directory"
    )


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('hostname = "relay.test\n')
    message = config_error(cli(path, "check-config"))
    assert message.startswith(f"{path}: not valid TOML: ")
    assert "(at line 1, column " in message


def test_mailrelay_config_names_the_file(config: Path, tmp_path: Path) -> None:
    expected = f"configuration ok: hostname=relay.test database={database(config)}\n"
    env = {**os.environ, "MAILRELAY_CONFIG": str(config)}
    done = run("check-config", env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, expected, "")
    # --config wins over the environment.
    bad = tmp_path / "bad.toml"
    bad.write_text("[delivery]\nholdd = true\n")
    done = run("--config", str(config), "check-config", env={**env, "MAILRELAY_CONFIG": str(bad)})
    assert (done.returncode, done.stdout) == (0, expected)
    assert config_error(run("check-config", env={**env, "MAILRELAY_CONFIG": str(bad)})) == (
        f"{bad}: delivery.holdd: unknown key"
    )


def test_database_that_cannot_be_opened(tmp_path: Path) -> None:
    path = tmp_path / "mailrelay.toml"
    path.write_text('[storage]\npath = "/dev/null/queue.sqlite3"\n')
    message = user_error(cli(path, "user", "list"))
    assert message.startswith("cannot open database /dev/null/queue.sqlite3: ")


def test_usage_error_exits_2(config: Path) -> None:
    done = cli(config, "queue", "retry")
    assert done.returncode == 2
    assert "one of the arguments id --all is required" in done.stderr
    assert "Traceback" not in done.stderr


# ---- users -------------------------------------------------------------------------------------


def test_user_lifecycle(config: Path) -> None:
    assert user_error(cli(config, "user", "add", "alice@example.org", "--password-stdin")) == (
        "domain example.org is not set up; first run: mailrelay domain add example.org"
        " --notify ADDRESS"
    )
    assert user_error(cli(config, "user", "add", "not-an-address", "--password-stdin")) == (
        "'not-an-address' is not an e-mail address"
    )
    ok(config, "domain", "add", "example.org", "--notify", "postmaster@example.org")
    short = cli(config, "user", "add", "alice@example.org", "--password-stdin", stdin="short\n")
    assert user_error(short) == "password too short: use at least 8 characters"
    assert ok_json(config, "user", "list") == []

    added = ok(config, "user", "add", "Alice@Example.ORG", "--password-stdin", stdin=PASSWORD)
    assert added == "user alice@example.org added\n"
    again = cli(config, "user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD)
    assert user_error(again) == "user alice@example.org exists already"

    listing = cli(config, "user", "list", "--json")
    assert listing.returncode == 0
    [user] = json.loads(listing.stdout)
    assert set(user) == {"address", "domain", "created_at", "may_send_as"}
    assert (user["address"], user["domain"]) == ("alice@example.org", "example.org")
    assert user["may_send_as"] == ["alice@example.org"]
    assert time.time() - 60 < user["created_at"] <= time.time()
    assert "argon2" not in listing.stdout  # never the hash, not even in another field
    assert ok(config, "user", "list").startswith("alice@example.org\tadded ")

    changed = ok(
        config, "user", "passwd", "alice@example.org", "--password-stdin", stdin=NEW_PASSWORD
    )
    assert changed == "password of alice@example.org changed\n"
    conn = connect(database(config))
    stored = accounts.password_hash(conn, "alice@example.org")
    conn.close()
    assert stored is not None
    assert PasswordHasher().verify(stored, NEW_PASSWORD)
    with pytest.raises(VerifyMismatchError):
        PasswordHasher().verify(stored, PASSWORD)
    nobody = cli(config, "user", "passwd", "nobody@example.org", "--password-stdin", stdin=PASSWORD)
    assert user_error(nobody) == "no user nobody@example.org"

    assert user_error(cli(config, "user", "delete", "nobody@example.org")) == (
        "no user nobody@example.org"
    )
    assert ok(config, "user", "delete", "alice@example.org") == "user alice@example.org deleted\n"
    assert ok_json(config, "user", "list") == []


# ---- domains -----------------------------------------------------------------------------------


def test_domain_add_and_list(config: Path) -> None:
    assert user_error(cli(config, "domain", "list")).startswith("no database at ")
    out = ok(config, "domain", "add", "Example.ORG.", "--notify", "postmaster@example.org")
    lines = out.splitlines()
    assert lines[:2] == [
        "domain example.org: unverified, bounce copies to postmaster@example.org",
        "Publish these DNS records:",
    ]
    assert re.fullmatch(
        r'  mr\d{8}\._domainkey\.example\.org\. IN TXT "v=DKIM1; k=rsa; p=\S+"', lines[2]
    )
    assert lines[3:] == [
        '  example.org. IN TXT "v=spf1 a:relay.test ~all"',
        '  _dmarc.example.org. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@example.org;'
        ' adkim=r; aspf=r"',
        "Then run: mailrelay domain check example.org",
    ]
    assert ok_json(config, "domain", "list") == [
        {
            "domain": "example.org",
            "state": "unverified",
            "notify": "postmaster@example.org",
            "checked_at": None,
        }
    ]
    assert ok(config, "domain", "list").startswith(
        "example.org\tunverified\tnotify postmaster@example.org\tchecked -"
    )
    again = cli(config, "domain", "add", "example.org", "--notify", "postmaster@example.org")
    assert user_error(again) == "domain example.org exists already"
    assert user_error(cli(config, "domain", "add", "example.net", "--notify", "postmaster")) == (
        "--notify: 'postmaster' is not an e-mail address"
    )
    assert user_error(cli(config, "domain", "add", "not a domain", "--notify", "a@b.example")) == (
        "'not a domain' is not a domain name"
    )
    assert [d["domain"] for d in ok_json(config, "domain", "list")] == ["example.org"]


# ---- queue -------------------------------------------------------------------------------------


def enqueue(config: Path, *recipients: str) -> str:
    conn = connect(database(config))
    message = queue.NewMessage(
        sender="alice@example.org",
        recipients=recipients,
        data=b"From: alice@example.org\r\nSubject: test\r\n\r\nHello.\r\n",
        auth_user="alice@example.org",
        client_ip="127.0.0.1",
        sender_domain="example.org",
    )
    with queue.transaction(conn):
        queue_id = queue.enqueue(conn, message, time.time())
        # As if the first attempt had been deferred: due in an hour.
        conn.execute(
            "UPDATE recipients SET state = 'deferred', next_attempt_at = ? WHERE message_id = ?",
            (time.time() + 3600, queue_id),
        )
    conn.close()
    return queue_id


def due_now(config: Path, queue_id: str) -> list[bool]:
    conn = connect(database(config))
    rows = conn.execute(
        "SELECT next_attempt_at <= ? FROM recipients WHERE message_id = ? ORDER BY id",
        (time.time(), queue_id),
    ).fetchall()
    conn.close()
    return [bool(r[0]) for r in rows]


def test_queue_commands(config: Path) -> None:
    assert user_error(cli(config, "queue", "list")).startswith("no database at ")
    connect(database(config)).close()  # as `serve` or `domain add` would have made it
    assert ok(config, "queue", "list", "--json") == "[]\n"
    assert ok(config, "queue", "list") == "queue is empty\n"
    unknown = user_error(cli(config, "queue", "show", "0123456789ABCDEF"))
    assert unknown.startswith("no message") and unknown.endswith(" 0123456789ABCDEF")

    first = enqueue(config, "bob@example.net", "carol@example.net")
    second = enqueue(config, "dave@example.com")
    listing = ok_json(config, "queue", "list")
    assert [m["id"] for m in listing] == [first, second]
    for m in listing:
        assert set(m) == {"id", "sender", "size", "created_at", "bounce", "recipients"}
        assert (m["sender"], m["bounce"]) == ("alice@example.org", False)
    assert listing[0]["recipients"] == [
        {"address": "bob@example.net", "state": "deferred"},
        {"address": "carol@example.net", "state": "deferred"},
    ]
    shown = ok_json(config, "queue", "show", first.lower())
    assert shown["id"] == first
    assert [r["address"] for r in shown["recipients"]] == ["bob@example.net", "carol@example.net"]

    assert ok(config, "queue", "retry", first) == "2 recipient(s) due now\n"
    assert (due_now(config, first), due_now(config, second)) == ([True, True], [False])
    assert ok(config, "queue", "retry", "--all") == "3 recipient(s) due now\n"
    assert due_now(config, second) == [True]
    assert user_error(cli(config, "queue", "retry", "0123456789ABCDEF")) == (
        "no queued recipients for message 0123456789ABCDEF"
    )

    assert ok(config, "queue", "delete", first.lower()) == f"message {first} deleted\n"
    assert user_error(cli(config, "queue", "delete", first)) == f"no message {first}"
    assert [m["id"] for m in ok_json(config, "queue", "list")] == [second]


def test_queue_list_pages(config: Path) -> None:
    ids = [enqueue(config, f"user{n}@example.net") for n in range(5)]
    first = cli(config, "queue", "list", "--json", "--limit", "2")
    assert [m["id"] for m in json.loads(first.stdout)] == ids[:2]
    assert first.stderr == f"more: --cursor {ids[1]}\n"
    second = cli(config, "queue", "list", "--json", "--limit", "2", "--cursor", ids[1])
    assert [m["id"] for m in json.loads(second.stdout)] == ids[2:4]
    assert second.stderr == f"more: --cursor {ids[3]}\n"
    last = ok(config, "queue", "list", "--limit", "2", "--cursor", ids[3].lower())
    assert last.splitlines()[0].startswith(f"{ids[4]} ")  # no "more:" line: the last page
    assert user_error(cli(config, "queue", "list", "--limit", "0")) == (
        "--limit must be at least 1, got 0"
    )


def test_domain_rotate_and_retire_dkim(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    added = ok_json(config, "domain", "add", "example.org", "--notify", "postmaster@example.org")
    old = added["records"][0]["name"].split(".")[0]
    rotated = ok_json(config, "domain", "rotate-dkim", "example.org")
    selectors = [r["name"].split(".")[0] for r in rotated["records"] if "_domainkey" in r["name"]]
    assert len(selectors) == 2 and selectors[0] == old
    new = selectors[1]
    assert rotated["dkim"] == {"signing": [old], "next": [new], "rotated_out": []}
    ok(config, "domain", "activate-dkim", "example.org", "--force")
    assert user_error(cli(config, "domain", "retire-dkim", "example.org", new)).startswith(
        f"DKIM key {new} "
    )
    out = ok(config, "domain", "retire-dkim", "example.org", old)
    assert out.splitlines()[0] == (
        f"DKIM key {old} retired; you may now remove {old}._domainkey.example.org from DNS"
    )
    listed = ok_json(config, "domain", "records", "example.org")
    assert [r["name"] for r in listed["records"] if "_domainkey" in r["name"]] == [
        f"{new}._domainkey.example.org"
    ]
