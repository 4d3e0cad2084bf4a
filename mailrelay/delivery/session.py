"""The outbound SMTP session: connect, STARTTLS, grade the TLS, and only then send messages.

`open_session` returns a `Session` whose TLS passed the policy, or a `Failure` that says whether
the attempt is worth retrying (transient) or not (permanent), and, for a destination refused as
insecure, which `Insecure` reason applies. `Session.send` returns one result per recipient. Only
programming errors and cancellation raise. There is no path that sends MAIL FROM in plaintext,
before grading, or after a refused grade.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import aiosmtplib

from mailrelay.config import CipherProfile, SecurityLevel
from mailrelay.delivery.certificates import (
    CertificateFacts,
    certificate_facts,
    verify_chain,
    weak_chain,
)
from mailrelay.delivery.tls_policy import Insecure as Insecure  # re-exported, used with Failure
from mailrelay.delivery.tls_policy import Refused, grade, shared_client_context


class Outcome(StrEnum):
    SENT = "sent"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")


@dataclass(frozen=True)
class Reply:
    """One SMTP reply as received: code, RFC 3463 enhanced code if given, and the text."""

    code: int
    enhanced: str | None
    text: str  # continuation lines joined with "\n", each without its enhanced code

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        match = _ENHANCED.match(message)
        if match is None:
            return cls(code, None, message)
        enhanced = match.group(1)
        lines = [line.removeprefix(enhanced).strip() for line in message.split("\n")]
        return cls(code, enhanced, "\n".join(lines))

    @property
    def outcome(self) -> Outcome:
        if 200 <= self.code < 300:
            return Outcome.SENT
        return Outcome.TRANSIENT if 400 <= self.code < 500 else Outcome.PERMANENT

    @property
    def status(self) -> str:
        """The enhanced status to record: the server's own if consistent, else a generic one."""
        klass = self.code // 100
        if self.enhanced and self.enhanced[0] == str(klass):
            return self.enhanced
        return f"{klass}.0.0" if klass in (2, 4, 5) else "5.5.0"

    def __str__(self) -> str:
        text = " ".join(self.text.split())
        return " ".join(str(p) for p in (self.code, self.enhanced, text) if p)


@dataclass(frozen=True)
class TlsFacts:
    protocol: str  # "TLSv1.3"
    cipher: str  # OpenSSL name
    certificate: CertificateFacts | None  # None: the server sent none (anonymous suite)
    # Whether the chain verified to a trusted root for the MX name: under "verify" OpenSSL
    # checked it; under "encrypt" we check it ourselves for the record. None: not determined.
    verified: bool | None
    verify_error: str | None = None


_FailureOutcome = Literal[Outcome.TRANSIENT, Outcome.PERMANENT]


@dataclass(frozen=True)
class Failure:
    """Why no session could be used on this MX address."""

    outcome: _FailureOutcome
    status: str  # RFC 3463
    detail: str  # names the MX: "mx1.example.org[192.0.2.1]: negotiated TLSv1.0"
    insecure: Insecure | None = None
    reply: Reply | None = None
    tls: TlsFacts | None = None  # what a refused handshake negotiated

    @property
    def diagnostic(self) -> str:
        return f"smtp; {self.reply}" if self.reply else self.detail


@dataclass(frozen=True)
class RecipientResult:
    recipient: str
    outcome: Outcome
    status: str
    reply: Reply | None  # the reply that decided it, if a server gave one
    detail: str

    @property
    def diagnostic(self) -> str:
        return f"smtp; {self.reply}" if self.reply else self.detail


@dataclass(frozen=True)
class SendResult:
    recipients: tuple[RecipientResult, ...]  # one per recipient, in the order given

    def with_outcome(self, outcome: Outcome) -> list[RecipientResult]:
        return [r for r in self.recipients if r.outcome is outcome]


