"""DKIM keys and signing: keys on disk, RFC 6376 / RFC 8463 signatures, Authentication-Results.

Keys live at `<key_dir>/<domain>/<selector>.pem`, mode 0600 in directories of mode 0700, owned
by the service user (`owner`, when root makes them for it). RSA keys
are PKCS#1 PEM (what dkimpy documents); Ed25519 keys are PKCS#8 PEM, because dkimpy wants the raw
base64 seed instead and that is not a format any other tool reads: `load_private_key` converts.
`sign` uses dkimpy's canonicalisation and OpenSSL's signatures (see dkim_signature.py). It is
CPU-bound, about 0.6 ms for a 10 KB message (scripts/bench_dkim.py): a third of that is the RSA-2048
signature, which OpenSSL computes with the GIL released, the rest is dkimpy's canonicalisation.
Async callers should run it in a worker thread.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import ipaddress
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import authres
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailrelay import dkim_signature
from mailrelay.config import DkimAlgorithm

SignatureAlgorithm = Literal["rsa-sha256", "ed25519-sha256"]
# (uid, gid) to give new key files and directories, when root makes them for the service user.
Owner = tuple[int, int]


@dataclass(frozen=True)
class DkimKey:
    selector: str
    algorithm: SignatureAlgorithm
    private_key_path: str
    # The TXT value to publish at <selector>._domainkey.<domain>, e.g. "v=DKIM1; k=rsa; p=MIIB...".
    public_record: str


# Header fields signed when present: RFC 6376 §5.4.1's list plus List-Unsubscribe-Post, which
# RFC 8058 §4 requires to be signed for one-click unsubscribe to be honoured.
SIGNED_HEADERS: tuple[str, ...] = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
    "in-reply-to", "references", "mime-version", "content-type",
    "content-transfer-encoding", "content-id", "content-description",
    "resent-date", "resent-from", "resent-sender", "resent-to", "resent-cc",
    "resent-message-id", "list-id", "list-help", "list-unsubscribe", "list-unsubscribe-post",
    "list-subscribe", "list-post", "list-owner", "list-archive",
)  # fmt: skip

# Signed once more than they occur, so that a field of this name added later (an attacker's
# second From above ours, which many clients display) breaks the signature (RFC 6376 §8.15).
OVERSIGNED_HEADERS: tuple[str, ...] = ("from",)

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_MAX_ROTATIONS_PER_DAY = 100


def generate_keys(
    domain: str,
    key_dir: str,
    algorithm: DkimAlgorithm = "rsa",
    rsa_bits: int = 2048,
    now: datetime | None = None,
    owner: Owner | None = None,
) -> list[DkimKey]:
    """Make and store a new key set for `domain`: RSA, plus Ed25519 for "rsa+ed25519".

    Selectors are "mrYYYYMMDD" (RSA) and "mrYYYYMMDDe" (Ed25519) from `now` (pass UTC); a second
    rotation on the same day gets "mrYYYYMMDD-2" / "mrYYYYMMDD-2e", and so on, so a selector never
    names two different keys. The RSA key comes first in the result. `owner` (uid, gid) is given
    the key directories and files; None leaves them to the caller.
    """
    domain = _domain(domain)
    if rsa_bits < 1024:
        # dkimpy (and RFC 8301) reject shorter keys when verifying.
        raise ValueError(f"rsa_bits: {rsa_bits} is below the 1024 bits verifiers accept")
    day = (now or datetime.now(UTC)).strftime("%Y%m%d")
    directory = Path(key_dir) / domain
    _make_private_dir(Path(key_dir), owner)
    _make_private_dir(directory, owner)

    # Generate before claiming a selector, so a failure here leaves nothing behind.
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    ed_key = ed25519.Ed25519PrivateKey.generate() if algorithm == "rsa+ed25519" else None
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    spki = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    rsa_record = f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode('ascii')}"

    for n in range(1, _MAX_ROTATIONS_PER_DAY + 1):
        stem = f"mr{day}" if n == 1 else f"mr{day}-{n}"
        # Claim both names even for RSA alone, so a later rsa+ed25519 set stays paired by stem.
        if (directory / f"{stem}e.pem").exists():
            continue
        rsa_path = directory / f"{stem}.pem"
        if not _write_new_private(rsa_path, rsa_pem, owner):
            continue
        keys = [DkimKey(stem, "rsa-sha256", str(rsa_path), rsa_record)]
        if ed_key is not None:
            ed_path = directory / f"{stem}e.pem"
            ed_pem = ed_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            if not _write_new_private(ed_path, ed_pem, owner):
                # Another rotation raced us to the Ed25519 name: give the stem back and move on.
                rsa_path.unlink()
                continue
            raw_public = ed_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            ed_record = f"v=DKIM1; k=ed25519; p={base64.b64encode(raw_public).decode('ascii')}"
            keys.append(DkimKey(f"{stem}e", "ed25519-sha256", str(ed_path), ed_record))
        return keys
    raise RuntimeError(f"{directory}: no free selector for {day} after {_MAX_ROTATIONS_PER_DAY}")


def public_record(private_key_path: str) -> str:
    """The TXT value for the key stored at `private_key_path` (to rebuild a DkimKey from disk)."""
    key = _load(private_key_path)
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"


@functools.lru_cache(maxsize=256)
def load_private_key(path: str) -> bytes:
    """The key at `path` in the form dkimpy's own `dkim.sign` takes: PEM for RSA, the base64 seed
    for Ed25519. `sign` does not use it; it is for checking our signatures against dkimpy's."""
    key = _load(path)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(seed)


