"""Every error the service returns has one JSON shape: {"error": {"code", "message", "fields"}}."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from service import request_id
from service.body import BadKey, NulByte
from service.schemas import MAX_TEXTS, TOO_MANY_TEXTS, ErrorResponse

log = logging.getLogger(__name__)

MAX_REPORTED = 50  # fields listed in a 422: a list of thousands of bad items is not answered item by item
_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 408: "timeout",
          413: "too_large", 415: "unsupported_media_type", 422: "validation_error", 429: "rate_limited",
          431: "headers_too_large", 500: "internal_error", 501: "not_implemented", 503: "unavailable",
          504: "timeout"}


def unavailable_for_now() -> dict[str, str]:
    """The headers of a 503 for what passes within seconds (the model loading, the service stopping): clients are
    told to retry in 5 s, elsewhere or here."""
    return {"Retry-After": "5"}


def internal_error() -> str:
    """A 500's message: the id of the request being handled, under which its traceback is logged, for its operator."""
    return f"internal error; it is in the service's log under request {request_id.current.get()}"


class ServiceError(Exception):
    """An error response: HTTP status, machine-readable code, message, offending fields, extra headers."""

    def __init__(self, status: int, message: str, code: str | None = None, fields: Sequence[dict[str, str]] = (),
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.code = code or _CODES.get(status, "error")
        self.fields, self.headers = list(fields), headers


def error_response(status: int, message: str, code: str | None = None, fields: Sequence[dict[str, str]] = (),
                   headers: dict[str, str] | None = None) -> JSONResponse:
    listed = [{key: _encodable(value) for key, value in field.items()} for field in fields]
    body = {"error": {"code": code or _CODES.get(status, "error"), "message": _encodable(message), "fields": listed}}
    return JSONResponse(body, status_code=status, headers=headers)


def _encodable(text: str) -> str:
    """Text as UTF-8 can carry it: a lone surrogate a request sent (a JSON key "\\ud800") escaped, where it made the
    answer itself fail (500)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_branch(part: Any) -> bool:
    """Pydantic puts the union member tried ('str', 'list[...]') into an error's location; it is no field."""
    return isinstance(part, str) and not part.isidentifier()


def _field_name(loc: tuple[Any, ...]) -> str:
    """('body', 'text', 'list[str]', 2) -> 'text[2]'."""
    name = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not _is_branch(part):
            name += f".{part}" if name else str(part)
    return name or "body"


def _message(err: dict[str, Any], doc: Any) -> str:
    """One validation error for people; doc: the body as text, where a JSON syntax error is placed."""
    if err.get("type") == "json_invalid":
        return f"not valid JSON: {_json_error_at(err, doc)}"
    whole_body = len(err.get("loc", ())) <= 1  # sent as JSON: the route refused the others (415)
    if err.get("type") == "model_attributes_type" and whole_body:
        return f"must be a JSON object, not {_json_kind(err.get('input'))}"
    if err.get("type") == "missing" and whole_body:
        return "empty: send a JSON object"
    return str(err.get("msg", "invalid value")).removeprefix("Value error, ")


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in the spec's words."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return ("an array" if isinstance(value, list) else "a string" if isinstance(value, str)
            else "a number" if isinstance(value, (int, float)) else "an object")


def _union_branch(loc: tuple[Any, ...]) -> tuple[str, int] | None:
    """For an error inside a union member: the union field's name and how deep in the member the error lies."""
    for i, part in enumerate(loc):
        if _is_branch(part):
            return _field_name(loc[:i]), len(loc) - i
    return None


def _json_error_at(err: dict[str, Any], doc: Any) -> str:
    """The parser's complaint with where it is, as json's own message puts it: "Expecting value at line 1 column 9"
    (FastAPI keeps the message without its position, which is in the error's loc, and the text in the exception)."""
    what = str(err.get("ctx", {}).get("error", "parse error")).removesuffix(" at")
    loc = tuple(err.get("loc", ()))
    if len(loc) < 2 or not isinstance(loc[1], int) or not isinstance(doc, str):
        return what
    pos = loc[1]
    line, column = doc.count("\n", 0, pos) + 1, pos - doc.rfind("\n", 0, pos)
    return f"{what} at line {line} column {column}"


