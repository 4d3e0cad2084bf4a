"""Counting the API's answers: `mailrelay_api_requests_total{endpoint,status}`, where endpoint is
the route's path template (`/v1/messages/{message_id}`, never an id) or "other" for a path no
route serves, so that the label stays a bounded set."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailrelay.metrics import Metrics


class CountAnswers:
    """ASGI middleware inside the application: the router has set `scope["route"]` by the time
    the answer starts. An exception that escapes (answered 500 by the framework) counts as 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.metrics is None:
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.api_requests.labels(endpoint=endpoint, status=str(status)).inc()
