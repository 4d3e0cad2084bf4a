"""What an operator reads: `/metrics` as Prometheus scrapes it (in one process and with the
delivery process's snapshot relayed), `queue list` and `queue show` as the real command prints
them, and the systemd unit."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import json
import re
import socket
import subprocess
import sys
import time
import typing
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from mailrelay import metrics
from mailrelay.config import LimitsConfig
from mailrelay.delivery.result import Insecure
from mailrelay.delivery.sts_fetch import StsError
from mailrelay.submission.handler import UserLimit
from mailrelay.submission.server import LimitName
from tests.conftest import Relay, RelayFactory, free_port, write_config_file
from tests.test_delivery import settled, start_relay, submit
from tests.test_service import scrape, start
from tests.world import MODERN, World

run = asyncio.to_thread
UNIT = Path(__file__).parent.parent / "systemd" / "mailrelay.service"
FIRST_ADDRESS = "127.0.43.1"  # this file's MX servers: 127.0.43.x
DEFERRING_REPLY = "451 4.3.0 Later"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def zero_series(text: str) -> None:
    """Every bounded label set is exported (at 0 until something happens)."""
    scraped = samples(text)
    expected = (
        [("mailrelay_smtpd_messages_rejected_total", {"code": c}) for c in metrics.REJECTED_CODES]
        + [("mailrelay_smtpd_limit_refusals_total", {"limit": n}) for n in metrics.LIMITS]
        + [
            ("mailrelay_smtp_messages_processed_total", {"status": s})
            for s in metrics.DELIVERY_STATUSES
        ]
        + [
            ("mailrelay_smtp_insecure_refusals_total", {"reason": r})
            for r in metrics.INSECURE_REASONS
        ]
        + [
            ("mailrelay_smtp_tls_policy_failures_total", {"policy": p, "reason": r})
            for p, r in metrics.POLICY_FAILURES
        ]
    )
    missing = [(n, ls) for n, ls in expected if (n, tuple(sorted(ls.items()))) not in scraped]
    assert missing == []


def literal_values(t: object) -> set[str]:
    """The strings of a Literal, or of a union of Literals."""
    args = typing.get_args(t)
    return {a for a in args if isinstance(a, str)} | {
        v for a in args if not isinstance(a, str) for v in literal_values(a)
    }


def test_the_pre_initialised_label_values_are_those_the_code_uses() -> None:
    assert set(metrics.INSECURE_REASONS) == {i.value for i in Insecure}
    assert set(metrics.LIMITS) == literal_values(LimitName) | literal_values(UserLimit)
    sts = {r for p, r in metrics.POLICY_FAILURES if p == "mta-sts"}
    assert literal_values(StsError) <= sts


async def test_metrics_have_build_info_zeros_and_no_created(relay: Relay) -> None:
    port = relay.service.metrics_server.port
    assert port is not None
    text = await run(scrape, port)
    assert "_created" not in text
    version = importlib.metadata.version("mailrelay")
    assert samples(text)[("mailrelay_build_info", (("version", version),))] == 1
    zero_series(text)
    cert = x509.load_pem_x509_certificate(await run(Path(relay.cert_file).read_bytes))
    expiry = ("mailrelay_tls_certificate_expiry_timestamp_seconds", ())
    assert samples(text)[expiry] == cert.not_valid_after_utc.timestamp()


def scrape_until(port: int, name: str) -> str:
    deadline = time.monotonic() + 15
    while not re.search(rf"^{name} ", text := scrape(port), re.MULTILINE):
        assert time.monotonic() < deadline, text
        time.sleep(0.1)
    return text


async def test_relayed_delivery_metrics_have_zeros_and_no_created(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """With delivery in its own process, /metrics serves that process's snapshot."""
    metrics_port = free_port()
    delivery = f'port = {free_port()}\nnameservers = ["127.0.0.1:{free_port()}"]\ndns_timeout = 1\n'
    config, _port = write_config_file(tmp_path, delivery=delivery, metrics_port=metrics_port)
    proc = start(config, notify_socket)
    try:
        assert (await run(notify_socket.recv, 1024)).startswith(b"READY=1")
        # The delivery gauges are exported only once the delivery process's snapshot is in.
        text = await run(scrape_until, metrics_port, "mailrelay_delivery_workers")
    finally:
        proc.terminate()
        await run(proc.wait, 30)
        assert proc.stderr is not None
        proc.stderr.close()
    assert "_created" not in text
    zero_series(text)


