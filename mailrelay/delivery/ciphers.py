"""Cipher profiles for delivery as data, grading a negotiated session against one, and the
client context every delivery handshake uses.

Grading is pure: it takes the two strings Python's `ssl` reports after a handshake
(`SSLObject.version()`, e.g. "TLSv1.2", and `SSLObject.cipher()[0]`, an OpenSSL suite name such
as "ECDHE-RSA-AES128-GCM-SHA256" or "TLS_AES_256_GCM_SHA384") and returns a typed verdict.

Profiles (what each one encodes):

- ``ncsc-2025`` -- Dutch NCSC TLS guidelines (2025) as encoded by internet.nl. TLS 1.3 ("good")
  and TLS 1.2 ("sufficient"). TLS 1.3 suites AES-256-GCM, CHACHA20-POLY1305, AES-128-GCM,
  AES-128-CCM. TLS 1.2: ECDHE with an RSA or ECDSA certificate and AES-GCM or CHACHA20-POLY1305;
  ECDHE-ECDSA with AES-CCM. Everything else is refused: RSA key exchange, DHE, static (EC)DH,
  CBC, 3DES, RC4, CCM_8, NULL, anonymous, export, PSK/SRP, and any name we cannot parse.
- ``nist-800-52r2`` -- NIST SP 800-52 Rev. 2 (2019), section 3.3.1: TLS 1.2 and 1.3 only.
  TLS 1.3: AES-128-GCM, AES-256-GCM, AES-128-CCM, AES-128-CCM_8 (section 3.3.1.2; ChaCha20 is
  not a NIST-approved cipher, so TLS_CHACHA20_POLY1305_SHA256 is refused). TLS 1.2 (3.3.1.1,
  AES only): ECDHE-ECDSA with GCM, CCM, CCM_8 or CBC; ECDHE-RSA with GCM or CBC; DHE-RSA with
  GCM, CCM, CCM_8 or CBC; DHE-DSS, static DH (DSS or RSA certificate) and static ECDH (ECDSA or
  RSA certificate) with GCM or CBC. CBC is allowed with SHA-1, SHA-256 and SHA-384 MACs as the
  document lists them. RSA key transport is not in the 3.3.1 recommendations (Rev. 2 moved it to
  Appendix D, "if a transition period is needed"), so it is refused here. Camellia, ARIA, 3DES,
  RC4, NULL, anonymous and export are refused.
- ``tls13-only`` -- TLS 1.3 only, with the four ncsc-2025 TLS 1.3 suites (not CCM_8).
"""

from __future__ import annotations

import functools
import ssl
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mailrelay.config import CipherProfile
from mailrelay.delivery.result import Insecure


@dataclass(frozen=True)
class Acceptable:
    protocol: str
    cipher: str


@dataclass(frozen=True)
class Refused:
    reason: Literal[Insecure.PROTOCOL, Insecure.CIPHER]
    detail: str  # e.g. "negotiated TLSv1.0", "cipher AES128-GCM-SHA256 uses RSA key exchange"


Grade = Acceptable | Refused


@dataclass(frozen=True)
class Suite:
    """The parts of a cipher suite that policies talk about, parsed from its OpenSSL name."""

    name: str
    kx: str  # "ECDHE", "DHE", "RSA", "static ECDH", "static DH", "PSK", "SRP"; "any" for TLS 1.3
    auth: str  # "RSA", "ECDSA", "DSS", "PSK", "SRP", "anonymous"; "any" for TLS 1.3
    bulk: str  # "AES128", "AES256", "CHACHA20", "3DES", "RC4", "NULL", ...; "unknown"
    mode: str  # "GCM", "CCM", "CCM_8", "POLY1305", "CBC", "stream", "none"; "unknown"
    export: bool = False


