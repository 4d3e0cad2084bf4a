"""What sending a message through the API takes, shared by POST /v1/messages (`api.messages`)
and POST /v1/messages/batch (`api.batch`): a built message checked as SMTP submission checks it
(`submission.accept`), its suppressed recipients set aside, the key's limits checked (`api.quota`)
and the message signed (`draft`); then queued and counted, with the REFUSED events of the
recipients it does not queue, in the caller's transaction (`commit_draft`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Literal

import authres
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from mailrelay.api import mime, quota
from mailrelay.api.auth import api_key
from mailrelay.api.context import ApiContext
from mailrelay.api.errors import ApiError, field_path
from mailrelay.metrics import API_REFUSALS
from mailrelay.store import (
    accounts,
    apikeys,
    events,
    queue,
    senders,
    suppressions,
    usage,
    webhooks,
)
from mailrelay.store.backend import Connection
from mailrelay.submission import headers
from mailrelay.submission.accept import Principal, Refusal
from mailrelay.submission.handler import suppressed as suppressed_reply

log = logging.getLogger("mailrelay.api")

IDEMPOTENCY_KEY_MAX = 255


class RecipientState(BaseModel):
    address: str
    state: Literal["queued", "suppressed"]
    reason: str | None = Field(default=None, exclude_if=lambda v: v is None)
    """Why a recipient is suppressed: 'suppressed for example.org since 2026-11-30 (...)'."""


class AttachmentDigest(BaseModel):
    filename: str
    content_type: str
    size: int
    sha256: str


class Queued(BaseModel):
    id: str
    message_id: str | None
    recipients: list[RecipientState]
    attachments: list[AttachmentDigest]


@dataclass(frozen=True)
class Draft:
    """One message checked, signed and ready to commit, with its 202 answer."""

    queue_id: str
    new: queue.NewMessage
    answer: Queued
    suppressed: tuple[tuple[str, str], ...]
    """(recipient, reply) of the suppressed recipients: their REFUSED events."""
    held: tuple[suppressions.Suppression, ...] = ()
    """Their suppression entries."""

    @property
    def recipients(self) -> int:
        return len(self.new.recipients)


def valid_idempotency_key(value: str) -> bool:
    return 0 < len(value) <= IDEMPOTENCY_KEY_MAX and value.isprintable()


@dataclass(frozen=True)
class Incoming:
    """What both send endpoints start from, read before anything is decided."""

    key: apikeys.ApiKey
    content_type: str  # lower case, without parameters
    body: bytes
    now: float
    idempotency_key: str | None
    kept: apikeys.KeptAnswer | None  # the answer kept for a valid Idempotency-Key
    used: usage.Usage  # the key's counts in its [limits] windows

    def check_idempotency_key(self) -> None:
        """Refused inside the caller's handling, so that the 422 carries the rate headers."""
        if self.idempotency_key is not None and not valid_idempotency_key(self.idempotency_key):
            raise ApiError(422, "invalid", "1 to 255 printable characters", "Idempotency-Key")


async def incoming(request: Request) -> Incoming:
    """The caller's key (scope `send`), the body, and from the store the answer kept for its
    Idempotency-Key and the key's usage."""
    ctx: ApiContext = request.app.state.ctx
    key = await api_key(request, "send")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    now = time.time()
    idempotency_key = request.headers.get("idempotency-key")

    def facts(c: Connection) -> tuple[apikeys.KeptAnswer | None, usage.Usage]:
        kept = None
        if idempotency_key is not None and valid_idempotency_key(idempotency_key):
            kept = apikeys.kept_answer(c, key.id, idempotency_key)
        return kept, quota.current(c, key.id, now)

    kept, used = await ctx.store.read(facts)
    return Incoming(key, content_type, body, now, idempotency_key, kept, used)


async def draft(
    ctx: ApiContext,
    key: apikeys.ApiKey,
    built: mime.Built,
    queue_id: str,
    message_id: str | None,
    now: float,
    requiretls: bool,
    client_ip: str | None,
    used: usage.Usage,
    pending: tuple[int, int] = (0, 0),
) -> Draft:
    """Check a built message as SMTP submission would, set its suppressed recipients aside,
    check the key's limits (`pending`: messages and recipients of the same request ahead of it)
    and sign it. An ApiError raised names in `refused` the recipients it refuses."""
    recipients = queue.unique_recipients(built.recipients)
    try:
        return await _draft(
            ctx, key, built, recipients, queue_id, message_id, now, requiretls, client_ip, used,
            pending,
        )  # fmt: skip
    except ApiError as exc:
        if not exc.refused:
            reply = f"HTTP {exc.status} {exc.code}: {exc.message}"
            exc.refused = tuple((r, reply) for r in recipients)
        raise