# ---- queue list and queue show -----------------------------------------------------------------


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path / "world", first_address=FIRST_ADDRESS) as w:
        await w.add_mx("example.org", MODERN)
        yield w


def mailrelay(relay: Relay, *argv: str) -> str:
    """The real command, against the relay's database; its stdout."""
    config = Path(relay.config.storage.path).parent / "cli.toml"
    config.write_text(f"[storage]\npath = {json.dumps(relay.config.storage.path)}\n")
    done = subprocess.run(
        [sys.executable, "-m", "mailrelay", "--config", str(config), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, ""), done
    return done.stdout


def when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


async def test_queue_list_and_show_tell_state_reason_next_attempt_and_evidence(
    tmp_path: Path, relay_factory: RelayFactory, world: World
) -> None:
    await world.add_mx("tls13.example", MODERN)
    await world.add_mx("r451.example", dataclasses.replace(MODERN, rcpt_reply=DEFERRING_REPLY))
    relay = await start_relay(tmp_path, relay_factory, world)
    queue_id = await run(submit, relay, ["bob@tls13.example", "carol@r451.example"])
    await settled(relay, queue_id, lambda r: r["state"] in ("sent", "deferred"))

    shown: dict[str, Any] = json.loads(
        await run(mailrelay, relay, "queue", "show", queue_id, "--json")
    )
    sent, deferred = shown["recipients"]
    assert (sent["state"], deferred["state"]) == ("sent", "deferred")
    assert DEFERRING_REPLY in deferred["reply"]

    listed = (await run(mailrelay, relay, "queue", "list")).splitlines()
    assert listed[1:] == [
        "    sent      bob@tls13.example, attempts 1",
        f"    deferred  carol@r451.example, next {when(deferred['next_attempt_at'])},"
        f" attempts 1 ({deferred['reply']})",
    ]

    text = (await run(mailrelay, relay, "queue", "show", queue_id)).splitlines()
    for r in (sent, deferred):
        [attempt] = r["delivery_attempts"]
        assert re.fullmatch("[0-9a-f]{64}", attempt["cert_fingerprint"])
        trust = "verified" if attempt["cert_verified"] else "unverified"
        line = (
            f"    attempt {when(attempt['at'])} {attempt['mx_host']}[{attempt['mx_address']}]"
            f" {attempt['verdict']}, tls={attempt['tls_protocol']}/{attempt['tls_cipher']},"
            f" cert=sha256:{attempt['cert_fingerprint']} ({trust}),"
            f" policy={attempt['policy']} ({attempt['reply']})"
        )
        assert line in text, text
        assert attempt["policy"] == "encrypt"


# ---- the systemd unit --------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_unit_reloads_with_sighup_and_has_descriptors_for_the_connections() -> None:
    unit = unit_settings()
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # Each session is a descriptor; the delivery side, the store and the listeners need more.
    assert int(unit["LimitNOFILE"][0]) >= 8 * LimitsConfig().max_connections
    # A start that keeps failing stops instead of looping, and a configuration error (exit 78,
    # as tests/test_cli.py::config_error asserts) is not restarted at all.
    assert unit["Restart"] == ["on-failure"]
    assert int(unit["StartLimitBurst"][0]) * 2 < int(unit["StartLimitIntervalSec"][0])
    assert unit["RestartPreventExitStatus"] == ["78"]
