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
        origin, method = request_headers["origin"], request_headers["access-control-request-method"]
        reasons = []
        if not self.is_allowed_origin(origin):
            reasons.append(f"origin {origin} is not among NMT_CORS_ORIGINS")
        if method not in self.allow_methods:
            reasons.append(f"method {method} is not one of {', '.join(sorted(self.allow_methods))}")
        if refused := self._refused_headers(request_headers):
            reasons.append(f"header(s) {', '.join(refused)} not among {', '.join(sorted(self.allow_headers))}")
        headers = {name: value for name, value in response.headers.items()
                   if name not in ("content-length", "content-type")}
        # Starlette's own words for a refusal named above by none (a private-network request).
        message = "; ".join(reasons) or bytes(response.body).decode()
        return error_response(400, f"CORS preflight refused: {message}", code="cors_refused", headers=headers)

    def _refused_headers(self, request_headers: Headers) -> list[str]:
        if self.allow_all_headers:
            return []
        requested = request_headers.get("access-control-request-headers", "")
        names = (name.strip().lower() for name in requested.split(","))
        return [name for name in names if name and name not in self.allow_headers]
