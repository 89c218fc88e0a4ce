"""The proxy's HTTP API (Starlette): the OpenAI endpoints apps talk to, on :8088. This module only
assembles the app; the routes live in routes/ (one module per job), the shared state and lifecycle
in state.py, and the objects built from the config in stack.py.

  GET  /health, /ready          open (no token): ok or not, with an error code and nothing else
  GET  /tightwad/v1/health      the same with its details: the engine, model, rpc workers, drafter
  GET  /v1/models               the engine's model, with the proxy's mode in `meta.proxy`
                                (mode consensus is APPROXIMATE: `exact: false`, `approximate: consensus`)
  GET  /v1/models/{id}          that model (the engine's, or one of its aliases), else 404 model_not_found
  POST /v1/completions          speculative when it can be (see request_parsing.py), else passed through
  POST /v1/chat/completions     the same, the prompt rendered by the engine's chat template
  POST /tightwad/v1/gate/chat/completions   the quality gate (gate.py), when configured
  GET  /tightwad/v1/stats       live numbers for `tightwad proxy status`
  GET  /tightwad/v1/events      the same, once a second (SSE), for /dashboard
  GET  /metrics                 Prometheus
  GET  /openapi.json            open: this API's OpenAPI document (tightwad.openapi)

Errors are OpenAI-shaped with a real status before the first byte of a reply; a streamed reply that
breaks later ends with one `data: {"error": ...}` event. Replies generated in mode consensus carry
the header `X-Tightwad-Approximate: consensus` (some tokens were never checked by the target). With
a token configured every route but /health and /ready needs `Authorization: Bearer <token>`
(tightwad.http.BearerAuth).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.routing import Route

from tightwad import http, openapi
from tightwad.proxy.config import ProxyConfig
from tightwad.proxy.routes.gate_chat import GateRoutes
from tightwad.proxy.routes.generate import GenerateRoutes
from tightwad.proxy.routes.health import DETAILS_PATH, HealthRoutes
from tightwad.proxy.routes.info import InfoRoutes
from tightwad.proxy.state import Proxy
from tightwad.proxy.upstream import EngineClient

# /dashboard: a page with no data in it; /openapi.json: shapes only, no secrets
OPEN_PATHS = ("/health", "/ready", "/dashboard", openapi.OPENAPI_PATH)


def create_app(config: ProxyConfig, engine: EngineClient | None = None) -> Starlette:
    proxy = Proxy(config, engine)
    health, info = HealthRoutes(proxy), InfoRoutes(proxy)
    generate, gate = GenerateRoutes(proxy), GateRoutes(proxy)
    routes = [
        Route("/health", health.health, methods=["GET"]),
        Route("/ready", health.ready, methods=["GET"]),
        Route(DETAILS_PATH, health.details, methods=["GET"]),
        Route("/v1/models", info.models, methods=["GET"]),
        Route("/v1/models/{model:path}", info.model_detail, methods=["GET"]),
        Route("/v1/completions", generate.completions, methods=["POST"]),
        Route("/v1/chat/completions", generate.chat_completions, methods=["POST"]),
        Route("/tightwad/v1/gate/chat/completions", gate.gate_chat, methods=["POST"]),
        Route("/tightwad/v1/stats", info.stats, methods=["GET"]),
        Route("/tightwad/v1/events", info.events, methods=["GET"]),
        Route("/dashboard", info.dashboard, methods=["GET"]),
        Route("/metrics", info.metrics, methods=["GET"]),
        openapi.route(openapi.proxy_document()),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await proxy.startup()
        yield
        await proxy.shutdown()

    # The house's bearer check and error handlers (tightwad.http): one error shape everywhere.
    app = http.app(routes, token=config.token, open_paths=OPEN_PATHS, lifespan=lifespan)
    app.state.proxy = proxy
    return app
