"""Who is calling: the API key in `Authorization: Bearer …`, looked up by its SHA-256."""

from __future__ import annotations

from fastapi import Request

from mailrelay.api.context import ApiContext
from mailrelay.api.errors import ApiError
from mailrelay.store import apikeys

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mailrelay"'}


async def api_key(request: Request, scope: apikeys.Scope) -> apikeys.ApiKey:
    """The caller's key, if it is valid and has `scope`; else ApiError 401 or 403."""
    ctx: ApiContext = request.app.state.ctx
    kind, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if kind.lower() != "bearer" or not token:
        raise ApiError(
            401,
            "unauthorized",
            "an API key is required: Authorization: Bearer KEY",
            headers=_CHALLENGE,
        )
    key = await ctx.store.read(lambda c: apikeys.by_token(c, token))
    if key is None or key.revoked_at is not None:
        raise ApiError(401, "unauthorized", "the API key is not valid", headers=_CHALLENGE)
    if not key.allows(scope):
        raise ApiError(403, "forbidden", f"the key's scope {key.scope!r} does not allow {scope}")
    return key
