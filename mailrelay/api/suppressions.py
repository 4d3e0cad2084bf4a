"""GET, POST and DELETE /v1/suppressions: a domain's suppression list over HTTP, as the CLI's
`mailrelay suppression list|add|remove` (the same store functions); each key sees and changes
its own domains' entries only."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from mailrelay.api.auth import api_key
from mailrelay.api.context import ApiContext
from mailrelay.api.errors import ApiError
from mailrelay.config import parse_duration
from mailrelay.store import accounts, suppressions
from mailrelay.store.apikeys import ApiKey

router = APIRouter(prefix="/v1")

_PAGE = 100

_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid API key"},
    403: {"description": "the key's scope does not allow it, or the domain is not the key's"},
}


class NewSuppression(BaseModel):
    address: str
    domain: str | None = None  # one of the key's; may be left out by a key of one domain
    reason: str | None = None
    expires: str | None = None  # a duration, "30d"; None or "0": never


@router.get("/suppressions", responses={**_RESPONSES, 422: {"description": "invalid"}})
async def list_entries(
    request: Request, domain: str | None = None, cursor: str | None = None
) -> dict[str, Any]:
    """The entries in force for a domain of the key's (a key of one domain need not say which),
    by address, 100 at a time: pass `next_cursor` back as `cursor` for the next page."""
    ctx: ApiContext = request.app.state.ctx
    key = await api_key(request, "read")
    wanted = _domain_of(key, domain)
    after = (wanted, cursor) if cursor else None
    now = time.time()
    entries = await ctx.store.read(
        lambda c: suppressions.list_suppressions(
            c, now, domain=wanted, limit=_PAGE + 1, after=after
        )
    )
    more = len(entries) > _PAGE
    entries = entries[:_PAGE]
    last = entries[-1] if more else None
    return {
        "suppressions": [e.to_json() for e in entries],
        "next_cursor": last.address if last else None,
    }


@router.post(
    "/suppressions", status_code=201, responses={**_RESPONSES, 422: {"description": "invalid"}}
)
async def add_entry(new: NewSuppression, request: Request) -> dict[str, Any]:
    """Suppress an address for one of the key's domains by hand (replacing an entry there)."""
    ctx: ApiContext = request.app.state.ctx
    key = await api_key(request, "manage")
    domain = _domain_of(key, new.domain)
    now = time.time()
    expires_at = None
    if new.expires is not None:
        seconds = parse_duration(new.expires, zero=True)
        if seconds is None:
            why = f"{new.expires!r} is not a duration such as 30d, 12h or 0 (never)"
            raise ApiError(422, "invalid", why, "expires")
        expires_at = None if not seconds else now + seconds
    reason = new.reason or suppressions.MANUAL_REASON

    def add(c: Any) -> suppressions.Suppression:
        return suppressions.add(c, domain, new.address, now, reason=reason, expires_at=expires_at)

    try:
        entry = await ctx.store.write(add)
    except accounts.NotFound as exc:
        raise ApiError(404, "not_found", str(exc), "domain") from None
    except ValueError as exc:
        raise ApiError(422, "invalid", str(exc), "address") from None
    return entry.to_json()


@router.delete(
    "/suppressions/{domain}/{address}",
    status_code=204,
    responses={**_RESPONSES, 404: {"description": "not suppressed for that domain"}},
)
async def remove_entry(domain: str, address: str, request: Request) -> None:
    """Accept mail to `address` from `domain` (one of the key's) again."""
    ctx: ApiContext = request.app.state.ctx
    key = await api_key(request, "manage")
    owned = _domain_of(key, domain)
    try:
        await ctx.store.write(lambda c: suppressions.remove(c, owned, address))
    except accounts.NotFound as exc:
        raise ApiError(404, "not_found", str(exc), "address") from None


def _domain_of(key: ApiKey, asked: str | None) -> str:
    """The domain a request is about: `asked`, if the key has it; a key of one domain may leave
    it out."""
    if asked is None:
        if len(key.domains) > 1:
            raise ApiError(422, "invalid", "the key has several domains: say which", "domain")
        return key.domains[0]
    domain = asked.lower().rstrip(".")
    if not key.owns(domain):
        raise ApiError(403, "forbidden", f"the key is not for {domain}", "domain")
    return domain