# Sent by OpenSSL when it and the peer could not agree, or read from the peer as an alert:
# the server's TLS stack worked and said no. Anything else (garbage, reset, timeout, internal
# errors) means the handshake broke rather than failed.
_NEGOTIATION_REASONS = frozenset(
    [
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "NO_CIPHERS_AVAILABLE",
        "NO_SHARED_CIPHER",
        "VERSION_TOO_LOW",
        "DH_KEY_TOO_SMALL",
        "EE_KEY_TOO_SMALL",
        "CA_KEY_TOO_SMALL",
        "CA_MD_TOO_WEAK",
        "UNSAFE_LEGACY_RENEGOTIATION_DISABLED",
        "WRONG_SIGNATURE_TYPE",
        "INAPPROPRIATE_FALLBACK",
        "NO_SUITABLE_SIGNATURE_ALGORITHM",
        "NO_SHARED_SIGNATURE_ALGORITHMS",
    ]
)
_BROKEN_ALERTS = frozenset(
    {"TLSV1_ALERT_INTERNAL_ERROR", "SSLV3_ALERT_BAD_RECORD_MAC", "TLSV1_ALERT_USER_CANCELLED"}
)
_ENCODING_DER = 2  # _ssl.ENCODING_DER, which typeshed does not declare
_ADDRESS = re.compile(r"[^\s<>\x00-\x1f\x7f]+")
_NO_ESMTP = (500, 502, 504)


async def open_session(
    mx_name: str,
    address: str,
    *,
    port: int = 25,
    ehlo_name: str,
    security_level: SecurityLevel = "encrypt",
    cipher_profile: CipherProfile = "ncsc-2025",
    ca_file: str = "",
    connect_timeout: float = 30.0,
    command_timeout: float = 120.0,
) -> Session | Failure:
    """Connect to `address`:`port` (the MX called `mx_name`) and set up graded TLS."""
    context = shared_client_context(security_level, ca_file)
    smtp = aiosmtplib.SMTP(
        hostname=address,
        port=port,
        local_hostname=ehlo_name,
        timeout=command_timeout,
        start_tls=False,  # we do STARTTLS ourselves, to classify every way it can go wrong
        tls_context=context,
    )
    attempt = _Attempt(smtp, mx_name, address, context)
    try:
        result = await attempt.run(
            security_level, cipher_profile, ca_file, connect_timeout, command_timeout
        )
    except BaseException:
        smtp.close()
        raise
    if isinstance(result, Failure):
        smtp.close()
    return result


