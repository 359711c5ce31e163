"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

ANSWERED_OUTSIDE = "nmt.answered_outside"  # scope key: a status the HTTP protocol answered the request with


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("nmt_http_requests", "HTTP requests by route and status code",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("nmt_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("nmt_http_requests_in_flight", "HTTP requests being handled",
                               registry=self.registry)
        self.batch_requests = Histogram("nmt_batch_requests", "requests in the running model batch, per decoding step",
                                        buckets=_BATCH_BUCKETS, registry=self.registry)
        self.batch_texts = Histogram("nmt_batch_texts", "sentences of the running requests (decoding, or waiting for "
                                     "room in the token budget), per decoding step",
                                     buckets=_BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("nmt_batch_duration_seconds", "model time per decoding step",
                                       buckets=_STEP_BUCKETS, registry=self.registry)
        self.source_tokens = Counter("nmt_source_tokens", "source tokens encoded for the requests translated or "
                                     "scored (a score request's source once per candidate; not of those cancelled)",
                                     registry=self.registry)
        self.queue_depth = Gauge("nmt_queue_depth", "requests waiting for the model", registry=self.registry)
        self.model_loaded = Gauge("nmt_model_loaded", "1 once the model is loaded", registry=self.registry)

    def observe_step(self, requests: int, sentences: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_texts.observe(sentences)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_of(scope: Scope) -> str:
    """The route template (or mount) a request goes to, before routing (which rewrites the scope): so also for one
    answered before routing, as a 413 for its body size; not the raw path, to bound label cardinality."""
    partial = None  # a route whose path matches but not its method (405)
    for route in _routes(getattr(getattr(scope.get("app"), "router", None), "routes", ())):
        match = route.matches(scope)[0]
        if match == Match.FULL:
            return getattr(route, "path", None) or "unmatched"
        if match == Match.PARTIAL and partial is None:
            partial = getattr(route, "path", None)
    return partial or "unmatched"


def _routes(routes: Iterable[Any]) -> Iterator[Any]:
    """The routes, those of a router added with include_router as its own: FastAPI keeps such a router as one
    entry with no path of its own, and every request to it failed here, outside every error handler."""
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:
            yield from contexts()
        else:
            yield route


# Methods counted by name; any other (PROPFIND, PURGE, ...: a label series each) as "other".
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


class MetricsMiddleware:
    """Counts every response by route template and status; a request whose client left before any response (a
    body never finished) counts as 499, as nginx logs it, not as a server error."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the request by route, method and status: the status the app sent, else the one the HTTP protocol
        answered it with (ANSWERED_OUTSIDE), else 499 (its client left)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.metrics
        status: int | None = None
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        route = route_of(scope)
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            status = status or 500
            raise
        finally:
            metrics.in_flight.dec()
            method = scope["method"] if scope["method"] in _METHODS else "other"
            status = scope.get(ANSWERED_OUTSIDE) or status or 499
            metrics.requests.labels(route, method, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)
