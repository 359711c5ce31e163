"""A forced stop: a second Ctrl-C (or SIGINT/SIGTERM) while the first waits for the requests in flight."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response

MESSAGE = "the service was stopped before the answer"


class ForcedStopMiddleware:
    """Answers 503 (with Retry-After, for a client to go elsewhere) to a request whose handler is cancelled, and ends
    the app's cancelled lifespan quietly. uvicorn stops waiting for the requests in flight at a second signal and
    skips the lifespan's shutdown; asyncio then cancels what is left: each request's client got a 500 and the log a
    traceback of CancelledError, and the log one more for the lifespan. Nothing else cancels them (a client that
    leaves only ends its request's body)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except asyncio.CancelledError:
            if not started:
                await error_response(503, MESSAGE, headers={"Retry-After": "5"})(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        cancelled = False  # while waiting for the shutdown message

        async def receive_noting_cancel() -> Message:
            nonlocal cancelled
            try:
                return await receive()
            except asyncio.CancelledError:
                cancelled = True
                raise

        async def send_unless_cancelled(message: Message) -> None:
            if not cancelled:  # Starlette reports the cancellation as a failed shutdown, with its traceback
                await send(message)

        try:
            await self.app(scope, receive_noting_cancel, send_unless_cancelled)
        except asyncio.CancelledError:
            if not cancelled:
                raise