class _Attempt:
    """The steps of `open_session` for one connection, each failure classified where it is known."""

    def __init__(
        self, smtp: aiosmtplib.SMTP, mx_name: str, address: str, context: ssl.SSLContext
    ) -> None:
        self.smtp = smtp
        self.mx_name = mx_name
        self.address = address
        self.where = f"{mx_name}[{address}]"
        self.context = context
        self.stage = "the connection"

    def transient(self, status: str, detail: str) -> Failure:
        return Failure(Outcome.TRANSIENT, status, f"{self.where}: {detail}")

    def insecure(
        self, reason: Insecure, detail: str, reply: Reply | None = None, tls: TlsFacts | None = None
    ) -> Failure:
        where = f"{self.where}: {detail}"
        return Failure(Outcome.PERMANENT, reason.status, where, reason, reply, tls)

    def from_reply(self, reply: Reply) -> Failure:
        transient = reply.outcome is Outcome.TRANSIENT
        outcome: _FailureOutcome = Outcome.TRANSIENT if transient else Outcome.PERMANENT
        detail = f"{self.where}: {self.stage} was answered {reply}"
        return Failure(outcome, reply.status, detail, reply=reply)

    def handshake_failure(self, exc: ssl.SSLError) -> Failure:
        """Classify a failed TLS handshake.

        A certificate that does not verify, an alert, or "no protocol/cipher in common" is the
        server's TLS stack answering coherently: it will answer the same next time, so the
        destination is insecure (permanent, 5.7.5) and the bounce can say why. Garbage where a
        handshake should be, a reset, a timeout or an internal error means the TLS conversation
        never properly happened -- a middlebox, an overloaded or restarting server -- so we
        retry (transient, 4.7.5) rather than bounce on a flake. Neither falls back to plaintext.
        """
        reason = exc.reason or ""
        if isinstance(exc, ssl.SSLCertVerificationError):
            message = exc.verify_message or reason or str(exc)
            return self.insecure(Insecure.CERTIFICATE, f"certificate not accepted: {message}")
        if reason in _NEGOTIATION_REASONS or ("ALERT" in reason and reason not in _BROKEN_ALERTS):
            return self.insecure(Insecure.HANDSHAKE, f"TLS handshake failed: {reason}")
        return self.transient("4.7.5", f"TLS handshake broke off: {reason or exc}")

    async def run(
        self,
        security_level: SecurityLevel,
        cipher_profile: CipherProfile,
        ca_file: str,
        connect_timeout: float,
        command_timeout: float,
    ) -> Session | Failure:
        smtp = self.smtp
        try:
            try:
                await smtp.connect(timeout=connect_timeout)
            except aiosmtplib.SMTPConnectTimeoutError:
                return self.transient("4.4.1", f"no answer within {connect_timeout:g}s")
            except aiosmtplib.SMTPConnectResponseError as exc:
                # A 554 greeting means "no SMTP service for you here"; the caller tries other MX.
                return self.from_reply(Reply.parse(exc.code, exc.message))
            except aiosmtplib.SMTPConnectError as exc:
                return self.transient("4.4.1", f"cannot connect: {exc.message}")

            self.stage = "EHLO"
            try:
                await smtp.ehlo()
            except aiosmtplib.SMTPHeloError as exc:
                reply = Reply.parse(exc.code, exc.message)
                await _quit(smtp)
                if exc.code in _NO_ESMTP:
                    # No EHLO, no extensions, so no STARTTLS; we never fall back to HELO.
                    return self.insecure(Insecure.NO_STARTTLS, "does not speak ESMTP", reply)
                return self.from_reply(reply)
            if not smtp.supports_extension("starttls"):
                await _quit(smtp)
                return self.insecure(Insecure.NO_STARTTLS, "does not offer STARTTLS")

            self.stage = "STARTTLS"
            try:
                await smtp.starttls(
                    server_hostname=self.mx_name, tls_context=self.context, timeout=command_timeout
                )
            except ssl.SSLError as exc:
                return self.handshake_failure(exc)
            except aiosmtplib.SMTPReadTimeoutError:
                return self.transient("4.4.2", "timed out waiting for the reply to STARTTLS")
            except (aiosmtplib.SMTPTimeoutError, aiosmtplib.SMTPServerDisconnected) as exc:
                return self.transient("4.7.5", f"TLS handshake broke off: {exc.message}")
            except aiosmtplib.SMTPResponseException as exc:
                reply = Reply.parse(exc.code, exc.message)
                await _quit(smtp)
                if reply.outcome is Outcome.TRANSIENT:
                    return self.from_reply(reply)
                detail = f"refused STARTTLS: {reply}"
                return self.insecure(Insecure.STARTTLS_REFUSED, detail, reply)
            except ConnectionError as exc:
                return self.transient("4.7.5", f"TLS handshake broke off: {exc}")

            facts = await _tls_facts(smtp, self.mx_name, security_level, ca_file)
            if security_level == "verify" and not facts.verified:
                await _quit(smtp)
                detail = f"certificate not accepted: {facts.verify_error}"
                return self.insecure(Insecure.CERTIFICATE, detail, tls=facts)
            verdict = grade(cipher_profile, facts.protocol, facts.cipher)
            if isinstance(verdict, Refused):
                await _quit(smtp)  # the only command ever sent over a refused channel
                return self.insecure(verdict.reason, verdict.detail, tls=facts)

            self.stage = "EHLO after STARTTLS"
            try:
                await smtp.ehlo()
            except aiosmtplib.SMTPHeloError as exc:
                await _quit(smtp)
                return self.from_reply(Reply.parse(exc.code, exc.message))
            return Session(smtp, self.mx_name, self.address, facts, command_timeout)
        except aiosmtplib.SMTPTimeoutError:
            return self.transient("4.4.2", f"timed out waiting for the reply to {self.stage}")
        except aiosmtplib.SMTPServerDisconnected:
            return self.transient("4.4.2", f"connection lost during {self.stage}")
        except aiosmtplib.SMTPResponseException as exc:  # e.g. a malformed reply line
            return self.transient("4.5.0", f"protocol error during {self.stage}: {exc.message}")


