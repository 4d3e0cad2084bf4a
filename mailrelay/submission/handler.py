"""The SMTP hooks: who may send what. They decide and return the reply; they never deliver."""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mailrelay.config import LimitsConfig, SubmissionConfig
from mailrelay.store import Store, accounts, events, queue, senders, suppressions, usage, webhooks
from mailrelay.store.backend import Connection
from mailrelay.store.writer import StoreClosed
from mailrelay.submission import replies
from mailrelay.submission.accept import NOT_A_SENDER as NOT_A_SENDER
from mailrelay.submission.accept import NUL_IN_DATA as NUL_IN_DATA
from mailrelay.submission.accept import (
    Acceptor,
    Prepared,
    Principal,
    Refusal,
    SignFunction,
    sender_refusal,
)
from mailrelay.submission.accept import split_address as split_address

log = logging.getLogger("mailrelay.submission")

# NOT_A_SENDER, NUL_IN_DATA, SignFunction and split_address are imported from here by other
# modules: they moved to `accept` with the checks that both SMTP and the HTTP API apply.

# {limit} is "2 messages", "1 recipient"; {seconds} "41 seconds".
TOO_MANY_MESSAGES = "451 4.7.1 {user}: more than {limit} a minute; try again in {seconds}"
TOO_MANY_RECIPIENTS_IN = "452 4.5.3 {user}: more than {limit} {window}; try again in {seconds}"
# A recipient on the sending domain's suppression list; {why} is `Suppression.describe()`.
SUPPRESSED = "550 5.7.1 <{address}>: {why}; mailrelay suppression remove {domain} {address}"

UserLimit = Literal["messages_per_minute", "recipients_per_hour", "recipients_per_day"]
"""The [limits] on one user's sending, as `smtpd_limit_refusals{limit}` names them."""


Stage = Literal["mail", "rcpt", "data"]
"""The SMTP command a refusal answered."""


def authenticated_user(session: Any) -> str:
    """The address the session authenticated as ('' before AUTH). The protocol layer stores a
    LoginPassword with the login only (see SubmissionSMTP._check): no password is kept."""
    login = getattr(getattr(session, "auth_data", None), "login", None) or b""
    return bytes(login).decode("utf-8", "replace").lower()


