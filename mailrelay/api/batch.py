"""POST /v1/messages/batch: up to 1,000 JSON messages in one request, each checked and answered
on its own (a refused item does not refuse the others), the accepted ones committed together
in one transaction with their usage counts, REFUSED events and the Idempotency-Key's answer.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mailrelay.api import mime, quota, sending
from mailrelay.api.context import ApiContext
from mailrelay.api.errors import ApiError
from mailrelay.api.messages import RATE_HEADERS_DOC
from mailrelay.metrics import API_REFUSALS
from mailrelay.store import apikeys, queue, usage
from mailrelay.store.backend import Connection
from mailrelay.store.suppressions import Suppression

router = APIRouter(prefix="/v1")

BATCH_MAX = 1000

_BATCH_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["messages"],
                    "additionalProperties": False,
                    "properties": {
                        "messages": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": BATCH_MAX,
                            "items": {"$ref": "#/components/schemas/SendRequest"},
                        }
                    },
                }
            }
        },
    },
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": sending.IDEMPOTENCY_KEY_MAX},
        }
    ],
}

_RESULT = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"type": "integer", "description": "202, or the error's HTTP status"},
        "id": {"type": "string"},
        "message_id": {"type": ["string", "null"]},
        "recipients": {"type": "array", "items": {"type": "object"}},
        "attachments": {"type": "array", "items": {"type": "object"}},
        "error": {"type": "object"},
    },
}


@router.post(
    "/messages/batch",
    status_code=200,
    openapi_extra=_BATCH_DOC,
    responses={
        200: {
            "description": "one result per message, in order",
            "headers": RATE_HEADERS_DOC,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["results"],
                        "properties": {"results": {"type": "array", "items": _RESULT}},
                    }
                }
            },
        },
        400: {"description": "malformed JSON"},
        401: {"description": "no valid API key"},
        403: {"description": "the key's scope does not allow sending"},
        413: {"description": "the request body is too large"},
        415: {"description": "not application/json"},
        422: {"description": "not {messages: [...]}, or more than 1,000 messages"},
        429: {"description": "no room left under a [limits] rate or quota; see Retry-After"},
        503: {"description": "nothing was queued: try again"},
    },
)
async def send_batch(request: Request) -> JSONResponse:
    """Each message as POST /v1/messages would take it; one result each, in order: the 202
    answer with `"status": 202`, or `{"status": 422, "error": {...}}`."""
    ctx: ApiContext = request.app.state.ctx
    got = await sending.incoming(request)
    key, content_type, body, now = got.key, got.content_type, got.body, got.now
    idempotency_key, kept, used = got.idempotency_key, got.kept, got.used
    limits = ctx.config.limits
    rate = quota.headers(limits, used, now)
    try:
        got.check_idempotency_key()
        # Another path than POST /v1/messages: the same key and body there is another request.
        request_hash = hashlib.sha256(b"batch\0" + content_type.encode() + b"\0" + body).hexdigest()
        if kept is not None:
            return sending.replay(kept, request_hash, rate)
        if content_type not in ("application/json", ""):
            raise ApiError(415, "unsupported_media_type", "a batch is application/json")
        items = _items(body)
        over = quota.over(limits, used, 1, 1, now)
        if over is not None:
            raise over.error({})
        drafted = await _draft_all(ctx, request, key, items, now, used)

        def commit(
            c: Connection,
        ) -> tuple[apikeys.KeptAnswer | None, list[dict[str, Any]], usage.Usage]:
            if idempotency_key is not None:
                kept = apikeys.kept_answer(c, key.id, idempotency_key)
                if kept is not None:
                    return kept, [], quota.current(c, key.id, now)
            final = list(drafted.results)
            for queue_id, refused, held in drafted.refused:
                sending.record_events(c, ctx, queue_id, refused, held, now)
            for index, pending in drafted.drafts.items():
                # Counted one by one, in order: an item the key's limits have no room for now
                # (other requests used it meanwhile) is refused alone.
                counted = sending.commit_draft(c, ctx, key.id, pending, now)
                if isinstance(counted, quota.Over):
                    error = counted.error({})
                    final[index] = {"status": error.status, **error.to_json()}
                else:
                    final[index] = {"status": 202, **pending.answer.model_dump(mode="json")}
            if idempotency_key is not None:
                answer = apikeys.KeptAnswer(request_hash, 200, json.dumps({"results": final}))
                apikeys.keep_answer(c, key.id, idempotency_key, answer, now)
            return None, final, quota.current(c, key.id, now)

        try:
            kept, final, counted = await ctx.store.write(commit)
        except (sqlite3.Error, RuntimeError) as exc:
            raise ApiError(503, "not_queued", f"nothing queued, try again: {exc}") from None
        rate = quota.headers(limits, counted, now)
        if kept is not None:
            return sending.replay(kept, request_hash, rate)
    except ApiError as exc:
        exc.headers = {**rate, **(exc.headers or {})}
        raise
    for index, pending in drafted.drafts.items():
        if final[index]["status"] == 202:
            sending.queued(ctx, pending, key.id)
    if ctx.metrics is not None:
        for result in final:
            code = result.get("error", {}).get("code")
            if code in API_REFUSALS:
                ctx.metrics.api_refusals.labels(code=code).inc()
    return JSONResponse({"results": final}, status_code=200, headers=rate)


def _items(body: bytes) -> list[Any]:
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not JSON: {exc}") from None
    if (
        not isinstance(raw, dict)
        or set(raw) != {"messages"}
        or not isinstance(raw["messages"], list)
    ):
        raise ApiError(422, "invalid", 'the body is {"messages": [...]}', "messages")
    items: list[Any] = raw["messages"]
    if not items:
        raise ApiError(422, "invalid", "give at least one message", "messages")
    if len(items) > BATCH_MAX:
        raise ApiError(
            422, "too_many_messages", f"at most {BATCH_MAX} messages in a batch", "messages"
        )
    return items


@dataclass
class _Drafted:
    results: list[dict[str, Any]] = field(default_factory=list)
    """One per item: its error, or a place for the 202 answer the commit writes."""
    drafts: dict[int, sending.Draft] = field(default_factory=dict)
    refused: list[tuple[str, tuple[tuple[str, str], ...], tuple[Suppression, ...]]] = field(
        default_factory=list
    )
    """(queue id, ((recipient, reply), ...), suppression entries) of the items refused: their
    REFUSED events and `suppressed` webhook events."""


async def _draft_all(
    ctx: ApiContext,
    request: Request,
    key: apikeys.ApiKey,
    items: list[Any],
    now: float,
    used: usage.Usage,
) -> _Drafted:
    """Each item built, checked and signed as POST /v1/messages would, one after another; the
    key's limits are checked against what the items before it would add."""
    out = _Drafted()
    hostname = ctx.config.hostname
    date = email.utils.formatdate(now, usegmt=True)
    client_ip = request.client.host if request.client else None
    pending = (0, 0)
    for index, raw in enumerate(items):
        queue_id = queue.new_message_id()
        message_id = f"<{queue_id}.{int(now)}@{hostname}>"
        try:
            built = mime.build(sending.send_request(raw), message_id=message_id, date=date)
            draft = await sending.draft(
                ctx, key, built, queue_id, message_id, now, built.requiretls, client_ip, used,
                pending,
            )  # fmt: skip
        except ApiError as exc:
            out.results.append({"status": exc.status, **exc.to_json()})
            if exc.refused:
                out.refused.append((queue_id, exc.refused, exc.held))
            continue
        out.drafts[index] = draft
        out.results.append({"status": 202})
        pending = (pending[0] + 1, pending[1] + draft.recipients)
    return out
