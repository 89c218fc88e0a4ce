"""The router: a stable address in front of a backend that can change under it.

What a Kubernetes Service is to pods, for the process and docker runtimes: clients (the proxy, apps)
keep one URL while the operator swaps the engine behind it. Every request goes to the backend
current when it arrives and finishes there, so an old engine is stopped only once the router reports
no request left on it (`GET /_tightwad/health`: open, for probes, with the open requests per engine
unit and no address). With no backend yet it answers 503 in OpenAI's error shape.

    python -m tightwad.operator.router --host 127.0.0.1 --port 8080 [--backend URL]

`GET /_tightwad/route` says where it points and `PUT /_tightwad/route {"backend": URL, "unit":
NAME}` re-points it, both with the bearer token when TIGHTWAD_TOKEN is set; the engine behind checks
the clients' tokens itself. Every body is bounded (MAX_BODY_BYTES) before it is read. Auth, errors
and serving are the house's (tightwad.http), loopback rule included: beyond loopback it needs a
token. `GET /_tightwad/openapi.json` (open) is its OpenAPI document (tightwad.openapi).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tightwad import http, openapi
from tightwad.errors import TightwadError
from tightwad.openai import OpenAIError

ROUTE_PATH = "/_tightwad/route"
HEALTH_PATH = "/_tightwad/health"
# Bodies are buffered (for the one retry below), so they are bounded before a byte is held. Above
# the proxy's own default (8 MiB): the proxy's and the engine's limits decide, this one backs them.
MAX_BODY_BYTES = 16 * 2**20
ROUTE_BODY_BYTES = 64 * 2**10  # {"backend": URL, "unit": NAME}
ENGINE_HEADER = "x-tightwad-engine"
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones httpx sets itself.
_DROP_REQUEST = {
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
_DROP_RESPONSE = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}


@dataclass
class EngineBackend:
    url: str
    unit: str


class Router:
    def __init__(
        self, backend: EngineBackend | None, token: str | None, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.backend = backend
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.inflight: Counter[str] = Counter()
        # No read timeout: a streamed reply lasts as long as the model writes.
        timeout = httpx.Timeout(connect=5.0, read=None, write=60.0, pool=None)
        self.client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        await self.client.aclose()

    def status(self) -> dict[str, object]:
        backend = self.backend
        return {
            "backend": backend.url if backend else None,
            "unit": backend.unit if backend else None,
            "inflight": {unit: n for unit, n in self.inflight.items() if n},
        }

    async def show_route(self, request: Request) -> Response:
        return JSONResponse(self.status())

    async def probe(self, request: Request) -> Response:
        """For health probes, which carry no token: up, and the open requests per engine unit (the
        operator drains an old engine by them), but not where the route points."""
        status = self.status()
        return JSONResponse({"status": "ok", "unit": status["unit"], "inflight": status["inflight"]})

    async def set_route(self, request: Request) -> Response:
        raw = await http.read_limited(request, ROUTE_BODY_BYTES, "the router's route")
        try:
            body = json.loads(raw)
            self.backend = EngineBackend(
                str(body["backend"]).rstrip("/"), str(body.get("unit") or body["backend"])
            )
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: `[[[[...` deep
            return _error(400, 'send {"backend": "http://HOST:PORT", "unit": "NAME"}', "invalid_request")
        return JSONResponse(self.status())

    async def forward(self, request: Request) -> Response:
        if self.backend is None:
            return _error(503, "no engine is ready yet; the operator is starting one", "no_backend")
        # Buffered (requests are small, and it allows one retry below), under the limit: anyone
        # who reaches the router can send one, the engine checks the token only after.
        body = await http.read_limited(request, self.max_body_bytes, "the engine router")
        # The backend is chosen and counted only now, with no await in between: an engine that
        # the operator saw drained (no request open) while this body was arriving, and then
        # stopped, is never chosen.
        backend = self.backend
        if backend is None:
            return _error(503, "no engine is ready yet; the operator is starting one", "no_backend")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST]
        url = httpx.URL(backend.url + request.url.path, query=request.url.query.encode())
        self.inflight[backend.unit] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.inflight[backend.unit] -= 1

        try:
            upstream = await self._send(request.method, url, headers, body)
        except httpx.HTTPError as exc:
            release()
            return _error(
                502, f"the engine at {backend.url} did not answer ({type(exc).__name__})", "bad_gateway"
            )

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()
                release()

        response_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE}
        # Which engine answered: a client that caches what it learned about the engine (model,
        # vocabulary) can tell that a hot-swap happened behind this stable address.
        response_headers[ENGINE_HEADER] = backend.unit
        return StreamingResponse(
            stream(),
            status_code=upstream.status_code,
            headers=response_headers,
            background=BackgroundTask(release),
        )

    async def _send(
        self, method: str, url: httpx.URL, headers: list[tuple[str, str]], body: bytes
    ) -> httpx.Response:
        request = self.client.build_request(method, url, headers=headers, content=body)
        try:
            return await self.client.send(request, stream=True)
        except httpx.ConnectError:
            # A pooled connection to a backend that just restarted: one fresh try, before any byte
            # of the reply was sent, cannot duplicate work.
            await asyncio.sleep(0.05)
            return await self.client.send(
                self.client.build_request(method, url, headers=headers, content=body), stream=True
            )


def _error(status: int, message: str, code: str) -> JSONResponse:
    return http.error_response(OpenAIError(message, status=status, code=code))


def _guarded(method: str, path: str) -> bool:
    """The route needs the token, to re-point it or to read where it points; forwarded requests
    carry the client's own token to the engine, which checks it; the probe path is open."""
    return path == ROUTE_PATH


def create_app(router: Router) -> Starlette:
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    routes = [
        Route(ROUTE_PATH, router.show_route, methods=["GET"]),
        Route(ROUTE_PATH, router.set_route, methods=["PUT"]),
        Route(HEALTH_PATH, router.probe, methods=["GET"]),
        # Its own document under /_tightwad/: /openapi.json is the engine's, forwarded like the rest.
        openapi.route(openapi.router_document(), openapi.ROUTER_OPENAPI_PATH),
        Route("/{path:path}", router.forward, methods=methods),
    ]
    return http.app(routes, token=router.token, guarded=_guarded, lifespan=router.lifespan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tightwad.operator.router", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", default=None, help="initial backend URL")
    args = parser.parse_args(argv)
    backend = EngineBackend(args.backend.rstrip("/"), args.backend.rstrip("/")) if args.backend else None
    router = Router(backend, os.environ.get("TIGHTWAD_TOKEN") or None)
    try:
        return 0 if http.serve(create_app(router), args.host, args.port, token=router.token) else 1
    except TightwadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
