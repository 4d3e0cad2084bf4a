"""The CLI on a production install (README, "Operating"), run as the operator runs it: root, for a
service that runs as its own user.

Root's `domain add` gives the database, the directories it makes for it, its -wal and -shm and
the DKIM keys to the service user (the owner of the unit's StateDirectory); no other command
makes a database, so none leaves a root-owned one behind for the service to trip over.
`scripts/walk_install.py` walks the whole install with a real user; these pin the CLI's part.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from mailrelay import config as configmod
from mailrelay.store import connect
from tests.conftest import PASSWORD, write_config_file

NOBODY = 65534  # nobody:nogroup, standing in for the service user the unit runs as
DOMAIN = "example.org"
NOTIFY = "postmaster@example.org"
NO_SUCH_USER = "mailrelay-test-no-such-user"  # no service user: root-owned files are right


def mailrelay(
    config: Path,
    *args: str,
    service_user: str = NO_SUCH_USER,
    stdin: str | None = None,
    prefix: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    env["MAILRELAY_SERVICE_USER"] = service_user
    return subprocess.run(
        [*prefix, sys.executable, "-m", "mailrelay", "--config", str(config), *args],
        input=stdin,
        # Without `stdin`, not a terminal and empty, as under cron or a provisioning tool.
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert (done.returncode, done.stderr) == (0, ""), done
    return done.stdout


def user_error(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a user error prints (without "mailrelay: " and the newline)."""
    assert done.returncode == 1, done
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("mailrelay: ") and done.stderr.count("\n") == 1, done.stderr
    return done.stderr.removeprefix("mailrelay: ").removesuffix("\n")


def production_config(directory: Path) -> Path:
    """The README's layout under `directory`: the database in a directory of its own below the
    state directory, the DKIM keys beside it."""
    config = write_config_file(directory)[0]
    text = config.read_text()
    text = text.replace('path = "queue.sqlite3"', 'path = "state/db/mailrelay.sqlite3"')
    config.write_text(text.replace('key_dir = "dkim"', 'key_dir = "state/dkim"'))
    return config


