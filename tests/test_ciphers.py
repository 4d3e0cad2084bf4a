"""TLS policy: suite parsing, grading against each profile, the client context, certificates."""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
import subprocess
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from mailrelay.config import CipherProfile
from mailrelay.delivery.certificates import certificate_facts, verify_chain, weak_chain
from mailrelay.delivery.ciphers import (
    PROFILES,
    Acceptable,
    Refused,
    Suite,
    client_context,
    grade,
    parse_suite,
)
from mailrelay.delivery.result import Insecure
from tests.world.certs import TestCA, self_signed

NCSC_TLS13 = [
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_128_CCM_SHA256",
]
NCSC_TLS12 = [
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-CCM",
    "ECDHE-ECDSA-AES256-CCM",
]
NIST_TLS13 = [
    "TLS_AES_256_GCM_SHA384",
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_128_CCM_SHA256",
    "TLS_AES_128_CCM_8_SHA256",
]
NIST_TLS12 = [
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-CCM",
    "ECDHE-ECDSA-AES128-CCM8",
    "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-SHA256",
    "ECDHE-RSA-AES256-SHA",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-CCM8",
    "DHE-RSA-AES256-SHA256",
    "DHE-DSS-AES128-GCM-SHA256",
    "DHE-DSS-AES256-SHA",
    "DH-RSA-AES128-GCM-SHA256",
    "DH-DSS-AES256-SHA256",
    "ECDH-ECDSA-AES256-GCM-SHA384",
    "ECDH-RSA-AES128-SHA256",
]

ACCEPTED: list[tuple[CipherProfile, str, str]] = [
    *(("ncsc-2025", "TLSv1.3", c) for c in NCSC_TLS13),
    *(("ncsc-2025", "TLSv1.2", c) for c in NCSC_TLS12),
    *(("nist-800-52r2", "TLSv1.3", c) for c in NIST_TLS13),
    *(("nist-800-52r2", "TLSv1.2", c) for c in NIST_TLS12),
    *(("tls13-only", "TLSv1.3", c) for c in NCSC_TLS13),
]


@pytest.mark.parametrize(("profile", "protocol", "cipher"), ACCEPTED)
def test_accepted(profile: CipherProfile, protocol: str, cipher: str) -> None:
    assert grade(profile, protocol, cipher) == Acceptable(protocol, cipher)


