"""/v1/domains: the key's sending domains as `mailrelay domain` manages them (`onboarding`):
add, the records to publish, check them in DNS, and the two-step DKIM rotation.

A key adds only a domain it lists already (made with `apikey add --domain D --new-domain`):
which domains an API client may send for is the operator's decision, taken on the command line.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from mailrelay import onboarding
from mailrelay.api.errors import ApiError
from mailrelay.api.manage import (
    UNAUTHORIZED,
    ManageKey,
    ReadKey,
    async_on_own_connection,
    context,
    domain_name,
    on_own_connection,
    own_domain,
)
from mailrelay.store import accounts
from mailrelay.store.backend import Connection
from mailrelay.submission.accept import split_address

T = TypeVar("T")

router = APIRouter(prefix="/v1", tags=["domains"])

_NOT_OURS: dict[int | str, dict[str, Any]] = {
    404: {"description": "not a domain of this key, or not added yet"}
}
_ROTATION: dict[int | str, dict[str, Any]] = {
    409: {"description": "the rotation step cannot be taken now; `message` says why"}
}


class DomainSummary(BaseModel):
    domain: str
    state: accounts.DomainState
    notify: str
    checked_at: float | None


class Record(BaseModel):
    type: str
    name: str
    value: str


class DomainRecords(BaseModel):
    """`mailrelay domain records D --json`."""

    domain: str
    state: accounts.DomainState
    notify: str
    records: list[Record]
    dkim: dict[str, list[str]]
    """Selectors by role: signing, next (made by rotate-dkim, not signing yet), rotated_out."""


class RecordCheck(BaseModel):
    type: str
    name: str
    expected: str
    found: list[str]
    valid: bool
    reason: str | None


class DomainCheck(BaseModel):
    """`mailrelay domain check D --json`; `next_dkim` only while a next DKIM key waits."""

    domain: str
    valid: bool
    records: list[RecordCheck]
    next_dkim: list[RecordCheck] | None = None


class NewDomain(BaseModel):
    domain: str = Field(min_length=1, max_length=253)
    notify: str = Field(min_length=3, max_length=254, description="gets copies of bounces")


class Activate(BaseModel):
    force: bool = Field(False, description="switch without checking the next key's record")


def _records(report: onboarding.DomainReport) -> DomainRecords:
    return DomainRecords.model_validate(report.to_json())


@router.get("/domains", response_model=list[DomainSummary], responses=UNAUTHORIZED)
async def list_domains(key: ReadKey, request: Request) -> list[DomainSummary]:
    """The key's domains that have been added, with their state."""
    found = await context(request).store.read(
        lambda c: [d for d in (accounts.get_domain(c, name) for name in key.domains) if d]
    )
    return [
        DomainSummary(domain=d.name, state=d.state, notify=d.notify, checked_at=d.checked_at)
        for d in found
    ]


@router.post(
    "/domains",
    status_code=201,
    response_model=DomainRecords,
    responses={
        **UNAUTHORIZED,
        403: {"description": "the key does not list this domain"},
        409: {"description": "the domain exists already"},
        422: {"description": "not a domain name, or `notify` is not an address"},
    },
)
async def add_domain(key: ManageKey, body: NewDomain, request: Request) -> DomainRecords:
    """Add a domain the key lists (`apikey add --new-domain`) with its DKIM key, as `mailrelay
    domain add` does; the answer is the records to publish."""
    name = domain_name(body.domain)
    if split_address(body.notify) is None:
        raise ApiError(422, "invalid", f"{body.notify!r} is not an e-mail address", "notify")
    if not key.owns(name):
        raise ApiError(
            403,
            "forbidden",
            f"this key may not add {name}: an operator adds it, or makes a key for it with"
            f" mailrelay apikey add --domain {name} --new-domain",
            "domain",
        )
    ctx = context(request)
    try:
        # The service makes the key files, as its own user: the files it must read.
        report = await on_own_connection(
            ctx, lambda c: onboarding.add(c, ctx.config, name, body.notify, None)
        )
    except accounts.AlreadyExists as exc:
        raise ApiError(409, "exists", str(exc), "domain") from None
    return _records(report)