async def _tls_facts(
    smtp: aiosmtplib.SMTP, mx_name: str, security_level: SecurityLevel, ca_file: str
) -> TlsFacts:
    tls = smtp.get_transport_info("ssl_object")
    assert isinstance(tls, ssl.SSLObject)
    cipher = tls.cipher()
    chain = _peer_chain(tls)
    certificate = certificate_facts(chain[0]) if chain else None
    if security_level == "verify":
        # OpenSSL verified the chain, but at @SECLEVEL=0: put back the key-size and hash floor.
        weak = weak_chain(chain)
        protocol, suite = tls.version() or "", cipher[0] if cipher else ""
        return TlsFacts(protocol, suite, certificate, weak is None, weak)
    # Off the event loop: the first call parses the system trust store.
    error = await asyncio.to_thread(verify_chain, chain, mx_name, ca_file)
    return TlsFacts(
        tls.version() or "", cipher[0] if cipher else "", certificate, error is None, error
    )


def _peer_chain(tls: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent, leaf first, as DER."""
    leaf = tls.getpeercert(binary_form=True)
    # Python 3.13 has SSLObject.get_unverified_chain(); 3.11 has it only on the private
    # _sslobj. Without it, verification sees the leaf alone and fails on missing intermediates.
    getter = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        with contextlib.suppress(Exception):
            return [c.public_bytes(_ENCODING_DER) for c in getter() or ()]
    return [leaf] if leaf else []


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    """Say QUIT if the peer is still there; a peer that is gone or slow is no error."""
    if smtp.is_connected:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await smtp.quit(timeout=5.0)
    smtp.close()


class _Lost(Exception):
    """The connection died or timed out mid-transaction; the session cannot be used again."""


class Session:
    """A connection whose TLS passed the policy, ready for one or more transactions."""

    def __init__(
        self,
        smtp: aiosmtplib.SMTP,
        mx_name: str,
        address: str,
        tls: TlsFacts,
        command_timeout: float,
    ) -> None:
        self._smtp = smtp
        self.mx_name = mx_name
        self.address = address
        self.tls = tls
        self._timeout = command_timeout
        self._transactions = 0

    @property
    def where(self) -> str:
        return f"{self.mx_name}[{self.address}]"

    @property
    def alive(self) -> bool:
        return self._smtp.is_connected

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """QUIT and close; tolerates a peer that is already gone."""
        await _quit(self._smtp)

    async def send(self, mail_from: str, rcpt_tos: list[str], data: bytes) -> SendResult:
        """One transaction (MAIL FROM, RCPT TO each, DATA); one result per recipient, in order.

        Not safe to call concurrently on one Session: SMTP is one transaction at a time.
        """
        results: dict[int, RecipientResult] = {}

        def decide(i: int, outcome: Outcome, status: str, reply: Reply | None, why: str) -> None:
            results[i] = RecipientResult(
                rcpt_tos[i], outcome, status, reply, f"{self.where}: {why}"
            )

        def undecided(outcome: Outcome, status: str, reply: Reply | None, why: str) -> SendResult:
            for i in range(len(rcpt_tos)):
                if i not in results:
                    decide(i, outcome, status, reply, why)
            return SendResult(tuple(results[i] for i in range(len(rcpt_tos))))

        ext = self._smtp.esmtp_extensions
        utf8 = "smtputf8" in ext
        if mail_from and not _ADDRESS.fullmatch(mail_from):
            return undecided(Outcome.PERMANENT, "5.1.7", None, f"invalid sender {mail_from!r}")
        if not mail_from.isascii() and not utf8:
            return undecided(Outcome.PERMANENT, "5.6.7", None, "sender needs SMTPUTF8")
        limit = ext.get("size", "")
        if limit.isdigit() and 0 < int(limit) < len(data):
            why = f"message of {len(data)} bytes exceeds the server's SIZE {limit}"
            return undecided(Outcome.PERMANENT, "5.3.4", None, why)
        wanted = []
        for i, rcpt in enumerate(rcpt_tos):
            if not _ADDRESS.fullmatch(rcpt):
                decide(i, Outcome.PERMANENT, "5.1.3", None, f"invalid address {rcpt!r}")
            elif not rcpt.isascii() and not utf8:
                decide(i, Outcome.PERMANENT, "5.6.7", None, "address needs SMTPUTF8")
            else:
                wanted.append(i)
        if not wanted:
            return undecided(Outcome.PERMANENT, "5.1.3", None, "no deliverable recipient")

        params: list[bytes] = []
        if "size" in ext:
            params.append(f"SIZE={len(data)}".encode())
        if "8bitmime" in ext and not data.isascii():
            params.append(b"BODY=8BITMIME")
        header_section = data.split(b"\r\n\r\n", 1)[0]
        addresses = [mail_from, *(rcpt_tos[i] for i in wanted)]
        if utf8 and not (header_section.isascii() and all(a.isascii() for a in addresses)):
            params.append(b"SMTPUTF8")

        try:
            if self._transactions:
                # Whatever the last transaction left behind (a refused DATA, a half-built
                # envelope), the next one starts clean.
                reply = await self._command("RSET", b"RSET")
                if reply.code != 250:
                    raise _Lost(f"RSET was answered {reply}")
            self._transactions += 1
            sender = b"FROM:<" + mail_from.encode() + b">"
            reply = await self._command("MAIL FROM", b"MAIL", sender, *params)
            if reply.outcome is not Outcome.SENT:
                return undecided(reply.outcome, reply.status, reply, f"MAIL FROM: {reply}")
            accepted = []
            for i in wanted:
                recipient = b"TO:<" + rcpt_tos[i].encode() + b">"
                reply = await self._command("RCPT TO", b"RCPT", recipient)
                if reply.outcome is Outcome.SENT:
                    accepted.append(i)
                else:
                    decide(i, reply.outcome, reply.status, reply, f"RCPT TO: {reply}")
            if not accepted:
                return undecided(Outcome.PERMANENT, "5.0.0", None, "no recipient accepted")
            try:
                response = await self._smtp.data(data, timeout=self._timeout)
                reply = Reply.parse(response.code, response.message)
            except aiosmtplib.SMTPDataError as exc:  # refused at DATA or after the final dot
                reply = Reply.parse(exc.code, exc.message)
            except aiosmtplib.SMTPTimeoutError as exc:
                raise _Lost("timed out during DATA") from exc
            except aiosmtplib.SMTPServerDisconnected as exc:
                raise _Lost("connection lost during DATA") from exc
            except aiosmtplib.SMTPResponseException as exc:  # a malformed reply
                raise _Lost(f"unreadable reply to DATA: {exc.message}") from exc
            return undecided(reply.outcome, reply.status, reply, f"DATA: {reply}")
        except _Lost as exc:
            self._smtp.close()
            # If only the reply to the final dot was lost the message may have arrived, and a
            # retry may duplicate it; that beats losing it.
            return undecided(Outcome.TRANSIENT, "4.4.2", None, str(exc))

    async def _command(self, stage: str, *args: bytes) -> Reply:
        try:
            response = await self._smtp.execute_command(*args, timeout=self._timeout)
        except aiosmtplib.SMTPTimeoutError as exc:
            raise _Lost(f"timed out waiting for the reply to {stage}") from exc
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise _Lost(f"connection lost during {stage}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise _Lost(f"unreadable reply to {stage}: {exc.message}") from exc
        return Reply.parse(response.code, response.message)
