"""POST, GET and DELETE /v1/webhooks: a domain's webhook endpoints, for keys with the manage
scope, each seeing its own domains' only. The signing secret is in the POST's answer only."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from mailrelay.api.auth import api_key
from mailrelay.api.context import ApiContext
from mailrelay.api.errors import ApiError
from mailrelay.store import accounts
from mailrelay.store import webhooks as store

router = APIRouter(prefix="/v1")


class NewWebhook(BaseModel):
    url: str
    events: list[str]
    domain: str | None = None  # one of the key's; may be left out by a key of one domain


_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid API key"},
    403: {"description": "the key's scope is not manage"},
}


@router.post(
    "/webhooks", status_code=201, responses={**_RESPONSES, 422: {"description": "invalid"}}
)
async def add_webhook(new: NewWebhook, request: Request) -> dict[str, Any]:
    """Subscribe an https:// URL to event types of a domain of the key's (delivered, deferred,
    bounced, insecure, suppressed). The answer has the `whsec_` signing secret, shown once."""
    ctx: ApiContext = request.app.state.ctx
    key = await api_key(request, "manage")
    if new.domain is None and len(key.domains) > 1:
        raise ApiError(422, "invalid", "the key has several domains: say which", "domain")
    domain = key.domains[0] if new.domain is None else new.domain.lower().rstrip(".")
    if not key.owns(domain):
        raise ApiError(403, "forbidden", f"the key is not for {domain}", "domain")
    try:
        endpoint = await ctx.store.write(
            lambda c: store.add_endpoint(c, domain, new.url, new.events, time.time())
        )
    except store.InvalidEndpoint as exc:
        field, _, message = str(exc).partition(": ")
        raise ApiError(422, "invalid", message, field) from None
    except accounts.NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return endpoint.to_json(with_secret=True)


@router.get("/webhooks", responses=_RESPONSES)
async def list_webhooks(request: Request) -> dict[str, Any]:
    """The endpoints of the key's domains, without their secrets."""
    ctx: ApiContext = request.app.state.ctx
    key = await api_key(request, "manage")
    endpoints = await ctx.store.read(
        lambda c: [e for d in key.domains for e in store.list_endpoints(c, d)]
    )
    return {"webhooks": [e.to_json() for e in endpoints]}


@router.delete(
    "/webhooks/{webhook_id}",
    status_code=204,
    responses={**_RESPONSES, 404: {"description": "no such webhook of the key's domain"}},
)
async def remove_webhook(webhook_id: str, request: Request) -> None:
    """Remove an endpoint of one of the key's domains, with its pending deliveries."""
    ctx: ApiContext = request.app.state.ctx
    key = await api_key(request, "manage")
    try:
        await ctx.store.write(lambda c: store.remove_endpoint(c, webhook_id, key.domains))
    except accounts.NotFound:
        raise ApiError(404, "not_found", f"no webhook {webhook_id}", "id") from None
