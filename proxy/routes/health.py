"""GET /health and /ready: open routes (no token), for load balancers and `tightwad up`.

The proxy is healthy when the engine is: reachable, serving, every rpc worker alive. Both answer
503 with the engine's error when it is not.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tightwad.openai import OpenAIError
from tightwad.proxy.state import Proxy


class HealthRoutes:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def health(self, request: Request) -> Response:
        """The engine, its model and rpc workers, and the drafter's state."""
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
            return JSONResponse({**body, "status": "error", **exc.to_json()}, status_code=503)
        return JSONResponse(body)

    async def ready(self, request: Request) -> Response:
        try:
            await self.proxy.learn_engine()
            await self.proxy.engine.health()
        except OpenAIError as exc:
            self.proxy.engine_failed(exc)
            return JSONResponse({"ready": False, **exc.to_json()}, status_code=503)
        return JSONResponse({"ready": True})
