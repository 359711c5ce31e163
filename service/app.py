"""The FastAPI app: routes, limits, API keys, rate limits, metrics and the web page around one ModelWorker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.responses import FileResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp

from nmt import LOG_FORMAT, __version__
from nmt.errors import NMTError
from nmt.translator import Translation, Translator
from service import request_id, schemas
from service.batcher import Closed, QueueFull
from service.body import StrictJSONRoute
from service.cors import CORS
from service.errors import (
    ERROR_RESPONSES,
    ServiceError,
    error_response,
    install_error_handlers,
    internal_error,
    unavailable_for_now,
)
from service.guard import KEY_REQUIRED, PASSED, Guard
from service.limits import DEADLINE, BodyLimitMiddleware
from service.metrics import Metrics, MetricsMiddleware
from service.ratelimit import RateLimiter
from service.settings import Settings, describe
from service.shutdown import ForcedStopMiddleware
from service.worker import DecodeOptions, ModelWorker, TooLarge

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
DOCS, REDOC = "/docs", "/redoc"  # the API documentation pages
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format that Prometheus scrapes
TRANSLATE, SCORE = "/v1/translate", "/v1/score"  # the model endpoints: API keys and rate limits apply to them
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key from NMT_API_KEYS")
_bearer = HTTPBearer(auto_error=False, description="an API key from NMT_API_KEYS, as a bearer token")


async def _guarded(request: Request, api_key: str | None = Security(_api_key_header),
                   bearer: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
    """Declares the API key schemes in the OpenAPI schema; service.guard.Guard checks the keys, before the body is
    read (a dependency runs after it is parsed). A request that reached a model endpoint without passing the Guard
    is refused here all the same: the keys fail closed."""
    if not request.scope.get(PASSED):
        log.error("%s %s reached its endpoint without the key check", request.method, request.url.path)
        raise ServiceError(401, KEY_REQUIRED, headers={"WWW-Authenticate": "Bearer"})


def _check_sizes(settings: Settings, field: str, value: str | list[str]) -> list[str]:
    """The texts of a field (one string or a list), checked against the count and length limits (413)."""
    texts = [value] if isinstance(value, str) else value
    if len(texts) > settings.max_texts:
        raise ServiceError(413, f"{field}: {len(texts)} texts, more than the limit of {settings.max_texts} per request",
                           fields=[{"field": field, "message": f"at most {settings.max_texts} texts"}])
    for i, text in enumerate(texts):
        if len(text) > settings.max_chars:
            name = field if isinstance(value, str) else f"{field}[{i}]"
            raise ServiceError(413, f"{name}: {len(text)} characters, more than the limit of {settings.max_chars}",
                               fields=[{"field": name, "message": f"at most {settings.max_chars} characters"}])
    return texts


async def _disconnected(request: Request) -> None:
    """Return once the client has closed the connection (the body was read already: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _run(settings: Settings, work: Any, request: Request) -> Any:
    """Await model work under the request deadline, mapping queue and model errors to responses. A client that
    leaves first (a disconnect, a client-side timeout) drops its work: the model does not go on for nobody."""
    deadline = request.scope.get(DEADLINE)  # set as the body began to arrive: what is left of it
    left_s = settings.request_timeout_s if deadline is None else max(deadline - time.monotonic(), 0.0)
    task = asyncio.ensure_future(asyncio.wait_for(work, left_s))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        left = not task.done()
        if left:
            task.cancel()
    if left:
        raise ServiceError(499, "the client closed the connection before the answer", code="client_closed")
    try:
        return task.result()
    except QueueFull:
        raise ServiceError(503, "the translation queue is full; retry shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None
    except Closed:
        raise ServiceError(503, "the service is shutting down", headers=unavailable_for_now()) from None
    except asyncio.TimeoutError:  # wait_for's: not the builtin TimeoutError before Python 3.11
        raise ServiceError(504, f"not done within the {settings.request_timeout_s:g} s request deadline; "
                                "send fewer or shorter texts") from None
    except TooLarge as exc:
        raise ServiceError(413, str(exc), fields=[{"field": exc.field, "message": exc.limit}]) from None
    except NMTError as exc:
        raise ServiceError(422, str(exc)) from None
    except Exception:  # answered here: past the app's handlers, uvicorn would also drop the keep-alive connection
        log.exception("translation failed")
        raise ServiceError(500, internal_error(), code="internal_error") from None


def _require(worker: ModelWorker) -> None:
    if not worker.ready:  # only without the lifespan startup, e.g. under `uvicorn --lifespan off`
        raise ServiceError(503, "the model is not loaded", headers=unavailable_for_now())


def _translation(t: Translation, scores: bool, alignment: bool) -> schemas.Translation:
    alternatives = [schemas.Alternative(text=a.text, score=a.score if scores else None) for a in t.alternatives[1:]]
    out = schemas.Translation(text=t.text, score=t.score if scores else None, alternatives=alternatives)
    if alignment:
        out.alignment = schemas.Alignment(source=t.src_pieces or [], target=t.tgt_pieces or [],
                                          weights=t.alignment or [])
    return out


def create_app(settings: Settings | None = None, translator: Translator | None = None) -> FastAPI:
    """Build the service; the model is loaded at startup (or `translator` is used as it is)."""
    settings = settings or Settings()
    if not logging.getLogger().handlers:  # a worker process of `nmt serve --workers N`: spawned, with no logging
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    metrics = Metrics()
    worker = ModelWorker(settings, metrics, translator)
    guards = [Depends(_guarded)] if settings.api_keys else []
    limits = schemas.Limits(max_texts=settings.max_texts, max_chars=settings.max_chars,
                            max_body_bytes=settings.max_body_bytes, max_beam_size=schemas.MAX_BEAM,
                            max_alignment_cells=settings.max_alignment_cells,
                            request_timeout_s=settings.request_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        log.info("serving %s: %s", worker.model_id, describe(settings))
        yield
        await worker.close()

    # /docs and /redoc from files in the package (fastapi-offline), not from a CDN: air-gapped hosts get them too.
    app = FastAPIOffline(title="rnnsearch", version=__version__, lifespan=lifespan, static_url="/docs-static",
                         docs_url=DOCS, redoc_url=REDOC, redirect_slashes=False,
                         description="Neural machine translation with RNNsearch (Bahdanau attention). "
                                     "Errors are JSON: `{\"error\": {\"code\", \"message\", \"fields\"}}`.")
    app.state.worker, app.state.settings, app.state.metrics = worker, settings, metrics
    app.router.route_class = StrictJSONRoute  # for the routes below
    install_error_handlers(app)
    # The last added is the outermost: keys and rate limits are checked before the body limit reads the body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.request_timeout_s,
                       json_paths=frozenset((TRANSLATE, SCORE)))
    rate = settings.rate()
    app.add_middleware(Guard, paths=frozenset((TRANSLATE, SCORE)), keys=settings.api_keys,
                       rate_limit=settings.rate_limit, limiter=RateLimiter(*rate) if rate else None)

    @app.post(TRANSLATE, response_model=schemas.TranslateResponse, responses=ERROR_RESPONSES,
              dependencies=guards, tags=["translation"], operation_id="translate")
    async def translate(req: schemas.TranslateRequest, request: Request) -> schemas.TranslateResponse:
        """Translate one text or a list of texts; concurrent requests with equal options share model batches."""
        start = time.perf_counter()
        _require(worker)
        texts = _check_sizes(settings, "text", req.text)
        default_beam, default_alpha = worker.defaults()
        # An n_best over the model's beam widens it: a schema-valid n_best was refused for a default not in the schema.
        beam = req.beam_size or max(default_beam, req.n_best)
        options = DecodeOptions(beam, req.n_best, default_alpha if req.length_penalty is None else req.length_penalty,
                                req.return_alignment)
        results = await _run(settings, worker.translate(texts, options), request)
        return schemas.TranslateResponse(
            translations=[_translation(t, req.return_scores, req.return_alignment) for t in results],
            model=worker.model_id, elapsed_ms=round((time.perf_counter() - start) * 1000, 2))

    @app.post(SCORE, response_model=schemas.ScoreResponse, responses=ERROR_RESPONSES,
              dependencies=guards, tags=["translation"], operation_id="score")
    async def score(req: schemas.ScoreRequest, request: Request) -> schemas.ScoreResponse:
        """Log-probabilities of candidate translations of one source, e.g. to rerank them."""
        start = time.perf_counter()
        _require(worker)
        _check_sizes(settings, "source", req.source)
        _check_sizes(settings, "candidates", req.candidates)
        results = await _run(settings, worker.score(req.source, req.candidates), request)
        return schemas.ScoreResponse(
            scores=[schemas.Score(text=c, logprob=r.logprob, pieces=r.pieces, token_logprobs=r.token_logprobs)
                    for c, r in zip(req.candidates, results, strict=True)],
            model=worker.model_id, elapsed_ms=round((time.perf_counter() - start) * 1000, 2))

    @app.head("/v1/models", include_in_schema=False)
    @app.get("/v1/models", response_model=schemas.ModelsResponse, responses={503: ERROR_RESPONSES[503]},
             tags=["service"], operation_id="models")
    async def models() -> dict[str, Any]:
        """The served model (languages, size, decoding defaults and its card: data, BLEU) and the request limits."""
        _require(worker)
        return {"models": [worker.info], "limits": limits}

    @app.head("/v1/health", include_in_schema=False)  # uptime monitors probe with HEAD
    @app.get("/v1/health", response_model=schemas.Health, tags=["service"], operation_id="health")
    async def health() -> dict[str, Any]:
        """The process is up and its event loop answers."""
        return {"status": "ok"}

    @app.head("/v1/ready", include_in_schema=False)
    @app.get("/v1/ready", response_model=schemas.Ready, responses={503: ERROR_RESPONSES[503]}, tags=["service"],
             operation_id="ready")
    async def ready() -> Any:
        """The model is loaded and requests are taken."""
        if not worker.ready:
            return error_response(503, "the model is not loaded", headers=unavailable_for_now())
        return {"status": "ready", "model": worker.model_id}

    @app.head("/metrics", include_in_schema=False)
    @app.get("/metrics", tags=["service"], response_class=Response, operation_id="metrics",
             responses={200: {"description": "Prometheus text format (version 0.0.4)",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus() -> Response:
        """Prometheus metrics: requests by route and status, latency, batch sizes, queue depth, tokens."""
        return Response(metrics.render(), media_type=PROMETHEUS_TYPE)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    # fastapi-offline's documentation pages answer GET alone: monitors probing them with HEAD got 405.
    for route in [r for r in app.routes if isinstance(r, APIRoute) and r.path in (DOCS, REDOC)]:
        app.add_api_route(route.path, route.endpoint, methods=["HEAD"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Around Starlette's whole stack (its ServerErrorMiddleware, which answers an unexpected error's 500, runs outside
    # every middleware added to an app): the answer to a request cut off by the service's stop, CORS headers, so that
    # pages can read every answer, the metrics, counting them all, and the request id, on every answer. Built when
    # Starlette builds its stack (at the first request), so that middleware and exception handlers added to the app
    # after this still take effect.
    build_stack = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        stack = ForcedStopMiddleware(build_stack())
        if settings.cors_origins:
            stack = CORS(stack, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                         allow_headers=["Content-Type", "X-API-Key", "Authorization", request_id.HEADER],
                         # so that pages can wait as 429 and 503 ask, and quote a request's id
                         expose_headers=["Retry-After", request_id.HEADER])
        return request_id.RequestIdMiddleware(MetricsMiddleware(stack, metrics=metrics))

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]
    return app