P, C = Insecure.PROTOCOL, Insecure.CIPHER
REFUSED: list[tuple[CipherProfile, str, str, Insecure, str]] = [
    # protocol versions
    ("ncsc-2025", "TLSv1.1", "ECDHE-RSA-AES128-SHA", P, "negotiated TLSv1.1"),
    ("ncsc-2025", "TLSv1", "ECDHE-RSA-AES128-SHA", P, "negotiated TLSv1.0"),
    ("ncsc-2025", "SSLv3", "AES128-SHA", P, "negotiated SSLv3"),
    ("ncsc-2025", "SSLv2", "RC4-MD5", P, "negotiated SSLv2"),
    ("nist-800-52r2", "TLSv1.1", "ECDHE-RSA-AES128-GCM-SHA256", P, "negotiated TLSv1.1"),
    ("nist-800-52r2", "TLSv1", "ECDHE-RSA-AES128-SHA", P, "negotiated TLSv1.0"),
    ("tls13-only", "TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256", P, "negotiated TLSv1.2"),
    # ncsc-2025: every refused family, named
    ("ncsc-2025", "TLSv1.2", "AES128-GCM-SHA256", C, "uses RSA key exchange"),
    ("ncsc-2025", "TLSv1.2", "AES256-SHA256", C, "uses RSA key exchange"),
    ("ncsc-2025", "TLSv1.2", "RSA-PSK-AES128-GCM-SHA256", C, "uses RSA key exchange"),
    ("ncsc-2025", "TLSv1.2", "ECDHE-RSA-AES128-SHA256", C, "uses CBC mode"),
    ("ncsc-2025", "TLSv1.2", "ECDHE-ECDSA-AES256-SHA384", C, "uses CBC mode"),
    ("ncsc-2025", "TLSv1.2", "ECDHE-RSA-AES256-SHA", C, "uses CBC mode"),
    ("ncsc-2025", "TLSv1.2", "DHE-RSA-AES128-GCM-SHA256", C, "uses DHE key exchange"),
    ("ncsc-2025", "TLSv1.2", "DHE-RSA-CHACHA20-POLY1305", C, "uses DHE key exchange"),
    ("ncsc-2025", "TLSv1.2", "EDH-RSA-DES-CBC3-SHA", C, "uses DHE key exchange"),
    ("ncsc-2025", "TLSv1.2", "ECDHE-RSA-DES-CBC3-SHA", C, "uses 3DES"),
    ("ncsc-2025", "TLSv1.2", "ECDHE-RSA-RC4-SHA", C, "uses RC4"),
    ("ncsc-2025", "TLSv1.2", "ECDHE-ECDSA-AES128-CCM8", C, "uses CCM_8 mode"),
    ("ncsc-2025", "TLSv1.3", "TLS_AES_128_CCM_8_SHA256", C, "uses CCM_8 mode"),
    ("ncsc-2025", "TLSv1.2", "ECDHE-RSA-NULL-SHA", C, "does not encrypt (NULL cipher)"),
    ("ncsc-2025", "TLSv1.2", "NULL-SHA256", C, "does not encrypt (NULL cipher)"),
    ("ncsc-2025", "TLSv1.2", "ADH-AES128-GCM-SHA256", C, "is anonymous"),
    ("ncsc-2025", "TLSv1.2", "AECDH-AES256-SHA", C, "is anonymous"),
    ("ncsc-2025", "TLSv1.2", "EXP-RC4-MD5", C, "is an export-grade cipher"),
    ("ncsc-2025", "TLSv1.2", "EXP-EDH-RSA-DES-CBC-SHA", C, "is an export-grade cipher"),
    ("ncsc-2025", "TLSv1.2", "ECDH-RSA-AES128-GCM-SHA256", C, "uses static ECDH key exchange"),
    ("ncsc-2025", "TLSv1.2", "DH-RSA-AES128-GCM-SHA256", C, "uses static DH key exchange"),
    ("ncsc-2025", "TLSv1.2", "PSK-AES128-GCM-SHA256", C, "uses PSK key exchange"),
    ("ncsc-2025", "TLSv1.2", "ECDHE-PSK-CHACHA20-POLY1305", C, "uses PSK authentication"),
    ("ncsc-2025", "TLSv1.2", "SRP-RSA-AES-128-CBC-SHA", C, "uses SRP key exchange"),
    ("ncsc-2025", "TLSv1.2", "ECDHE-RSA-CAMELLIA128-SHA256", C, "uses CAMELLIA128"),
    ("ncsc-2025", "TLSv1.2", "ECDHE-ARIA128-GCM-SHA256", C, "uses ARIA128"),
    ("ncsc-2025", "TLSv1.2", "GOST2012-KUZNYECHIK-KUZNYECHIKOMAC", C, "not a cipher suite"),
    ("ncsc-2025", "TLSv1.3", "TLS_SHA256_SHA256", C, "not a cipher suite"),
    # nist-800-52r2: looser on CBC and DHE, but still no RSA key transport or ChaCha20
    ("nist-800-52r2", "TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256", C, "uses CHACHA20"),
    ("nist-800-52r2", "TLSv1.2", "ECDHE-RSA-CHACHA20-POLY1305", C, "uses CHACHA20"),
    ("nist-800-52r2", "TLSv1.2", "AES128-GCM-SHA256", C, "uses RSA key exchange"),
    ("nist-800-52r2", "TLSv1.2", "AES256-SHA", C, "uses RSA key exchange"),
    ("nist-800-52r2", "TLSv1.2", "ECDHE-RSA-DES-CBC3-SHA", C, "uses 3DES"),
    ("nist-800-52r2", "TLSv1.2", "ECDHE-RSA-RC4-SHA", C, "uses RC4"),
    ("nist-800-52r2", "TLSv1.2", "ECDHE-RSA-CAMELLIA256-SHA384", C, "uses CAMELLIA256"),
    ("nist-800-52r2", "TLSv1.2", "ADH-AES256-GCM-SHA384", C, "is anonymous"),
    ("nist-800-52r2", "TLSv1.2", "ECDHE-ECDSA-NULL-SHA", C, "does not encrypt"),
    ("nist-800-52r2", "TLSv1.2", "EXP-RC4-MD5", C, "is an export-grade cipher"),
    ("nist-800-52r2", "TLSv1.2", "PSK-AES128-GCM-SHA256", C, "uses PSK key exchange"),
    # ECDHE-RSA with CCM is no real suite, but the rules must not let it through by accident.
    ("nist-800-52r2", "TLSv1.2", "ECDHE-RSA-AES128-CCM", C, "not an allowed combination"),
    ("ncsc-2025", "TLSv1.2", "ECDHE-RSA-AES128-CCM", C, "not an allowed combination"),
    # tls13-only
    ("tls13-only", "TLSv1.3", "TLS_AES_128_CCM_8_SHA256", C, "uses CCM_8 mode"),
    ("tls13-only", "TLSv1.1", "ECDHE-RSA-AES128-SHA", P, "negotiated TLSv1.1"),
]


