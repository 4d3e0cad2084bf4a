"""One DKIM-Signature header field exactly as dkimpy writes it, with the signature made by OpenSSL.

dkimpy still parses the message, canonicalises it, selects the header fields and lays out and
folds the tags: its module functions `rfc822_parse`, `hash_headers` and `fold` are called here
as its own `DKIM.sign` calls them. Only the signature itself differs: dkimpy computes RSA in pure
Python (about 6 ms per RSA-2048 signature, all of it holding the GIL), `cryptography` in OpenSSL
(about 0.2 ms). RSASSA-PKCS1-v1_5 and Ed25519 are both deterministic, so the field is the one
dkimpy would write, byte for byte; tests/test_dkim_signing.py holds it to that.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import dkim as dkimpy
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_NAME = b"DKIM-Signature"
_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
# dkimpy's placeholder, so that b= starts on a line of its own and the tags before it fold the
# same way before and after the signature goes in (see DKIM.sign).
_B_PLACEHOLDER = b"0" * 60


@dataclass(frozen=True)
class Canonical:
    """A message parsed, canonicalised (relaxed/relaxed) and body-hashed once for all its keys."""

    headers: list[tuple[bytes, bytes]]  # canonical fields in message order; names lower-case
    body_hash: bytes  # the bh= value: base64 of the SHA-256 of the canonical body

    @property
    def names(self) -> list[bytes]:
        return [name for name, _value in self.headers]


def canonicalize(message: bytes) -> Canonical:
    """Raises dkim.MessageFormatError for a header line that is not a field (as dkimpy does)."""
    headers, body = dkimpy.rfc822_parse(message)
    canonical = [(bytes(n), bytes(v)) for n, v in _RELAXED.canonicalize_headers(headers)]
    digest = hashlib.sha256(_RELAXED.canonicalize_body(body)).digest()
    return Canonical(canonical, base64.b64encode(digest))


def signature_field(
    canonical: Canonical,
    key: PrivateKey,
    *,
    selector: bytes,
    domain: bytes,
    include: Sequence[bytes],
    timestamp: int,
) -> bytes:
    """The whole field, CRLF-terminated: what `dkim.DKIM(message).sign(selector, domain, key,
    canonicalize=(b"relaxed", b"relaxed"), include_headers=include)` returns at `timestamp`.

    `include` lists lower-case field names, bottom-up instances for repeats (RFC 6376 §5.4.2).
    """
    # The tags and their order are DKIM.sign's (no l=, i= the bare domain).
    fields = [
        (b"v", b"1"),
        (b"a", algorithm(key)),
        (b"c", b"relaxed/relaxed"),
        (b"d", domain),
        (b"i", b"@" + domain),
        (b"q", b"dns/txt"),
        (b"s", selector),
        (b"t", str(timestamp).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", canonical.body_hash),
        (b"b", _B_PLACEHOLDER),
    ]
    # What DomainSigner.gen_header hashes: the selected fields, then this field with b= empty.
    unsigned = dkimpy.fold(_join(fields), namelen=len(_NAME), linesep=b"\r\n")
    unsigned = dkimpy.RE_BTAG.sub(rb"\1", unsigned)
    hasher = hashlib.sha256()
    dkimpy.hash_headers(
        hasher, _RELAXED, canonical.headers, tuple(include), (_NAME, b" " + unsigned), dict(fields)
    )
    digest = hasher.digest()
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    else:
        # RFC 8463 §3: Ed25519 signs the SHA-256 hash of the header data, not the data itself.
        signature = key.sign(digest)
    fields[-1] = (b"b", base64.b64encode(signature))
    value = dkimpy.fold(_join(fields) + b"\r\n", namelen=len(_NAME), linesep=b"\r\n")
    return _NAME + b": " + bytes(value)


def algorithm(key: PrivateKey) -> bytes:
    """The a= value a signature by `key` carries."""
    return b"rsa-sha256" if isinstance(key, rsa.RSAPrivateKey) else b"ed25519-sha256"


def _join(fields: list[tuple[bytes, bytes]]) -> bytes:
    return b"; ".join(name + b"=" + value for name, value in fields)
