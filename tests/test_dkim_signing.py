"""DKIM signatures made by OpenSSL: byte-identical to dkimpy's own signer, and verified by dkimpy.

RSASSA-PKCS1-v1_5 and Ed25519 are deterministic, so for the same key, message and t= the field
`dkim.sign` writes must equal dkimpy's exactly; that proves canonicalisation, header selection,
tag layout and folding are dkimpy's, and only the arithmetic moved to OpenSSL.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import dkim as dkimpy
import pytest

from mailrelay import dkim
from mailrelay.dkim import DkimKey
from tests.test_dkim import (
    DOMAIN,
    EVIL_FROM,
    MESSAGE,
    dkimpy_verify,
    dnsfunc,
    independent_verify,
    signature_tags,
    split_message,
)

NOW = datetime(2026, 11, 22, 9, 30)
T = 1_795_340_000  # a fixed t=, so that two signers can be compared byte for byte

# Folded and repeated fields (two resent blocks), odd spacing and letter case, raw UTF-8 in a
# field (RFC 6532), an 8-bit body that is not even valid UTF-8, trailing whitespace and trailing
# empty lines; enough signed fields that h= folds over several lines. It is also a message that
# OpenDKIM accepts: it refuses a second To or Cc field outright, as RFC 5322 §3.6 allows one.
AWKWARD = (
    b"Received: from client.example.org by relay\r\n"
    b"Received: from laptop by client.example.org\r\n"
    b"Resent-Date: Sun, 22 Nov 2026 09:35:00 +0100\r\n"
    b"Resent-From: desk@example.org\r\n"
    b"Resent-To: erin@example.net\r\n"
    b"Resent-Date: Sun, 22 Nov 2026 09:32:00 +0100\r\n"
    b"Resent-From: desk@example.org\r\n"
    b"Resent-To: frank@example.net\r\n"
    b"FROM:   Alice  Example\r\n\t<alice@example.org>   \r\n"
    b"To: bob@example.net,\r\n"
    b" carol@example.net\r\n"
    b"Cc: dave@example.net\r\n"
    b"reply-TO: desk@example.org\r\n"
    b"Subject: Gr\xc3\xbc\xc3\x9fe aus\r\n"
    b"   \t  K\xc3\xb6ln \r\n"
    b"Date: Sun, 22 Nov 2026 09:30:00 +0100\r\n"
    b"Message-ID: <awkward.1@example.org>\r\n"
    b"In-Reply-To: <0@example.net>\r\n"
    b"References: <0@example.net>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain;\r\n"
    b"\tcharset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"List-Id: Figures <figures.example.org>\r\n"
    b"List-Unsubscribe: <https://example.org/u/1>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Gr\xfc\xdfe,  caf\xe9 \t \r\n"
    b"\xff\xfe raw bytes\t\r\n"
    b" \r\n"
    b"\r\n"
    b"\r\n"
)
MESSAGES = {"plain": MESSAGE, "awkward": AWKWARD}


@pytest.fixture(scope="module")
def key_set(tmp_path_factory: pytest.TempPathFactory) -> list[DkimKey]:
    # Full-size RSA: the size production signs with.
    key_dir = tmp_path_factory.mktemp("dkim") / "keys"
    return dkim.generate_keys(DOMAIN, str(key_dir), "rsa+ed25519", 2048, NOW)


def dkimpy_signature(message: bytes, key: DkimKey) -> bytes:
    """The field dkimpy itself signs, chosen as mailrelay chose before signing moved to OpenSSL:
    the present fields of dkim.SIGNED_HEADERS, From once more, relaxed/relaxed."""
    signer = dkimpy.DKIM(message, signature_algorithm=key.algorithm.encode())
    present = [name.lower() for name, _value in signer.headers]
    include = [name for name in present if name.decode() in dkim.SIGNED_HEADERS] + [b"from"]
    field = signer.sign(
        key.selector.encode(),
        DOMAIN.encode(),
        dkim.load_private_key(key.private_key_path),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include,
    )
    assert isinstance(field, bytes)
    return field


def signature_fields(signed: bytes, message: bytes) -> bytes:
    assert signed.endswith(message)
    return signed[: -len(message)]


@pytest.mark.parametrize("name", sorted(MESSAGES))
@pytest.mark.parametrize("idx", [0, 1], ids=["rsa-sha256", "ed25519-sha256"])
def test_signature_equals_dkimpys_byte_for_byte(
    key_set: list[DkimKey], name: str, idx: int
) -> None:
    message, key = MESSAGES[name], key_set[idx]
    expected = dkimpy_signature(message, key)
    timestamp = int(signature_tags(expected)["t"])
    ours = signature_fields(dkim.sign(message, domain=DOMAIN, keys=[key], now=timestamp), message)
    assert ours == expected
    # The comparison is not vacuous: the field is complete, folded, and signs what it should.
    assert ours.startswith(f"DKIM-Signature: v=1; a={key.algorithm}; c=relaxed/relaxed;".encode())
    assert ours.endswith(b"\r\n") and ours.count(b"\r\n") > 1
    assert signature_tags(ours)["h"].split(b":").count(b"from") == 2


def test_awkward_message_signs_every_present_field_and_from_once_more(
    key_set: list[DkimKey],
) -> None:
    signed = dkim.sign(AWKWARD, domain=DOMAIN, keys=key_set, now=T)
    assert signed.endswith(AWKWARD)
    for idx in (0, 1):
        assert signature_tags(signed, idx)["h"].split(b":") == [
            b"resent-date", b"resent-from", b"resent-to", b"resent-date", b"resent-from",
            b"resent-to", b"from", b"to", b"cc", b"reply-to", b"subject", b"date",
            b"message-id", b"in-reply-to", b"references", b"mime-version", b"content-type",
            b"content-transfer-encoding", b"list-id", b"list-unsubscribe",
            b"list-unsubscribe-post", b"from",
        ]  # fmt: skip
        assert signature_tags(signed, idx)["t"] == str(T).encode()


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_rsa_and_ed25519_signatures_verify_with_dkimpy(key_set: list[DkimKey], name: str) -> None:
    message = MESSAGES[name]
    signed = dkim.sign(message, domain=DOMAIN, keys=key_set)
    assert [signature_tags(signed, i)["a"] for i in (0, 1)] == [b"rsa-sha256", b"ed25519-sha256"]
    assert dkimpy.verify(signed, dnsfunc=dnsfunc(key_set))  # the top (RSA) signature
    assert dkimpy_verify(signed, key_set, idx=0)
    assert dkimpy_verify(signed, key_set, idx=1)  # RFC 8463
    for idx, key in enumerate(key_set):
        assert independent_verify(signed, key, idx)


def test_two_key_signature_is_the_two_single_key_signatures(key_set: list[DkimKey]) -> None:
    both = dkim.sign(AWKWARD, domain=DOMAIN, keys=key_set, now=T)
    one_by_one = [
        signature_fields(dkim.sign(AWKWARD, domain=DOMAIN, keys=[key], now=T), AWKWARD)
        for key in key_set
    ]
    assert both == b"".join(one_by_one) + AWKWARD


@pytest.mark.parametrize(
    ("original", "replacement"),
    [
        (b"raw bytes", b"raw bites"),  # the body
        (b"Gr\xfc\xdfe,", b"Gr\xfc\xdf,"),  # an 8-bit body byte
        (b"carol@example.net", b"mallory@example.net"),  # a signed, folded header field
    ],
)
def test_tampering_fails_verification(
    key_set: list[DkimKey], original: bytes, replacement: bytes
) -> None:
    signed = dkim.sign(AWKWARD, domain=DOMAIN, keys=key_set)
    tampered = signed.replace(original, replacement)
    assert tampered != signed
    assert not dkimpy.verify(tampered, dnsfunc=dnsfunc(key_set))
    for idx, key in enumerate(key_set):
        assert not dkimpy_verify(tampered, key_set, idx)
        assert not independent_verify(tampered, key, idx)


def test_added_from_breaks_both_signatures(key_set: list[DkimKey]) -> None:
    signed = dkim.sign(AWKWARD, domain=DOMAIN, keys=key_set)
    head, sep, tail = signed.partition(b"FROM:")
    forged = head + EVIL_FROM + sep + tail
    for idx, key in enumerate(key_set):
        assert not dkimpy_verify(forged, key_set, idx)
        assert not independent_verify(forged, key, idx)


def test_relaxed_signature_survives_refolding(key_set: list[DkimKey]) -> None:
    signed = dkim.sign(AWKWARD, domain=DOMAIN, keys=key_set)
    refolded = signed.replace(b"To: bob@example.net,\r\n carol", b"To:bob@example.net, carol")
    refolded = refolded.replace(b"\xff\xfe raw bytes\t\r\n", b"\xff\xfe  raw bytes\r\n")
    fields, _ = split_message(refolded)
    assert len(fields) == len(split_message(signed)[0])
    for idx, key in enumerate(key_set):
        assert dkimpy_verify(refolded, key_set, idx)
        assert independent_verify(refolded, key, idx)


def test_key_file_is_read_once_and_a_rotated_key_is_used(tmp_path: Path) -> None:
    first = dkim.generate_keys(DOMAIN, str(tmp_path), "rsa+ed25519", 1024, NOW)
    signed = dkim.sign(MESSAGE, domain=DOMAIN, keys=first, now=T)
    # The key files go away; signing goes on with the keys parsed the first time.
    moved = tmp_path / "moved"
    shutil.move(tmp_path / DOMAIN, moved)
    assert not any(Path(k.private_key_path).exists() for k in first)
    assert dkim.sign(MESSAGE, domain=DOMAIN, keys=first, now=T) == signed
    shutil.move(moved, tmp_path / DOMAIN)

    # A rotation makes new files: the next message is signed with the new keys.
    second = dkim.generate_keys(DOMAIN, str(tmp_path), "rsa+ed25519", 1024, NOW)
    rotated = dkim.sign(MESSAGE, domain=DOMAIN, keys=second, now=T)
    assert [signature_tags(rotated, i)["s"] for i in (0, 1)] == [
        b"mr20261122-2",
        b"mr20261122-2e",
    ]
    for idx in (0, 1):
        assert dkimpy_verify(rotated, second, idx)
        assert not dkimpy_verify(rotated, first, idx)


def test_signing_from_many_threads_gives_one_answer(key_set: list[DkimKey]) -> None:
    expected = dkim.sign(AWKWARD, domain=DOMAIN, keys=key_set, now=T)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(
            pool.map(lambda _: dkim.sign(AWKWARD, domain=DOMAIN, keys=key_set, now=T), range(64))
        )
    assert set(results) == {expected}


def test_key_of_the_wrong_algorithm_is_refused(key_set: list[DkimKey]) -> None:
    rsa_key, ed_key = key_set
    mislabelled = DkimKey(ed_key.selector, "rsa-sha256", ed_key.private_key_path, "")
    with pytest.raises(ValueError, match="not an rsa-sha256 key"):
        dkim.sign(MESSAGE, domain=DOMAIN, keys=[rsa_key, mislabelled])


def test_header_line_that_is_not_a_field_is_refused(key_set: list[DkimKey]) -> None:
    with pytest.raises(dkimpy.MessageFormatError):
        dkim.sign(b"From: a@example.org\r\nnot a field\r\n\r\nx\r\n", domain=DOMAIN, keys=key_set)
