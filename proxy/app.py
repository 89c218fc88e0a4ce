"""The proxy's HTTP API (Starlette): the OpenAI endpoints apps talk to, on :8088. This module only
assembles the app; the routes live in routes/ (one module per job), the shared state and lifecycle
in state.py, and the objects built from the config in stack.py.

  GET  /health, /ready          open (no token): the proxy, and whether the engine answers
  GET  /v1/models               the engine's model, with the proxy's mode in `meta.proxy`
                                (mode consensus is APPROXIMATE: `exact: false`, `approximate: consensus`)
  POST /v1/completions          speculative when it can be (see request_parsing.py), else passed through
  POST /v1/chat/completions     the same, the prompt rendered by the engine's chat template
  POST /tightwad/v1/gate/chat/completions   the quality gate (gate.py), when configured
  GET  /tightwad/v1/stats       live numbers for `tightwad proxy status`
  GET  /tightwad/v1/events      the same, once a second (SSE), for /dashboard
  GET  /metrics                 Prometheus

Errors are OpenAI-shaped with a real status before the first byte of a reply; a streamed reply that
breaks later ends with one `data: {"error": ...}` event. Replies generated in mode consensus carry
the header `X-Tightwad-Approximate: consensus` (some tokens were never checked by the target). With
a token configured every route but /health and /ready needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tightwad.auth import BearerAuth
from tightwad.openai import OpenAIError, Unauthorized, error_body
from tightwad.proxy.config import ProxyConfig
from tightwad.proxy.routes.gate_chat import GateRoutes
from tightwad.proxy.routes.generate import GenerateRoutes
from tightwad.proxy.routes.health import HealthRoutes
from tightwad.proxy.routes.info import InfoRoutes
from tightwad.proxy.state import Proxy
from tightwad.proxy.upstream import EngineClient

OPEN_PATHS = ("/health", "/ready", "/dashboard")  # /dashboard: a page with no data in it


async def _on_openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    return JSONResponse(exc.to_json(), status_code=exc.status)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = error_body(f"{request.method} {request.url.path}: {exc.detail}", type_, code)
    return JSONResponse(body, status_code=exc.status_code)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    body = error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error")
    return JSONResponse(body, status_code=500)


def _unauthorized() -> JSONResponse:
    error = Unauthorized("missing or wrong bearer token: send `Authorization: Bearer <token>`")
    return JSONResponse(error.to_json(), status_code=error.status)


def create_app(config: ProxyConfig, engine: EngineClient | None = None) -> Starlette:
    proxy = Proxy(config, engine)
    health, info = HealthRoutes(proxy), InfoRoutes(proxy)
    generate, gate = GenerateRoutes(proxy), GateRoutes(proxy)
    routes = [
        Route("/health", health.health, methods=["GET"]),
        Route("/ready", health.ready, methods=["GET"]),
        Route("/v1/models", info.models, methods=["GET"]),
        Route("/v1/completions", generate.completions, methods=["POST"]),
        Route("/v1/chat/completions", generate.chat_completions, methods=["POST"]),
        Route("/tightwad/v1/gate/chat/completions", gate.gate_chat, methods=["POST"]),
        Route("/tightwad/v1/stats", info.stats, methods=["GET"]),
        Route("/tightwad/v1/events", info.events, methods=["GET"]),
        Route("/dashboard", info.dashboard, methods=["GET"]),
        Route("/metrics", info.metrics, methods=["GET"]),
    ]
    middleware = (
        [Middleware(BearerAuth, token=config.token, open_paths=OPEN_PATHS, rejection=_unauthorized)]
        if config.token
        else []
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await proxy.startup()
        yield
        await proxy.shutdown()

    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            OpenAIError: _on_openai_error,
            HTTPException: _on_http_error,
            Exception: _on_unexpected,
        },
    )
    app.state.proxy = proxy
    return app
