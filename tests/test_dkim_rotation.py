"""Two-step DKIM rotation, zone-file records, key ownership when run as root, and `user add`
without a terminal: each driven through the real `mailrelay` command in a separate process, the
rotation against a real relay and the test world's DNS."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from asyncio import to_thread
from pathlib import Path

from mailrelay import config as configmod
from tests.conftest import RelayFactory
from tests.test_cli import run, user_error
from tests.test_onboarding import (
    DOMAIN,
    NOTIFY,
    acli,
    ajson,
    check,
    dest,
    dkimpy_results,
    independent_results,
    key_file,
    onboard,
    publish,
    selector_of,
    submit,
    world,  # noqa: F401  (a fixture)
    write_config,
)
from tests.world import World

NOBODY = 65534  # a uid that is not root, as a service user's would be
ZONE_DKIM = re.compile(
    r'  (mr\S+)\._domainkey\.example\.org\. IN TXT \( "v=DKIM1; k=rsa; " "(p=[^"]+)"( "[^"]+")* \)'
)


async def test_rotation_switches_only_once_the_next_record_is_published(
    tmp_path: Path,
    relay_factory: RelayFactory,
    world: World,  # noqa: F811
) -> None:
    config = write_config(tmp_path, world)
    relay = await relay_factory(configmod.load(config))
    records = await onboard(config, world)
    old = selector_of(records[0])

    rotated = await ajson(config, "domain", "rotate-dkim", DOMAIN)
    listed_old, next_record, _spf, _dmarc = rotated["records"]
    new = selector_of(next_record)
    assert listed_old == records[0] and new != old
    assert rotated["dkim"] == {"signing": [old], "next": [new], "rotated_out": []}
    assert stat.S_IMODE(key_file(config, new).stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file(config, new).parent.stat().st_mode) == 0o700
    assert await ajson(config, "domain", "records", DOMAIN) == rotated
    again = await acli(config, "domain", "rotate-dkim", DOMAIN)
    assert user_error(again).startswith(f"domain {DOMAIN} has a next DKIM key already ({new})")

    # Signing is unchanged, and the domain stays valid while the next record is unpublished.
    await to_thread(submit, relay)
    [first] = await dest(world).wait_for_messages(1)
    assert independent_results(first.data, rotated["records"]) == [old]
    code, report = await check(config)
    assert (code, report["valid"]) == (0, True)
    assert report["next_dkim"] == [
        {
            "type": "TXT",
            "name": next_record["name"],
            "expected": next_record["value"],
            "found": [],
            "valid": False,
            "reason": "not published",
        }
    ]
    text = await acli(config, "domain", "check", DOMAIN)
    assert f"next DKIM key {next_record['name']}: not ready: not published" in text.stdout

    refused = await acli(config, "domain", "activate-dkim", DOMAIN)
    assert user_error(refused) == (
        f"{next_record['name']}: not published; publish the TXT record"
        f" `mailrelay domain records {DOMAIN}` shows for it, then run this again"
        " (--force switches without checking)"
    )
    # A record that does not match is refused too.
    world.dns.add(next_record["name"], "TXT", records[0]["value"])
    refused = await acli(config, "domain", "activate-dkim", DOMAIN)
    assert user_error(refused).startswith(
        f"{next_record['name']}: public key (p=) differs from this relay's key;"
    )
    world.dns.remove(next_record["name"], "TXT")

    publish(world, [next_record])
    code, report = await check(config)
    assert [r["valid"] for r in report["next_dkim"]] == [True]
    activated = await acli(config, "domain", "activate-dkim", DOMAIN)
    assert (activated.returncode, activated.stderr) == (0, ""), activated
    assert activated.stdout.splitlines()[0] == f"DKIM signing of {DOMAIN} now uses {new}"
    listed = await ajson(config, "domain", "records", DOMAIN)
    assert listed["dkim"] == {"signing": [new], "next": [], "rotated_out": [old]}
    assert listed["records"] == rotated["records"]  # the old selector is still listed

    await to_thread(submit, relay)
    second = (await dest(world).wait_for_messages(2))[1]
    assert independent_results(second.data, listed["records"]) == [new]
    assert await to_thread(dkimpy_results, second.data, world) == [True]

    retired = await acli(config, "domain", "retire-dkim", DOMAIN, old)
    assert retired.returncode == 0, retired
    after = await ajson(config, "domain", "records", DOMAIN)
    assert after["dkim"] == {"signing": [new], "next": [], "rotated_out": []}


async def test_activate_without_a_next_key_and_with_force(tmp_path: Path) -> None:
    config = write_config(tmp_path, None)
    added = await ajson(config, "domain", "add", DOMAIN, "--notify", NOTIFY)
    old = selector_of(added["records"][0])
    none = await acli(config, "domain", "activate-dkim", DOMAIN)
    assert user_error(none) == (
        f"domain {DOMAIN} has no next DKIM key; first run: mailrelay domain rotate-dkim {DOMAIN}"
    )
    rotated = await ajson(config, "domain", "rotate-dkim", DOMAIN)
    [new] = rotated["dkim"]["next"]
    # No DNS answers here at all: --force switches without looking.
    forced = await ajson(config, "domain", "activate-dkim", DOMAIN, "--force")
    assert forced["dkim"] == {"signing": [new], "next": [], "rotated_out": [old]}


def test_records_are_printed_in_zone_file_syntax(tmp_path: Path) -> None:
    config = write_config(tmp_path, None)
    # The default 2048 bits: a record longer than one 255-byte string.
    config.write_text(config.read_text().replace("rsa_bits = 1024", "rsa_bits = 2048"))
    out = run("--config", str(config), "domain", "add", DOMAIN, "--notify", NOTIFY)
    assert out.returncode == 0, out
    lines = out.stdout.splitlines()
    match = ZONE_DKIM.fullmatch(lines[2])
    assert match, lines[2]
    strings = re.findall(r'"([^"]*)"', lines[2])
    assert len(strings) == 3 and all(len(s.encode()) <= 255 for s in strings)
    as_json = run("--config", str(config), "domain", "records", DOMAIN, "--json")
    [dkim_record] = [r for r in json.loads(as_json.stdout)["records"] if "_domainkey" in r["name"]]
    # --json keeps the value whole.
    assert dkim_record["value"] == "".join(strings)
    assert lines[3] == '  example.org. IN TXT "v=spf1 a:relay.test ~all"'

    rotated = run("--config", str(config), "domain", "rotate-dkim", DOMAIN)
    assert rotated.returncode == 0, rotated
    notes = [line for line in rotated.stdout.splitlines() if line.startswith("  ;")]
    assert notes == [
        "  ; next DKIM key, not signing yet: publish it, then run:"
        f" mailrelay domain activate-dkim {DOMAIN}"
    ]


def test_root_gives_new_keys_to_the_owner_of_the_key_directory(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "this test checks what root does"
    config = write_config(tmp_path, None)
    key_dir = Path(configmod.load(config).dkim.key_dir)
    key_dir.mkdir(mode=0o700)
    os.chown(key_dir, NOBODY, NOBODY)  # as the service user's first start would leave it
    out = run("--config", str(config), "domain", "add", DOMAIN, "--notify", NOTIFY, "--json")
    assert out.returncode == 0, out
    selector = selector_of(json.loads(out.stdout)["records"][0])
    key = key_file(config, selector)
    for path in (key, key.parent, key_dir):
        assert (path.stat().st_uid, path.stat().st_gid) == (NOBODY, NOBODY), path
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    rotated = run("--config", str(config), "domain", "rotate-dkim", DOMAIN, "--json")
    assert rotated.returncode == 0, rotated
    [new] = json.loads(rotated.stdout)["dkim"]["next"]
    assert key_file(config, new).stat().st_uid == NOBODY


def test_root_with_no_owner_to_follow_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, None)
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    env["MAILRELAY_SERVICE_USER"] = "nobody"  # a service user that exists on this machine
    done = run("--config", str(config), "domain", "add", DOMAIN, "--notify", NOTIFY, env=env)
    key_dir = configmod.load(config).dkim.key_dir
    assert user_error(done) == (
        f"run as root, this would make DKIM keys under {key_dir} that the service user nobody"
        " cannot read; run it as that user: sudo -u nobody mailrelay ..."
    )
    # Nothing was made: neither the database nor a key.
    assert not Path(configmod.load(config).storage.path).exists()
    assert not Path(key_dir).exists()


def test_user_add_without_a_terminal_is_a_one_line_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, None)
    added = run("--config", str(config), "domain", "add", DOMAIN, "--notify", NOTIFY)
    assert added.returncode == 0, added
    done = subprocess.run(
        [*_mailrelay(), "--config", str(config), "user", "add", "alice@example.org"],
        stdin=subprocess.DEVNULL,  # not a terminal
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert user_error(done) == (
        "no terminal to ask for the password on; pipe it in with --password-stdin"
    )


def _mailrelay() -> list[str]:
    return [sys.executable, "-m", "mailrelay"]