def validation_fields(exc: RequestValidationError) -> list[dict[str, str]]:
    """One entry per offending field. Where a value failed every member of a union (text: str | list[str]), the
    errors from inside a member (text[1]) are the useful ones; with none, the members' messages are merged."""
    errors = exc.errors()
    depth: dict[str, int] = {}
    for err in errors:
        if branch := _union_branch(tuple(err.get("loc", ()))):
            depth[branch[0]] = max(depth.get(branch[0], 0), branch[1])
    fields: dict[str, list[str]] = {}
    for err in errors:
        loc = tuple(err.get("loc", ()))
        branch = _union_branch(loc)
        if branch and branch[1] < depth[branch[0]]:
            continue
        messages = fields.setdefault("body" if err.get("type") == "json_invalid" else _field_name(loc), [])
        if (message := _message(err, exc.body)) not in messages:
            messages.append(message)
    return [{"field": field, "message": messages[0] if len(messages) == 1 else
             "Input should be " + " or ".join(m.removeprefix("Input should be ") for m in messages)}
            for field, messages in fields.items()]


async def _on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.code, exc.fields, exc.headers)


def _too_many(request: Request, errors: list[dict[str, Any]]) -> JSONResponse | None:
    """413 for a list over schemas.MAX_TEXTS (refused before its items were validated), with the limit that
    applies: the service's max_texts."""
    over = [err for err in errors if err.get("type") == TOO_MANY_TEXTS]
    if not over:
        return None
    settings = getattr(request.app.state, "settings", None)
    limit = settings.max_texts if settings is not None else MAX_TEXTS
    fields = [{"field": _field_name(tuple(err["loc"])[:2]), "message": f"at most {limit} texts"} for err in over]
    message = "; ".join(f"{f['field']}: {err['ctx']['actual_length']} texts, more than the limit of {limit} per "
                        "request" for f, err in zip(fields, over, strict=True))
    return error_response(413, message, fields=fields)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if too_many := _too_many(request, errors):
        return too_many
    fields = validation_fields(exc)
    message = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:MAX_REPORTED]) or "invalid request"
    if len(fields) > MAX_REPORTED:
        message += f" (the first {MAX_REPORTED} of {len(fields)} fields)"
    return error_response(422, message, fields=fields[:MAX_REPORTED])


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message, headers = str(exc.detail), getattr(exc, "headers", None)
    cause = exc.__cause__
    if isinstance(cause, BadKey):
        message = f"body: {cause}; {cause.advice}"
        return error_response(422, message, fields=[{"field": cause.key, "message": str(cause)}])
    if isinstance(cause, NulByte):
        message = str(cause)
    elif isinstance(cause, UnicodeDecodeError):  # FastAPI's 400 for a body that is not UTF-8
        message = f"the body is not valid UTF-8 ({cause.reason} at byte {cause.start})"
    elif isinstance(cause, RecursionError):  # Python's json parser stops at a thousand levels or more
        message = "the JSON body is nested too deeply to read (a request of this API nests two levels deep)"
    elif isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        message = (f"a number in the JSON body has more digits than can be read (at most "
                   f"{sys.get_int_max_str_digits()})")
    elif exc.status_code == 404 and message == "Not Found":  # the router's, or the static files'
        message = _not_found(request)
    elif exc.status_code == 405:  # Starlette names the methods of the first route of the path only (GET, not HEAD)
        methods = {method for route in request.app.router.routes if isinstance(route, Route)
                   and route.matches(request.scope)[0] != Match.NONE for method in route.methods or ()}
        methods = methods or {"GET", "HEAD"}  # no route: one of the mounted static directories
        headers = {**(headers or {}), "Allow": ", ".join(sorted(methods))}
    return error_response(exc.status_code, message, headers=headers)


def _not_found(request: Request) -> str:
    """A 404's message: the path, and the route it misses by a trailing slash (the app does not redirect)."""
    path = request.url.path
    if path != "/" and any(isinstance(route, Route) and route.path == path.rstrip("/")
                           for route in request.app.router.routes):
        return f"no such path: {path}; the path is {path.rstrip('/')}, without the trailing slash"
    return f"no such path: {path} (the API's paths are listed at /docs)"


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, internal_error())


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description,
             **({"headers": _RETRY_AFTER} if status in (429, 503) else {})} for status, description in {
        400: "the body could not be decoded (not UTF-8, nested too deeply, a number too long to read)",
        401: "missing or invalid API key (when keys are configured)",
        408: "the body did not arrive within the request deadline",
        413: "body, text count, text length, a score pair's pieces or an alignment's size over the limits",
        415: "the body is compressed or not JSON",
        422: "invalid request: the message and `fields` name the offending fields",
        429: "rate limit exceeded; see Retry-After",
        431: "the request line and headers are over NMT_MAX_HEADER_BYTES (the connection is closed)",
        501: "a Transfer-Encoding other than chunked",
        503: "queue full or model not loaded yet; see Retry-After",
        504: "the request deadline passed before the translation was done",
    }.items()
}