@pytest.mark.parametrize(("profile", "protocol", "cipher", "reason", "detail"), REFUSED)
def test_refused(
    profile: CipherProfile, protocol: str, cipher: str, reason: Insecure, detail: str
) -> None:
    verdict = grade(profile, protocol, cipher)
    assert isinstance(verdict, Refused)
    assert verdict.reason is reason
    assert detail in verdict.detail
    if reason is Insecure.CIPHER:
        assert verdict.detail.startswith(f"cipher {cipher} ")


def test_refused_details_read_as_documented() -> None:
    assert grade("ncsc-2025", "TLSv1", "ECDHE-RSA-AES256-SHA") == Refused(
        Insecure.PROTOCOL, "negotiated TLSv1.0"
    )
    assert grade("ncsc-2025", "TLSv1.2", "AES128-GCM-SHA256") == Refused(
        Insecure.CIPHER, "cipher AES128-GCM-SHA256 uses RSA key exchange"
    )


def test_no_session_is_refused() -> None:
    assert isinstance(grade("ncsc-2025", None, None), Refused)
    assert isinstance(grade("ncsc-2025", "TLSv1.3", None), Refused)


def test_profile_objects_grade_like_their_names() -> None:
    for name, profile in PROFILES.items():
        assert profile.name == name
        for protocol, cipher in (("TLSv1.3", "TLS_AES_128_GCM_SHA256"), ("TLSv1.2", "AES128-SHA")):
            assert grade(profile, protocol, cipher) == grade(name, protocol, cipher)


@pytest.mark.parametrize(
    ("name", "kx", "auth", "bulk", "mode"),
    [
        ("TLS_AES_128_CCM_8_SHA256", "any", "any", "AES128", "CCM_8"),
        ("TLS_CHACHA20_POLY1305_SHA256", "any", "any", "CHACHA20", "POLY1305"),
        ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE", "ECDSA", "AES256", "GCM"),
        ("ECDHE-ARIA256-GCM-SHA384", "ECDHE", "RSA", "ARIA256", "GCM"),
        ("AES128-SHA", "RSA", "RSA", "AES128", "CBC"),
        ("DES-CBC3-SHA", "RSA", "RSA", "3DES", "CBC"),
        ("EDH-DSS-DES-CBC-SHA", "DHE", "DSS", "DES", "CBC"),
        ("SRP-AES-256-CBC-SHA", "SRP", "SRP", "AES256", "CBC"),
        ("RC4-MD5", "RSA", "RSA", "RC4", "stream"),
        ("AECDH-NULL-SHA", "ECDHE", "anonymous", "NULL", "none"),
    ],
)
def test_parse_suite(name: str, kx: str, auth: str, bulk: str, mode: str) -> None:
    assert parse_suite(name) == Suite(name, kx, auth, bulk, mode)


def test_parse_export_suite() -> None:
    assert parse_suite("EXP-RC2-CBC-MD5") == Suite(
        "EXP-RC2-CBC-MD5", "RSA", "RSA", "RC2", "CBC", True
    )


def test_every_suite_openssl_can_negotiate_parses() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    for cipher in ctx.get_ciphers():
        suite = parse_suite(cipher["name"])
        assert suite.bulk != "unknown", cipher["name"]
        kea = cipher["kea"]
        if kea == "kx-rsa":
            assert suite.kx == "RSA", cipher["name"]
        elif kea == "kx-ecdhe":
            assert suite.kx == "ECDHE", cipher["name"]
        elif kea == "kx-dhe":
            assert suite.kx == "DHE", cipher["name"]


