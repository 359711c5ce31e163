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
# A client's id is taken as it is when it could not garble a log line or a header: at most 128 visible ASCII
# characters other than quotes and backslashes (a UUID, a trace id, a load balancer's such as AWS's
# Root=1-67891233-abcdef012345678912345678); any other is replaced by a new one.
_USABLE = re.compile(r"[!#-&(-\[\]-~]{1,128}")
current: ContextVar[str | None] = ContextVar("request_id", default=None)  # the id of the request being handled


def id_for(given: str | None) -> str:
    """The id for a request that sent this X-Request-ID (None: none): the same, if usable, else a new UUID (hex)."""
    return given if given is not None and _USABLE.fullmatch(given) else uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives each HTTP request its id (id_for), for the code handling it (`current`) and in its answer. It must
    wrap Starlette's ServerErrorMiddleware, whose 500 handler runs outside every middleware added to an app (see
    service.app.create_app)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = id_for(Headers(scope=scope).get(HEADER))
        answered = False

        async def send_with_id(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])  # optional in ASGI
                MutableHeaders(scope=message)[HEADER] = rid
            await send(message)
            answered = answered or message["type"] == "http.response.body" and not message.get("more_body")

        token = current.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # ServerErrorMiddleware raises again once its 500 (logged with the id) has gone out: uvicorn then logged
            # a second traceback, without the id, and closed the client's keep-alive connection.
            if not answered:
                raise
        finally:
            current.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `request_id`, " [request ID]" while a request is handled and "" otherwise, to every record it passes,
    for a log format ending in %(request_id)s."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = current.get()
        record.request_id = f" [request {rid}]" if rid else ""
        return True
