"""DKIM keys on disk, signatures checked by dkimpy and by an independent RFC 6376 verifier."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import authres
import dkim as dkimpy
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from mailrelay import dkim
from mailrelay.dkim import DkimKey

DOMAIN = "example.org"
NOW = datetime(2026, 11, 22, 9, 30)
# Small keys keep the tests fast; 1024 is the least verifiers accept (RFC 8301).
TEST_RSA_BITS = 1024

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: Quarterly figures\r\n"
    b"Date: Sun, 22 Nov 2026 09:30:00 +0100\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Mailer: test\r\n"
    b"Received: from client by relay\r\n"
    b"\r\n"
    b"Hello  Bob, \r\n"
    b"\r\n"
    b"the figures are attached.\r\n"
    b"\r\n"
    b"\r\n"
)
EVIL_FROM = b"From: CEO <ceo@example.org>\r\n"


@pytest.fixture(scope="module")
def key_set(tmp_path_factory: pytest.TempPathFactory) -> list[DkimKey]:
    key_dir = tmp_path_factory.mktemp("dkim") / "keys"
    return dkim.generate_keys(DOMAIN, str(key_dir), "rsa+ed25519", TEST_RSA_BITS, NOW)


def dns_for(keys: list[DkimKey]) -> dict[str, str]:
    return {f"{k.selector}._domainkey.{DOMAIN}.": k.public_record for k in keys}


def dnsfunc(keys: list[DkimKey]) -> Callable[..., bytes | None]:
    records = dns_for(keys)

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        value = records.get(name.decode())
        return value.encode() if value is not None else None

    return lookup


def dkimpy_verify(message: bytes, keys: list[DkimKey], idx: int = 0) -> bool:
    # DKIM.verify raises for some failures (a body hash mismatch) where dkim.verify returns False.
    try:
        return bool(dkimpy.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc(keys)))
    except dkimpy.DKIMException:
        return False


# -- an independent verifier (RFC 6376 §3.4, §3.7), not sharing code with dkimpy ---------------


def split_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name, value))
    return fields, body


def relaxed_body(body: bytes) -> bytes:
    # §3.4.4: strip trailing WSP on lines, reduce WSP runs to one SP, drop trailing empty lines.
    lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" \t") for line in body.split(b"\r\n")]
    while lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def relaxed_header(name: bytes, value: bytes) -> bytes:
    # §3.4.2: lower-case name, unfold, reduce WSP runs, trim around the colon and at the end.
    value = re.sub(rb"\r\n", b"", value)
    value = re.sub(rb"[ \t]+", b" ", value).strip(b" ")
    return name.strip().lower() + b":" + value


def tags(value: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for part in re.sub(rb"\s+", b"", value).split(b";"):
        if part:
            name, _, v = part.partition(b"=")
            out[name.decode()] = v
    return out


def independent_verify(message: bytes, key: DkimKey, idx: int = 0) -> bool:
    fields, body = split_message(message)
    signatures = [f for f in fields if f[0].lower() == b"dkim-signature"]
    sig_name, sig_value = signatures[idx]
    sig = tags(sig_value)
    if base64.b64decode(sig["bh"]) != hashlib.sha256(relaxed_body(body)).digest():
        return False
    # §5.4.2: for a name listed n times, take its instances from the bottom up; a name listed
    # more often than it occurs contributes nothing, which is what makes over-signing work.
    remaining: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for name, value in fields:
        remaining.setdefault(name.lower(), []).append((name, value))
    hashed = b""
    for name in sig["h"].lower().split(b":"):
        instances = remaining.get(name, [])
        if instances:
            hashed += relaxed_header(*instances.pop()) + b"\r\n"
    unsigned = re.sub(rb"(;\s*b=)[^;]*$", rb"\1", sig_value)
    hashed += relaxed_header(sig_name, unsigned)
    signature = base64.b64decode(sig["b"])
    p = base64.b64decode(tags(key.public_record.encode())["p"])
    try:
        if key.algorithm == "rsa-sha256":
            public = serialization.load_der_public_key(p)
            assert isinstance(public, rsa.RSAPublicKey)
            public.verify(signature, hashed, padding.PKCS1v15(), hashes.SHA256())
        else:
            # RFC 8463 §3: Ed25519 signs the SHA-256 hash of the data, not the data itself.
            ed_public = ed25519.Ed25519PublicKey.from_public_bytes(p)
            ed_public.verify(signature, hashlib.sha256(hashed).digest())
    except InvalidSignature:
        return False
    return True


def signature_tags(message: bytes, idx: int = 0) -> dict[str, bytes]:
    fields, _ = split_message(message)
    return tags([v for n, v in fields if n.lower() == b"dkim-signature"][idx])


# -- keys ------------------------------------------------------------------------------------


def test_keys_are_private_from_the_start(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    old = os.umask(0)  # even a permissive umask must not widen them
    try:
        keys = dkim.generate_keys(DOMAIN, str(key_dir), "rsa+ed25519", TEST_RSA_BITS, NOW)
    finally:
        os.umask(old)
    assert [(k.selector, k.algorithm) for k in keys] == [
        ("mr20261122", "rsa-sha256"),
        ("mr20261122e", "ed25519-sha256"),
    ]
    for directory in (key_dir, key_dir / DOMAIN):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for key in keys:
        assert stat.S_IMODE(os.stat(key.private_key_path).st_mode) == 0o600
        assert Path(key.private_key_path).parent == key_dir / DOMAIN
    # No temporary file is left next to them.
    assert sorted(p.name for p in (key_dir / DOMAIN).iterdir()) == [
        "mr20261122.pem",
        "mr20261122e.pem",
    ]


def test_same_day_rotation_gets_new_selectors(tmp_path: Path) -> None:
    first = dkim.generate_keys(DOMAIN, str(tmp_path), "rsa", TEST_RSA_BITS, NOW)
    second = dkim.generate_keys(DOMAIN, str(tmp_path), "rsa+ed25519", TEST_RSA_BITS, NOW)
    third = dkim.generate_keys(DOMAIN, str(tmp_path), "rsa", TEST_RSA_BITS, NOW)
    assert [k.selector for k in first] == ["mr20261122"]
    assert [k.selector for k in second] == ["mr20261122-2", "mr20261122-2e"]
    assert [k.selector for k in third] == ["mr20261122-3"]
    assert first[0].public_record != third[0].public_record


def test_record_and_private_key_formats(key_set: list[DkimKey]) -> None:
    rsa_key, ed_key = key_set
    assert re.fullmatch(r"v=DKIM1; k=rsa; p=[A-Za-z0-9+/]+=*", rsa_key.public_record)
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", ed_key.public_record)
    assert Path(rsa_key.private_key_path).read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY")
    assert Path(ed_key.private_key_path).read_bytes().startswith(b"-----BEGIN PRIVATE KEY")
    assert dkim.load_private_key(rsa_key.private_key_path).startswith(b"-----BEGIN RSA")
    assert len(base64.b64decode(dkim.load_private_key(ed_key.private_key_path))) == 32
    for key in key_set:
        assert dkim.public_record(key.private_key_path) == key.public_record


@pytest.mark.parametrize("domain", ["../etc", "a/b", "", ".", "exa mple.org"])
def test_domain_cannot_escape_the_key_directory(tmp_path: Path, domain: str) -> None:
    with pytest.raises(ValueError, match="not a domain name"):
        dkim.generate_keys(domain, str(tmp_path), "rsa", TEST_RSA_BITS, NOW)
    assert list(tmp_path.iterdir()) == []


# -- signing ---------------------------------------------------------------------------------


def test_signature_verifies_with_dkimpy(key_set: list[DkimKey]) -> None:
    signed = dkim.sign(MESSAGE, domain=DOMAIN, keys=key_set)
    assert signed.endswith(MESSAGE)
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert b"\r\n" in signed and b"\n" not in signed.replace(b"\r\n", b"")
    assert dkimpy.verify(signed, dnsfunc=dnsfunc(key_set))
    assert dkimpy_verify(signed, key_set, idx=0)
    assert dkimpy_verify(signed, key_set, idx=1)  # the Ed25519 one


def test_signature_verifies_independently(key_set: list[DkimKey]) -> None:
    signed = dkim.sign(MESSAGE, domain=DOMAIN, keys=key_set)
    _, body = split_message(MESSAGE)
    for idx, key in enumerate(key_set):
        sig = signature_tags(signed, idx)
        assert sig["a"] == key.algorithm.encode()
        assert sig["c"] == b"relaxed/relaxed"
        assert sig["d"] == DOMAIN.encode()
        assert sig["s"] == key.selector.encode()
        assert base64.b64decode(sig["bh"]) == hashlib.sha256(relaxed_body(body)).digest()
        assert sig["h"].split(b":") == [
            b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
            b"content-type", b"from",
        ]  # fmt: skip
        assert independent_verify(signed, key, idx)


def test_relaxed_canonicalization_survives_rewrapping(key_set: list[DkimKey]) -> None:
    signed = dkim.sign(MESSAGE, domain=DOMAIN, keys=key_set)
    rewrapped = signed.replace(b"Subject: Quarterly figures", b"Subject:  Quarterly\r\n\tfigures ")
    rewrapped = rewrapped.replace(b"Hello  Bob, \r\n", b"Hello Bob,\r\n") + b"\r\n\r\n"
    assert dkimpy_verify(rewrapped, key_set)
    assert independent_verify(rewrapped, key_set[0])
    tampered = signed.replace(b"attached", b"deleted")
    assert not dkimpy_verify(tampered, key_set)
    assert not independent_verify(tampered, key_set[0])


def test_added_from_breaks_the_signature(key_set: list[DkimKey]) -> None:
    signed = dkim.sign(MESSAGE, domain=DOMAIN, keys=key_set)
    head, sep, _ = signed.partition(b"From: Alice")
    forged = head + EVIL_FROM + sep + signed[len(head) + len(sep) :]
    assert forged.count(b"\r\nFrom: ") == 2
    for idx, key in enumerate(key_set):
        assert not independent_verify(forged, key, idx)
        assert not dkimpy_verify(forged, key_set, idx)


def test_independent_verifier_would_miss_a_forgery_without_oversigning(
    key_set: list[DkimKey],
) -> None:
    # The control for the test above: with From signed only once, RFC 6376 verification of the
    # forged message passes, so the test above really depends on sign() over-signing From.
    rsa_key = key_set[0]
    header = dkimpy.sign(
        MESSAGE,
        rsa_key.selector.encode(),
        DOMAIN.encode(),
        dkim.load_private_key(rsa_key.private_key_path),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject"],
    )
    forged = header + EVIL_FROM + MESSAGE
    assert independent_verify(header + MESSAGE, rsa_key)
    assert independent_verify(forged, rsa_key)


def test_only_present_headers_are_signed(key_set: list[DkimKey]) -> None:
    message = (
        b"From: a@example.org\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nx\r\n"
    )
    signed = dkim.sign(message, domain=DOMAIN, keys=key_set[:1])
    assert signature_tags(signed)["h"] == b"from:list-unsubscribe-post:from"
    assert independent_verify(signed, key_set[0])


def test_message_without_from_is_refused(key_set: list[DkimKey]) -> None:
    with pytest.raises(ValueError, match="no From"):
        dkim.sign(b"To: b@example.net\r\n\r\nx\r\n", domain=DOMAIN, keys=key_set)


# -- Authentication-Results ------------------------------------------------------------------


def test_authentication_results_parses_back() -> None:
    line = dkim.authentication_results("relay.example.net", "alice@example.org", "192.0.2.7")
    assert line == (
        "Authentication-Results: relay.example.net; auth=pass (client 192.0.2.7)"
        " smtp.auth=alice@example.org\r\n"
    )
    parsed = authres.AuthenticationResultsHeader.parse(line.rstrip("\r\n"))
    assert parsed.authserv_id == "relay.example.net"
    [result] = parsed.results
    assert (result.method, result.result, result.smtp_auth) == ("auth", "pass", "alice@example.org")


def test_authentication_results_without_client_address() -> None:
    line = dkim.authentication_results("relay.example.net", "alice@example.org", None)
    assert (
        line
        == "Authentication-Results: relay.example.net; auth=pass smtp.auth=alice@example.org\r\n"
    )


@pytest.mark.parametrize(
    ("hostname", "user", "client_ip"),
    [
        ("relay.example.net", "alice@example.org\r\nBcc: x@evil.example", None),
        ("relay.example.net", "", None),
        ("relay.example.net", "alice@example.org", "192.0.2.7) (x"),
    ],
)
def test_authentication_results_refuses_injection(
    hostname: str, user: str, client_ip: str | None
) -> None:
    with pytest.raises(ValueError):
        dkim.authentication_results(hostname, user, client_ip)
