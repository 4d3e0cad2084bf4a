"""DKIM keys and signing: keys on disk, RFC 6376 / RFC 8463 signatures, Authentication-Results.

Keys live at `<key_dir>/<domain>/<selector>.pem`, mode 0600 in directories of mode 0700, owned
by the service user (`owner`, when root makes them for it). RSA keys
are PKCS#1 PEM (what dkimpy documents); Ed25519 keys are PKCS#8 PEM, because dkimpy wants the raw
base64 seed instead and that is not a format any other tool reads: `load_private_key` converts.
`sign` uses dkimpy's canonicalisation and OpenSSL's signatures (see dkim_signature.py). It is
CPU-bound, about 0.6 ms for a 10 KB message (scripts/bench_dkim.py): a third of that is the RSA-2048
signature, which OpenSSL computes with the GIL released, the rest is dkimpy's canonicalisation.
Async callers should run it in a worker thread.

On PostgreSQL (several instances, one store) the keys are not files: `new_sealed_keys` makes them
sealed with AES-256-GCM under a master key (`dkim.master_key_file`, 32 random bytes in base64),
bound to their domain and selector, and each instance unseals them from the database (`sign`
with `master_key`, or the process's `use_master_key`).
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
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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
    # In the database instead of a file (private_key_path ""): the PEM, sealed (`seal`).
    sealed_key: bytes | None = None


class MasterKeyError(ValueError):
    """The master key is missing, unreadable, malformed, or not the one a key was sealed with."""


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
    rsa_pem, rsa_record, ed = _generate(algorithm, rsa_bits)

    for n in range(1, _MAX_ROTATIONS_PER_DAY + 1):
        stem = f"mr{day}" if n == 1 else f"mr{day}-{n}"
        # Claim both names even for RSA alone, so a later rsa+ed25519 set stays paired by stem.
        if (directory / f"{stem}e.pem").exists():
            continue
        rsa_path = directory / f"{stem}.pem"
        if not _write_new_private(rsa_path, rsa_pem, owner):
            continue
        keys = [DkimKey(stem, "rsa-sha256", str(rsa_path), rsa_record)]
        if ed is not None:
            ed_pem, ed_record = ed
            ed_path = directory / f"{stem}e.pem"
            if not _write_new_private(ed_path, ed_pem, owner):
                # Another rotation raced us to the Ed25519 name: give the stem back and move on.
                rsa_path.unlink()
                continue
            keys.append(DkimKey(f"{stem}e", "ed25519-sha256", str(ed_path), ed_record))
        return keys
    raise RuntimeError(f"{directory}: no free selector for {day} after {_MAX_ROTATIONS_PER_DAY}")


def new_sealed_keys(
    domain: str,
    master_key: bytes,
    taken: set[str],
    algorithm: DkimAlgorithm = "rsa",
    rsa_bits: int = 2048,
    now: datetime | None = None,
) -> list[DkimKey]:
    """`generate_keys` for the database: the keys come back sealed (`sealed_key`), no file.

    Selectors follow the same pattern; `taken` are the domain's selectors in the store. The
    next free number after the day's highest is used, never a lower one: a retired key's row is
    gone, but receivers may still cache its record, so its selector must not name another key.
    """
    domain = _domain(domain)
    day = (now or datetime.now(UTC)).strftime("%Y%m%d")
    numbers = [0]
    for selector in taken:
        match = re.fullmatch(rf"mr{day}(?:-(\d+))?e?", selector)
        if match:
            numbers.append(int(match.group(1) or 1))
    n = max(numbers) + 1
    if n > _MAX_ROTATIONS_PER_DAY:
        raise RuntimeError(f"{domain}: no free selector for {day} after {_MAX_ROTATIONS_PER_DAY}")
    stem = f"mr{day}" if n == 1 else f"mr{day}-{n}"
    rsa_pem, rsa_record, ed = _generate(algorithm, rsa_bits)
    keys = [DkimKey(stem, "rsa-sha256", "", rsa_record, seal(rsa_pem, master_key, domain, stem))]
    if ed is not None:
        ed_pem, ed_record = ed
        sealed = seal(ed_pem, master_key, domain, f"{stem}e")
        keys.append(DkimKey(f"{stem}e", "ed25519-sha256", "", ed_record, sealed))
    return keys


def _generate(
    algorithm: DkimAlgorithm, rsa_bits: int
) -> tuple[bytes, str, tuple[bytes, str] | None]:
    """A new RSA key's PEM and record, and for "rsa+ed25519" an Ed25519 key's."""
    if rsa_bits < 1024:
        # dkimpy (and RFC 8301) reject shorter keys when verifying.
        raise ValueError(f"rsa_bits: {rsa_bits} is below the 1024 bits verifiers accept")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    spki = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    rsa_record = f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode('ascii')}"
    if algorithm != "rsa+ed25519":
        return rsa_pem, rsa_record, None
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_pem = ed_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    raw_public = ed_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    ed_record = f"v=DKIM1; k=ed25519; p={base64.b64encode(raw_public).decode('ascii')}"
    return rsa_pem, rsa_record, (ed_pem, ed_record)


# ---- the master key and sealed keys (PostgreSQL) ------------------------------------------------

MASTER_KEY_BYTES = 32  # AES-256
_SEALED_FORMAT = b"\x01"  # one byte of format version, the 12-byte nonce, then AES-GCM's output
_process_master_key: bytes | None = None


def make_master_key() -> str:
    """A new master key as the file holds it: 32 random bytes in base64, one line."""
    return base64.b64encode(secrets.token_bytes(MASTER_KEY_BYTES)).decode("ascii") + "\n"


def read_master_key(path: str) -> bytes:
    """The 32-byte key in the file at `path`; MasterKeyError says what is wrong with it."""
    if not path:
        raise MasterKeyError(
            "dkim.master_key_file: not set, and with storage.url the DKIM keys are kept in the"
            " database sealed with it; make one with: mailrelay dkim make-master-key PATH"
        )
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except OSError as exc:
        raise MasterKeyError(
            f"dkim.master_key_file: cannot read {path}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        text = ""
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        key = b""
    if len(key) != MASTER_KEY_BYTES:
        raise MasterKeyError(
            f"dkim.master_key_file: {path} does not hold {MASTER_KEY_BYTES} bytes in base64;"
            " make one with: mailrelay dkim make-master-key PATH"
        )
    return key


def use_master_key(key: bytes | None) -> None:
    """The master key `sign` unseals with when it is given none (set once, at start)."""
    global _process_master_key
    _process_master_key = key


def seal(pem: bytes, master_key: bytes, domain: str, selector: str) -> bytes:
    """`pem` encrypted and authenticated with AES-256-GCM under `master_key`.

    The domain and selector are the associated data: a sealed key copied onto another row (by
    whoever can write the database but has no master key) fails to unseal instead of signing.
    """
    nonce = secrets.token_bytes(12)
    return _SEALED_FORMAT + nonce + AESGCM(master_key).encrypt(nonce, pem, _aad(domain, selector))


def unseal(sealed: bytes, master_key: bytes, domain: str, selector: str) -> bytes:
    """The PEM `seal` sealed; MasterKeyError if `master_key` is not the key it was sealed with."""
    sealed = bytes(sealed)
    if sealed[:1] != _SEALED_FORMAT or len(sealed) < 1 + 12 + 16:
        raise MasterKeyError(f"DKIM key {selector} of {domain}: not a sealed key")
    try:
        return AESGCM(master_key).decrypt(sealed[1:13], sealed[13:], _aad(domain, selector))
    except InvalidTag:
        raise MasterKeyError(
            f"DKIM key {selector} of {domain}: dkim.master_key_file holds another master key"
            " than the one it was sealed with"
        ) from None


@functools.lru_cache(maxsize=256)
def sealed_signing_key(
    sealed: bytes, master_key: bytes, domain: str, selector: str
) -> dkim_signature.PrivateKey:
    """`signing_key` for a sealed key: unsealed and parsed once per process (a sealed key is
    never rewritten either: a rotation makes a new row)."""
    return _parse(unseal(sealed, master_key, domain, selector), f"{domain} {selector}")


def _aad(domain: str, selector: str) -> bytes:
    return f"mailrelay-dkim:{domain.lower()}:{selector}".encode("ascii")


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


def sign(
    message: bytes,
    *,
    domain: str,
    keys: list[DkimKey],
    now: float | None = None,
    master_key: bytes | None = None,
) -> bytes:
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
        if key.sealed_key is not None:
            master = master_key or _process_master_key
            if master is None:
                raise MasterKeyError(
                    f"DKIM key {key.selector} of {domain} is in the database;"
                    " no dkim.master_key_file was loaded to unseal it"
                )
            private = sealed_signing_key(
                bytes(key.sealed_key), master, domain_b.decode(), key.selector
            )
        else:
            private = signing_key(key.private_key_path)
        if dkim_signature.algorithm(private) != key.algorithm.encode("ascii"):
            raise ValueError(f"{key.private_key_path or key.selector}: not an {key.algorithm} key")
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
    return _parse(Path(path).read_bytes(), path)


def _parse(pem: bytes, name: str) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise ValueError(f"{name}: not an RSA or Ed25519 private key")
    return key
