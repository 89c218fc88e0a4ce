"""The operator's side of agents: an HTTP API, behind the cluster's bearer token.

Hosts the operator cannot reach (a Mac with `runtime: native`, a `runtime: process` machine
elsewhere) run `tightwad agent`, which reads the manifest and the observed state here, runs its
host's units itself, and reports them back; the operator's next pass plans with those reports.

    GET  /v1/manifest                 the manifest in force (the last good one)
    GET  /v1/observed                 every unit and model check of the last pass
    POST /v1/hosts/{host}/report      an agent's units and model checks
"""

from __future__ import annotations

import hmac
import threading
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tightwad.operator.observed import checks_from_json, checks_to_json, state_from_json, state_to_json

if TYPE_CHECKING:
    from tightwad.operator.reconcile import Reconciler

DEFAULT_PORT = 8090


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


class _RequireToken:
    """Every route needs `Authorization: Bearer <token>`: agents learn the whole manifest here."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
            if not hmac.compare_digest(given, self.token):
                response = _error(401, "missing or wrong bearer token: send `Authorization: Bearer <token>`")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(reconciler: Reconciler, token: str) -> ASGIApp:
    async def manifest(request: Request) -> Response:
        current = reconciler.manifest
        if current is None:
            return _error(503, f"no valid manifest yet: {reconciler.manifest_error}")
        return JSONResponse(
            {"cluster": current.name, "digest": reconciler.manifest_digest, "manifest": current.data}
        )

    async def observed(request: Request) -> Response:
        last = reconciler.last_observed
        if last is None:
            return JSONResponse({"now": None, "units": [], "models": []})
        units = [state_to_json(state) for state in last.units.values()]
        return JSONResponse({"now": last.now, "units": units, "models": checks_to_json(last.models)})

    async def report(request: Request) -> Response:
        host = request.path_params["host"]
        if reconciler.host_kinds.get(host) != "agent":
            known = sorted(h for h, kind in reconciler.host_kinds.items() if kind == "agent")
            return _error(
                404, f"host {host!r} is not run by an agent here (agent hosts: {', '.join(known) or 'none'})"
            )
        try:
            body: dict[str, Any] = await request.json()
            units = {s.name: s for s in map(state_from_json, body.get("units", []))}
            checks = checks_from_json(body.get("models", []))
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"not a report: {exc}")
        foreign = [name for name, state in units.items() if state.unit.host != host]
        if foreign:
            return _error(400, f"an agent reports its own host's units only, not {', '.join(foreign)}")
        reconciler.report(host, units, {key: check for key, check in checks.items() if key[0] == host})
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/v1/manifest", manifest, methods=["GET"]),
            Route("/v1/observed", observed, methods=["GET"]),
            Route("/v1/hosts/{host}/report", report, methods=["POST"]),
        ]
    )
    return _RequireToken(app, token)


class AgentServer:
    """The API on a thread of the operator, for as long as the operator runs."""

    def __init__(self, reconciler: Reconciler, token: str, host: str, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(
            create_app(reconciler, token), host=host, port=port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="agent-api", daemon=True)
        self.url = f"http://{host}:{port}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
