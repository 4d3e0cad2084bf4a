"""POST /v1/messages and GET /v1/messages/{id}: send a message, and follow it.

A message sent here passes exactly the checks SMTP submission applies (`submission.accept`),
is DKIM-signed, and is committed to the queue before the 202 answer. With an Idempotency-Key,
the answer is committed with the message, so a retry gets it again and queues nothing.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import sqlite3
import time
from typing import Any

import authres
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from mailrelay.api import mime
from mailrelay.api.auth import api_key
from mailrelay.api.context import ApiContext
from mailrelay.api.errors import ApiError, field_path
from mailrelay.store import accounts, apikeys, queue, senders
from mailrelay.submission.accept import Principal, Refusal

router = APIRouter(prefix="/v1")

_IDEMPOTENCY_KEY_MAX = 255


class RecipientState(BaseModel):
    address: str
    state: str


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
            "schema": {"type": "string", "maxLength": _IDEMPOTENCY_KEY_MAX},
        }
    ],
}


@router.post(
    "/messages",
    status_code=202,
    response_model=Queued,
    openapi_extra=_SEND_DOC,
    responses={
        400: {"description": "malformed JSON"},
        401: {"description": "no valid API key"},
        403: {"description": "the key may not send as this sender"},
        413: {"description": "larger than submission.max_message_size"},
        415: {"description": "neither JSON nor message/rfc822"},
        422: {"description": "invalid; `field` names what"},
    },
)
async def send(request: Request) -> JSONResponse:
    ctx: ApiContext = request.app.state.ctx
    key = await api_key(request, "send")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and not (
        0 < len(idempotency_key) <= _IDEMPOTENCY_KEY_MAX and idempotency_key.isprintable()
    ):
        raise ApiError(422, "invalid", "1 to 255 printable characters", "Idempotency-Key")
    request_hash = hashlib.sha256(content_type.encode() + b"\0" + body).hexdigest()
    if idempotency_key is not None:
        kept = await ctx.store.read(lambda c: apikeys.kept_answer(c, key.id, idempotency_key))
        if kept is not None:
            return _replay(kept, request_hash)

    now = time.time()
    queue_id = queue.new_message_id()
    hostname = ctx.config.hostname
    message_id: str | None = f"<{queue_id}.{int(now)}@{hostname}>"
    if content_type in ("application/json", ""):
        built = _from_json(body, str(message_id), email.utils.formatdate(now, usegmt=True))
    elif content_type == "message/rfc822":
        built = mime.read_raw(body)
        message_id = None  # the caller's own, or added below when it has none
    else:
        raise ApiError(415, "unsupported_media_type", "send application/json or message/rfc822")

    sub = ctx.config.submission
    if len(built.data) > sub.max_message_size:
        raise ApiError(413, "too_large", f"the message is over {sub.max_message_size} bytes")
    recipients = queue.unique_recipients(built.recipients)
    if len(recipients) > sub.max_recipients:
        raise ApiError(422, "too_many_recipients", f"at most {sub.max_recipients}", "to")
    sender_domain = built.sender.rpartition("@")[2].lower()
    send_as = senders.SendAs(f"API key {key.id}", (f"@{key.domain}",))
    if not send_as.allows(built.sender):
        raise ApiError(403, "sender_not_allowed", f"this key sends for {key.domain} only", "from")
    domain = await ctx.store.read(lambda c: accounts.get_domain(c, sender_domain))
    if not ctx.acceptor.domain_may_send(domain):
        raise ApiError(
            403,
            "domain_not_verified",
            f"{sender_domain} is not verified; run: mailrelay domain check {sender_domain}",
            "from",
        )
    principal = Principal(lambda: send_as, _authentication_results(hostname, key.id))
    prepared = await asyncio.to_thread(
        ctx.acceptor.prepare, built.data, principal, sender_domain, queue_id, now
    )
    if isinstance(prepared, Refusal):
        raise _refused(prepared.reply)
    answer = Queued(
        id=queue_id,
        message_id=message_id,
        recipients=[RecipientState(address=r, state="queued") for r in recipients],
        attachments=[AttachmentDigest(**vars(a)) for a in built.attachments],
    )
    answer_json = answer.model_dump_json()
    new = queue.NewMessage(
        sender=built.sender,
        recipients=tuple(recipients),
        data=prepared.message,
        auth_user=f"apikey:{key.id}",
        client_ip=request.client.host if request.client else None,
        sender_domain=sender_domain,
        tls_optional=prepared.tls_required_no,
    )

    def commit(c: sqlite3.Connection) -> apikeys.KeptAnswer | None:
        if idempotency_key is not None:
            # Checked again where writes are serialized: of two retries racing, one queues.
            kept = apikeys.kept_answer(c, key.id, idempotency_key)
            if kept is not None:
                return kept
            answer = apikeys.KeptAnswer(request_hash, 202, answer_json)
            apikeys.keep_answer(c, key.id, idempotency_key, answer, now)
        queue.enqueue(c, new, now, queue_id)
        return None

    try:
        kept = await ctx.store.write(commit)
    except (sqlite3.Error, RuntimeError) as exc:
        raise ApiError(503, "not_queued", f"not queued, try again: {exc}") from None
    if kept is not None:
        return _replay(kept, request_hash)
    ctx.on_queued()
    ctx.on_accepted()
    return JSONResponse(json.loads(answer_json), status_code=202)


def _from_json(body: bytes, message_id: str, date: str) -> mime.Built:
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not JSON: {exc}") from None
    try:
        req = mime.SendRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple("from" if p == "from_" else p for p in first["loc"])
        raise ApiError(422, "invalid", first["msg"], field_path(loc)) from None
    return mime.build(req, message_id=message_id, date=date)


def _replay(kept: apikeys.KeptAnswer, request_hash: str) -> JSONResponse:
    if kept.request_sha256 != request_hash:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used with another request",
            "Idempotency-Key",
        )
    return JSONResponse(
        json.loads(kept.response), status_code=kept.status, headers={"Idempotent-Replayed": "true"}
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

    def find(c: sqlite3.Connection) -> dict[str, object] | None:
        row = c.execute(
            "SELECT sender_domain FROM messages WHERE id = ?", (message_id.upper(),)
        ).fetchone()
        if row is None or row[0] != key.domain:
            return None
        return queue.show(c, message_id)

    shown = await ctx.store.read(find)
    if shown is None:
        raise ApiError(404, "not_found", f"no message {message_id}", "id")
    return shown
