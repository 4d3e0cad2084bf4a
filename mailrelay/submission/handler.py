"""The SMTP hooks: who may send what. They decide and return the reply; they never deliver."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from mailrelay.config import SubmissionConfig
from mailrelay.store import Store, accounts, queue
from mailrelay.submission import replies
from mailrelay.submission.message import add_submission_headers

log = logging.getLogger("mailrelay.submission")

Signer = Callable[[bytes, str], Awaitable[bytes]]
"""(message, sending domain) -> the message with DKIM-Signature headers."""

_BARE_LINE_ENDING = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")


def split_address(address: str) -> tuple[str, str] | None:
    """'alice@Example.org' -> ('alice', 'example.org'), or None if it is not a routable address.

    Stricter than RFC 5321 on purpose: quoted local parts and address literals are legal but
    are never what a submission client of ours means, and they complicate every later step.
    """
    local, at, domain = address.rpartition("@")
    domain = domain.lower()
    if not at or not _LOCAL.fullmatch(local) or not _DOMAIN.fullmatch(domain):
        return None
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return None
    return local, domain


@dataclass(frozen=True)
class Accepted:
    queue_id: str
    recipients: int


class SubmissionHandler:
    """aiosmtpd handler: one instance serves every connection, so it holds no session state."""

    def __init__(
        self,
        config: SubmissionConfig,
        hostname: str,
        store: Store,
        signer: Signer | None,
        on_queued: Callable[[], None],
        authentication_results_for: Callable[[str], str] | None = None,
        on_accepted: Callable[[Accepted], None] | None = None,
        on_rejected: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.hostname = hostname
        self.store = store
        self.signer = signer
        self.on_queued = on_queued
        self.authentication_results_for = authentication_results_for
        self.on_accepted = on_accepted
        self.on_rejected = on_rejected

    def _reject(self, reply: str) -> str:
        if self.on_rejected is not None:
            self.on_rejected(reply[:3])
        return reply

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # ENHANCEDSTATUSCODES goes just before the final "250 HELP" line.
        return [*responses[:-1], "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        login: str = (session.login_data or b"").decode("utf-8", "replace").lower()
        parts = split_address(address)
        if parts is None:
            return self._reject(replies.BAD_ADDRESS)
        if parts[1] != login.rpartition("@")[2]:
            return self._reject(replies.SENDER_NOT_OWNED)
        domain = await self.store.read(lambda c: accounts.get_domain(c, parts[1]))
        if domain is None or (domain.state != "valid" and not self.config.allow_unverified_domains):
            return self._reject(replies.DOMAIN_NOT_VERIFIED.format(domain=parts[1]))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if split_address(address) is None:
            return self._reject(replies.BAD_ADDRESS)
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return self._reject(replies.TOO_MANY_RECIPIENTS)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data: bytes = envelope.original_content
        if _BARE_LINE_ENDING.search(data):
            # SMTP smuggling: a bare LF or CR may be read as a line end by the next hop, which
            # would then see a second message hidden in this one. Refuse the whole DATA.
            return self._reject(replies.BARE_LINE_ENDING)
        login: str = session.login_data.decode("utf-8", "replace").lower()
        sending_domain = login.rpartition("@")[2]
        headers = BytesHeaderParser(policy=compat32).parsebytes(data, headersonly=True)
        from_headers = headers.get_all("From") or []
        if len(from_headers) != 1:
            return self._reject(replies.FROM_MISSING)
        addresses = email.utils.getaddresses([str(from_headers[0])])
        if not addresses or any(
            (split_address(a) or ("", ""))[1] != sending_domain for _, a in addresses
        ):
            return self._reject(replies.FROM_NOT_OWNED)

        now = time.time()
        queue_id = queue.new_message_id()
        message = add_submission_headers(
            data,
            hostname=self.hostname,
            queue_id=queue_id,
            now=now,
            authentication_results=self.authentication_results_for(login)
            if self.authentication_results_for
            else None,
        )
        if self.signer is not None:
            message = await self.signer(message, sending_domain)
        new = queue.NewMessage(
            sender=envelope.mail_from,
            recipients=tuple(envelope.rcpt_tos),
            data=message,
            auth_user=login,
            client_ip=session.peer[0] if session.peer else None,
            sender_domain=sending_domain,
        )
        try:
            await self.store.write(lambda c: queue.enqueue(c, new, now, queue_id))
        except (sqlite3.Error, RuntimeError) as exc:
            # Not on disk: say so with a 4xx so the client keeps the message and retries.
            log.error("event=queue_failed queue_id=%s error=%r", queue_id, str(exc))
            return replies.NOT_QUEUED
        log.info(
            "event=queued queue_id=%s user=%s size=%d nrcpt=%d",
            queue_id,
            login,
            len(message),
            len(envelope.rcpt_tos),
        )
        self.on_queued()
        if self.on_accepted is not None:
            self.on_accepted(Accepted(queue_id, len(envelope.rcpt_tos)))
        return replies.QUEUED.format(queue_id=queue_id)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.CancelledError):
            raise error
        log.exception("event=session_error error=%r", type(error).__name__)
        return replies.INTERNAL_ERROR
