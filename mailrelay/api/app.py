"""The API's ASGI application and its listener: FastAPI on uvicorn, in the service's own event
loop, started and stopped like the other parts. HTTPS with the submission certificate wherever
it listens beyond loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailrelay.api import batch, errors, messages
from mailrelay.api.context import ApiContext
from mailrelay.api.domains import router as domains_router
from mailrelay.api.events import router as events_router
from mailrelay.api.keys import router as keys_router
from mailrelay.api.manage import router as tls_check_router
from mailrelay.api.mime import SendRequest
from mailrelay.api.observe import CountAnswers
from mailrelay.api.queue import router as queue_router
from mailrelay.api.suppressions import router as suppressions_router
from mailrelay.api.users import router as users_router
from mailrelay.api.webhooks import router as webhooks_router

log = logging.getLogger("mailrelay.api")
# uvicorn's own lines ("Shutting down", "Finished server process") are not events of ours: only
# its warnings and errors reach the journal, as with aiosmtpd's "mail.log".
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="mailrelay",
        version="1",
        openapi_url="/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    errors.install(app)
    app.include_router(batch.router)
    app.include_router(messages.router)
    app.add_middleware(CountAnswers, metrics=ctx.metrics)
    app.include_router(events_router)
    app.include_router(domains_router)
    app.include_router(users_router)
    app.include_router(keys_router)
    app.include_router(queue_router)
    app.include_router(tls_check_router)
    app.include_router(webhooks_router)
    app.include_router(suppressions_router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            # The JSON send request is read by hand (it shares its path with message/rfc822),
            # so its schema is added here for the $ref in the operation.
            sent = SendRequest.model_json_schema(
                by_alias=True, ref_template="#/components/schemas/{model}"
            )
            found = schema.setdefault("components", {}).setdefault("schemas", {})
            found.update(sent.pop("$defs", {}))
            found["SendRequest"] = sent
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def body_limit(max_message_size: int) -> int:
    """The largest request body read: the message limit with room for base64 (4/3) and JSON."""
    return max_message_size * 4 // 3 + 65536


# After a chunked body passed the limit, the rest is read and thrown away -- up to this much and
# this long -- before the 413 goes out: a server that answers and closes while the client is
# still sending makes the client's kernel see a reset, and the client often loses the answer
# (nginx's lingering close does the same). Past either bound the connection is just closed.
_DRAIN_BYTES = 16 * 1024 * 1024
_DRAIN_SECONDS = 5.0


class BodyLimit:
    """Refuses a body over `limit` with 413 before reading it (by Content-Length) or as soon as
    it grows past the limit (chunked): nothing larger is ever buffered."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _too_large(send, self.limit)
            return
        received = 0
        refused = False

        async def counted() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # Answered now; the application is told the client went away (its body
                    # read fails) and whatever it answers after is dropped.
                    refused = True
                    finished = not message.get("more_body", False)
                    if finished or await _drained(receive):
                        await _too_large(send, self.limit)
                    return {"type": "http.disconnect"}
            return message

        async def sending(message: Message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, counted, sending)
        except Exception:
            if not refused:
                raise


async def _drained(receive: Receive) -> bool:
    """Read the rest of a refused body, discarding it; False if it was too long or too slow."""
    drained = 0
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            while drained <= _DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return False  # the client went away: nobody to answer
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return True
    except TimeoutError:
        return False
    return False


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps(errors.body("too_large", f"the request body is over {limit} bytes")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ApiServer:
    """The listener: `[api] listen`, plain HTTP on loopback, HTTPS anywhere else."""

    def __init__(self, ctx: ApiContext) -> None:
        cfg = ctx.config
        assert cfg.api.listen is not None
        self.listen = cfg.api.listen
        self.tls = cfg.api.tls
        app = BodyLimit(create_app(ctx), body_limit(cfg.submission.max_message_size))
        self.config = uvicorn.Config(
            app,
            host=self.listen.host,
            port=self.listen.port,
            http="h11",
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=10,
            ssl_certfile=cfg.submission.cert_file if self.tls else None,
            ssl_keyfile=cfg.submission.key_file if self.tls else None,
            ssl_version=ssl.PROTOCOL_TLS_SERVER,
        )
        self.server = uvicorn.Server(self.config)
        self._socket: socket.socket | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # The socket is bound here, so that a port in use fails the service's start with an
        # OSError (uvicorn's own bind would call sys.exit).
        family = socket.AF_INET6 if ":" in self.listen.host else socket.AF_INET
        self._socket = socket.create_server((self.listen.host, self.listen.port), family=family)
        self.config.load()
        if self.config.ssl is not None:
            self.config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup(sockets=[self._socket])
        self._loop_task = asyncio.create_task(self.server.main_loop())
        log.info(
            "event=listening address=%s service=api tls=%s",
            self.listen,
            "https" if self.tls else "plain",
        )

    async def stop(self) -> None:
        if self._loop_task is None:
            if self._socket is not None:
                self._socket.close()
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop_task
        await self.server.shutdown(sockets=[self._socket] if self._socket else None)
        self._loop_task = None
