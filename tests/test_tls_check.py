"""`tls-check` against the test world: it must say before sending what delivery would do."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailrelay.config import Config
from mailrelay.delivery.probe import tls_check
from tests.conftest import make_config
from tests.world import EXPIRED_CERT, MODERN, NO_STARTTLS, STARTTLS_454, TLS10_ONLY, World


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path / "world") as w:
        yield w


def config(tmp_path: Path, world: World, **delivery: object) -> Config:
    return make_config(
        tmp_path,
        delivery={
            "port": world.smtp_port,
            "nameservers": world.nameservers,
            "ca_file": str(world.ca_file),
            "dns_timeout": 1,
            "connect_timeout": 5,
            **delivery,
        },
    )


async def test_secure_domain(tmp_path: Path, world: World) -> None:
    good = await world.add_mx("good.example", MODERN)
    report = await tls_check(config(tmp_path, world), "good.example")
    assert report.verdict == "secure"
    [mx] = report.mx
    assert (mx.host, mx.address, mx.starttls) == (good.hostname, good.address[0], True)
    assert (mx.protocol, mx.cipher) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    assert mx.certificate_subject == f"CN={good.hostname}"
    assert mx.certificate_verified is True and mx.verdict == "secure"
    assert good.all_messages == []  # a probe sends no mail


async def test_partly_and_wholly_insecure(tmp_path: Path, world: World) -> None:
    weak = await world.add_mx("mixed.example", TLS10_ONLY, preference=10)
    await world.add_mx("mixed.example", MODERN, preference=20)
    plain = await world.add_mx("plain.example", NO_STARTTLS)
    cfg = config(tmp_path, world)
    mixed = await tls_check(cfg, "mixed.example")
    assert mixed.verdict == "partly secure"
    assert [(m.preference, m.verdict, m.status) for m in mixed.mx] == [
        (10, "insecure", "5.7.10"),
        (20, "secure", "2.0.0"),
    ]
    assert mixed.mx[0].protocol == "TLSv1"
    assert mixed.mx[0].detail == f"{weak.hostname}[{weak.address[0]}]: negotiated TLSv1.0"
    plain_report = await tls_check(cfg, "plain.example")
    assert plain_report.verdict == "insecure"
    assert [(m.starttls, m.status) for m in plain_report.mx] == [(False, "5.7.4")]
    assert plain.all_messages == []


async def test_verify_shows_the_refused_certificate(tmp_path: Path, world: World) -> None:
    await world.add_mx("expired.example", EXPIRED_CERT)
    await world.add_mx("busy.example", STARTTLS_454)
    cfg = config(tmp_path, world, domains={"expired.example": {"security_level": "verify"}})
    report = await tls_check(cfg, "expired.example")
    assert (report.verdict, report.security_level) == ("insecure", "verify")
    [mx] = report.mx
    assert mx.status == "5.7.5" and "certificate has expired" in mx.detail
    assert mx.certificate_verified is False and mx.certificate_not_after is not None
    busy = await tls_check(cfg, "busy.example")
    assert busy.verdict == "unreachable" and busy.mx[0].status == "4.7.0"


async def test_no_mail_service(tmp_path: Path, world: World) -> None:
    world.dns.add("nullmx.example", "MX", "0 .")
    cfg = config(tmp_path, world)
    assert (await tls_check(cfg, "nullmx.example")).verdict == "no mail service"
    assert (await tls_check(cfg, "nxdomain.example")).verdict == "no mail service"


async def test_cli_tls_check(tmp_path: Path, world: World) -> None:
    good = await world.add_mx("good.example", MODERN)
    await world.add_mx("plain.example", NO_STARTTLS)
    config = tmp_path / "mailrelay.toml"
    config.write_text(
        f'hostname = "relay.test"\n[storage]\npath = "q.sqlite3"\n'
        f'[delivery]\nport = {world.smtp_port}\nnameservers = ["{world.nameservers[0]}"]\n'
        f'ca_file = "{world.ca_file}"\n'
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "mailrelay", "--config", str(config), "tls-check", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    secure = await asyncio.to_thread(cli, "good.example", "--json")
    assert secure.returncode == 0, secure.stderr
    report = json.loads(secure.stdout)
    assert (report["domain"], report["verdict"]) == ("good.example", "secure")
    assert [(m["host"], m["protocol"], m["starttls"]) for m in report["mx"]] == [
        (good.hostname, "TLSv1.3", True)
    ]
    plain = await asyncio.to_thread(cli, "plain.example")
    assert plain.returncode == 1
    lines = plain.stdout.splitlines()
    assert lines[0].startswith("plain.example: INSECURE (no MX meets the policy")
    assert "STARTTLS no; -" in plain.stdout
    assert lines[-1].endswith("]: does not offer STARTTLS")
