"""API keys and rate limits for the model endpoints, checked before a request's body is read."""

from __future__ import annotations

import hmac
import math
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_response
from service.ratelimit import RateLimiter

PASSED = "nmt.guard_passed"  # the scope key the Guard sets on a request it let through
KEY_REQUIRED = "an API key is required: send it as X-API-Key or Authorization: Bearer"


def given_key(headers: Headers) -> str | None:
    """The API key a request sends, as X-API-Key or as an Authorization bearer token."""
    if key := headers.get("x-api-key", "").strip():
        return key
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def route_path(scope: Scope) -> str:
    """The path the app's routes match, as Starlette takes it: without the root path a proxy mounts it under
    (uvicorn --root-path), where that begins the request's path."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


def path_matcher(paths: frozenset[str]) -> Callable[[str], bool]:
    """Whether a path (as route_path gives it) is one of these routes', matched as the router matches them: a path
    compared as a string let /v1/translate%0A through, which the router's `$` still takes for /v1/translate."""
    patterns = [compile_path(path)[0] for path in paths]
    return lambda path: any(pattern.match(path) for pattern in patterns)


class Guard:
    """Answers a POST to a guarded path with 401 when API keys are set and it sends none of them, and with 429 (and
    Retry-After) when its client is over the rate limit, before anything reads its body: a client without a key
    cannot have a large or malformed body read and parsed. The limit counts per key, and per client address for
    requests without a valid key, so that keys cannot be guessed at full speed either."""

    def __init__(self, app: ASGIApp, paths: frozenset[str], keys: list[str], rate_limit: str,
                 limiter: RateLimiter | None):
        self.app = app
        self.guarded = path_matcher(paths)
        self.keys = [key.encode() for key in keys]
        self.rate_limit, self.limiter = rate_limit, limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" and scope["method"] == "POST" else None
        if path is None or not self.guarded(path):
            await self.app(scope, receive, send)
            return
        key = given_key(Headers(scope=scope))
        valid = not self.keys or key is not None and any(hmac.compare_digest(key.encode(), k) for k in self.keys)
        client = f"key:{key}" if self.keys and valid else f"ip:{scope['client'][0] if scope.get('client') else '?'}"
        wait = self.limiter.acquire(client) if self.limiter is not None else 0.0
        if wait > 0:
            response = error_response(429, f"rate limit of {self.rate_limit} exceeded; retry in {wait:.1f} s",
                                      headers={"Retry-After": str(math.ceil(wait))})
        elif not valid:
            response = error_response(401, "invalid API key" if key else KEY_REQUIRED,
                                      headers={"WWW-Authenticate": "Bearer"})
        else:
            scope[PASSED] = True
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)