@dataclass(frozen=True)
class Rule:
    """One family of TLS 1.2 suites a profile accepts: any kx x auth x (bulk, mode) listed."""

    kx: frozenset[str]
    auth: frozenset[str]
    ciphers: frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Profile:
    name: str
    protocols: frozenset[str]  # as ssl reports them: "TLSv1.3", "TLSv1.2"
    tls13_suites: frozenset[str]
    tls12_rules: tuple[Rule, ...]


def _aes(*modes: str) -> frozenset[tuple[str, str]]:
    return frozenset((bulk, mode) for bulk in ("AES128", "AES256") for mode in modes)


_NCSC_TLS13 = frozenset(
    [
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_128_CCM_SHA256",
    ]
)
_RSA_OR_ECDSA = frozenset({"RSA", "ECDSA"})

PROFILES: dict[CipherProfile, Profile] = {
    "ncsc-2025": Profile(
        name="ncsc-2025",
        protocols=frozenset({"TLSv1.3", "TLSv1.2"}),
        tls13_suites=_NCSC_TLS13,
        tls12_rules=(
            Rule(frozenset({"ECDHE"}), _RSA_OR_ECDSA, _aes("GCM") | {("CHACHA20", "POLY1305")}),
            Rule(frozenset({"ECDHE"}), frozenset({"ECDSA"}), _aes("CCM")),
        ),
    ),
    "nist-800-52r2": Profile(
        name="nist-800-52r2",
        protocols=frozenset({"TLSv1.3", "TLSv1.2"}),
        tls13_suites=frozenset(
            [
                "TLS_AES_256_GCM_SHA384",
                "TLS_AES_128_GCM_SHA256",
                "TLS_AES_128_CCM_SHA256",
                "TLS_AES_128_CCM_8_SHA256",
            ]
        ),
        tls12_rules=(
            Rule(frozenset({"ECDHE"}), frozenset({"ECDSA"}), _aes("GCM", "CCM", "CCM_8", "CBC")),
            Rule(frozenset({"ECDHE"}), frozenset({"RSA"}), _aes("GCM", "CBC")),
            Rule(frozenset({"DHE"}), frozenset({"RSA"}), _aes("GCM", "CCM", "CCM_8", "CBC")),
            Rule(frozenset({"DHE"}), frozenset({"DSS"}), _aes("GCM", "CBC")),
            Rule(frozenset({"static DH"}), frozenset({"DSS", "RSA"}), _aes("GCM", "CBC")),
            Rule(frozenset({"static ECDH"}), _RSA_OR_ECDSA, _aes("GCM", "CBC")),
        ),
    ),
    "tls13-only": Profile(
        name="tls13-only",
        protocols=frozenset({"TLSv1.3"}),
        tls13_suites=_NCSC_TLS13,
        tls12_rules=(),
    ),
}

# Longest prefix first. A name with none of these prefixes uses RSA key exchange: that is
# OpenSSL's convention ("AES128-GCM-SHA256" is TLS_RSA_WITH_AES_128_GCM_SHA256).
_KX_PREFIXES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("ECDHE", "ECDSA"), "ECDHE", "ECDSA"),
    (("ECDHE", "RSA"), "ECDHE", "RSA"),
    (("ECDHE", "PSK"), "ECDHE", "PSK"),
    (("ECDHE",), "ECDHE", "RSA"),  # OpenSSL names ECDHE-RSA-ARIA suites "ECDHE-ARIA..."
    (("DHE", "RSA"), "DHE", "RSA"),
    (("DHE", "DSS"), "DHE", "DSS"),
    (("DHE", "PSK"), "DHE", "PSK"),
    (("EDH", "RSA"), "DHE", "RSA"),
    (("EDH", "DSS"), "DHE", "DSS"),
    (("ECDH", "ECDSA"), "static ECDH", "ECDSA"),
    (("ECDH", "RSA"), "static ECDH", "RSA"),
    (("DH", "RSA"), "static DH", "RSA"),
    (("DH", "DSS"), "static DH", "DSS"),
    (("ADH",), "DHE", "anonymous"),
    (("AECDH",), "ECDHE", "anonymous"),
    (("RSA", "PSK"), "RSA", "PSK"),
    (("PSK",), "PSK", "PSK"),
    (("SRP", "RSA"), "SRP", "RSA"),
    (("SRP", "DSS"), "SRP", "DSS"),
    (("SRP",), "SRP", "SRP"),
)
_BLOCK_CIPHERS = {"AES128", "AES256", "ARIA128", "ARIA256", "CAMELLIA128", "CAMELLIA256"}
_AEAD_MODES = {"GCM": "GCM", "CCM": "CCM", "CCM8": "CCM_8"}