async def _draft(
    ctx: ApiContext,
    key: apikeys.ApiKey,
    built: mime.Built,
    recipients: list[str],
    queue_id: str,
    message_id: str | None,
    now: float,
    requiretls: bool,
    client_ip: str | None,
    used: usage.Usage,
    pending: tuple[int, int],
) -> Draft:
    sub = ctx.config.submission
    if len(built.data) > sub.max_message_size:
        raise ApiError(413, "too_large", f"the message is over {sub.max_message_size} bytes")
    if len(recipients) > sub.max_recipients:
        raise ApiError(422, "too_many_recipients", f"at most {sub.max_recipients}", "to")
    sender_domain = built.sender.rpartition("@")[2].lower()
    send_as = senders.SendAs(f"API key {key.id}", tuple(f"@{d}" for d in key.domains))
    if not send_as.allows(built.sender):
        mine = ", ".join(key.domains)
        raise ApiError(403, "sender_not_allowed", f"this key sends for {mine} only", "from")
    check_suppressions = ctx.config.suppression.enabled

    def facts(
        c: Connection,
    ) -> tuple[accounts.Domain | None, list[suppressions.Suppression | None]]:
        found = [
            suppressions.lookup(c, sender_domain, r, now) if check_suppressions else None
            for r in recipients
        ]
        return accounts.get_domain(c, sender_domain), found

    domain, entries = await ctx.store.read(facts)
    if not ctx.acceptor.domain_may_send(domain):
        raise ApiError(
            403,
            "domain_not_verified",
            f"{sender_domain} is not verified; run: mailrelay domain check {sender_domain}",
            "from",
        )
    held = {r: e for r, e in zip(recipients, entries, strict=True) if e is not None}
    refused = tuple((r, suppressed_reply(e)) for r, e in held.items())
    to_queue = [r for r in recipients if r not in held]
    if not to_queue:
        exc = ApiError(
            422,
            "all_recipients_suppressed",
            "every recipient is suppressed: "
            + "; ".join(f"{r}: {e.describe()}" for r, e in held.items()),
            "to",
        )
        exc.refused, exc.held = refused, tuple(held.values())
        raise exc
    over = quota.over(ctx.config.limits, used, 1 + pending[0], len(to_queue) + pending[1], now)
    if over is not None:
        exc = over.error({})
        exc.refused, exc.held = refused + _refusals(exc, to_queue), tuple(held.values())
        raise exc
    protocol = "HTTPS" if ctx.config.api.tls else "HTTP"
    principal = Principal(lambda: send_as, _authentication_results(ctx.config.hostname, key.id),
                          protocol)  # fmt: skip
    prepared = await asyncio.to_thread(
        ctx.acceptor.prepare, built.data, principal, sender_domain, queue_id, now
    )
    if isinstance(prepared, Refusal):
        exc = _refused(prepared.reply)
        exc.refused = refused + tuple((r, prepared.reply) for r in to_queue)
        exc.held = tuple(held.values())
        raise exc
    if message_id is None:
        message_id = _message_id(prepared.message)
    if prepared.tls_required_no:
        log.info(
            "event=tls_required_no queue_id=%s user=apikey:%s ignored=%s",
            queue_id,
            key.id,
            "requiretls" if requiretls else "unless-configured",
        )
    new = queue.NewMessage(
        sender=built.sender,
        recipients=tuple(to_queue),
        data=prepared.message,
        auth_user=quota.principal(key.id),
        client_ip=client_ip,
        sender_domain=sender_domain,
        requiretls=requiretls,
        tls_optional=prepared.tls_required_no and not requiretls,
    )
    states = [
        RecipientState(address=r, state="suppressed", reason=held[r].describe())
        if r in held
        else RecipientState(address=r, state="queued")
        for r in recipients
    ]
    answer = Queued(
        id=queue_id,
        message_id=message_id,
        recipients=states,
        attachments=[AttachmentDigest(**vars(a)) for a in built.attachments],
    )
    return Draft(queue_id, new, answer, refused, tuple(held.values()))


def _refusals(exc: ApiError, recipients: list[str]) -> tuple[tuple[str, str], ...]:
    reply = f"HTTP {exc.status} {exc.code}: {exc.message}"
    return tuple((r, reply) for r in recipients)