@router.get(
    "/domains/{domain}/records",
    response_model=DomainRecords,
    responses={**UNAUTHORIZED, **_NOT_OURS},
)
async def domain_records(key: ReadKey, domain: str, request: Request) -> DomainRecords:
    """Every record to publish: SPF, DMARC and the DKIM keys' (signing, next, rotated-out)."""
    name = own_domain(key, domain)
    ctx = context(request)
    return _records(
        await _existing(ctx.store.read(lambda c: onboarding.records(c, ctx.config, name)))
    )


@router.post(
    "/domains/{domain}/check",
    response_model=DomainCheck,
    response_model_exclude_unset=True,
    responses={**UNAUTHORIZED, **_NOT_OURS},
)
async def check_domain(key: ManageKey, domain: str, request: Request) -> DomainCheck:
    """Look the records up with the configured resolver; all valid makes the domain `valid` (it
    may send), a record found wrong makes it `unverified`, a failed lookup changes nothing."""
    name = own_domain(key, domain)
    ctx = context(request)
    report = await _existing(
        async_on_own_connection(ctx, lambda c: onboarding.check(c, ctx.config, name))
    )
    return DomainCheck.model_validate(report.to_json())


@router.post(
    "/domains/{domain}/rotate-dkim",
    response_model=DomainRecords,
    responses={**UNAUTHORIZED, **_NOT_OURS, **_ROTATION},
)
async def rotate_dkim(key: ManageKey, domain: str, request: Request) -> DomainRecords:
    """Make the next DKIM key; it signs nothing until activate-dkim finds its record published."""
    name = own_domain(key, domain)
    ctx = context(request)
    report = await _rotation(
        on_own_connection(ctx, lambda c: onboarding.rotate(c, ctx.config, name, None))
    )
    return _records(report)


@router.post(
    "/domains/{domain}/activate-dkim",
    response_model=DomainRecords,
    responses={**UNAUTHORIZED, **_NOT_OURS, **_ROTATION},
)
async def activate_dkim(
    key: ManageKey, domain: str, request: Request, body: Activate | None = None
) -> DomainRecords:
    """Sign with the next key from now on, once its record is published and matches."""
    name = own_domain(key, domain)
    ctx = context(request)
    force = body.force if body is not None else False
    report = await _rotation(
        async_on_own_connection(
            ctx, lambda c: onboarding.activate(c, ctx.config, name, force=force)
        )
    )
    return _records(report)


@router.delete(
    "/domains/{domain}/dkim/{selector}",
    response_model=DomainRecords,
    responses={
        **UNAUTHORIZED,
        404: {"description": "no such domain of this key, or no such DKIM key"},
        409: {"description": "the key signs new mail: rotate first"},
    },
)
async def retire_dkim(
    key: ManageKey, domain: str, selector: str, request: Request
) -> DomainRecords:
    """Stop listing a rotated-out DKIM key (`domain retire-dkim`); its record may leave DNS."""
    name = own_domain(key, domain)
    ctx = context(request)

    def retire(c: Connection) -> onboarding.DomainReport:
        onboarding.retire_key(c, name, selector)
        return onboarding.records(c, ctx.config, name)

    try:
        report = await _existing(on_own_connection(ctx, retire))
    except accounts.KeyInUse as exc:
        raise ApiError(409, "key_in_use", str(exc), "selector") from None
    return _records(report)


async def _existing(pending: Awaitable[T]) -> T:
    """`pending`'s result; a domain (or DKIM key) that does not exist is a 404."""
    try:
        return await pending
    except accounts.NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None


async def _rotation(pending: Awaitable[onboarding.DomainReport]) -> onboarding.DomainReport:
    try:
        return await _existing(pending)
    except onboarding.RotationError as exc:
        raise ApiError(409, "rotation_refused", str(exc)) from None
