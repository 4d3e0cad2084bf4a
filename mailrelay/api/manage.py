"""What the management endpoints share (a key acts on its own domains only; the CLI's steps run
as the CLI runs them), and GET /v1/tls-check/{domain}: `mailrelay tls-check DOMAIN --json`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request

from mailrelay.api.auth import api_key
from mailrelay.api.context import ApiContext
from mailrelay.api.errors import ApiError
from mailrelay.store import apikeys, connect
from mailrelay.store.backend import Connection
from mailrelay.submission.accept import split_address

T = TypeVar("T")

router = APIRouter(prefix="/v1", tags=["tls-check"])

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid API key"},
    403: {"description": "the key's scope does not allow this"},
}


async def _read_key(request: Request) -> apikeys.ApiKey:
    return await api_key(request, "read")


async def _manage_key(request: Request) -> apikeys.ApiKey:
    return await api_key(request, "manage")


# The caller's key as a dependency: it is checked before the body is, so that a request without
# a valid key is a 401 (or 403), never a 422 that tells what the body lacks.
ReadKey = Annotated[apikeys.ApiKey, Depends(_read_key)]
ManageKey = Annotated[apikeys.ApiKey, Depends(_manage_key)]


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


def domain_name(text: str, field: str = "domain") -> str:
    """A domain name, lowercase and without a final dot; ApiError 422 if it is not one."""
    name = text.strip().lower().rstrip(".")
    if not name or split_address(f"postmaster@{name}") is None:
        raise ApiError(422, "invalid", f"{text!r} is not a domain name", field)
    return name


def own_domain(key: apikeys.ApiKey, text: str) -> str:
    """One of the key's domains; any other is a 404, as a domain that does not exist is, so that
    a key learns nothing about the domains of others."""
    name = text.strip().lower().rstrip(".")
    if not key.owns(name):
        raise ApiError(404, "not_found", f"no domain {name}", "domain")
    return name


async def on_own_connection(ctx: ApiContext, step: Callable[[Connection], T]) -> T:
    """Run a CLI step (`onboarding`) on a connection of its own, in a worker thread.

    Those steps commit their own transactions, as the CLI's do, so they cannot run inside the
    writer's group commit; SQLite serializes this connection's writes with the writer's.
    """

    def run() -> T:
        conn = connect(ctx.store.path)
        try:
            return step(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(run)


async def async_on_own_connection(ctx: ApiContext, step: Callable[[Connection], Awaitable[T]]) -> T:
    """`on_own_connection` for a step that also waits on the network (DNS checks, probes): it
    runs on an event loop of its worker thread, so its database calls never block this one."""
    return await on_own_connection(ctx, lambda conn: asyncio.run(_awaited(step(conn))))


async def _awaited(pending: Awaitable[T]) -> T:
    return await pending


def _probing(request: Request) -> set[str]:
    """The keys with a tls-check under way, on this application."""
    state = request.app.state
    if not hasattr(state, "tls_probes"):
        state.tls_probes = set()
    probes: set[str] = state.tls_probes
    return probes


@router.get(
    "/tls-check/{domain}",
    responses={
        **UNAUTHORIZED,
        422: {"description": "not a domain name"},
        429: {"description": "this key has a tls-check under way"},
    },
)
async def tls_check(key: ReadKey, domain: str, request: Request) -> dict[str, Any]:
    """What `mailrelay tls-check DOMAIN --json` reports: every MX of a recipient domain probed as
    delivery would connect (no mail is sent), with DNSSEC, TLSA, MTA-STS, protocol, cipher and
    certificate, and the verdict. Any domain; one probe at a time per key."""
    name = domain_name(domain)
    ctx = context(request)
    busy = _probing(request)
    if key.id in busy:
        raise ApiError(429, "busy", "this key has a tls-check under way; try again when it ends")
    busy.add(key.id)
    try:
        # Delivery code, loaded only here as the CLI loads it: the rest of the API never sends.
        from mailrelay.delivery import probe
        from mailrelay.delivery.mta_sts import ConnectionStsCache

        report = await async_on_own_connection(
            ctx, lambda conn: probe.tls_check(ctx.config, name, ConnectionStsCache(conn))
        )
    finally:
        busy.discard(key.id)
    return report.to_json()