@functools.lru_cache(maxsize=256)
def signing_key(path: str) -> dkim_signature.PrivateKey:
    """The parsed key at `path`, read and parsed once per process.

    Parsing is the expensive part: loading an RSA-2048 key checks its consistency (~30 ms here,
    a hundred signatures' worth). Caching by path is safe because a key file is never
    rewritten: each rotation makes a new selector and file, so a domain's new active key is a new
    path and is loaded on its first use. Thread-safe: at worst two threads both load a key once.
    """
    return _load(path)


def sign(message: bytes, *, domain: str, keys: list[DkimKey], now: float | None = None) -> bytes:
    """Return `message` (CRLF line ends) with one DKIM-Signature per key prepended, keys[0] on top.

    Canonicalization is relaxed/relaxed, so the re-folding and trailing-space changes relays make
    do not break the signatures. `now` (default: the clock) sets t=. Raises ValueError when the
    message has no From field (RFC 6376 §5.4 requires it to be signed) or a key is unusable, and
    dkim.MessageFormatError for a header line that is not a field.
    """
    domain_b = _domain(domain).encode("ascii")
    canonical = dkim_signature.canonicalize(message)
    present = canonical.names
    if b"from" not in present:
        raise ValueError("message has no From header field; it cannot be DKIM-signed")
    include = [name for name in present if name.decode("ascii", "replace") in SIGNED_HEADERS]
    include += [name.encode() for name in OVERSIGNED_HEADERS if name.encode() in present]
    timestamp = int(time.time() if now is None else now)
    signatures: list[bytes] = []
    for key in keys:
        private = signing_key(key.private_key_path)
        if dkim_signature.algorithm(private) != key.algorithm.encode("ascii"):
            raise ValueError(f"{key.private_key_path}: not an {key.algorithm} key")
        signatures.append(
            dkim_signature.signature_field(
                canonical,
                private,
                selector=key.selector.encode("ascii"),
                domain=domain_b,
                include=include,
                timestamp=timestamp,
            )
        )
    # Every signature covers the unsigned original: none signs DKIM-Signature fields (RFC 6376
    # §5.4 lists them as SHOULD NOT), so the order they are added in does not matter to receivers.
    return b"".join(signatures) + message


def authentication_results(hostname: str, user: str, client_ip: str | None) -> str:
    """The whole header field, CRLF-terminated, recording the submitter's SMTP AUTH (RFC 8601).

    e.g. "Authentication-Results: relay.example.net; auth=pass (client 192.0.2.7)
    smtp.auth=alice@example.org\\r\\n". client_ip None leaves the address out, for operators who
    would rather not disclose their users' addresses to every recipient.
    """
    for name, value in (("hostname", hostname), ("user", user)):
        # Both end up in a header field: a CR or LF here would let a value inject fields.
        if not value or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
            raise ValueError(f"{name}: {value!r} cannot appear in a header field")
    comment = None
    if client_ip is not None:
        comment = f"client {ipaddress.ip_address(client_ip)}"
    header = authres.AuthenticationResultsHeader(
        authserv_id=hostname,
        results=[
            authres.SMTPAUTHAuthenticationResult(
                result="pass", result_comment=comment, smtp_auth=user
            )
        ],
    )
    return f"{header}\r\n"


def _domain(domain: str) -> str:
    """Lower-case, without the root dot; refuses anything that could escape the key directory."""
    name = domain.lower().rstrip(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(p) for p in name.split(".")):
        raise ValueError(f"domain: {domain!r} is not a domain name")
    return name


def _make_private_dir(path: Path, owner: Owner | None) -> None:
    # mkdir's mode is masked by the umask, and an existing directory keeps its mode: set it.
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if owner is not None:
        os.chown(path, *owner)
    os.chmod(path, 0o700)


def _write_new_private(path: Path, data: bytes, owner: Owner | None) -> bool:
    """Create `path` holding `data`, mode 0600 from the start; False if the name is taken.

    Writes a temporary file and hard-links it into place: the link both fails when the name
    exists (so two rotations cannot claim one selector) and never shows a half-written key.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            if owner is not None:
                # Before the link, so that the key never appears under its name with root's owner.
                os.fchown(f.fileno(), *owner)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def _load(path: str) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise ValueError(f"{path}: not an RSA or Ed25519 private key")
    return key
