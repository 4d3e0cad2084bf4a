"""DANE for SMTP (RFC 7672): which TLSA records are usable, and how they match certificate
chains made in the test (DANE-EE, DANE-TA, and input that must never raise)."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailrelay.delivery.dane import DaneMatch, DaneMismatch, Tlsa
from mailrelay.delivery.dane_match import match
from tests.test_dane import (
    DOMAIN,
    EE,
    EE_OTHER,
    INTERMEDIATE,
    ISSUED,
    LEAF,
    MX,
    OTHER,
    OWNER,
    TA,
    records,
)
from tests.world import Issued, TestCA, self_signed, tlsa_record

NAMES = (MX, DOMAIN)
NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


def chain(issued: Issued, length: int | None = None) -> list[bytes]:
    return issued.chain_der[:length]


def brief(text: str) -> str:
    return Tlsa.from_text(text).brief()


def sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# -- TLSA records ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "usable"),
    [
        (EE, True),
        (tlsa_record(LEAF, 3, 0, 2), True),
        (tlsa_record(TA.certificate, 2, 0, 0), True),
        (tlsa_record(TA.certificate, 2, 1, 0), True),
        (tlsa_record(LEAF, 1, 1, 1), False),  # PKIX-EE: not for SMTP (RFC 7672 §3.1.3)
        (tlsa_record(LEAF, 0, 0, 1), False),  # PKIX-TA
        ("3 1 1 abcd", False),  # too short for SHA2-256
        ("3 1 2 " + "ab" * 32, False),  # a SHA2-256 length under SHA2-512
        ("3 0 0 deadbeef", False),  # not a certificate
        ("2 1 0 00", False),  # not a public key
        ("3 2 1 " + "ab" * 32, False),  # no selector 2
        ("3 1 3 " + "ab" * 32, False),  # no matching type 3
        ("4 1 1 " + "ab" * 32, False),  # no usage 4
    ],
    # Stable ids: the records hold digests of keys made at import, different in every process
    # (pytest-xdist's workers must collect the same names).
    ids=[
        "ee-3-1-1",
        "ee-3-0-2",
        "ta-2-0-0",
        "ta-2-1-0",
        "pkix-ee",
        "pkix-ta",
        "short-digest",
        "sha256-length-under-sha512",
        "not-a-certificate",
        "not-a-key",
        "selector-2",
        "matching-type-3",
        "usage-4",
    ],
)
def test_which_records_are_usable(text: str, usable: bool) -> None:
    assert Tlsa.from_text(text).usable is usable


def test_records_have_a_presentation_form() -> None:
    full = Tlsa.from_text(tlsa_record(TA.certificate, 2, 0, 0))

    assert str(Tlsa.from_text(EE)) == EE
    assert Tlsa.from_text("3 1 1 AB CD") == Tlsa(3, 1, 1, b"\xab\xcd")
    assert full.brief() == f"2 0 0 {full.data.hex()[:32]}...({len(full.data)} bytes)"
    assert Tlsa.from_text(EE).brief() == EE
    with pytest.raises(ValueError, match="not a TLSA record"):
        Tlsa.from_text("3 1 one ab")


# -- matching: DANE-EE(3) --------------------------------------------------------------------------

NO_PATH = "no DANE-TA record names a certificate or key that the leaf chains to"
NO_EE = "no DANE-EE record matches the leaf"


def ee_match(text: str) -> DaneMatch:
    return DaneMatch("dane-ee", Tlsa.from_text(text), f"DANE-EE {brief(text)} matches the leaf")


def ta_match(text: str, anchor: str) -> DaneMatch:
    return DaneMatch("dane-ta", Tlsa.from_text(text), f"DANE-TA {brief(text)}: chain to {anchor}")


def mismatch(leaf: x509.Certificate, why: str, *texts: str) -> DaneMismatch:
    return DaneMismatch(
        f"certificate (leaf SHA-256 {sha256(leaf)}) does not match the TLSA records at {OWNER}: "
        f"{why}; records: {', '.join(map(brief, texts))}"
    )


@pytest.mark.parametrize(("selector", "mtype"), [(1, 1), (0, 1), (1, 2), (0, 0), (1, 0)])
def test_dane_ee_matches_the_leaf(selector: int, mtype: int) -> None:
    record = tlsa_record(LEAF, 3, selector, mtype)

    assert match(chain(ISSUED), records(record), NAMES, NOW) == ee_match(record)


def test_dane_ee_matches_an_rsa_key() -> None:
    issued = TA.issue([MX], key="rsa")
    record = tlsa_record(issued.leaf, 3, 1, 1)

    assert match(chain(issued), records(record), NAMES, NOW) == ee_match(record)


def test_dane_ee_ignores_names_and_dates() -> None:
    elsewhere = self_signed("elsewhere.example", not_before=NOW - 9 * DAY, not_after=NOW - DAY)
    record = tlsa_record(elsewhere.leaf, 3, 1, 1)

    assert match(chain(elsewhere), records(record), NAMES, NOW) == ee_match(record)


def test_dane_ee_mismatch_names_the_owner_and_the_records() -> None:
    result = match(chain(ISSUED), records(EE_OTHER), NAMES, NOW)

    assert result == DaneMismatch(
        f"certificate (leaf SHA-256 {sha256(LEAF)}) does not match the TLSA records at "
        f"{OWNER}: no DANE-EE record matches the leaf; records: {EE_OTHER}"
    )


def test_dane_ee_matches_the_leaf_only() -> None:
    record = tlsa_record(INTERMEDIATE.certificate, 3, 1, 1)

    assert match(chain(ISSUED), records(record), NAMES, NOW) == mismatch(LEAF, NO_EE, record)


def test_dane_ee_is_tried_before_dane_ta() -> None:
    ta = tlsa_record(TA.certificate, 2, 0, 1)

    assert match(chain(ISSUED), records(ta, EE), NAMES, NOW) == ee_match(EE)


# -- matching: DANE-TA(2) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("anchor", "selector", "mtype"),
    [(TA, 0, 1), (TA, 1, 1), (TA, 1, 2), (INTERMEDIATE, 0, 1)],
    ids=["root-0-1", "root-1-1", "root-1-2", "intermediate-0-1"],
)
def test_dane_ta_matches_an_anchor_the_server_sent(
    anchor: TestCA, selector: int, mtype: int
) -> None:
    record = tlsa_record(anchor.certificate, 2, selector, mtype)

    result = match(chain(ISSUED), records(record), NAMES, NOW)

    assert result == ta_match(record, anchor.certificate.subject.rfc4514_string())


@pytest.mark.parametrize("name", [MX, DOMAIN, "*.example.org", "MX1.Example.Org"])
def test_dane_ta_accepts_any_reference_name(name: str) -> None:
    issued = TA.issue([name], chain="full")
    record = tlsa_record(TA.certificate, 2, 0, 1)

    result = match(chain(issued), records(record), NAMES, NOW)

    assert result == ta_match(record, "CN=DANE trust anchor")


@pytest.mark.parametrize(
    "issued_to",
    [
        "mx2.example.org",
        "*.mx1.example.org",  # "*" stands for one label only (RFC 6125 §6.4.3)
        "*.org",
        "m*.example.org",
    ],
)
def test_dane_ta_refuses_a_certificate_for_another_name(issued_to: str) -> None:
    issued = TA.issue([issued_to], chain="full")
    record = tlsa_record(TA.certificate, 2, 0, 1)

    result = match(chain(issued), records(record), NAMES, NOW)

    why = f"the certificate is issued to {issued_to}, not to {MX} or {DOMAIN}"
    assert result == mismatch(issued.leaf, why, record)


@pytest.mark.parametrize(("selector", "anchor"), [(0, "CN=DANE trust anchor"), (1, "a public key")])
def test_dane_ta_published_whole_may_be_left_out_of_the_chain(selector: int, anchor: str) -> None:
    record = tlsa_record(TA.certificate, 2, selector, 0)

    # RFC 7671 §5.2.2: the server sends leaf and intermediate, not the trust anchor.
    result = match(chain(ISSUED, 2), records(record), NAMES, NOW)

    assert result == ta_match(record, anchor)


def test_an_intermediate_published_whole_may_be_left_out_too() -> None:
    record = tlsa_record(INTERMEDIATE.certificate, 2, 0, 0)

    result = match(chain(ISSUED, 1), records(record), NAMES, NOW)

    assert result == ta_match(record, "CN=DANE intermediate")


def test_a_bare_key_may_sign_the_leaf_itself() -> None:
    issued = TA.issue([MX], chain="leaf")
    record = tlsa_record(TA.certificate, 2, 1, 0)

    assert match(chain(issued), records(record), NAMES, NOW) == ta_match(record, "a public key")


def test_dane_ta_digest_needs_the_anchor_in_the_chain() -> None:
    record = tlsa_record(TA.certificate, 2, 0, 1)

    result = match(chain(ISSUED, 2), records(record), NAMES, NOW)

    assert result == mismatch(LEAF, NO_PATH, record)


def test_dane_ta_never_matches_the_leaf_itself() -> None:
    record = tlsa_record(LEAF, 2, 0, 1)

    assert match(chain(ISSUED), records(record), NAMES, NOW) == mismatch(LEAF, NO_PATH, record)


def test_dane_ta_checks_the_leaf_dates() -> None:
    expired = INTERMEDIATE.issue([MX], not_before=NOW - 9 * DAY, not_after=NOW - DAY, chain="full")
    record = tlsa_record(TA.certificate, 2, 0, 1)
    leaf = expired.leaf

    result = match(chain(expired), records(record), NAMES, NOW)

    why = (
        f"certificate CN={MX} is valid from {leaf.not_valid_before_utc:%Y-%m-%d} "
        f"to {leaf.not_valid_after_utc:%Y-%m-%d} only"
    )
    assert result == mismatch(leaf, why, record)


def test_dane_ta_checks_the_intermediate_dates() -> None:
    # The leaf outlives its issuer, which expires after a year, as the trust anchor does.
    issued = INTERMEDIATE.issue([MX], not_after=NOW + 500 * DAY, chain="full")
    record = tlsa_record(TA.certificate, 2, 0, 1)
    ca = INTERMEDIATE.certificate

    result = match(chain(issued), records(record), NAMES, NOW + 400 * DAY)

    why = (
        f"certificate CN=DANE intermediate is valid from {ca.not_valid_before_utc:%Y-%m-%d} "
        f"to {ca.not_valid_after_utc:%Y-%m-%d} only"
    )
    assert result == mismatch(issued.leaf, why, record)


def test_dane_ta_checks_signatures_not_names() -> None:
    # An impostor CA with the trust anchor's name signs the leaf; the real anchor is sent along.
    forged = TestCA("DANE trust anchor").issue([MX])
    record = tlsa_record(TA.certificate, 2, 0, 1)
    sent = [*chain(forged), TA.certificate.public_bytes(serialization.Encoding.DER)]

    assert match(sent, records(record), NAMES, NOW) == mismatch(forged.leaf, NO_PATH, record)


def certificate(
    subject: str,
    issuer: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    eku: bool = True,
    path_length: int | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate made by hand, for shapes `TestCA` does not make, signed with `key`, and
    its own key (`key` again where `subject` is `issuer`: self-signed)."""
    own_key = key if subject == issuer else ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(own_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        ).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if eku else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256()), own_key


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_dane_ta_issuers_must_be_cas() -> None:
    # The anchor is real, but it is a server certificate, which may sign nothing.
    root_key = ec.generate_private_key(ec.SECP256R1())
    root, _ = certificate("root", "root", root_key, ca=True)
    not_a_ca, its_key = certificate("issuer.example.org", "root", root_key, ca=False)
    leaf, _ = certificate(MX, "issuer.example.org", its_key, ca=False)
    record = tlsa_record(not_a_ca, 2, 0, 1)

    result = match([der(leaf), der(not_a_ca), der(root)], records(record), NAMES, NOW)

    assert result == mismatch(leaf, NO_PATH, record)


