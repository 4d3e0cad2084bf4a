"""What `check-config` and `serve` verify before they trust a config, run as operators run them.

The default config path, read-only commands on a missing database, the certificate and its key,
the directories the service writes and reads, listen addresses and a hostname receivers accept.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailrelay.config import DEFAULT_PATH
from mailrelay.submission.tls import ensure_self_signed
from tests.conftest import write_config_file
from tests.test_cli import cli, config_error, run, user_error

REPO = Path(__file__).resolve().parent.parent
NO_CONFIG = (
    f"no configuration at {DEFAULT_PATH} (the default); give --config PATH or set MAILRELAY_CONFIG"
)
NOT_FQDN = (
    "hostname: {name!r} is not a fully qualified domain name; receivers refuse EHLO from it:"
    " set hostname to this relay's DNS name (allow_local_hostname = true allows it for"
    " development)"
)


def problems(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines a refused config prints, one per problem (without "mailrelay: "); the exit
    status is 78 (EX_CONFIG), which the systemd unit does not restart on."""
    assert done.returncode == 78, done
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert all(line.startswith("mailrelay: ") for line in lines), done.stderr
    return [line.removeprefix("mailrelay: ") for line in lines]


def config_with(directory: Path, *, hostname: str = "relay.test", extra: str = "") -> Path:
    """The tests' usual config, with a real certificate and key already made."""
    path, _port = write_config_file(directory)
    text = path.read_text().replace('hostname = "relay.test"', f"hostname = {hostname!r}" + extra)
    path.write_text(text.replace("self_signed_if_missing = true", "self_signed_if_missing = false"))
    ensure_self_signed(
        str(directory / "tls/cert.pem"), str(directory / "tls/key.pem"), "relay.test"
    )
    return path


def write_certificate(cert: Path, key: Path, not_before: datetime.datetime, days: int) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    built = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=days))
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(built.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


# ---- 1. the default config path ----------------------------------------------------------------


def test_help_names_the_default_config_path() -> None:
    done = run("--help")
    assert done.returncode == 0
    assert f"else {DEFAULT_PATH})" in " ".join(done.stdout.split())


@pytest.mark.skipif(os.path.exists(DEFAULT_PATH), reason=f"{DEFAULT_PATH} exists here")
@pytest.mark.parametrize("args", [["check-config"], ["domain", "list"], ["serve"]])
def test_without_config_a_missing_default_is_an_error(tmp_path: Path, args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-m", "mailrelay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**env, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
    )
    assert config_error(done) == NO_CONFIG
    assert list(tmp_path.iterdir()) == []  # not the embedded defaults: nothing was made


def test_without_config_the_default_path_is_read(tmp_path: Path) -> None:
    # The real default is /etc/mailrelay/mailrelay.toml, which a test must not write: the same
    # command, with the module constant pointed at a file of ours before main() reads it.
    config = config_with(tmp_path)
    program = (
        "import sys; from mailrelay import config; from mailrelay.cli import main;"
        f" config.DEFAULT_PATH = {str(config)!r}; main(sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-c", program, "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done
    assert done.stdout.startswith("configuration ok: hostname=relay.test database=")


# ---- 2. read-only commands on a missing database -----------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["domain", "list"],
        ["domain", "list", "--json"],
        ["user", "list"],
        ["queue", "list"],
        ["queue", "show", "0123456789ABCDEF"],
        ["log"],
        ["log", "--json"],
    ],
)
def test_read_only_commands_do_not_create_the_database(tmp_path: Path, args: list[str]) -> None:
    config = config_with(tmp_path)
    text = config.read_text().replace('path = "queue.sqlite3"', 'path = "state/queue.sqlite3"')
    config.write_text(text)
    database = tmp_path / "state" / "queue.sqlite3"
    assert user_error(cli(config, *args)) == (
        f"no database at {database} (has `mailrelay serve` or `domain add` run with this config?)"
    )
    assert not (tmp_path / "state").exists()


