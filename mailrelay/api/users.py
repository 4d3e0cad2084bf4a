"""/v1/users: the submission users of the key's domains, as `mailrelay user` manages them.

Passwords come in JSON bodies and are hashed with the SMTP server's own argon2 code; they are
never stored, logged or answered back as given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from mailrelay.api.errors import ApiError
from mailrelay.api.manage import UNAUTHORIZED, ManageKey, context
from mailrelay.store import accounts, apikeys, senders
from mailrelay.store.backend import Connection
from mailrelay.submission.accept import split_address
from mailrelay.submission.auth import hash_password

T = TypeVar("T")

router = APIRouter(prefix="/v1", tags=["users"])

MIN_PASSWORD = 8  # as `mailrelay user add` asks

_NO_USER: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such user of this key's domains"}
}


class User(BaseModel):
    address: str
    domain: str
    created_at: float
    may_send_as: list[str]
    """Besides the user's own address: other addresses, and '@domain' for a whole domain."""


class NewUser(BaseModel):
    address: str = Field(max_length=254)
    password: str = Field(min_length=MIN_PASSWORD, max_length=1024, repr=False)
    may_send_as: list[str] = []


class Password(BaseModel):
    password: str = Field(min_length=MIN_PASSWORD, max_length=1024, repr=False)


class SendAsChange(BaseModel):
    may_send_as: list[str] = []
    may_not_send_as: list[str] = []


def _address(key: apikeys.ApiKey, text: str, field: str) -> str:
    """A user's address of one of the key's domains, lowercase."""
    address = text.strip().lower()
    if split_address(address) is None:
        raise ApiError(422, "invalid_address", f"{text!r} is not an e-mail address", field)
    domain = address.rpartition("@")[2]
    if not key.owns(domain):
        raise ApiError(403, "forbidden", f"this key manages {', '.join(key.domains)} only", field)
    return address


def _senders(key: apikeys.ApiKey, values: list[str], field: str) -> list[str]:
    """ADDRESS or @DOMAIN grants, normalized; each of one of the key's domains."""
    out = []
    for i, value in enumerate(values):
        sender = senders.normalize(value)
        as_address = f"postmaster{sender}" if sender.startswith("@") else sender
        if split_address(as_address) is None:
            raise ApiError(
                422, "invalid", f"{value!r} is not an address or @domain", f"{field}[{i}]"
            )
        if not key.owns(sender.rpartition("@")[2]):
            raise ApiError(
                403, "forbidden", f"this key manages {', '.join(key.domains)} only", f"{field}[{i}]"
            )
        out.append(sender)
    return out


def _user(conn: Connection, key: apikeys.ApiKey, address: str) -> User:
    """The user, if it is one of the key's domains; else NotFound (a 404)."""
    row = conn.execute(
        "SELECT address, domain, created_at FROM users WHERE address = ?", (address.lower(),)
    ).fetchone()
    if row is None or not key.owns(row["domain"]):
        raise accounts.NotFound(f"no user {address.lower()}")
    grants = senders.send_as(conn, row["address"]).addresses
    return User(
        address=row["address"],
        domain=row["domain"],
        created_at=row["created_at"],
        may_send_as=list(grants),
    )


class _Refused(ValueError):
    """A change that cannot be made as asked; `field` names the part of the request at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


async def _hashed(password: str) -> str:
    # argon2 takes tens of milliseconds of CPU: off the event loop.
    return await asyncio.to_thread(hash_password, password)


@router.get("/users", response_model=list[User], responses=UNAUTHORIZED)
async def list_users(key: ManageKey, request: Request) -> list[User]:
    """The users of the key's domains, with whom each may send as."""

    def users(conn: Connection) -> list[User]:
        send_as = senders.all_send_as(conn)
        return [
            User(
                address=str(u["address"]),
                domain=str(u["domain"]),
                created_at=float(str(u["created_at"])),
                may_send_as=send_as[str(u["address"])].addresses,
            )
            for u in accounts.list_users(conn)
            if key.owns(str(u["domain"]))
        ]

    return await context(request).store.read(users)