@pytest.mark.parametrize("limit", [0, 1])
def test_dane_ta_honours_path_length_constraints(limit: int) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root, _ = certificate("root", "root", root_key, ca=True, path_length=limit)
    intermediate, intermediate_key = certificate("intermediate", "root", root_key, ca=True)
    leaf, _ = certificate(MX, "intermediate", intermediate_key, ca=False)
    record = tlsa_record(root, 2, 0, 1)

    result = match([der(leaf), der(intermediate), der(root)], records(record), NAMES, NOW)

    if limit:
        assert result == ta_match(record, "CN=root")
    else:
        why = "certificate CN=root allows 0 intermediate CAs below it, not 1"
        assert result == mismatch(leaf, why, record)


def test_dane_ta_refuses_a_leaf_not_for_servers() -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root, _ = certificate("root", "root", root_key, ca=True)
    client_only, _ = certificate(MX, "root", root_key, ca=False, eku=False)
    server, _ = certificate(MX, "root", root_key, ca=False)
    record = tlsa_record(root, 2, 0, 1)

    refused = match([der(client_only), der(root)], records(record), NAMES, NOW)
    accepted = match([der(server), der(root)], records(record), NAMES, NOW)

    why = "the leaf certificate is not for TLS servers (extended key usage)"
    assert refused == mismatch(client_only, why, record)
    assert accepted == ta_match(record, "CN=root")