def test_insecure_statuses() -> None:
    assert Insecure.NO_STARTTLS.status == "5.7.4"
    assert Insecure.STARTTLS_REFUSED.status == "5.7.4"
    assert Insecure.CERTIFICATE.status == "5.7.5"
    assert Insecure.HANDSHAKE.status == "5.7.5"
    assert Insecure.PROTOCOL.status == "5.7.10"
    assert Insecure.CIPHER.status == "5.7.10"


def test_client_context_negotiates_anything_but_prefers_strong() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = client_context()
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    # Certificates are judged after the handshake by the transport policy, never by OpenSSL.
    assert ctx.check_hostname is False
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1
    names = [c["name"] for c in ctx.get_ciphers()]
    # Weak suites stay negotiable so that we can name them ...
    assert {"AES128-SHA", "ECDHE-RSA-AES128-SHA", "DHE-RSA-AES128-GCM-SHA256"} <= set(names)
    # ... but a server that follows our order picks one every profile accepts.
    first_tls12 = next(n for n in names if not n.startswith("TLS_"))
    for profile in PROFILES:
        if profile != "tls13-only":
            assert isinstance(grade(profile, "TLSv1.2", first_tls12), Acceptable)


def test_certificate_facts() -> None:
    issued = TestCA().issue(["mx.example.org"])
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    der = cert.public_bytes(Encoding.DER)
    facts = certificate_facts(der)
    assert facts.sha256 == hashlib.sha256(der).hexdigest()
    assert facts.subject == "CN=mx.example.org"
    assert facts.issuer == "CN=mailrelay test CA"
    assert facts.not_before == cert.not_valid_before_utc
    assert facts.not_after == cert.not_valid_after_utc


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def test_verify_chain(tmp_path: Path) -> None:
    ca = TestCA()
    ca_file = str(ca.write_ca(tmp_path / "ca.pem"))
    good = _der(ca.issue(["mx.example.org"]).cert_pem)
    assert verify_chain([good], "mx.example.org", ca_file) is None
    assert verify_chain([good], "MX.Example.org.", ca_file) is None
    assert verify_chain([good], "other.example.org", ca_file) is not None
    assert verify_chain([good], "mx.example.org") is not None  # our CA is not a system root
    now = dt.datetime.now(dt.UTC)
    expired = ca.issue(
        ["mx.example.org"], not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(1)
    )
    assert verify_chain([_der(expired.cert_pem)], "mx.example.org", ca_file) is not None
    lone = _der(self_signed("mx.example.org").cert_pem)
    assert verify_chain([lone], "mx.example.org", ca_file) is not None
    assert verify_chain([], "mx.example.org", ca_file) == "the server sent no certificate"


def _rsa_cert(key_bits: int) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"rsa-{key_bits}")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "issuer")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


def _sha1_signed(tmp_path: Path) -> tuple[bytes, bytes]:
    """A leaf signed with SHA-1 by a CA, and that CA (also self-signed with SHA-1). Made with
    the openssl command: cryptography refuses to sign with SHA-1 at all."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-sha1", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.pem", "-subj", "/CN=sha1-root", "-days", "1")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr",
            "-subj", "/CN=sha1-leaf")  # fmt: skip
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "leaf.pem", "-days", "1", "-sha1")  # fmt: skip
    leaf, root = (
        x509.load_pem_x509_certificate((tmp_path / f).read_bytes()).public_bytes(Encoding.DER)
        for f in ("leaf.pem", "ca.pem")
    )
    return leaf, root


def test_weak_chain_puts_the_seclevel_floor_back(tmp_path: Path) -> None:
    good, small = _rsa_cert(2048), _rsa_cert(1024)
    sha1_leaf, sha1_root = _sha1_signed(tmp_path)
    assert weak_chain([good]) is None
    assert weak_chain([good, sha1_root]) is None  # a trust anchor's own signature is not used
    assert weak_chain([good, small]) == "CN=rsa-1024 has a 1024-bit RSA key"
    assert weak_chain([sha1_leaf, sha1_root]) == "CN=sha1-leaf is signed with SHA1"
