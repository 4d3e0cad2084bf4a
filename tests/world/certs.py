"""Test certificates: throw-away CAs (roots and intermediates), the leaf certificates they sign,
self-signed ones, and the TLSA records (RFC 6698) that name any of them."""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
# What `TestCA.issue` puts after the leaf: "intermediates" is every CA below the root (what
# public CAs tell servers to send); "full" adds the root; "leaf" sends the leaf alone.
ChainShape = Literal["intermediates", "full", "leaf"]

_DAY = datetime.timedelta(days=1)


@functools.cache
def _rsa_key() -> rsa.RSAPrivateKey:
    # A 2048-bit RSA key takes up to a second to generate; every RSA leaf in a test run shares
    # one, which is harmless because nothing here is secret.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _new_key(key: KeyType) -> PrivateKey:
    if key == "rsa":
        return _rsa_key()
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(hostnames: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(names)


def _validity(
    not_before: datetime.datetime | None, not_after: datetime.datetime | None
) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return (not_before or now - _DAY, not_after or now + 30 * _DAY)


def _leaf_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    hostnames: list[str],
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.CertificateBuilder:
    # The extensions a public CA would set, so that strict verifiers (X509_STRICT, Python 3.13's
    # defaults) judge these certificates on validity and name only, not on a missing extension.
    rsa_leaf = isinstance(public_key, rsa.RSAPublicKey)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hostnames), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                # RSA key exchange (the "RSA key exchange only" MX) encrypts to the RSA key.
                key_encipherment=rsa_leaf,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


@dataclass(frozen=True)
class Issued:
    """A certificate chain (leaf first) and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def certificates(self) -> list[x509.Certificate]:
        """The chain, leaf first, parsed."""
        return x509.load_pem_x509_certificates(self.cert_pem)

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]

    @property
    def chain_der(self) -> list[bytes]:
        """The chain as a TLS server sends it: DER, leaf first."""
        return [c.public_bytes(serialization.Encoding.DER) for c in self.certificates]

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write `name`.crt and `name`.key into `directory`; return (cert_file, key_file)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_file = directory / f"{name}.crt"
        key_file = directory / f"{name}.key"
        cert_file.write_bytes(self.cert_pem)
        key_file.write_bytes(self.key_pem)
        key_file.chmod(0o600)
        return cert_file, key_file


class TestCA:
    """A certificate authority that exists only for one test run."""

    # pytest would otherwise try to collect this class wherever a test module imports it.
    __test__ = False

    def __init__(
        self,
        common_name: str = "mailrelay test CA",
        *,
        key: KeyType = "ec",
        parent: TestCA | None = None,
    ) -> None:
        """A root CA, or with `parent` an intermediate CA that `parent` signs. Nothing trusts
        either unless written to a ca_file: a CA made here for DANE-TA is a private trust anchor
        that only a TLSA record vouches for."""
        self._key = _new_key(key)
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.parent = parent
        now = datetime.datetime.now(datetime.UTC)
        public_key = self._key.public_key()
        builder = x509.CertificateBuilder()
        if parent is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(parent._ski),
                critical=False,
            )
        self._cert = (
            builder.subject_name(self._name)
            .issuer_name(parent._name if parent is not None else self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 365 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    key_encipherment=False,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(parent._key if parent is not None else self._key, hashes.SHA256())
        )

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self._cert)

    @property
    def _ski(self) -> x509.SubjectKeyIdentifier:
        return self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    def intermediate(self, common_name: str, *, key: KeyType = "ec") -> TestCA:
        """A CA that this one signs."""
        return TestCA(common_name, key=key, parent=self)

    def _above_leaf(self, shape: ChainShape) -> list[x509.Certificate]:
        cas: list[x509.Certificate] = []
        ca: TestCA | None = self
        while ca is not None:
            cas.append(ca._cert)
            ca = ca.parent
        match shape:
            case "leaf":
                return []
            case "intermediates":
                return cas[:-1]
            case "full":
                return cas

    def write_ca(self, path: Path) -> Path:
        """Write the CA certificate (a trust anchor for `cafile=`) to `path` and return it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.cert_pem)
        return path

    def issue(
        self,
        hostnames: list[str],
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key: KeyType = "ec",
        chain: ChainShape = "intermediates",
    ) -> Issued:
        """A leaf for `hostnames` (DNS names or IP addresses), valid from yesterday for 30 days
        unless told otherwise; pass a `not_after` in the past for an expired certificate.

        The chain after the leaf is the intermediates by default, as public CAs tell servers to
        send (for a root that signs leaves itself: the leaf alone). `chain="full"` adds the root,
        as RFC 7671 §5.2.2 asks of a server whose DANE-TA record is a digest; "leaf" omits
        every CA, as a server may when its TLSA record publishes the whole TA."""
        if not hostnames:
            raise ValueError("a certificate needs at least one host name")
        leaf_key = _new_key(key)
        start, end = _validity(not_before, not_after)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
        cert = (
            _leaf_builder(subject, self._name, leaf_key.public_key(), hostnames, start, end)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        pem = b"".join(_cert_pem(c) for c in [cert, *self._above_leaf(chain)])
        return Issued(cert_pem=pem, key_pem=_key_pem(leaf_key))


def self_signed(
    hostname: str,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    key: KeyType = "ec",
) -> Issued:
    """A leaf for `hostname` signed by its own key, as many small MX hosts present."""
    leaf_key = _new_key(key)
    start, end = _validity(not_before, not_after)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = _leaf_builder(name, name, leaf_key.public_key(), [hostname], start, end).sign(
        leaf_key, hashes.SHA256()
    )
    return Issued(cert_pem=_cert_pem(cert), key_pem=_key_pem(leaf_key))


def tlsa_data(cert: x509.Certificate, selector: int, mtype: int) -> bytes:
    """The certificate association data of a TLSA record for `cert` (RFC 6698 §2.1): selector
    0 the whole certificate, 1 its SubjectPublicKeyInfo; matching type 0 the bytes themselves,
    1 their SHA2-256, 2 their SHA2-512."""
    if selector == 0:
        selected = cert.public_bytes(serialization.Encoding.DER)
    elif selector == 1:
        selected = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        raise ValueError(f"no such TLSA selector: {selector}")
    match mtype:
        case 0:
            return selected
        case 1:
            return hashlib.sha256(selected).digest()
        case 2:
            return hashlib.sha512(selected).digest()
        case _:
            raise ValueError(f"no such TLSA matching type: {mtype}")


def tlsa_record(cert: x509.Certificate, usage: int, selector: int, mtype: int) -> str:
    """A TLSA record for `cert` in presentation form, "3 1 1 <hex>", for `DnsServer.add`."""
    return f"{usage} {selector} {mtype} {tlsa_data(cert, selector, mtype).hex()}"
