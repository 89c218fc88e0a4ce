"""What the proxy tells about itself: GET /v1/models, /tightwad/v1/stats (`tightwad proxy status`),
/tightwad/v1/events and /dashboard (the live page), and /metrics (Prometheus).

/v1/models is the engine's answer with the proxy's mode added under `meta.proxy`; in mode
consensus it says `exact: false` and `approximate: consensus`. /v1/models/{id} answers for the
engine's model and its aliases, and 404 model_not_found for any other name.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from tightwad.openai import OpenAIError, check_model, served_names
from tightwad.proxy.dashboard import DASHBOARD_HTML, live_stats
from tightwad.proxy.drafters.race import RaceDrafter
from tightwad.proxy.state import Proxy


class InfoRoutes:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def models(self, request: Request) -> Response:
        proxy = self.proxy
        profile = await proxy.engine_profile()
        body = json.loads(json.dumps(profile.info.models_body))  # a deep copy: the profile keeps its own
        for entry in body.get("data", []):
            meta = entry.setdefault("meta", {})
            meta["proxy"] = {
                "mode": proxy.config.mode,
                "exact": not proxy.approximate,
                "drafter": proxy.drafter.kind if proxy.drafter else None,
                "chat_speculation": profile.chat_tokens,
            }
            if isinstance(proxy.drafter, RaceDrafter):
                meta["proxy"]["drafters"] = [d.name for d in proxy.drafter.drafters]
            if proxy.approximate:
                meta["proxy"]["approximate"] = "consensus"
                meta["proxy"]["consensus_policy"] = proxy.config.consensus_policy
        return JSONResponse(body)

    async def model_detail(self, request: Request) -> Response:
        """GET /v1/models/{id}: OpenAI's model object for the engine's model or one of its aliases."""
        profile = await self.proxy.engine_profile()
        name = request.path_params["model"]
        check_model({"model": name}, served_names(profile.info.models_body))
        entry = profile.info.models_body["data"][0]
        keys = ("object", "created", "owned_by")
        return JSONResponse({"id": name, **{k: entry[k] for k in keys if k in entry}})

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.stats_body())

    def stats_body(self) -> dict[str, Any]:
        proxy = self.proxy
        body: dict[str, Any] = {
            "object": "tightwad.proxy.stats",
            "mode": proxy.config.mode,
            "engine": proxy.engine.url,
            "model": proxy.profile.info.model if proxy.profile else None,
            **proxy.telemetry.snapshot(),
        }
        if proxy.controller is not None and proxy.drafter is not None:
            body["policy"] = proxy.controller.snapshot()
            body["drafter"] = proxy.drafter.snapshot()
            measured, alone = body.get("tok_s"), body["policy"]["target_alone_tok_s"]
            body["speedup_measured"] = round(measured / alone, 3) if measured and alone else None
        if isinstance(proxy.drafter, RaceDrafter):
            body["race"] = proxy.drafter.board.snapshot()
        if proxy.gate is not None:
            body["gate"] = proxy.gate.snapshot()
        if proxy.approximate and proxy.speculator is not None:
            body["consensus"] = {
                "approximate": True,
                "policy": proxy.config.consensus_policy,
                "skipped_rounds": proxy.speculator.skipped_rounds,
                "skipped_tokens": proxy.speculator.skipped_tokens,
            }
        body["recent_requests"] = list(proxy.recent)
        return body

    async def dashboard(self, request: Request) -> Response:
        """The page only (no numbers in it): it asks for the token and reads /tightwad/v1/events."""
        return HTMLResponse(DASHBOARD_HTML)

    async def events(self, request: Request) -> Response:
        """Live stats for the dashboard (SSE, one event a second); needs the token like any route."""
        return EventSourceResponse(live_stats(self.stats_body, self._pool_health), ping=15)

    async def _pool_health(self) -> dict[str, Any]:
        try:
            return {"ok": True, "workers": (await self.proxy.engine.health()).get("workers", [])}
        except OpenAIError as exc:
            return {"ok": False, "error": str(exc)}

    async def metrics(self, request: Request) -> Response:
        proxy = self.proxy
        if proxy.controller is not None:
            proxy.telemetry.policy(proxy.controller.last_choice.k, proxy.controller.acceptance.alpha)
        return Response(generate_latest(proxy.telemetry.registry), media_type=CONTENT_TYPE_LATEST)
