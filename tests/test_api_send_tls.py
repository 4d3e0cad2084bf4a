"""The API's HTTPS listener (issue 15): plain HTTP on loopback only; anywhere else HTTPS with the
submission certificate, TLS 1.2 or newer.

Every address of 127.0.0.0/8 is loopback, so the TLS branch is reached by listening on the
wildcard address 0.0.0.0 (not loopback, as a real deployment would write it), which also
answers on 127.0.0.1: the test dials that with a real TLS handshake. Nothing is faked."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from mailrelay.config import ApiConfig, ListenAddress
from tests.conftest import RelayFactory, free_port, make_config
from tests.test_api import TEXT_MESSAGE, add_domain, add_key


@pytest.mark.parametrize(
    ("host", "tls"),
    [
        ("127.0.0.1", False),
        ("127.0.103.7", False),
        ("::1", False),
        ("localhost", False),
        ("0.0.0.0", True),  # noqa: S104 -- the address under test
        ("192.0.2.10", True),
        ("2001:db8::1", True),
        ("relay.example.net", True),
    ],
)
def test_tls_everywhere_but_loopback(host: str, tls: bool) -> None:
    assert ApiConfig(listen=ListenAddress(host, 8025)).tls is tls


async def test_beyond_loopback_the_api_speaks_https_only(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    port = free_port("0.0.0.0")  # noqa: S104
    cfg = make_config(tmp_path, api={"listen": f"0.0.0.0:{port}"})
    add_domain(cfg, "example.org")
    _, token = add_key(cfg, "example.org", "send")
    relay = await relay_factory(cfg)
    assert relay.service.api is not None and relay.service.api.tls
    url = f"https://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(verify=relay.client_context(), headers=auth) as client:
        got = await client.post(f"{url}/v1/messages", json=TEXT_MESSAGE)
        assert got.status_code == 202, got.text
        assert got.extensions["network_stream"].get_extra_info("ssl_object").version() in (
            "TLSv1.2",
            "TLSv1.3",
        )
    conn = relay.db()
    try:
        data: bytes = conn.execute("SELECT data FROM messages").fetchone()[0]
    finally:
        conn.close()
    assert data.startswith(b"Received: by relay.test (mailrelay) with HTTPS id ")
    # TLS 1.1 and older are refused in the handshake.
    old = relay.client_context()
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    async with httpx.AsyncClient(verify=old) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{url}/v1/openapi.json")
    # Plain HTTP gets no answer.
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"http://127.0.0.1:{port}/v1/openapi.json")