@router.post(
    "/users",
    status_code=201,
    response_model=User,
    responses={
        **UNAUTHORIZED,
        409: {"description": "the user exists already"},
        422: {"description": "not an address, a password under 8 characters, a bad grant"},
    },
)
async def add_user(key: ManageKey, body: NewUser, request: Request) -> User:
    """Add a submission user (SMTP AUTH with this address and password), as `user add` does."""
    address = _address(key, body.address, "address")
    grants = _senders(key, body.may_send_as, "may_send_as")
    hashed = await _hashed(body.password)

    def add(conn: Connection) -> User:
        now = time.time()
        try:
            accounts.add_user(conn, address, hashed, now)
        except accounts.NotFound as exc:  # the key lists the domain; it is not added yet
            raise _Refused(str(exc), "address") from None
        for i, sender in enumerate(grants):
            try:
                senders.grant(conn, address, sender, now)
            except accounts.NotFound as exc:
                raise _Refused(str(exc), f"may_send_as[{i}]") from None
        return _user(conn, key, address)

    return await _written(request, add)


@router.put(
    "/users/{address}/password",
    status_code=204,
    responses={**UNAUTHORIZED, **_NO_USER, 422: {"description": "under 8 characters"}},
)
async def set_password(key: ManageKey, address: str, body: Password, request: Request) -> Response:
    """Change the user's password (`user passwd`)."""
    hashed = await _hashed(body.password)

    def change(conn: Connection) -> None:
        _user(conn, key, address)
        accounts.set_password(conn, address, hashed)

    await _written(request, change)
    return Response(status_code=204)


@router.patch(
    "/users/{address}",
    response_model=User,
    responses={**UNAUTHORIZED, **_NO_USER, 422: {"description": "a grant that cannot be made"}},
)
async def modify_user(key: ManageKey, address: str, body: SendAsChange, request: Request) -> User:
    """Grant (`may_send_as`) or take back (`may_not_send_as`) addresses and @domains the user may
    send as (`user modify`)."""
    grants = _senders(key, body.may_send_as, "may_send_as")
    revokes = _senders(key, body.may_not_send_as, "may_not_send_as")
    both = sorted(set(grants) & set(revokes))
    if both:
        raise ApiError(422, "invalid", f"{both[0]} is both granted and taken back", "may_send_as")

    def modify(conn: Connection) -> User:
        user = _user(conn, key, address)
        now = time.time()
        for i, sender in enumerate(revokes):
            try:
                senders.revoke(conn, user.address, sender)
            except accounts.NotFound as exc:
                raise _Refused(str(exc), f"may_not_send_as[{i}]") from None
        for i, sender in enumerate(grants):
            try:
                senders.grant(conn, user.address, sender, now)
            except accounts.NotFound as exc:
                raise _Refused(str(exc), f"may_send_as[{i}]") from None
        return _user(conn, key, address)

    return await _written(request, modify)


@router.delete("/users/{address}", status_code=204, responses={**UNAUTHORIZED, **_NO_USER})
async def delete_user(key: ManageKey, address: str, request: Request) -> Response:
    """Delete the user (`user delete`): their SMTP logins fail from now on."""

    def delete(conn: Connection) -> None:
        _user(conn, key, address)
        accounts.delete_user(conn, address)

    await _written(request, delete)
    return Response(status_code=204)


async def _written(request: Request, op: Callable[[Connection], T]) -> T:
    """Commit `op`; a user that is not there (or not of the key's domains) is a 404."""
    try:
        return await context(request).store.write(op)
    except accounts.NotFound as exc:
        raise ApiError(404, "not_found", str(exc), "address") from None
    except accounts.AlreadyExists as exc:
        raise ApiError(409, "exists", str(exc), "address") from None
    except _Refused as exc:
        raise ApiError(422, "invalid", str(exc), exc.field) from None
