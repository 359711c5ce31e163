"""Requests cut off by the service's stop: a second Ctrl-C (SIGINT) while the first waits for the requests in flight,
or the end of the wait uvicorn allows them (NMT_REQUEST_TIMEOUT_S + NMT_SEND_TIMEOUT_S)."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response, unavailable_for_now

MESSAGE = "the service was stopped before the answer"


class ForcedStopMiddleware:
    """Answers 503 (with Retry-After, for a client to go elsewhere) to a request whose handler is cancelled, and ends
    the app's cancelled lifespan quietly. At a second Ctrl-C uvicorn stops waiting for the requests in flight and
    skips the lifespan's shutdown, and asyncio then cancels what is left; at the end of the wait it cancels the
    requests itself. Each such client got a 500 and the log a traceback of CancelledError, and after a second Ctrl-C
    one more for the lifespan. Nothing else cancels them (a client that leaves only ends its request's body); a
    CancelledError raised in a handler that is not being cancelled is an error as before (uvicorn's 500, logged)."""

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
            if not _being_cancelled():
                raise
            if not started:
                await error_response(503, MESSAGE, headers=unavailable_for_now())(scope, receive, send)

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


def _being_cancelled() -> bool:
    """Whether the current task has been asked to stop (Python 3.10, which cannot tell, is taken to have been)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0