class _OverLimit(Exception):
    """Raised inside the queueing transaction (which it rolls back) when the message takes the
    user past a rate or quota that sessions running side by side each saw room under."""

    def __init__(self, limit: UserLimit, reply: str) -> None:
        super().__init__(reply)
        self.limit = limit
        self.reply = reply


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
        limits: LimitsConfig | None = None,
        on_limit: Callable[[UserLimit], None] | None = None,
        suppression: bool = True,
        webhooks: bool = False,
    ) -> None:
        self.config = config
        # None: no per-user rates or quotas (the service always passes its [limits]).
        self.limits = limits or LimitsConfig(
            messages_per_minute=0, recipients_per_hour=0, recipients_per_day=0
        )
        self.on_limit = on_limit
        self.suppression = suppression  # [suppression] enabled: refuse suppressed recipients
        self.webhooks = webhooks  # [webhooks] enabled: a suppressed recipient is an event
        self.hostname = hostname
        self.store = store
        self.acceptor = Acceptor(config, hostname, store, signer)
        self.on_queued = on_queued
        self.authentication_results_for = authentication_results_for
        self.on_accepted = on_accepted
        self.on_rejected = on_rejected
        self._writes: set[asyncio.Future[None]] = set()

    @property
    def signer(self) -> SignFunction | None:
        return self.acceptor.signer

    @signer.setter
    def signer(self, signer: SignFunction | None) -> None:
        self.acceptor.signer = signer

    def refuse(
        self,
        session: Any,
        envelope: Any,
        reply: str,
        stage: Stage,
        rcpts: list[str],
        address: str | None = None,
    ) -> str:
        """Count, log and record a policy refusal; return `reply` for the hook to send.

        Logged once, at info, with the client's address and the address refused (`address`,
        else the recipient refused, else the envelope sender): what an operator greps for when
        a user says "my mail was refused". Each refused recipient gets a REFUSED event under the
        transaction's queue id (see `handle_MAIL`). A refused MAIL FROM has no recipients yet,
        so it leaves no event: the events table is the recipients' story; the refusal is in the
        log and the metrics. Public so that the protocol layer can report refusals aiosmtpd
        makes before any hook.
        """
        if self.on_rejected is not None:
            self.on_rejected(reply[:3])
        login = authenticated_user(session)
        queue_id: str | None = getattr(envelope, "queue_id", None)
        if address is None:
            sender = getattr(envelope, "mail_from", None)
            address = rcpts[0] if stage == "rcpt" and rcpts else sender
        peer = getattr(session, "peer", None)
        log.info(
            "event=refused stage=%s client=%s address=%r queue_id=%s user=%s nrcpt=%d reply=%r",
            stage,
            peer[0] if peer else "unknown",
            address or "",
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
        # for a commit (one fsync per bad RCPT). Handed to the writer here and now, not from a
        # task that might first run after the store has stopped: whatever is refused before
        # `Store.stop` is committed by it. `flush` waits for the commits; one that fails is
        # logged (its outcome always read), never raised into a session.
        op = functools.partial(
            events.record_refused, at=time.time(), queue_id=queue_id, recipients=rcpts, reply=reply
        )
        try:
            written = self.store.submit(op)
        except StoreClosed as exc:
            log.warning("event=refusal_not_recorded queue_id=%s error=%r", queue_id, str(exc))
            return
        self._writes.add(written)
        written.add_done_callback(functools.partial(self._written, queue_id))

    def _suppressed_event(self, entry: suppressions.Suppression, queue_id: str | None) -> None:
        # The `suppressed` webhook, handed to the writer unawaited like the REFUSED event.
        now = time.time()

        def op(conn: Connection) -> None:
            webhooks.enqueue_suppressed(conn, entry, queue_id, now)

        try:
            written = self.store.submit(op)
        except StoreClosed as exc:
            log.warning("event=webhook_not_recorded queue_id=%s error=%r", queue_id, str(exc))
            return
        self._writes.add(written)
        written.add_done_callback(functools.partial(self._written, queue_id or "none"))

    def _written(self, queue_id: str, written: asyncio.Future[None]) -> None:
        self._writes.discard(written)
        error = None if written.cancelled() else written.exception()
        if error is not None:
            log.warning("event=refusal_not_recorded queue_id=%s error=%r", queue_id, str(error))

    async def flush(self) -> None:
        """Wait until every refusal recorded so far is written or has failed (before the store
        stops); refusals made meanwhile are waited for too. Never raises."""
        while self._writes:
            await asyncio.wait(set(self._writes))

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # ENHANCEDSTATUSCODES goes just before the final "250 HELP" line; REQUIRETLS (RFC 8689
        # §4) only once the session is encrypted, since MAIL is refused before STARTTLS anyway.
        ours = ["250-ENHANCEDSTATUSCODES"]
        if getattr(server, "encrypted", False):
            ours.append("250-REQUIRETLS")
        return [*responses[:-1], *ours, responses[-1]]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        login = authenticated_user(session)
        parts = split_address(address)
        if parts is None:
            return self.refuse(session, envelope, replies.BAD_ADDRESS, "mail", [], address)
        now = time.time()
        limited = self._limited

        def facts(c: Connection) -> _MailFacts:
            return _MailFacts(
                senders.send_as(c, login),
                accounts.get_domain(c, parts[1]),
                usage.current(c, login, now) if limited else None,
            )

        found = await self.store.read(facts)
        refusal = sender_refusal(found.send_as, address, foreign=replies.SENDER_NOT_OWNED)
        if refusal is not None:
            return self.refuse(session, envelope, refusal, "mail", [], address)
        domain = found.domain
        if domain is None or (domain.state != "valid" and not self.config.allow_unverified_domains):
            reply = replies.DOMAIN_NOT_VERIFIED.format(domain=parts[1])
            return self.refuse(session, envelope, reply, "mail", [], address)
        if found.used is not None:
            minute = found.used["minute"]
            too_many = self._too_many_messages(login, minute, minute.messages + 1, now)
            if too_many is not None:
                self._count_limit("messages_per_minute")
                return self.refuse(session, envelope, too_many, "mail", [], address)
        # What the user had queued when the transaction began: RCPT checks the quotas on it.
        envelope.usage = found.used
        # Whom the user may send as, read once per transaction: DATA checks From: against it.
        envelope.send_as = found.send_as
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
        if self.suppression:
            sender_domain = envelope.mail_from.rpartition("@")[2]
            now = time.time()
            entry = await self.store.read(
                lambda c: suppressions.lookup(c, sender_domain, address, now)
            )
            if entry is not None:
                if self.webhooks:
                    self._suppressed_event(entry, getattr(envelope, "queue_id", None))
                return self.refuse(session, envelope, suppressed(entry), "rcpt", [address])
        used: usage.Usage | None = getattr(envelope, "usage", None)
        if used is not None:
            # Counting this transaction's recipients so far, each once, as they will be queued.
            pending = len(queue.unique_recipients((*envelope.rcpt_tos, address)))
            over = self._too_many_recipients(
                authenticated_user(session), used, pending, time.time()
            )
            if over is not None:
                self._count_limit(over[0])
                return self.refuse(session, envelope, over[1], "rcpt", [address])
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        login = authenticated_user(session)
        # Bounces of this message go to the envelope sender, copies to its domain's address.
        sender_domain = envelope.mail_from.rpartition("@")[2].lower()
        now = time.time()
        queue_id: str = getattr(envelope, "queue_id", None) or queue.new_message_id()
        # Everything this message costs in CPU -- checks, header parsing, our headers, the DKIM
        # signature -- in one worker-thread call: the event loop goes on serving other sessions,
        # and OpenSSL signs with the GIL released.
        send_as: senders.SendAs | None = getattr(envelope, "send_as", None)
        prepared = await asyncio.to_thread(
            self._prepare, envelope.original_content, login, sender_domain, queue_id, now, send_as
        )
        if isinstance(prepared, Refusal):
            return self._refuse_data(session, envelope, prepared.reply)
        message = prepared.message
        requiretls = bool(getattr(envelope, "requiretls", False))
        if prepared.tls_required_no:
            # Kept in the message, and in the log: by default it changes nothing, since this
            # relay exists to enforce TLS (see [delivery.domains] honour_tls_required_no). With
            # REQUIRETLS as well, RFC 8689 §4.1 says the header is ignored.
            log.info(
                "event=tls_required_no queue_id=%s user=%s ignored=%s",
                queue_id,
                login,
                "requiretls" if requiretls else "unless-configured",
            )
        new = queue.NewMessage(
            sender=envelope.mail_from,
            recipients=tuple(envelope.rcpt_tos),
            data=message,
            auth_user=login,
            client_ip=session.peer[0] if session.peer else None,
            sender_domain=sender_domain,
            requiretls=requiretls,
            tls_optional=prepared.tls_required_no and not requiretls,
        )
        limited = self._limited

        def commit(c: Connection) -> None:
            queue.enqueue(c, new, now, queue_id)
            if limited:
                # Counted with the message, so that one refused or not committed counts for
                # nothing; checked again here, where sessions side by side cannot both pass.
                recipients = len(queue.unique_recipients(new.recipients))
                counted = usage.count(c, login, now, recipients)
                minute = counted["minute"]
                reply = self._too_many_messages(login, minute, minute.messages, now)
                if reply is not None:
                    raise _OverLimit("messages_per_minute", reply)
                over = self._too_many_recipients(login, counted, 0, now)
                if over is not None:
                    raise _OverLimit(*over)

        try:
            await self.store.write(commit)
        except _OverLimit as over:
            self._count_limit(over.limit)
            return self._refuse_data(session, envelope, over.reply)
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

    def _prepare(
        self,
        data: bytes,
        login: str,
        sender_domain: str,
        queue_id: str,
        now: float,
        send_as: senders.SendAs | None = None,
    ) -> Prepared | Refusal:
        """The message as it will be queued, or why DATA is refused. Runs in a worker thread.
        `send_as`: what MAIL read for this transaction (else it is read now)."""
        principal = Principal(
            send_as=lambda: (
                send_as or self.store.read_blocking(lambda c: senders.send_as(c, login))
            ),
            authentication_results=self.authentication_results_for(login)
            if self.authentication_results_for
            else None,
        )
        return self.acceptor.prepare(data, principal, sender_domain, queue_id, now)

    # ---- per-user rates and quotas ([limits]) ----------------------------------------------

    @property
    def _limited(self) -> bool:
        lim = self.limits
        return bool(lim.messages_per_minute or lim.recipients_per_hour or lim.recipients_per_day)

    def _too_many_messages(
        self, user: str, minute: usage.Window, messages: int, now: float
    ) -> str | None:
        """The refusal if `messages` (this minute's, the one at hand included) is too many."""
        limit = self.limits.messages_per_minute
        if not limit or messages <= limit:
            return None
        return TOO_MANY_MESSAGES.format(
            user=user,
            limit=_counted(limit, "message"),
            seconds=_counted(minute.seconds_left(now), "second"),
        )

    def _too_many_recipients(
        self, user: str, used: usage.Usage, adding: int, now: float
    ) -> tuple[UserLimit, str] | None:
        """The quota and its refusal if `adding` more recipients take the user past one."""
        quotas: tuple[tuple[usage.Period, int, UserLimit, str], ...] = (
            ("hour", self.limits.recipients_per_hour, "recipients_per_hour", "an hour"),
            ("day", self.limits.recipients_per_day, "recipients_per_day", "a day"),
        )
        for period, limit, name, window in quotas:
            current = used[period].at(now)
            if limit and current.recipients + adding > limit:
                reply = TOO_MANY_RECIPIENTS_IN.format(
                    user=user,
                    limit=_counted(limit, "recipient"),
                    window=window,
                    seconds=_counted(current.seconds_left(now), "second"),
                )
                return name, reply
        return None

    def _count_limit(self, limit: UserLimit) -> None:
        if self.on_limit is not None:
            self.on_limit(limit)

    def _refuse_data(self, session: Any, envelope: Any, reply: str) -> str:
        return self.refuse(session, envelope, reply, "data", list(envelope.rcpt_tos))

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.CancelledError):
            raise error
        if isinstance(error, (sqlite3.OperationalError, StoreClosed)):
            # Not a bug: the database is away for now. Logged in a line, not a traceback.
            log.error("event=store_unavailable error=%r", str(error))
            return replies.STORE_UNAVAILABLE
        log.exception("event=session_error error=%r", type(error).__name__)
        return replies.INTERNAL_ERROR


@dataclass(frozen=True)
class _MailFacts:
    """What MAIL needs from the store, read in one go."""

    send_as: senders.SendAs
    domain: accounts.Domain | None
    used: usage.Usage | None


def suppressed(entry: suppressions.Suppression) -> str:
    """The RCPT refusal for a suppressed recipient: one line (the reason is kept printable and
    short), within RFC 5321's 512 octets even for the longest addresses."""
    reply = SUPPRESSED.format(address=entry.address, why=entry.describe(), domain=entry.domain)
    if len(reply) > 510:
        reply = f"550 5.7.1 <{entry.address}>: {entry.describe()}"[:510]
    return reply


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