def test_dane_ta_finds_its_way_through_a_chain_out_of_order() -> None:
    leaf, intermediate, root = chain(ISSUED)
    unrelated = OTHER.public_bytes(serialization.Encoding.DER)
    record = tlsa_record(TA.certificate, 2, 1, 1)

    result = match([leaf, root, unrelated, intermediate], records(record), NAMES, NOW)

    assert result == ta_match(record, "CN=DANE trust anchor")


# -- matching: what must never raise ---------------------------------------------------------------


def test_no_usable_records_is_a_mismatch() -> None:
    pkix = tlsa_record(LEAF, 1, 1, 1)

    assert match(chain(ISSUED), records(pkix, "3 1 1 abcd"), NAMES, NOW) == DaneMismatch(
        f"no usable TLSA records at {OWNER} ({pkix}, 3 1 1 abcd)"
    )


def test_garbage_records_beside_a_good_one_do_no_harm() -> None:
    garbage = ("3 0 0 deadbeef", "2 1 0 00", "2 0 0 3082", "3 1 1 abcd", "2 9 9 00")

    assert match(chain(ISSUED), records(*garbage, EE), NAMES, NOW) == ee_match(EE)


def test_no_certificate_is_a_mismatch() -> None:
    assert match([], records(EE), NAMES, NOW) == DaneMismatch(
        f"the server sent no certificate; TLSA at {OWNER}: {EE}"
    )


@pytest.mark.parametrize("position", [0, 1])
def test_an_unreadable_certificate_is_a_mismatch(position: int) -> None:
    sent = chain(ISSUED)
    sent[position] = b"\x30\x03\x02\x01\x01"

    assert match(sent, records(EE), NAMES, NOW) == DaneMismatch(
        f"certificate {position + 1} of the 3 the server sent is unreadable; TLSA: {EE}"
    )


def test_only_the_strongest_digest_counts() -> None:
    # RFC 7671 §9: a SHA2-512 record makes SHA2-256 records of the same usage and selector moot.
    sha512_other = tlsa_record(OTHER, 3, 1, 2)
    sha512_leaf = tlsa_record(LEAF, 3, 1, 2)

    weaker_matches = match(chain(ISSUED), records(EE, sha512_other), NAMES, NOW)
    stronger_matches = match(chain(ISSUED), records(EE_OTHER, sha512_leaf), NAMES, NOW)

    assert weaker_matches == mismatch(LEAF, NO_EE, EE, sha512_other)
    assert stronger_matches == ee_match(sha512_leaf)
