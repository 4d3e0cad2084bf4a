"""/v1/keys: the API keys of the key's domains, as `mailrelay apikey` manages them.

A key sees, makes and revokes only keys whose domains are all among its own: a key of two
domains is out of reach of a key of one of them. A token is answered once, when it is made.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from mailrelay.api.errors import ApiError
from mailrelay.api.manage import UNAUTHORIZED, ManageKey, context
from mailrelay.store import accounts, apikeys
from mailrelay.store.backend import Connection

router = APIRouter(prefix="/v1", tags=["keys"])


class Key(BaseModel):
    id: str
    domains: list[str]
    scope: apikeys.Scope
    created_at: float
    revoked_at: float | None


class NewKey(BaseModel):
    scope: apikeys.Scope
    domains: list[str] | None = Field(
        None, min_length=1, description="some of this key's domains; all of them if left out"
    )


class MadeKey(Key):
    token: str
    """Shown this once: only its SHA-256 is kept."""


@router.get("/keys", response_model=list[Key], responses=UNAUTHORIZED)
async def list_keys(key: ManageKey, request: Request) -> list[Key]:
    """The keys of this key's domains, revoked ones too (`apikey list`); never their tokens."""
    keys = await context(request).store.read(lambda c: apikeys.list_keys(c, key.domains))
    return [Key.model_validate(k.to_json()) for k in keys]


@router.post(
    "/keys",
    status_code=201,
    response_model=MadeKey,
    responses={
        **UNAUTHORIZED,
        403: {"description": "a domain this key does not hold"},
        422: {"description": "no such scope, or an empty list of domains"},
    },
)
async def add_key(key: ManageKey, body: NewKey, request: Request) -> MadeKey:
    """Make a key for some or all of this key's domains, any scope (`apikey add`)."""
    domains = key.domains if body.domains is None else apikeys.normalize_domains(body.domains)
    for i, name in enumerate(body.domains or ()):
        if not key.owns(name):
            raise ApiError(
                403, "forbidden", f"this key manages {', '.join(key.domains)} only", f"domains[{i}]"
            )

    def add(conn: Connection) -> tuple[apikeys.ApiKey, str]:
        # A domain this key holds but that is not added yet may be handed on as it was given.
        return apikeys.add(conn, domains, body.scope, time.time(), new_domains=True)

    made, token = await context(request).store.write(add)
    return MadeKey.model_validate({**made.to_json(), "token": token})


@router.delete(
    "/keys/{key_id}",
    status_code=204,
    responses={**UNAUTHORIZED, 404: {"description": "no active key of this key's domains"}},
)
async def revoke_key(key: ManageKey, key_id: str, request: Request) -> Response:
    """Revoke a key (`apikey revoke`): it is refused from the next request on. A key may revoke
    itself."""

    def revoke(conn: Connection) -> None:
        found = apikeys.get(conn, key_id)
        if found is None or not all(key.owns(d) for d in found.domains):
            raise accounts.NotFound(f"no active API key {key_id.upper()}")
        apikeys.revoke(conn, key_id, time.time())

    try:
        await context(request).store.write(revoke)
    except accounts.NotFound as exc:
        raise ApiError(404, "not_found", str(exc), "id") from None
    return Response(status_code=204)
