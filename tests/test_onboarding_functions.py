"""Domain onboarding at the level of the `mailrelay.onboarding` functions: retiring a DKIM key,
and the key a default config makes."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailrelay import config as configmod
from mailrelay import onboarding
from mailrelay.store import accounts, connect
from tests.conftest import make_config
from tests.test_onboarding import DOMAIN, NOTIFY


def test_retire_key(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    conn = connect(cfg.storage.path)
    onboarding.add(conn, cfg, DOMAIN, NOTIFY)
    [first] = accounts.keys(conn, DOMAIN, active_only=True)
    with pytest.raises(accounts.KeyInUse) as refused:
        onboarding.retire_key(conn, DOMAIN, first.selector)
    assert str(refused.value) == (
        f"DKIM key {first.selector} of example.org signs new mail;"
        " first run: mailrelay domain rotate-dkim example.org, then activate-dkim"
    )

    onboarding.rotate(conn, cfg, DOMAIN)
    asyncio.run(onboarding.activate(conn, cfg, DOMAIN, force=True))
    [second] = accounts.keys(conn, DOMAIN, active_only=True)
    with pytest.raises(accounts.KeyInUse):
        onboarding.retire_key(conn, DOMAIN, second.selector)
    with pytest.raises(accounts.NotFound) as no_key:
        onboarding.retire_key(conn, DOMAIN, "mr1")
    assert str(no_key.value) == "domain example.org has no DKIM key mr1"
    with pytest.raises(accounts.NotFound) as no_domain:
        onboarding.retire_key(conn, "nosuch.example", first.selector)
    assert str(no_domain.value) == "no domain nosuch.example"

    retired = onboarding.retire_key(conn, "Example.ORG.", first.selector)
    assert retired == dataclasses.replace(first, active=False)
    names = [r.name for r in onboarding.records(conn, cfg, DOMAIN).records]
    assert names == [f"{second.selector}._domainkey.example.org", DOMAIN, f"_dmarc.{DOMAIN}"]
    assert accounts.keys(conn, DOMAIN, active_only=False) == [second]
    with pytest.raises(accounts.NotFound):
        onboarding.retire_key(conn, DOMAIN, first.selector)
    # The file stays, so its selector is never given to another key.
    assert Path(first.private_key_path).is_file()
    onboarding.rotate(conn, cfg, DOMAIN)
    selectors = [k.selector for k in accounts.keys(conn, DOMAIN, active_only=False)]
    assert len(set(selectors)) == len(selectors) == 2 and first.selector not in selectors
    conn.close()


def test_default_config_makes_2048_bit_keys(tmp_path: Path) -> None:
    cfg = configmod.parse(
        {"hostname": "relay.test", "storage": {"path": "q.sqlite3"}, "dkim": {"key_dir": "dkim"}},
        base_dir=tmp_path,
    )
    assert (cfg.dkim.algorithm, cfg.dkim.rsa_bits) == ("rsa", 2048)
    conn = connect(cfg.storage.path)
    report = onboarding.add(conn, cfg, DOMAIN, NOTIFY)
    [key] = accounts.keys(conn, DOMAIN, active_only=True)
    conn.close()
    private = serialization.load_pem_private_key(
        Path(key.private_key_path).read_bytes(), password=None
    )
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    published = report.records[0].value.split("p=", 1)[1]
    public = serialization.load_der_public_key(base64.b64decode(published))
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    assert stat.S_IMODE(Path(key.private_key_path).stat().st_mode) == 0o600