def commit_draft(
    c: Connection, ctx: ApiContext, key_id: str, pending: Draft, now: float
) -> quota.Over | usage.Usage:
    """Queue and count one message in the caller's transaction, with the REFUSED events of its
    suppressed recipients; or, if the key's limits have no room for it now, record its
    recipients as refused instead and return the limit."""
    limits = ctx.config.limits
    over = quota.over(limits, quota.current(c, key_id, now), 1, pending.recipients, now)
    if over is not None:
        refused = pending.suppressed + _refusals(over.error({}), list(pending.new.recipients))
        record_events(c, ctx, pending.queue_id, refused, pending.held, now)
        return over
    queue.enqueue(c, pending.new, now, pending.queue_id)
    record_events(c, ctx, pending.queue_id, pending.suppressed, pending.held, now)
    return quota.count(c, key_id, now, pending.recipients)


def record_events(
    c: Connection,
    ctx: ApiContext,
    queue_id: str,
    refused: tuple[tuple[str, str], ...],
    held: tuple[suppressions.Suppression, ...],
    now: float,
) -> None:
    """REFUSED events, and a `suppressed` webhook event per suppressed recipient (as SMTP's
    RCPT gives one), in the caller's transaction."""
    for address, reply in refused:
        events.record_refused(c, now, queue_id, [address], reply)
    if ctx.config.webhooks.enabled:
        for entry in held:
            webhooks.enqueue_suppressed(c, entry, queue_id, now)


async def record_refusal(ctx: ApiContext, exc: ApiError, queue_id: str, now: float) -> None:
    """Count a refused message and write its recipients' REFUSED events (a refusal made in the
    queueing transaction has written them there, and has none left here)."""
    if exc.code in API_REFUSALS and ctx.metrics is not None:
        ctx.metrics.api_refusals.labels(code=exc.code).inc()
    if not exc.refused:
        return
    refused, held, exc.refused, exc.held = exc.refused, exc.held, (), ()
    try:
        await ctx.store.write(lambda c: record_events(c, ctx, queue_id, refused, held, now))
    except (sqlite3.Error, RuntimeError) as error:
        log.warning("event=refusal_not_recorded queue_id=%s error=%r", queue_id, str(error))


def queued(ctx: ApiContext, pending: Draft, key_id: str) -> None:
    log.info(
        "event=queued queue_id=%s user=apikey:%s size=%d nrcpt=%d",
        pending.queue_id,
        key_id,
        len(pending.new.data),
        pending.recipients,
    )
    ctx.on_queued()
    ctx.on_accepted()


def _message_id(message: bytes) -> str | None:
    """The Message-ID of a prepared message (the client's own, or the one submission added)."""
    try:
        found = headers.read(message).all("Message-ID")
    except headers.HeaderError:
        return None
    return found[0].unfolded().strip() if found else None


def send_request(raw: object) -> mime.SendRequest:
    """A JSON value read as a send request, or 422 naming the first field at fault."""
    try:
        return mime.SendRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple("from" if p == "from_" else p for p in first["loc"])
        raise ApiError(422, "invalid", first["msg"], field_path(loc)) from None


def replay(
    kept: apikeys.KeptAnswer, request_hash: str, rate: dict[str, str] | None = None
) -> JSONResponse:
    """The answer kept for an Idempotency-Key, if the request is the same one."""
    if kept.request_sha256 != request_hash:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used with another request",
            "Idempotency-Key",
        )
    return JSONResponse(
        json.loads(kept.response),
        status_code=kept.status,
        headers={**(rate or {}), "Idempotent-Replayed": "true"},
    )


def _authentication_results(hostname: str, key_id: str) -> str:
    header = authres.AuthenticationResultsHeader(
        authserv_id=hostname,
        results=[
            authres.SMTPAUTHAuthenticationResult(
                result="pass", result_comment="HTTP API key", smtp_auth=key_id
            )
        ],
    )
    return str(header)


def _refused(reply: str) -> ApiError:
    """An SMTP refusal from the shared checks as the API's error."""
    code, _, rest = reply.partition(" ")
    enhanced, _, text = rest.partition(" ")
    if enhanced.startswith("5.7."):
        return ApiError(403, "sender_not_allowed", text, "from")
    if code.startswith("4"):
        return ApiError(503, "unavailable", text)
    return ApiError(422, "invalid_message", text)
