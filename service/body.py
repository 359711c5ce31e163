"""Request bodies read as RFC 8259 JSON: UTF-8 only, and no key given twice in an object."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


class DuplicateKey(ValueError):
    """A JSON object names a key twice: which value was meant is unknown (Python keeps the last silently)."""

    def __init__(self, key: str):
        super().__init__(f"the key {key!r} is given twice")
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(key)
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


class StrictJSONRoute(APIRoute):
    """An API route whose endpoint reads its body as StrictJSONRequest."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))
        return strict
