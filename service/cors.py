"""Cross-origin requests (NMT_CORS_ORIGINS): Starlette's CORS middleware, its refusals in the service's error shape."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from service.errors import error_response


class CORS(CORSMiddleware):
    """Starlette's CORSMiddleware, answering a refused preflight with a JSON error, as every other error, instead of
    its plain-text "Disallowed CORS origin"."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ").split(", ")
        reasons = {"origin": f"origin {request_headers['origin']} is not among NMT_CORS_ORIGINS",
                   "method": f"method {request_headers['access-control-request-method']} is not one of "
                             f"{', '.join(sorted(self.allow_methods))}",
                   "headers": f"header(s) {', '.join(self._refused_headers(request_headers))} not among "
                              + ", ".join(sorted(self.allow_headers)),
                   "private-network": "private-network requests are not allowed"}
        headers = {name: value for name, value in response.headers.items()
                   if name not in ("content-length", "content-type")}
        message = "CORS preflight refused: " + "; ".join(reasons.get(r, r) for r in refused)
        return error_response(400, message, code="cors_refused", headers=headers)

    def _refused_headers(self, request_headers: Headers) -> list[str]:
        requested = request_headers.get("access-control-request-headers", "")
        names = (name.strip().lower() for name in requested.split(","))
        return [name for name in names if name and name not in self.allow_headers]