def owner_and_mode(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_root_gives_the_database_and_its_directory_to_the_service_user(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "this test checks what root does"
    config = production_config(tmp_path)
    cfg = configmod.load(config)
    state = tmp_path / "state"
    # As systemd leaves StateDirectory=mailrelay (StateDirectoryMode=0700), or the README's
    # `install -d -m 0700 -o mailrelay -g mailrelay /var/lib/mailrelay` before the first start.
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)

    ok(mailrelay(config, "domain", "add", DOMAIN, "--notify", NOTIFY, service_user="nobody"))
    database = Path(cfg.storage.path)
    assert owner_and_mode(database.parent) == (NOBODY, NOBODY, 0o700)
    assert owner_and_mode(database) == (NOBODY, NOBODY, 0o600)
    [key] = (Path(cfg.dkim.key_dir) / DOMAIN).iterdir()
    assert owner_and_mode(key) == (NOBODY, NOBODY, 0o600)
    for directory in (key.parent, Path(cfg.dkim.key_dir)):
        assert owner_and_mode(directory) == (NOBODY, NOBODY, 0o700)

    # Later commands as root change the database in place: it stays the service user's.
    added = mailrelay(
        config, "user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD
    )
    assert ok(added) == "user alice@example.org added\n"
    assert owner_and_mode(database) == (NOBODY, NOBODY, 0o600)
    # SQLite removes -wal and -shm when the last connection closes; nothing root-owned is left.
    assert sorted(p.name for p in database.parent.iterdir()) == ["mailrelay.sqlite3"]


def test_the_wal_and_shm_root_makes_are_the_service_users(tmp_path: Path) -> None:
    """What `connect` does for every command root runs on the service's database: the -wal and
    -shm files exist while a connection is open, and must be the service's, or the service
    cannot open the database while root's command runs (or after, if it ends abruptly)."""
    assert os.geteuid() == 0, "this test checks what root does"
    database = tmp_path / "mailrelay.sqlite3"
    connect(str(database)).close()
    os.chown(database, NOBODY, NOBODY)
    conn = connect(str(database))
    try:
        for suffix in ("-wal", "-shm"):
            assert owner_and_mode(Path(f"{database}{suffix}")) == (NOBODY, NOBODY, 0o600)
    finally:
        conn.close()


def test_root_with_nothing_to_follow_makes_nothing(tmp_path: Path) -> None:
    """Before the service's first start and without the state directory: root must not make a
    database only root can open (user add once did, then failed on the missing domain)."""
    assert os.geteuid() == 0, "this test checks what root does"
    config = production_config(tmp_path)
    database = configmod.load(config).storage.path
    key_dir = configmod.load(config).dkim.key_dir
    added = mailrelay(config, "domain", "add", DOMAIN, "--notify", NOTIFY, service_user="nobody")
    assert user_error(added) == (
        f"run as root, this would make DKIM keys under {key_dir} that the service user nobody"
        " cannot read; run it as that user: sudo -u nobody mailrelay ..."
    )
    user = mailrelay(
        config,
        "user",
        "add",
        "alice@example.org",
        "--password-stdin",
        stdin=PASSWORD,
        service_user="nobody",
    )
    assert user_error(user) == (
        "domain example.org is not set up; first run: mailrelay domain add example.org"
        " --notify ADDRESS"
    )
    no_database = (
        f"no database at {database} (has `mailrelay serve` or `domain add` run with this config?)"
    )
    for args in (
        ("user", "passwd", "alice@example.org", "--password-stdin"),
        ("user", "modify", "alice@example.org", "--may-send-as", "@example.org"),
        ("user", "delete", "alice@example.org"),
    ):
        done = mailrelay(config, *args, stdin=PASSWORD, service_user="nobody")
        assert user_error(done) == no_database, args
    # A command on one domain: without a database there is no such domain.
    for args in (
        ("domain", "records", DOMAIN),
        ("domain", "rotate-dkim", DOMAIN),
        ("domain", "activate-dkim", DOMAIN, "--force"),
        ("domain", "retire-dkim", DOMAIN, "mr20250101"),
    ):
        done = mailrelay(config, *args, service_user="nobody")
        assert user_error(done) == f"no domain {DOMAIN}", args
    assert not (tmp_path / "state").exists()


def test_queue_retry_and_delete_on_a_missing_database(tmp_path: Path) -> None:
    config = production_config(tmp_path)
    database = configmod.load(config).storage.path
    no_database = (
        f"no database at {database} (has `mailrelay serve` or `domain add` run with this config?)"
    )
    assert user_error(mailrelay(config, "queue", "retry", "--all")) == no_database
    assert user_error(mailrelay(config, "queue", "retry", "0123456789ABCDEF")) == no_database
    assert user_error(mailrelay(config, "queue", "delete", "0123456789ABCDEF")) == no_database
    # Neither the database nor its directory was made.
    assert not (tmp_path / "state").exists()


def test_user_add_and_passwd_without_a_terminal(tmp_path: Path) -> None:
    config = production_config(tmp_path)
    ok(mailrelay(config, "domain", "add", DOMAIN, "--notify", NOTIFY))
    no_terminal = "no terminal to ask for the password on; pipe it in with --password-stdin"
    assert user_error(mailrelay(config, "user", "add", "alice@example.org")) == no_terminal
    assert ok(mailrelay(config, "user", "list", "--json")) == "[]\n"  # nothing was added

    ok(mailrelay(config, "user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD))
    assert user_error(mailrelay(config, "user", "passwd", "alice@example.org")) == no_terminal


def test_a_database_directory_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    """The error names the database, the errno text and the directory it is about. Run as root,
    setpriv (util-linux) drops the capabilities that let root ignore file modes."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    config = write_config_file(tmp_path)[0]
    text = config.read_text().replace('path = "queue.sqlite3"', 'path = "locked/db/q.sqlite3"')
    config.write_text(text)
    drop = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    try:
        done = mailrelay(
            config,
            "domain",
            "add",
            DOMAIN,
            "--notify",
            NOTIFY,
            prefix=drop if os.geteuid() == 0 else (),
        )
    finally:
        locked.chmod(0o700)
    assert user_error(done) == (
        f"cannot open database {locked}/db/q.sqlite3: Permission denied: {locked}/db"
    )
