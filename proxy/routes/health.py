"""GET /health and /ready: open routes (no token), for load balancers, probes and `tightwad up`;
GET /tightwad/v1/health: the same verdict with its details, behind the token like every route.

The proxy is healthy when the engine is: reachable, serving, every rpc worker alive. The open routes
say only whether it is (200, or 503 with the error's code): the engine's URL, the model, rpc worker
addresses and drafter errors describe the cluster's inside, so only a client with the token sees
them (at /tightwad/v1/health, or at /health when it sends the token, or when the proxy has none).
The engine's /health answers the same way.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tightwad.openai import OpenAIError, error_body
from tightwad.proxy.state import Proxy

DETAILS_PATH = "/tightwad/v1/health"


class HealthRoutes:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def _check(self) -> tuple[dict[str, Any], OpenAIError | None]:
        """The engine, its model and rpc workers, and the drafter's state; and what is wrong."""
        proxy = self.proxy
        body: dict[str, Any] = {"status": "ok", "engine": proxy.engine.url}
        if proxy.drafter is not None:
            body["drafter"] = proxy.drafter.snapshot()
        try:
            profile = await proxy.learn_engine()
            body["model"] = profile.info.model
            body["workers"] = (await proxy.engine.health()).get("workers", [])
        except OpenAIError as exc:
            proxy.engine_failed(exc)
            return body, exc
        return body, None

    def _authorized(self, request: Request) -> bool:
        """No token configured (loopback only), or the caller sent it."""
        token = self.proxy.config.token
        if not token:
            return True
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, f"Bearer {token}".encode())

    async def health(self, request: Request) -> Response:
        """A bare verdict: ok, or the error's code and where to read why; the details for a caller
        with the token (the engine's /health answers the same way)."""
        if self._authorized(request):
            return await self.details(request)
        _, problem = await self._check()
        if problem is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "error", **_bare(problem)}, status_code=503)

    async def details(self, request: Request) -> Response:
        body, problem = await self._check()
        if problem is not None:
            return JSONResponse({**body, "status": "error", **problem.to_json()}, status_code=503)
        return JSONResponse(body)

    async def ready(self, request: Request) -> Response:
        try:
            await self.proxy.learn_engine()
            await self.proxy.engine.health()
        except OpenAIError as exc:
            self.proxy.engine_failed(exc)
            return JSONResponse({"ready": False, **_bare(exc)}, status_code=503)
        return JSONResponse({"ready": True})


def _bare(problem: OpenAIError) -> dict[str, Any]:
    """An open route's error: the code only (its message may name the engine's address)."""
    message = f"the proxy cannot serve ({problem.code}): GET {DETAILS_PATH} with the token says why"
    return error_body(message, problem.type, problem.code)
