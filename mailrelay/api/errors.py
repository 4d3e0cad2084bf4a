"""Every error the API answers, in one JSON shape: {"error": {"code", "message", "field"}}.

The framework's own errors (404, 405, a request it cannot validate) are rewritten into it too,
so that a client needs one error reader.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from mailrelay.dkim import MasterKeyError
from mailrelay.store.writer import StoreClosed

if TYPE_CHECKING:
    from mailrelay.store.suppressions import Suppression

log = logging.getLogger("mailrelay.api")

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers
        self.refused: tuple[tuple[str, str], ...] = ()
        """Recipients whose REFUSED event this refusal records, each with its reply."""
        self.held: tuple[Suppression, ...] = ()
        """The suppression entries among them (each a `suppressed` webhook event)."""

    def to_json(self) -> dict[str, Any]:
        return body(self.code, self.message, self.field)


def body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(body(code, message, field), status_code=status, headers=headers)


def field_path(loc: tuple[int | str, ...] | list[int | str]) -> str | None:
    """('body', 'attachments', 0, 'content') -> 'attachments[0].content'."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path", "header") and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def install(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = _CODES.get(exc.status_code, "error")
        return response(exc.status_code, code, str(exc.detail), None, exc.headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        return response(
            422,
            "invalid",
            str(first.get("msg", "invalid request")),
            field_path(first.get("loc", ())),
        )

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("event=api_error path=%s", request.url.path, exc_info=exc)
        return response(500, "internal", "internal error")

    async def not_configured(request: Request, exc: Exception) -> JSONResponse:
        # On PostgreSQL a DKIM key is made or read sealed under dkim.master_key_file: without
        # it (or with another) the operator must fix the configuration; the message says which.
        log.error("event=api_not_configured path=%s error=%r", request.url.path, str(exc))
        return response(503, "not_configured", str(exc))

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        # The database cannot be read or written now (PostgreSQL restarting, SQLite's lock
        # held past its timeout, a full disk): nothing was done, and trying again is right.
        log.error("event=api_store_unavailable path=%s error=%r", request.url.path, str(exc))
        return response(
            503, "unavailable", "the database is unavailable; try again", None, {"Retry-After": "5"}
        )

    async def disconnected(request: Request, exc: Exception) -> JSONResponse:
        # The client went away, or BodyLimit refused the body and answered already.
        return response(400, "bad_request", "the request body was not read to its end")

    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(ClientDisconnect, disconnected)
    app.add_exception_handler(MasterKeyError, not_configured)
    app.add_exception_handler(sqlite3.OperationalError, unavailable)
    app.add_exception_handler(StoreClosed, unavailable)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
