"""POST /v1/messages and GET /v1/messages/{id}: send a message, and follow it.

A message sent here passes exactly the checks SMTP submission applies (`submission.accept`),
is DKIM-signed, and is committed to the queue before the 202 answer. A recipient on the sending
domain's suppression list is not queued (its REFUSED event is written with the message); the
key's `[limits]` are counted in the same transaction (`api.quota`). With an Idempotency-Key, the
answer is committed with the message, so a retry gets it again and queues nothing. The steps
shared with POST /v1/messages/batch are in `api.sending`.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import sqlite3
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mailrelay.api import mime, quota
from mailrelay.api.auth import api_key
from mailrelay.api.context import ApiContext
from mailrelay.api.errors import ApiError
from mailrelay.api.sending import (
    IDEMPOTENCY_KEY_MAX,
    Queued,
    commit_draft,
    draft,
    incoming,
    queued,
    record_refusal,
    replay,
    send_request,
)
from mailrelay.store import apikeys, queue, usage
from mailrelay.store.backend import Connection

router = APIRouter(prefix="/v1")

RATE_HEADERS_DOC: dict[str, Any] = {
    "RateLimit-Policy": {"schema": {"type": "string"}, "description": "the key's [limits]"},
    "RateLimit": {"schema": {"type": "string"}, "description": "what remains, and when"},
}

_SEND_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/SendRequest"}},
            "message/rfc822": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX},
        },
        {
            "name": "requiretls",
            "in": "query",
            "required": False,
            "description": "REQUIRETLS (RFC 8689) for a message/rfc822 body; JSON has a field",
            "schema": {"type": "boolean"},
        },
    ],
}


@router.post(
    "/messages",
    status_code=202,
    response_model=Queued,
    openapi_extra=_SEND_DOC,
    responses={
        202: {"headers": RATE_HEADERS_DOC},
        400: {"description": "malformed JSON"},
        401: {"description": "no valid API key"},
        403: {"description": "the key may not send as this sender"},
        413: {"description": "larger than submission.max_message_size"},
        415: {"description": "neither JSON nor message/rfc822"},
        422: {"description": "invalid; `field` names what"},
        429: {"description": "over a [limits] rate or quota; see Retry-After"},
        503: {"description": "not queued: try again"},
    },
)
async def send(request: Request) -> JSONResponse:
    ctx: ApiContext = request.app.state.ctx
    got = await incoming(request)
    key, content_type, body, now = got.key, got.content_type, got.body, got.now
    idempotency_key, kept, used = got.idempotency_key, got.kept, got.used
    limits = ctx.config.limits
    rate = quota.headers(limits, used, now)
    queue_id = queue.new_message_id()
    try:
        got.check_idempotency_key()
        request_hash = hashlib.sha256(content_type.encode() + b"\0" + body).hexdigest()
        if kept is not None:
            return replay(kept, request_hash, rate)
        built, message_id = _build(content_type, body, queue_id, now, ctx.config.hostname)
        requiretls = built.requiretls or request.query_params.get("requiretls") in ("true", "1")
        client_ip = request.client.host if request.client else None
        pending = await draft(
            ctx, key, built, queue_id, message_id, now, requiretls, client_ip, used
        )

        def commit(
            c: Connection,
        ) -> tuple[apikeys.KeptAnswer | None, quota.Over | usage.Usage]:
            if idempotency_key is not None:
                # Checked again where writes are serialized: of two retries racing, one queues.
                kept = apikeys.kept_answer(c, key.id, idempotency_key)
                if kept is not None:
                    return kept, quota.current(c, key.id, now)
            counted = commit_draft(c, ctx, key.id, pending, now)
            if isinstance(counted, quota.Over) or idempotency_key is None:
                return None, counted
            answer = apikeys.KeptAnswer(request_hash, 202, pending.answer.model_dump_json())
            apikeys.keep_answer(c, key.id, idempotency_key, answer, now)
            return None, counted

        try:
            kept, counted = await ctx.store.write(commit)
        except (sqlite3.Error, RuntimeError) as exc:
            raise ApiError(503, "not_queued", f"not queued, try again: {exc}") from None
        if isinstance(counted, quota.Over):
            raise counted.error(quota.headers(limits, used, now))
        rate = quota.headers(limits, counted, now)
        if kept is not None:
            return replay(kept, request_hash, rate)
    except ApiError as exc:
        await record_refusal(ctx, exc, queue_id, now)
        exc.headers = {**rate, **(exc.headers or {})}
        raise
    queued(ctx, pending, key.id)
    return JSONResponse(pending.answer.model_dump(mode="json"), status_code=202, headers=rate)


def _build(
    content_type: str, body: bytes, queue_id: str, now: float, hostname: str
) -> tuple[mime.Built, str | None]:
    """The message and the Message-ID the API gave it (None: a raw message's own, read later)."""
    if content_type in ("application/json", ""):
        message_id = f"<{queue_id}.{int(now)}@{hostname}>"
        date = email.utils.formatdate(now, usegmt=True)
        return _from_json(body, message_id, date), message_id
    if content_type == "message/rfc822":
        return mime.read_raw(body), None
    raise ApiError(415, "unsupported_media_type", "send application/json or message/rfc822")


def _from_json(body: bytes, message_id: str, date: str) -> mime.Built:
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not JSON: {exc}") from None
    return mime.build(send_request(raw), message_id=message_id, date=date)


@router.get(
    "/messages/{message_id}",
    responses={401: {"description": "no valid API key"}, 404: {"description": "no such message"}},
)
async def get_message(message_id: str, request: Request) -> dict[str, Any]:
    """Each recipient's state, events and delivery attempts with their TLS evidence: protocol,
    cipher, certificate fingerprint and verification, the policy that applied (DANE, MTA-STS,
    verify, encrypt) and the verdict. Only for messages of the key's domain."""
    ctx: ApiContext = request.app.state.ctx
    key = await api_key(request, "read")

    def find(c: Connection) -> dict[str, object] | None:
        row = c.execute(
            "SELECT sender_domain FROM messages WHERE id = ?", (message_id.upper(),)
        ).fetchone()
        if row is None or not key.owns(row[0]):
            return None
        return queue.show(c, message_id)

    shown = await ctx.store.read(find)
    if shown is None:
        raise ApiError(404, "not_found", f"no message {message_id}", "id")
    return shown
