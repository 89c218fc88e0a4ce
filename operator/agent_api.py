"""The operator's side of agents: an HTTP API, behind the cluster's bearer token.

Hosts the operator cannot reach (a Mac with `runtime: native`, a `runtime: process` machine
elsewhere) run `tightwad agent`, which reads the manifest and the observed state here, runs its
host's units itself, and reports them back; the operator's next pass plans with those reports.

    GET  /v1/manifest                 the manifest in force (the last good one)
    GET  /v1/observed                 every unit and model check of the last pass
    POST /v1/hosts/{host}/report      an agent's units and model checks
    GET  /openapi.json                this API's OpenAPI document (tightwad.openapi; open, no secrets)

Every other route needs the token (agents learn the whole manifest here); auth, errors and serving are the
house's (tightwad.http).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tightwad import http, openapi
from tightwad.errors import TightwadError
from tightwad.openai import OpenAIError
from tightwad.operator.observed import checks_from_json, checks_to_json, state_from_json, state_to_json

if TYPE_CHECKING:
    from tightwad.operator.reconcile import Reconciler

DEFAULT_PORT = 8090


def _error(status: int, message: str, code: str) -> JSONResponse:
    return http.error_response(OpenAIError(message, status=status, code=code))


def create_app(reconciler: Reconciler, token: str) -> Starlette:
    if not token:  # never serve the manifest (and its secrets' places) to anyone who asks
        raise TightwadError("the agent API needs a token (spec.auth.token)")

    async def manifest(request: Request) -> Response:
        current = reconciler.manifest
        if current is None:
            return _error(503, f"no valid manifest yet: {reconciler.manifest_error}", "no_manifest")
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
                404,
                f"host {host!r} is not run by an agent here (agent hosts: {', '.join(known) or 'none'})",
                "not_found",
            )
        try:
            body: dict[str, Any] = await request.json()
            units = {s.name: s for s in map(state_from_json, body.get("units", []))}
            checks = checks_from_json(body.get("models", []))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: `[[[[...` deep
            return _error(400, f"not a report: {exc}", "invalid_request")
        foreign = [name for name, state in units.items() if state.unit.host != host]
        if foreign:
            message = f"an agent reports its own host's units only, not {', '.join(foreign)}"
            return _error(400, message, "invalid_request")
        reconciler.report(host, units, {key: check for key, check in checks.items() if key[0] == host})
        return JSONResponse({"ok": True})

    routes = [
        Route("/v1/manifest", manifest, methods=["GET"]),
        Route("/v1/observed", observed, methods=["GET"]),
        Route("/v1/hosts/{host}/report", report, methods=["POST"]),
        openapi.route(openapi.agent_document()),
    ]
    return http.app(routes, token=token, open_paths=(openapi.OPENAPI_PATH,))


class AgentServer:
    """The API on a thread of the operator, for as long as the operator runs."""

    def __init__(self, reconciler: Reconciler, token: str, host: str, port: int) -> None:
        self.server = http.Server(create_app(reconciler, token), host, port, token=token)
        self.url = self.server.url

    def start(self) -> None:
        self.server.start_thread(name="agent-api")
        self.url = self.server.url  # the port, if 0 picked one

    def stop(self) -> None:
        self.server.stop_thread()
