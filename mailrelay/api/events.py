"""GET /v1/events: the delivery log of the key's domains, newest first, a page at a time, as
`mailrelay log --json` pages it (`store.events.query`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from mailrelay.api.errors import ApiError
from mailrelay.api.manage import UNAUTHORIZED, ReadKey, context
from mailrelay.store import events

router = APIRouter(prefix="/v1", tags=["events"])

MAX_LIMIT = 500


class Event(BaseModel):
    at: float
    queue_id: str
    recipient: str
    domain: str
    """The recipient's domain."""
    event: str
    mx: str | None
    reply: str | None
    tls_protocol: str | None
    tls_cipher: str | None
    policy: str | None
    policy_detail: str | None


class EventPage(BaseModel):
    events: list[Event]
    next_cursor: str | None
    """Pass it back as `cursor`, with the same filters, for the next (older) page."""


@router.get(
    "/events",
    response_model=EventPage,
    responses={**UNAUTHORIZED, 422: {"description": "a filter or the cursor is not valid"}},
)
async def list_events(
    key: ReadKey,
    request: Request,
    domain: Annotated[str | None, Query(description="recipient domain")] = None,
    since: Annotated[
        str | None, Query(description="ISO 8601 time, or a duration back: 90m, 1h, 2d, 1w")
    ] = None,
    status: Annotated[
        str | None, Query(description="QUEUED, DELIVERED, SOFT-BOUNCE, HARD-BOUNCE, REFUSED")
    ] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the page before")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
) -> EventPage:
    """The events of messages the key's domains sent: QUEUED, then per recipient DELIVERED,
    SOFT-BOUNCE or HARD-BOUNCE with the MX, the reply, the TLS protocol and cipher, and the
    policy that applied."""
    try:
        since_at = None if since is None else events.parse_since(since)
    except ValueError as exc:
        raise ApiError(422, "invalid", str(exc).removeprefix("--since: "), "since") from None
    try:
        status_name = None if status is None else events.parse_status(status)
    except ValueError as exc:
        raise ApiError(422, "invalid", str(exc), "status") from None
    try:
        page = await context(request).store.read(
            lambda c: events.query(
                c,
                domain=domain,
                since=since_at,
                status=status_name,
                cursor=cursor,
                limit=limit,
                sender_domains=key.domains,
            )
        )
    except ValueError as exc:  # the filters passed above: what is left to refuse is the cursor
        raise ApiError(422, "invalid", str(exc), "cursor") from None
    return EventPage.model_validate(page.to_json())
