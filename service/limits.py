"""Request body limits, enforced before the body is parsed (also for chunked bodies without Content-Length): its
size, the time it may take to arrive, its transfer coding (chunked, or none), and for the JSON endpoints its media
type, charset and content coding."""

from __future__ import annotations

import asyncio
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.body import unsupported_body
from service.errors import error_response
from service.guard import path_matcher, route_path

DEADLINE = "nmt.deadline"  # the scope key of a request's deadline (time.monotonic())


class BodyLimitMiddleware:
    """Answers 413 to a request whose body exceeds `max_bytes` (buffering at most that much of it), and 408 to one
    whose body has not arrived `timeout_s` after the request began, so that a slow body cannot hold a connection
    (slow headers: service/http.py); and 415, before reading it, to a body POSTed to one of the `json_paths` that is
    not sent as UTF-8 JSON."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, json_paths: frozenset[str] = frozenset()):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.takes_json = path_matcher(json_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        codings = b",".join(value for name, value in scope["headers"] if name == b"transfer-encoding")
        others = [c for c in codings.decode("latin-1").lower().replace(" ", "").split(",") if c not in ("", "chunked")]
        if others:  # uvicorn undoes chunked only: a gzip coding would reach the parser as it is (RFC 9112: 501)
            message = (f"Transfer-Encoding {', '.join(others)} is not supported: send the body uncompressed "
                       "(chunked or with a Content-Length)")
            response = error_response(501, message, headers={"connection": "close"})
            await response(scope, receive, send)
            return
        json_body = scope["method"] == "POST" and self.takes_json(route_path(scope))  # other methods there: 405
        if json_body and (problem := unsupported_body(Headers(scope=scope))) is not None:
            response = error_response(415, problem, headers={"connection": "close"})  # its body is never read
            await response(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.timeout_s
        scope[DEADLINE] = deadline  # one deadline for the body and the answer (service.app._run)
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except asyncio.TimeoutError:  # wait_for's: not the builtin TimeoutError before Python 3.11
                response = error_response(408, f"the request body did not arrive within {self.timeout_s:g} s",
                                          headers={"connection": "close"})
                await response(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"request body exceeds {self.max_bytes} bytes", headers={"connection": "close"})
        await response(scope, receive, send)
