"""Request bodies read as RFC 8259 JSON: UTF-8 only, and no key given twice in an object."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers


class BadKey(ValueError):
    """A JSON object's key that the service cannot take, whatever the schema says; advice: what to do instead."""

    def __init__(self, key: str, problem: str, advice: str):
        super().__init__(f"the key {key!r} {problem}")
        self.key, self.advice = key, advice


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:  # which value was meant is unknown (Python keeps the last silently)
            raise BadKey(key, "is given twice", "give each field once")
        # pydantic said only "unable to parse raw data"; an ASCII key, as every field name is, is looked at no further
        if not key.isascii() and any("\ud800" <= char <= "\udfff" for char in key):
            raise BadKey(key, "holds a lone surrogate, which is no Unicode text", "send the field names of the API")
        obj[key] = value
    return obj


class NulByte(ValueError):
    """A NUL byte, which JSON text never holds raw: most likely UTF-16 or UTF-32 sent for UTF-8."""


class StrictJSONRequest(Request):
    """json.loads of bytes guesses UTF-16 and UTF-32 too; here a body is UTF-8 (a byte order mark allowed, as RFC
    8259 lets a parser ignore it), else UnicodeDecodeError or NulByte, which the service answers 400."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if (at := body.find(b"\0")) >= 0:
                raise NulByte(f"the body is not UTF-8 JSON: a NUL byte at byte {at}, as in UTF-16 or UTF-32 text")
            self._json = json.loads(body.decode("utf-8-sig"), object_pairs_hook=_unique)
        return self._json


def unsupported_body(headers: Headers) -> str | None:
    """Why a request's body cannot be read as this API's JSON, whatever it holds: compressed, not sent as JSON, or
    in another charset than UTF-8 (read as UTF-8, Latin-1 text that happens to be valid UTF-8 changed silently)."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return f"Content-Encoding {encoding} is not supported: send the body uncompressed"
    media, *params = (part.strip().lower() for part in headers.get("content-type", "").split(";"))
    if media != "application/json" and not media.endswith("+json"):
        return "the body must be JSON sent with Content-Type: application/json" + (f", not {media}" if media else "")
    charset = next((p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")), "utf-8")
    if charset.replace("-", "") != "utf8":
        return f"the body must be UTF-8 JSON (RFC 8259), not charset={charset}"
    return None


class StrictJSONRoute(APIRoute):
    """An API route whose endpoint reads its body as StrictJSONRequest."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))
        return strict
