"""The HTTP house every Tightwad server lives in: how it listens, who may call it, how it fails.

- `Server` / `serve`: uvicorn on a socket we bind ourselves (a busy port is one clear line, not
  uvicorn calling sys.exit), run blocking from a CLI (`serve`), inside the caller's event loop
  (`Server.start`, the swarm node) or on a thread (`Server.start_thread`, the operator's agent API).
- The loopback rule (`check_bind`): every server binds loopback by default, and one that listens
  anywhere else needs a token. `Server` applies it, so no server can forget.
- `BearerAuth`: the one bearer-token check (constant time), with the paths a server leaves open.
- `app`: a Starlette app with that check and the shared exception handlers, so every error a
  server answers has the one OpenAI shape of tightwad.openai (`{"error": {message, type, param,
  code}}`), 404s and crashes included; an error that says when to come back (a busy engine's 503)
  carries a Retry-After header too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from tightwad.errors import TightwadError
from tightwad.netaddr import is_loopback
from tightwad.openai import OpenAIError, PayloadTooLarge, Unauthorized, error_body

__all__ = [
    "BearerAuth",
    "ServeError",
    "Server",
    "app",
    "check_bind",
    "error_response",
    "read_limited",
    "serve",
    "url_for",
]

Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[None]]


class ServeError(TightwadError):
    """A server cannot start; the message says how to fix it."""


# errors ----------------------------------------------------------------------------------------
def error_response(exc: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error's body and status, with its own headers (Retry-After) and any given."""
    return JSONResponse(exc.to_json(), status_code=exc.status, headers={**exc.headers(), **(headers or {})})


async def _on_openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    return error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = error_body(f"{request.method} {request.url.path}: {exc.detail}", type_, code)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    body = error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error")
    return JSONResponse(body, status_code=500)


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Any]] = {
    OpenAIError: _on_openai_error,
    HTTPException: _on_http_error,
    Exception: _on_unexpected,
}


async def read_limited(request: Request, limit: int, server: str = "this server") -> bytes:
    """The request's body, refused with a 413 once it is over `limit` bytes, by its declared
    length or while it arrives: a server never holds a body bigger than it takes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes; {server} takes at most {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes; {server} takes at most {limit}")
    return bytes(body)


# auth ------------------------------------------------------------------------------------------
def check_bind(host: str, token: str | None) -> None:
    """The loopback rule: refuse to listen beyond loopback without a token (a LAN or namespace
    address counts as beyond)."""
    if not is_loopback(host) and not token:
        raise ServeError(
            f"refusing to listen on {host}, beyond loopback, without a token: pass --token or set "
            "TIGHTWAD_TOKEN (or spec.auth.token), or listen on 127.0.0.1"
        )


class BearerAuth:
    """Pure ASGI middleware: a request needs `Authorization: Bearer <token>` (compared in constant
    time) unless its path is in `open_paths`; with `guarded`, only requests it names need it."""

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        open_paths: Collection[str] = (),
        guarded: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.open_paths = frozenset(open_paths)
        self.guarded = guarded

    def _needs_token(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return False
        return self.guarded is None or self.guarded(scope["method"], scope["path"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._needs_token(scope):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                rejection = Unauthorized(
                    "missing or wrong bearer token: send `Authorization: Bearer <token>`"
                )
                await error_response(rejection, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def app(
    routes: Sequence[BaseRoute],
    *,
    token: str | None = None,
    open_paths: Collection[str] = (),
    guarded: Callable[[str, str], bool] | None = None,
    lifespan: Lifespan | None = None,
) -> Starlette:
    """A Starlette app in the house style: the bearer check when there is a token, every error in
    the one shape."""
    middleware = (
        [Middleware(BearerAuth, token=token, open_paths=open_paths, guarded=guarded)] if token else []
    )
    return Starlette(
        routes=list(routes), middleware=middleware, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS
    )


# serving ---------------------------------------------------------------------------------------
def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or ServeError saying what to do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ServeError(
            f"cannot listen on {host}:{port} ({exc.strerror}); is another server using it? pick --port"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, own_signals: bool) -> None:
        super().__init__(config)
        self.own_signals = own_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Inside someone else's loop (a swarm puller), SIGTERM must keep its default action (exit)
        # instead of becoming "stop serving" while the rest of the process runs on.
        if self.own_signals:
            with super().capture_signals():
                yield
        else:
            yield


class Server:
    """uvicorn serving `app` on host:port, under the loopback rule. Run it one way: `run()`
    (blocking, owns SIGINT/SIGTERM), `start()`/`stop()` in the running loop, or
    `start_thread()`/`stop_thread()`."""

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        token: str | None = None,
        lifespan: Literal["auto", "on", "off"] = "auto",
        graceful_timeout: float | None = None,
    ) -> None:
        check_bind(host, token)
        self.host = host
        self.port = port
        self.app = app
        self.lifespan: Literal["auto", "on", "off"] = lifespan
        self.graceful_timeout = graceful_timeout
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return url_for(self.host, self.port)

    @property
    def started(self) -> bool:
        return self._server is not None and self._server.started

    def _prepare(self, own_signals: bool) -> tuple[_Uvicorn, socket.socket]:
        sock = listen(self.host, self.port)
        self.port = sock.getsockname()[1]  # port 0 picked a free one
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan=self.lifespan,
            timeout_graceful_shutdown=self.graceful_timeout,
        )
        self._server = _Uvicorn(config, own_signals)
        return self._server, sock

    def run(self, on_ready: Callable[[str], None] | None = None) -> bool:
        """Serve until SIGINT/SIGTERM; `on_ready(url)` runs once it listens. True if it started."""
        server, sock = self._prepare(own_signals=True)
        if on_ready is not None:

            def announce() -> None:
                while not server.started and not server.should_exit:
                    time.sleep(0.05)
                if server.started:
                    on_ready(self.url)

            threading.Thread(target=announce, daemon=True).start()
        # uvicorn handles SIGINT/SIGTERM, then re-raises the signal once it has shut down; with these
        # handlers in place that re-raise lands in the caller, which still has cleanup to do.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: None)
        server.run(sockets=[sock])
        return server.started

    async def start(self) -> None:
        """Serve as a task of the running loop; returns once it listens."""
        server, sock = self._prepare(own_signals=False)
        self._task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            if self._task.done():
                self._task.result()
                raise ServeError(f"the server on {self.host}:{self.port} stopped while starting")
            await asyncio.sleep(0.02)

    async def wait(self) -> None:
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        if self._task is None or self._server is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def start_thread(self, name: str = "http-server") -> None:
        """Serve on a daemon thread, for as long as the process runs or until `stop_thread`."""
        server, sock = self._prepare(own_signals=False)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
        self._thread.start()

    def stop_thread(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=timeout)


def serve(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    token: str | None,
    on_ready: Callable[[str], None] | None = None,
) -> bool:
    """Serve `app` until SIGINT/SIGTERM, the way every Tightwad CLI does; True if it started.
    ServeError (a TightwadError) when the loopback rule or a busy port stops it first."""
    return Server(app, host, port, token=token).run(on_ready)
