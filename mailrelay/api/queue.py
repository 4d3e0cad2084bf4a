"""POST /v1/messages/{id}/retry and DELETE /v1/messages/{id}: `mailrelay queue retry` and
`queue delete` for the messages of the key's domains."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from mailrelay.api.errors import ApiError
from mailrelay.api.manage import UNAUTHORIZED, ManageKey, context
from mailrelay.store import apikeys, queue
from mailrelay.store.backend import Connection

router = APIRouter(prefix="/v1", tags=["queue"])

_NO_MESSAGE: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such message of this key's domains"}
}


class Retried(BaseModel):
    id: str
    due: int
    """How many of its recipients are due now."""


def _require_own(conn: Connection, key: apikeys.ApiKey, message_id: str) -> None:
    row = conn.execute(
        "SELECT sender_domain FROM messages WHERE id = ?", (message_id.upper(),)
    ).fetchone()
    if row is None or not key.owns(row[0]):
        raise ApiError(404, "not_found", f"no message {message_id}", "id")


@router.post(
    "/messages/{message_id}/retry",
    response_model=Retried,
    responses={
        **UNAUTHORIZED,
        **_NO_MESSAGE,
        409: {"description": "no recipient of it is queued or deferred"},
    },
)
async def retry_message(key: ManageKey, message_id: str, request: Request) -> Retried:
    """Make its queued and deferred recipients due now (`queue retry ID`)."""
    ctx = context(request)

    def retry(conn: Connection) -> int:
        _require_own(conn, key, message_id)
        return queue.retry(conn, message_id, time.time())

    due = await ctx.store.write(retry)
    if due == 0:
        raise ApiError(409, "not_pending", f"no queued recipients for message {message_id}", "id")
    ctx.on_queued()
    return Retried(id=message_id.upper(), due=due)


@router.delete("/messages/{message_id}", status_code=204, responses={**UNAUTHORIZED, **_NO_MESSAGE})
async def delete_message(key: ManageKey, message_id: str, request: Request) -> Response:
    """Remove it from the queue, whatever its recipients' states (`queue delete ID`). Its events
    stay in the operator's `mailrelay log`; GET /v1/events no longer shows them."""

    def delete(conn: Connection) -> None:
        _require_own(conn, key, message_id)
        queue.delete(conn, message_id)

    await context(request).store.write(delete)
    return Response(status_code=204)
