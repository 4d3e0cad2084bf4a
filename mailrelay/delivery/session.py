"""The outbound SMTP session: connect, STARTTLS, let the transport policy judge the TLS, and
only then send messages.

`open_session` returns a `Session` whose TLS the `TlsRequirement` accepted, or a `Result` that
says how the attempt on this MX address ended (transient, permanent, or insecure with the
reason). `Session.send` returns one `Result` per recipient. Only programming errors and
cancellation raise. There is no path that sends MAIL FROM in plaintext, before the judgement, or
after a refusal. The rules themselves live in `policy.py`; this module only asks.
"""

from __future__ import annotations

import contextlib
import errno
import re
import ssl
import time
from dataclasses import dataclass, replace

import aiosmtplib

from mailrelay.delivery.certificates import CertificateFacts, certificate_facts
from mailrelay.delivery.ciphers import shared_client_context
from mailrelay.delivery.policy import Accepted, Handshake, Refusal, TlsRequirement
from mailrelay.delivery.reply import Reply, server_text
from mailrelay.delivery.result import Evidence, Insecure, Kind, Result


@dataclass(frozen=True)
class TlsFacts:
    """The negotiated session and how the policy judged it: the evidence of one connection."""

    protocol: str  # "TLSv1.3"
    cipher: str  # OpenSSL name
    certificate: CertificateFacts | None  # None: the server sent none (anonymous suite)
    verified: bool | None  # authenticated: by DANE, or by WebPKI for the MX name
    verify_error: str | None = None
    policy: str | None = None  # the policy that accepted (or refused) the session
    policy_detail: str | None = None


class StaleSession(Exception):
    """A reused session turned out to be dead before this transaction began: nothing of it
    reached the server, so the same recipients may go at once over a fresh connection."""


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
# The connection could not even start from this host (no route for that network or address
# family): a fact about us, not about the MX.
_NO_ROUTE = frozenset({errno.ENETUNREACH, errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL})


async def open_session(
    mx_name: str,
    address: str,
    requirement: TlsRequirement,
    *,
    port: int = 25,
    ehlo_name: str,
    connect_timeout: float = 30.0,
    command_timeout: float = 120.0,
) -> Session | Result:
    """Connect to `address`:`port` (the MX called `mx_name`) and set up TLS the policy accepts."""
    context = shared_client_context()
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
        result = await attempt.run(requirement, connect_timeout, command_timeout)
    except BaseException:
        smtp.close()
        raise
    if isinstance(result, Result):
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
        self.local_address: str | None = None  # known once connected

    def ended(
        self,
        kind: Kind,
        status: str,
        detail: str,
        *,
        reply: Reply | None = None,
        insecure: Insecure | None = None,
        tls: TlsFacts | None = None,
    ) -> Result:
        # The detail may quote the server (its reply, a malformed line, a certificate's names).
        where = f"{self.where}: {server_text(detail)}"
        evidence = Evidence(
            at=time.time(),
            kind=kind,
            mx_host=self.mx_name,
            mx_address=self.address,
            reply=str(reply) if reply else where,
            tls_protocol=tls.protocol if tls else None,
            tls_cipher=tls.cipher if tls else None,
            cert_fingerprint=tls.certificate.sha256 if tls and tls.certificate else None,
            cert_verified=tls.verified if tls else None,
            policy=tls.policy if tls else None,
            policy_detail=tls.policy_detail if tls else None,
            local_address=self.local_address,
        )
        diagnostic = reply.diagnostic if reply and kind is not Kind.INSECURE else where
        return Result(kind, status, diagnostic, insecure, (evidence,))

    def transient(self, status: str, detail: str) -> Result:
        return self.ended(Kind.TRANSIENT, status, detail)

    def insecure(
        self, reason: Insecure, detail: str, reply: Reply | None = None, tls: TlsFacts | None = None
    ) -> Result:
        return self.ended(
            Kind.INSECURE, reason.status, detail, reply=reply, insecure=reason, tls=tls
        )

    def from_reply(self, reply: Reply) -> Result:
        kind = Kind.TRANSIENT if reply.kind is Kind.TRANSIENT else Kind.PERMANENT
        return self.ended(kind, reply.status, f"{self.stage} was answered {reply}", reply=reply)

    def handshake_failure(self, exc: ssl.SSLError) -> Result:
        """Classify a failed TLS handshake.

        An alert, or "no protocol/cipher in common", is the server's TLS stack answering
        coherently: it will answer the same next time, so the MX is insecure (5.7.5) and the
        bounce can say why. Garbage where a handshake should be, a reset, a timeout or an
        internal error means the TLS conversation never properly happened -- a middlebox, an
        overloaded or restarting server -- so we retry (transient, 4.7.5) rather than bounce on
        a flake. Neither falls back to plaintext.
        """
        reason = exc.reason or ""
        if reason in _NEGOTIATION_REASONS or ("ALERT" in reason and reason not in _BROKEN_ALERTS):
            return self.insecure(Insecure.HANDSHAKE, f"TLS handshake failed: {reason}")
        return self.transient("4.7.5", f"TLS handshake broke off: {reason or exc}")

    async def run(
        self, requirement: TlsRequirement, connect_timeout: float, command_timeout: float
    ) -> Session | Result:
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
                cause = exc.__cause__
                if isinstance(cause, OSError) and cause.errno in _NO_ROUTE:
                    unroutable = self.transient("4.4.4", f"no route from here: {cause.strerror}")
                    return replace(unroutable, no_route=True)
                return self.transient("4.4.1", f"cannot connect: {exc.message}")
            self.local_address = _local_address(smtp)

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
                    server_hostname=requirement.sni,
                    tls_context=self.context,
                    timeout=command_timeout,
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
                if reply.kind is Kind.TRANSIENT:
                    return self.from_reply(reply)
                detail = f"refused STARTTLS: {reply}"
                return self.insecure(Insecure.STARTTLS_REFUSED, detail, reply)
            except ConnectionError as exc:
                return self.transient("4.7.5", f"TLS handshake broke off: {exc}")

            handshake = _handshake(smtp, self.mx_name)
            judgement = await requirement.judge(handshake)
            facts = _facts(handshake, judgement)
            if isinstance(judgement, Refusal):
                await _quit(smtp)  # the only command ever sent over a refused channel
                return self.insecure(judgement.reason, judgement.detail, tls=facts)

            self.stage = "EHLO after STARTTLS"
            try:
                await smtp.ehlo()
            except aiosmtplib.SMTPHeloError as exc:
                await _quit(smtp)
                return self.from_reply(Reply.parse(exc.code, exc.message))
            session = Session(smtp, self.mx_name, self.address, facts, command_timeout)
            session.local_address = self.local_address
            return session
        except aiosmtplib.SMTPTimeoutError:
            return self.transient("4.4.2", f"timed out waiting for the reply to {self.stage}")
        except aiosmtplib.SMTPServerDisconnected:
            return self.transient("4.4.2", f"connection lost during {self.stage}")
        except aiosmtplib.SMTPResponseException as exc:  # e.g. a malformed reply line
            return self.transient("4.5.0", f"protocol error during {self.stage}: {exc.message}")


