"""The HTTP surface: a FastAPI app with the OpenAI endpoints, /health and /metrics.

    POST /v1/completions        completion, or SSE chunks with "stream": true
    POST /v1/chat/completions   chat completion through the student's chat template
    GET  /v1/models             every route (gate, experts, compositions, the bare student)
    GET  /health                200 once the student is loaded, 503 before
    GET  /metrics               Prometheus text of every mode_cotd_* series (with the student's live counts)

`create_app` takes a Backend (Ray handles in production, plain classes in tests), so the
same app runs under Ray Serve's ingress and in a test client.

Middleware, outermost first: request counting, API keys (401, serving.auth; only when
keys are configured, and before any body is read), body size (413, serving.limits). No endpoint changes server state
unless runtime routes are on (runtime.enabled: serving/runtime_api.py, RUNTIME_POSTS): otherwise the only POSTs are the
two inference endpoints (tests/serving/test_security.py keeps it so).
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serving.auth import ApiKeyAuth, KeyChecker, load_api_keys
from serving.composition_jobs import CompositionJobs
from serving.errors import install_error_handlers
from serving.handler import OpenAIHandler
from serving.limits import BodyLimit
from serving.metrics import ServingMetrics
from serving.prompts import PromptRenderer
from serving.protocol import Backend
from serving.routes import RouteTable
from serving.runtime_api import install_runtime_endpoints
from serving.runtime_routes import RuntimeRoutes
from serving.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from serving.settings import ApiSettings

API_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
STATS_TIMEOUT_S = 2.0
"""Longest wait for the student's live counts when /metrics is scraped."""

logger = logging.getLogger(__name__)


class RequestCounter:
    """ASGI middleware: count every /v1 request by route, endpoint and final status code.

    The handler puts the route kind in `request.state.route` once it is resolved; requests
    that fail before that count under route "none".
    """

    def __init__(self, app, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = 500

        async def remember_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, remember_status)
        finally:
            route = scope.get("state", {}).get("route", "none")
            endpoint = path if path in API_ENDPOINTS else "other"
            self.metrics.requests.labels(route, endpoint, str(status)).inc()


def create_app(backend: Backend, routes: RouteTable | RuntimeRoutes, prompts: PromptRenderer,
               settings: ApiSettings, metrics: ServingMetrics, jobs: CompositionJobs | None = None) -> FastAPI:
    """The OpenAI-compatible app over `backend`; with `jobs` (runtime routes on), the runtime endpoints too."""
    handler = OpenAIHandler(backend, routes, prompts, settings, metrics)
    keys = KeyChecker(load_api_keys(settings))
    created = int(time.time())
    app = FastAPI(title="mode-cotd", summary="Mixture of LoRA experts over one student, OpenAI-compatible")
    install_error_handlers(app, settings.retry_after_s)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # the last added runs first
    if keys:
        app.add_middleware(ApiKeyAuth, checker=keys)
    app.add_middleware(RequestCounter, metrics=metrics)

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            ready = await backend.ready()
        except Exception:  # noqa: BLE001 - an unreachable student is simply not ready
            ready = False
        return JSONResponse({"status": "ok" if ready else "loading"}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[
            ModelCard(id=m.id, created=created,
                      mode_cotd={"route": m.kind, "experts": m.experts, "candidates": m.candidates,
                                 "shared": m.shared})
            for m in routes.models()
        ])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await handler.completions(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await handler.chat(request, body)

    if jobs is not None:
        install_runtime_endpoints(app, jobs.routes, jobs)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        try:
            metrics.record_student_stats(await asyncio.wait_for(backend.stats(), STATS_TIMEOUT_S))
        except Exception as e:  # noqa: BLE001 - a student that is down or loading has no live counts
            logger.debug("no live student counts: %s", e)
        text, content_type = metrics.exposition()
        return Response(text, media_type=content_type)

    return app