def parse_suite(name: str) -> Suite:
    """Split an OpenSSL cipher suite name into key exchange, authentication, cipher and mode."""
    upper = name.upper()
    if upper.startswith("TLS_"):
        # TLS 1.3 names, e.g. TLS_AES_128_CCM_8_SHA256: key exchange is always ephemeral.
        parts = upper.split("_")[1:]
        if parts[:1] == ["AES"] and len(parts) >= 3 and parts[1] in ("128", "256"):
            mode = "CCM_8" if parts[2:4] == ["CCM", "8"] else _AEAD_MODES.get(parts[2], "unknown")
            return Suite(name, "any", "any", "AES" + parts[1], mode)
        if parts[:2] == ["CHACHA20", "POLY1305"]:
            return Suite(name, "any", "any", "CHACHA20", "POLY1305")
        return Suite(name, "any", "any", "unknown", "unknown")

    tokens = upper.split("-")
    export = tokens[0] in ("EXP", "EXP1024")
    if export:
        tokens = tokens[1:]
    kx, auth = "RSA", "RSA"
    for prefix, prefix_kx, prefix_auth in _KX_PREFIXES:
        if tuple(tokens[: len(prefix)]) == prefix:
            kx, auth, tokens = prefix_kx, prefix_auth, tokens[len(prefix) :]
            break
    bulk, mode = _bulk_and_mode(tokens)
    return Suite(name, kx, auth, bulk, mode, export)


def _bulk_and_mode(tokens: list[str]) -> tuple[str, str]:
    first = tokens[0] if tokens else ""
    second = tokens[1] if len(tokens) > 1 else ""
    if first == "AES" and second in ("128", "256"):  # SRP/PSK style "AES-128-CBC-SHA"
        first, second = "AES" + second, tokens[2] if len(tokens) > 2 else ""
    if first in _BLOCK_CIPHERS:
        return first, _AEAD_MODES.get(second, "CBC")
    if first == "CHACHA20" and second == "POLY1305":
        return "CHACHA20", "POLY1305"
    if first == "DES":
        return ("3DES", "CBC") if second == "CBC3" else ("DES", "CBC")
    if first == "RC4":
        return "RC4", "stream"
    if first == "NULL":
        return "NULL", "none"
    if first in ("RC2", "IDEA", "SEED"):
        return first, "CBC"
    return "unknown", "unknown"


def grade(profile: CipherProfile | Profile, protocol: str | None, cipher: str | None) -> Grade:
    """Judge a negotiated protocol and cipher suite against a profile."""
    policy = profile if isinstance(profile, Profile) else PROFILES[profile]
    if protocol is None or cipher is None:
        return Refused(Insecure.PROTOCOL, "no TLS session was negotiated")
    if protocol not in policy.protocols:
        return Refused(Insecure.PROTOCOL, f"negotiated {_protocol_name(protocol)}")
    suite = parse_suite(cipher)
    if protocol == "TLSv1.3":
        if cipher in policy.tls13_suites:
            return Acceptable(protocol, cipher)
        allowed = [parse_suite(name) for name in sorted(policy.tls13_suites)]
        return Refused(Insecure.CIPHER, _why_not(suite, _features_of(allowed)))
    for rule in policy.tls12_rules:
        if (
            not suite.export
            and suite.kx in rule.kx
            and suite.auth in rule.auth
            and (suite.bulk, suite.mode) in rule.ciphers
        ):
            return Acceptable(protocol, cipher)
    features = _Features(
        kx=frozenset().union(*(r.kx for r in policy.tls12_rules)),
        auth=frozenset().union(*(r.auth for r in policy.tls12_rules)),
        bulk=frozenset(b for r in policy.tls12_rules for b, _ in r.ciphers),
        mode=frozenset(m for r in policy.tls12_rules for _, m in r.ciphers),
    )
    return Refused(Insecure.CIPHER, _why_not(suite, features))


