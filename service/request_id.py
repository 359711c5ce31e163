"""Request ids: every answer carries an X-Request-ID header (the client's own id when it sent a usable one), and
the log lines written while a request is handled, uvicorn's access line included, end with it."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
# A client's id is taken as it is when it could not garble a log line or a header: visible ASCII without spaces or
# quotes, at most 128 characters (a UUID, a trace id, a load balancer's id); any other is replaced by a new one.
_USABLE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
current: ContextVar[str | None] = ContextVar("request_id", default=None)  # the id of the request being handled


def request_id(given: str | None) -> str:
    """The id for a request that sent this X-Request-ID (None: none): the same, if usable, else a new UUID (hex)."""
    return given if given is not None and _USABLE.fullmatch(given) else uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives each HTTP request its id (request_id), for the code handling it (`current`) and in its answer."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(Headers(scope=scope).get(HEADER))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = rid
            await send(message)

        token = current.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `request`, " [request ID]" while a request is handled and "" otherwise, to every record it passes, for a
    log format ending in %(request)s."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = current.get()
        record.request = f" [request {rid}]" if rid else ""
        return True