def _local_address(smtp: aiosmtplib.SMTP) -> str | None:
    sockname = smtp.get_transport_info("sockname")
    return str(sockname[0]) if isinstance(sockname, tuple) and sockname else None


def _handshake(smtp: aiosmtplib.SMTP, mx_name: str) -> Handshake:
    tls = smtp.get_transport_info("ssl_object")
    assert isinstance(tls, ssl.SSLObject)
    cipher = tls.cipher()
    chain = tuple(_peer_chain(tls))
    certificate = certificate_facts(chain[0]) if chain else None
    return Handshake(mx_name, tls.version() or "", cipher[0] if cipher else "", chain, certificate)


def _facts(handshake: Handshake, judgement: Accepted | Refusal) -> TlsFacts:
    if isinstance(judgement, Accepted):
        verified, error, detail = judgement.verified, judgement.verify_error, judgement.detail
    else:
        verified, error, detail = judgement.verified, judgement.detail, judgement.policy_detail
    return TlsFacts(
        handshake.protocol,
        handshake.cipher,
        handshake.certificate,
        verified,
        error,
        judgement.policy,
        detail,
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
        self.local_address: str | None = None

    @property
    def fresh(self) -> bool:
        """No transaction yet: the connection's first use (TLS-RPT counts it as a session)."""
        return self._transactions == 0

    def offers(self, extension: str) -> bool:
        """Whether the server's EHLO after STARTTLS listed `extension` (lowercase)."""
        return extension in self._smtp.esmtp_extensions

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

    def abort(self) -> None:
        """Drop the connection without QUIT: for a session left mid-transaction."""
        self._smtp.close()

    async def close(self) -> None:
        """QUIT and close; tolerates a peer that is already gone."""
        await _quit(self._smtp)

    def evidence(self, kind: Kind, reply: str | None) -> Evidence:
        """This connection's facts, for a recipient whose transaction ended as `kind`."""
        tls = self.tls
        return Evidence(
            at=time.time(),
            kind=kind,
            mx_host=self.mx_name,
            mx_address=self.address,
            reply=reply,
            tls_protocol=tls.protocol,
            tls_cipher=tls.cipher,
            cert_fingerprint=tls.certificate.sha256 if tls.certificate else None,
            cert_verified=tls.verified,
            policy=tls.policy,
            policy_detail=tls.policy_detail,
            local_address=self.local_address,
        )

    async def send(
        self, mail_from: str, rcpt_tos: list[str], data: bytes, *, requiretls: bool = False
    ) -> list[Result]:
        """One transaction (MAIL FROM, RCPT TO each, DATA); one result per recipient, in order.

        Raises `StaleSession` when a reused session is found dead at RSET, before anything of
        this transaction was sent. Not safe to call concurrently on one Session: SMTP is one
        transaction at a time.
        """
        results: dict[int, Result] = {}

        def decide(i: int, kind: Kind, status: str, reply: Reply | None, why: str) -> None:
            diagnostic = reply.diagnostic if reply else f"{self.where}: {why}"
            shown = str(reply) if reply else diagnostic
            results[i] = Result(kind, status, diagnostic, evidence=(self.evidence(kind, shown),))

        def undecided(kind: Kind, status: str, reply: Reply | None, why: str) -> list[Result]:
            for i in range(len(rcpt_tos)):
                if i not in results:
                    decide(i, kind, status, reply, why)
            return [results[i] for i in range(len(rcpt_tos))]

        ext = self._smtp.esmtp_extensions
        utf8 = "smtputf8" in ext
        if mail_from and not _ADDRESS.fullmatch(mail_from):
            return undecided(Kind.PERMANENT, "5.1.7", None, f"invalid sender {mail_from!r}")
        if not mail_from.isascii() and not utf8:
            return undecided(Kind.PERMANENT, "5.6.7", None, "sender needs SMTPUTF8")
        if not data.isascii() and "8bitmime" not in ext and not utf8:
            # RFC 6152 §3: no 8-bit data to a server without 8BITMIME. Converting the body to
            # 7 bit would break the DKIM signature made at submission, so the message bounces.
            why = "the message has 8-bit content and the server does not offer 8BITMIME"
            return undecided(Kind.PERMANENT, "5.6.3", None, why)
        limit = ext.get("size", "")
        if limit.isdigit() and 0 < int(limit) < len(data):
            why = f"message of {len(data)} bytes exceeds the server's SIZE {limit}"
            return undecided(Kind.PERMANENT, "5.3.4", None, why)
        wanted = []
        for i, rcpt in enumerate(rcpt_tos):
            if not _ADDRESS.fullmatch(rcpt):
                decide(i, Kind.PERMANENT, "5.1.3", None, f"invalid address {rcpt!r}")
            elif not rcpt.isascii() and not utf8:
                decide(i, Kind.PERMANENT, "5.6.7", None, "address needs SMTPUTF8")
            else:
                wanted.append(i)
        if not wanted:
            return undecided(Kind.PERMANENT, "5.1.3", None, "no deliverable recipient")

        params: list[bytes] = []
        if "size" in ext:
            params.append(f"SIZE={len(data)}".encode())
        if "8bitmime" in ext and not data.isascii():
            params.append(b"BODY=8BITMIME")
        header_section = data.split(b"\r\n\r\n", 1)[0]
        addresses = [mail_from, *(rcpt_tos[i] for i in wanted)]
        if utf8 and not (header_section.isascii() and all(a.isascii() for a in addresses)):
            params.append(b"SMTPUTF8")
        if requiretls:
            # RFC 8689 §4.2: passed on, so every later hop holds the message to TLS as well.
            params.append(b"REQUIRETLS")

        try:
            if self._transactions:
                # Whatever the last transaction left behind (a refused DATA, a half-built
                # envelope), the next one starts clean. A session that fails here was already
                # dead (the server timed us out while it was idle in the pool): nothing of this
                # transaction left, so the caller may retry at once on a fresh connection.
                try:
                    reply = await self._command("RSET", b"RSET")
                except _Lost as exc:
                    self._smtp.close()
                    raise StaleSession(f"{self.where}: {exc}") from exc
                if reply.code != 250:
                    self._smtp.close()
                    raise StaleSession(f"{self.where}: RSET was answered {reply}")
            self._transactions += 1
            sender = b"FROM:<" + mail_from.encode() + b">"
            reply = await self._command("MAIL FROM", b"MAIL", sender, *params)
            if reply.kind is not Kind.SENT:
                return undecided(reply.kind, reply.status, reply, f"MAIL FROM: {reply}")
            accepted = []
            for i in wanted:
                recipient = b"TO:<" + rcpt_tos[i].encode() + b">"
                reply = await self._command("RCPT TO", b"RCPT", recipient)
                if reply.kind is Kind.SENT:
                    accepted.append(i)
                else:
                    decide(i, reply.kind, reply.status, reply, f"RCPT TO: {reply}")
            if not accepted:
                return undecided(Kind.PERMANENT, "5.0.0", None, "no recipient accepted")
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
                raise _Lost(f"unreadable reply to DATA: {server_text(exc.message)}") from exc
            return undecided(reply.kind, reply.status, reply, f"DATA: {reply}")
        except _Lost as exc:
            self._smtp.close()
            # If only the reply to the final dot was lost the message may have arrived, and a
            # retry may duplicate it; that beats losing it.
            return undecided(Kind.TRANSIENT, "4.4.2", None, str(exc))

    async def _command(self, stage: str, *args: bytes) -> Reply:
        try:
            response = await self._smtp.execute_command(*args, timeout=self._timeout)
        except aiosmtplib.SMTPTimeoutError as exc:
            raise _Lost(f"timed out waiting for the reply to {stage}") from exc
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise _Lost(f"connection lost during {stage}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            # aiosmtplib's message quotes the malformed line the server sent.
            raise _Lost(f"unreadable reply to {stage}: {server_text(exc.message)}") from exc
        return Reply.parse(response.code, response.message)
