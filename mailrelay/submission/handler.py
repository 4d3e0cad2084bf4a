"""The SMTP hooks: who may send what. They decide and return the reply; they never deliver."""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mailrelay.config import SubmissionConfig
from mailrelay.store import Store, accounts, events, queue
from mailrelay.submission import headers, replies
from mailrelay.submission.message import add_submission_headers

log = logging.getLogger("mailrelay.submission")

SignFunction = Callable[[bytes, str], bytes]
"""(message, sending domain) -> the message with DKIM-Signature headers. Blocking: it is run in
a worker thread with the rest of the message's work."""

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


Stage = Literal["mail", "rcpt", "data"]
"""The SMTP command a refusal answered."""


def authenticated_user(session: Any) -> str:
    """The address the session authenticated as ('' before AUTH). The protocol layer stores a
    LoginPassword with the login only (see SubmissionSMTP._check): no password is kept."""
    login = getattr(getattr(session, "auth_data", None), "login", None) or b""
    return bytes(login).decode("utf-8", "replace").lower()


@dataclass(frozen=True)
class _Refusal:
    reply: str


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
        signer: SignFunction | None,
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
        self._writes: set[asyncio.Task[None]] = set()

    def refuse(
        self, session: Any, envelope: Any, reply: str, stage: Stage, rcpts: list[str]
    ) -> str:
        """Count, log and record a policy refusal; return `reply` for the hook to send.

        Each refused recipient gets a REFUSED event under the transaction's queue id (see
        `handle_MAIL`). A refused MAIL FROM has no recipients yet, so it leaves no event: the
        events table is the recipients' story; the refusal is in the log and the metrics.
        Public so that the protocol layer can report refusals aiosmtpd makes before any hook.
        """
        if self.on_rejected is not None:
            self.on_rejected(reply[:3])
        login = authenticated_user(session)
        queue_id: str | None = getattr(envelope, "queue_id", None)
        log.info(
            "event=refused stage=%s queue_id=%s user=%s nrcpt=%d reply=%r",
            stage,
            queue_id or "none",
            login or "none",
            len(rcpts),
            reply,
        )
        if queue_id and rcpts:
            self._record_refused(queue_id, list(rcpts), reply)
        return reply

    def _record_refused(self, queue_id: str, rcpts: list[str], reply: str) -> None:
        # Not awaited: a refusal promises the client nothing durable, so its reply need not wait
        # for a commit (one fsync per bad RCPT). The task is kept until written, and `flush`
        # waits for the stragglers; a write that fails is logged, never raised into a session.
        op = functools.partial(
            events.record_refused, at=time.time(), queue_id=queue_id, recipients=rcpts, reply=reply
        )
        task = asyncio.get_running_loop().create_task(self._write(op, queue_id))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, op: Callable[[sqlite3.Connection], None], queue_id: str) -> None:
        try:
            await self.store.write(op)
        except (sqlite3.Error, RuntimeError) as exc:
            log.warning("event=refusal_not_recorded queue_id=%s error=%r", queue_id, str(exc))

    async def flush(self) -> None:
        """Wait until every refusal recorded so far is written (before the store stops)."""
        while self._writes:
            await asyncio.gather(*self._writes)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # ENHANCEDSTATUSCODES goes just before the final "250 HELP" line.
        return [*responses[:-1], "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        login = authenticated_user(session)
        parts = split_address(address)
        if parts is None:
            return self.refuse(session, envelope, replies.BAD_ADDRESS, "mail", [])
        if parts[1] != login.rpartition("@")[2]:
            return self.refuse(session, envelope, replies.SENDER_NOT_OWNED, "mail", [])
        domain = await self.store.read(lambda c: accounts.get_domain(c, parts[1]))
        if domain is None or (domain.state != "valid" and not self.config.allow_unverified_domains):
            reply = replies.DOMAIN_NOT_VERIFIED.format(domain=parts[1])
            return self.refuse(session, envelope, reply, "mail", [])
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        # The queue id is chosen here, not at DATA, so that recipients refused during the
        # transaction are recorded under the id the message will have (aiosmtpd makes a new
        # envelope after DATA and on RSET, so each transaction gets its own).
        envelope.queue_id = queue.new_message_id()
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if split_address(address) is None:
            return self.refuse(session, envelope, replies.BAD_ADDRESS, "rcpt", [address])
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return self.refuse(session, envelope, replies.TOO_MANY_RECIPIENTS, "rcpt", [address])
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        login = authenticated_user(session)
        sending_domain = login.rpartition("@")[2]
        now = time.time()
        queue_id: str = getattr(envelope, "queue_id", None) or queue.new_message_id()
        # Everything this message costs in CPU -- checks, header parsing, our headers, the DKIM
        # signature -- in one worker-thread call: the event loop goes on serving other sessions,
        # and OpenSSL signs with the GIL released.
        prepared = await asyncio.to_thread(
            self._prepare, envelope.original_content, login, queue_id, now
        )
        if not isinstance(prepared, bytes):
            return self._refuse_data(session, envelope, prepared.reply)
        message = prepared
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

    def _prepare(self, data: bytes, login: str, queue_id: str, now: float) -> bytes | _Refusal:
        """The message as it will be queued, or why DATA is refused. Runs in a worker thread."""
        if _BARE_LINE_ENDING.search(data):
            # SMTP smuggling: a bare LF or CR may be read as a line end by the next hop, which
            # would then see a second message hidden in this one. Refuse the whole DATA.
            return _Refusal(replies.BARE_LINE_ENDING)
        sending_domain = login.rpartition("@")[2]
        try:
            section = headers.read(data)
        except headers.HeaderError as exc:
            return _Refusal(exc.reply)
        data = section.message
        from_fields = section.all("From")
        if len(from_fields) != 1:
            return _Refusal(replies.FROM_MISSING)
        addresses = email.utils.getaddresses([from_fields[0].unfolded()])
        if not addresses or any(
            (split_address(a) or ("", ""))[1] != sending_domain for _, a in addresses
        ):
            return _Refusal(replies.FROM_NOT_OWNED)
        message = add_submission_headers(
            data,
            hostname=self.hostname,
            queue_id=queue_id,
            now=now,
            authentication_results=self.authentication_results_for(login)
            if self.authentication_results_for
            else None,
        )
        return self.signer(message, sending_domain) if self.signer is not None else message

    def _refuse_data(self, session: Any, envelope: Any, reply: str) -> str:
        return self.refuse(session, envelope, reply, "data", list(envelope.rcpt_tos))

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.CancelledError):
            raise error
        log.exception("event=session_error error=%r", type(error).__name__)
        return replies.INTERNAL_ERROR