@dataclass(frozen=True)
class _Features:
    kx: frozenset[str]
    auth: frozenset[str]
    bulk: frozenset[str]
    mode: frozenset[str]


def _features_of(suites: Sequence[Suite]) -> _Features:
    return _Features(
        kx=frozenset(s.kx for s in suites),
        auth=frozenset(s.auth for s in suites),
        bulk=frozenset(s.bulk for s in suites),
        mode=frozenset(s.mode for s in suites),
    )


def _why_not(suite: Suite, allowed: _Features) -> str:
    """Name the first property of a refused suite that the profile does not allow."""
    name = f"cipher {suite.name}"
    if suite.bulk == "unknown":
        return f"{name} is not a cipher suite this policy recognises"
    if suite.export:
        return f"{name} is an export-grade cipher"
    if suite.bulk == "NULL":
        return f"{name} does not encrypt (NULL cipher)"
    if suite.auth == "anonymous":
        return f"{name} is anonymous (the server is not authenticated)"
    if suite.kx not in allowed.kx:
        return f"{name} uses {suite.kx} key exchange"
    if suite.auth not in allowed.auth:
        return f"{name} uses {suite.auth} authentication"
    if suite.bulk not in allowed.bulk:
        return f"{name} uses {suite.bulk}"
    if suite.mode not in allowed.mode:
        return f"{name} uses {suite.mode} mode"
    return f"{name} is not an allowed combination"


def _protocol_name(protocol: str) -> str:
    # ssl calls TLS 1.0 "TLSv1"; people (and internet.nl) call it TLSv1.0.
    return "TLSv1.0" if protocol == "TLSv1" else protocol


# Listed first so a server that honours the client's order picks a suite every profile accepts;
# "ALL" then lets us negotiate (and so name) whatever else a server insists on.
_CIPHERS = (
    "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE-ECDSA-AES256-CCM:ECDHE-ECDSA-AES128-CCM:ALL:@SECLEVEL=0"
)


def client_context() -> ssl.SSLContext:
    """The SSLContext for every delivery handshake: it negotiates anything and verifies nothing.

    Why permissive is safe: the handshake only establishes what the server offers; the transport
    policy judges the session right after it and before MAIL FROM -- protocol and cipher against
    the profile, the certificate chain against "verify", DANE or MTA-STS -- so nothing (not even
    the envelope) is sent over a connection the policy refuses, only QUIT. OpenSSL still checks
    that the server holds the key of the certificate it sent (CertificateVerify in TLS 1.3, the
    signed key exchange in TLS 1.2), so judging that certificate afterwards is as sound as judging
    it during the handshake, and one context serves every policy. An active attacker cannot use
    our permissiveness to downgrade a good server: a TLS 1.3 server puts a downgrade sentinel into
    ServerHello.random when it negotiates 1.2 or lower, and OpenSSL (which offers 1.3) aborts on
    seeing it (RFC 8446 4.1.3); in TLS 1.2 the Finished messages authenticate the whole
    transcript. An attacker who can break a weak suite (FREAK, Logjam) ends up with a weak
    negotiated result, which grading refuses. Refusing at the handshake instead (a strict
    context) would give an opaque alert where we want to say "the server offered TLSv1.0".
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        # Deliberate (see above); pytest runs with filterwarnings=error.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers(_CIPHERS)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@functools.cache
def shared_client_context() -> ssl.SSLContext:
    """`client_context`, built once: a context is safe to share between connections."""
    return client_context()
