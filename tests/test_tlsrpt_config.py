"""The [tlsrpt] section: defaults (off), values, bad values named at load time, and the names the
reports carry when the operator leaves them empty."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailrelay import config as configmod
from mailrelay.config import ConfigError, TlsRptConfig
from mailrelay.tlsrpt.report import Identity, identity


def parse(**tlsrpt: Any) -> configmod.Config:
    return configmod.parse({"hostname": "relay.example.net", "tlsrpt": tlsrpt}, base_dir=Path())


def test_off_by_default_with_names_derived_from_the_hostname() -> None:
    cfg = parse()
    assert cfg.tlsrpt == TlsRptConfig()
    assert not cfg.tlsrpt.enabled
    assert identity(cfg) == Identity(
        organization_name="relay.example.net",
        contact_info="postmaster@relay.example.net",
        submitter="relay.example.net",
        from_address="noreply-tlsrpt@relay.example.net",
        hostname="relay.example.net",
    )


def test_every_key() -> None:
    cfg = parse(
        enabled=True,
        organization_name="Example B.V.",
        contact_info="tlsrpt@Example.org",
        from_address="reports@example.org",
        send_hour=0,
        max_rua=2,
        https_timeout="1m",
    )
    assert cfg.tlsrpt == TlsRptConfig(
        enabled=True,
        organization_name="Example B.V.",
        contact_info="tlsrpt@Example.org",
        from_address="reports@example.org",
        send_hour=0,
        max_rua=2,
        https_timeout=60.0,
    )
    # §5.3: the submitter is the contact address's domain.
    assert (identity(cfg).submitter, identity(cfg).from_address) == (
        "example.org",
        "reports@example.org",
    )


@pytest.mark.parametrize(
    "contact", ["https://example.org/tls-reports", "tlsrpt@exämple.org", "tlsrpt@localhost"]
)
def test_a_contact_without_a_usable_domain_leaves_the_hostname_as_submitter(contact: str) -> None:
    # The submitter goes into a header and a file name: a host name in A-labels, or ours.
    who = identity(parse(contact_info=contact))
    assert (who.contact_info, who.submitter, who.from_address) == (
        contact,
        "relay.example.net",
        "noreply-tlsrpt@relay.example.net",
    )


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"send_hour": 24}, "tlsrpt.send_hour: 24 is out of range (from 0 to 23)"),
        ({"max_rua": 0}, "tlsrpt.max_rua: 0 is out of range (from 1 to 20)"),
        ({"enabled": "yes"}, "tlsrpt.enabled: expected true or false, got 'yes'"),
        (
            {"from_address": "Reports <r@example.org>"},
            "tlsrpt.from_address: 'Reports <r@example.org>' is not an address (local@domain)",
        ),
        (
            {"from_address": "bérénice@example.org"},
            "tlsrpt.from_address: 'bérénice@example.org' is not an address (local@domain)",
        ),
        (
            {"organization_name": "Example\nBcc: x@example.org"},
            "tlsrpt.organization_name: 'Example\\nBcc: x@example.org' has a control character",
        ),
        ({"interval": "1d"}, "tlsrpt.interval: unknown key"),
    ],
)
def test_bad_values_are_named(values: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(**values)
    assert str(caught.value) == error


def test_the_example_config_shows_the_defaults() -> None:
    example = Path(__file__).parent.parent / "config" / "mailrelay.example.toml"
    assert configmod.load(example).tlsrpt == TlsRptConfig()