def test_read_only_commands_read_an_existing_database(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    added = cli(config, "domain", "add", "example.org", "--notify", "postmaster@example.org")
    assert added.returncode == 0, added
    for args in (["domain", "list"], ["user", "list"], ["queue", "list"], ["log"]):
        done = cli(config, *args)
        assert (done.returncode, done.stderr) == (0, ""), done


# ---- 3. check-config looks at what the config points at ----------------------------------------


def test_check_config_prints_the_certificate_expiry(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    cert = tmp_path / "tls" / "cert.pem"
    expires = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    done = cli(config, "check-config")
    assert (done.returncode, done.stderr) == (0, ""), done
    ok, expiry = done.stdout.splitlines()
    assert ok == f"configuration ok: hostname=relay.test database={tmp_path / 'queue.sqlite3'}"
    assert expiry.startswith(f"certificate {cert} expires {expires:%Y-%m-%d %H:%M} UTC (in ")


def test_expired_certificate(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    write_certificate(cert, key, start, days=90)
    assert problems(cli(config, "check-config")) == [
        f"submission.cert_file: {cert} expired on 2020-03-31 00:00 UTC"
    ]


def test_certificate_and_key_that_do_not_match(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    now = datetime.datetime.now(datetime.UTC)
    write_certificate(tmp_path / "other.pem", key, now, days=30)  # a new key, another cert
    assert problems(cli(config, "check-config")) == [
        f"submission.key_file: {key} is not the key of the certificate in {cert}"
    ]


def test_missing_and_unparsable_certificate_files(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    cert.unlink()
    key.unlink()
    assert problems(cli(config, "check-config")) == [
        f"submission.cert_file: cannot read {cert}: No such file or directory",
        f"submission.key_file: cannot read {key}: No such file or directory",
    ]
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    assert problems(cli(config, "check-config")) == [
        f"submission.cert_file: {cert} holds no PEM certificate",
        f"submission.key_file: {key} holds no unencrypted PEM private key",
    ]


@pytest.mark.skipif(
    os.path.exists("/etc/mailrelay/tls"), reason="this machine has the default certificate paths"
)
def test_an_empty_file_loads_and_check_config_names_the_missing_certificate(
    tmp_path: Path,
) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    found = problems(cli(path, "check-config"))
    # Whether hostname and storage.path pass depends on this machine and user; these do not.
    assert [p for p in found if p.startswith("submission.")] == [
        "submission.cert_file: cannot read /etc/mailrelay/tls/fullchain.pem:"
        " No such file or directory",
        "submission.key_file: cannot read /etc/mailrelay/tls/privkey.pem:"
        " No such file or directory",
    ]


def test_self_signed_if_missing_accepts_absent_files(tmp_path: Path) -> None:
    config, _port = write_config_file(tmp_path)  # self_signed_if_missing = true, nothing made
    done = cli(config, "check-config")
    assert (done.returncode, done.stderr) == (0, ""), done
    assert not (tmp_path / "tls").exists()  # check-config made nothing


def test_storage_and_dkim_directories(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    config = config_with(tmp_path)
    text = config.read_text()
    text = text.replace('path = "queue.sqlite3"', 'path = "a-file/sub/queue.sqlite3"')
    config.write_text(text.replace('key_dir = "dkim"', 'key_dir = "a-file"'))
    assert problems(cli(config, "check-config")) == [
        f"storage.path: {tmp_path / 'a-file'} is not a directory",
        f"dkim.key_dir: {tmp_path / 'a-file'} is not a directory",
    ]
    # A database directory that does not exist yet is fine when it can be made (and is not).
    config.write_text(text.replace('"a-file/sub/queue.sqlite3"', '"new/sub/queue.sqlite3"'))
    done = cli(config, "check-config")
    assert (done.returncode, done.stderr) == (0, ""), done
    assert not (tmp_path / "new").exists()


def as_an_unprivileged_user(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mailrelay --config CONFIG ARGS` obeying file permissions even when the tests run as root:
    setpriv (util-linux) drops the capabilities that let root ignore them."""
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    command = [*(drop if os.geteuid() == 0 else []), sys.executable, "-m", "mailrelay"]
    return subprocess.run(
        [*command, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unwritable_storage_and_unreadable_dkim_directories(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    dkim = tmp_path / "dkim"
    dkim.mkdir(mode=0o300)
    config = config_with(tmp_path)
    text = config.read_text().replace('path = "queue.sqlite3"', 'path = "locked/queue.sqlite3"')
    config.write_text(text)
    try:
        assert problems(as_an_unprivileged_user(config, "check-config")) == [
            f"storage.path: directory {locked} is not writable by this user",
            f"dkim.key_dir: {dkim} is not readable by this user",
        ]
    finally:
        locked.chmod(0o700)
        dkim.chmod(0o700)


BAD_HOST = "has no valid host (an IP address or a host name)"
BAD_PORT = "has a bad port (from 1 to 65535)"


@pytest.mark.parametrize(
    ("listen", "error"),
    [
        ("256.0.0.1:2587", f"'256.0.0.1:2587' {BAD_HOST}"),
        ("127.0.0.1:0", f"'127.0.0.1:0' {BAD_PORT}"),
        ("127.0.0.1:65536", f"'127.0.0.1:65536' {BAD_PORT}"),
        ("::1:2587", "'::1:2587': write an IPv6 address as [::1]:2587"),
        ("[relay.test]:2587", f"'[relay.test]:2587' {BAD_HOST}"),
        ("relay_test:2587", f"'relay_test:2587' {BAD_HOST}"),
    ],
)
def test_listen_addresses_are_refused_at_load_time(tmp_path: Path, listen: str, error: str) -> None:
    path = tmp_path / "mailrelay.toml"
    path.write_text(f'hostname = "relay.test"\n[submission]\nlisten = ["{listen}"]\n')
    assert config_error(cli(path, "check-config")) == f"{path}: submission.listen[0]: {error}"
    # The same rules hold for every listener, the metrics one included.
    path.write_text(f'hostname = "relay.test"\n[metrics]\nlisten = "{listen}"\n')
    assert config_error(cli(path, "check-config")) == f"{path}: metrics.listen: {error}"


def test_every_problem_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    config = config_with(tmp_path, hostname="localhost")
    text = config.read_text().replace('key_dir = "dkim"', 'key_dir = "a-file"')
    config.write_text(text)
    (tmp_path / "tls" / "key.pem").unlink()
    assert problems(cli(config, "check-config")) == [
        NOT_FQDN.format(name="localhost"),
        f"submission.key_file: cannot read {tmp_path / 'tls' / 'key.pem'}:"
        " No such file or directory",
        f"dkim.key_dir: {tmp_path / 'a-file'} is not a directory",
    ]


# ---- 4. a hostname receivers accept ------------------------------------------------------------


@pytest.mark.parametrize("name", ["localhost", "mailhost", "localhost.localdomain"])
def test_check_config_refuses_a_local_hostname(tmp_path: Path, name: str) -> None:
    config = config_with(tmp_path, hostname=name)
    assert problems(cli(config, "check-config")) == [NOT_FQDN.format(name=name)]


def test_serve_refuses_a_local_hostname(tmp_path: Path) -> None:
    config = config_with(tmp_path, hostname="localhost")
    done = cli(config, "serve")
    assert config_error(done) == NOT_FQDN.format(name="localhost")
    assert not (tmp_path / "queue.sqlite3").exists()  # refused before anything started


def test_allow_local_hostname(tmp_path: Path) -> None:
    config = config_with(tmp_path, hostname="localhost", extra="\nallow_local_hostname = true")
    done = cli(config, "check-config")
    assert (done.returncode, done.stderr) == (0, ""), done
    assert done.stdout.startswith("configuration ok: hostname=localhost ")


def test_the_development_config_passes() -> None:
    # `make run`'s config says hostname = "localhost" and allows it; check-config makes nothing.
    done = cli(REPO / "config" / "mailrelay.dev.toml", "check-config")
    assert (done.returncode, done.stderr) == (0, ""), done
    assert done.stdout.startswith("configuration ok: hostname=localhost ")


def test_a_signing_key_the_service_cannot_read_is_named(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    added = cli(config, "domain", "add", "example.org", "--notify", "postmaster@example.org")
    assert added.returncode == 0, added.stderr
    [key] = [p for p in (tmp_path / "dkim").rglob("*") if p.is_file()]
    assert as_an_unprivileged_user(config, "check-config").returncode == 0
    # As when root made the key and the service runs as its own user.
    os.chown(key, 65534, 65534)
    refused = problems(as_an_unprivileged_user(config, "check-config"))
    assert len(refused) == 1
    assert refused[0].startswith("dkim: example.org selector ")
    assert refused[0].endswith(f"cannot read {key} (is it owned by the user the service runs as?)")
    # serve says the same before it starts anything.
    served = problems(as_an_unprivileged_user(config, "serve"))
    assert served == refused
