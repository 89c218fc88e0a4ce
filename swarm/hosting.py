"""Run the peer server inside the caller's event loop (so a puller can serve while it downloads),
on a socket we bind ourselves: a busy port is a clear error, not uvicorn calling sys.exit."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from tightwad.errors import TightwadError
from tightwad.manifest import is_loopback


class ServeError(TightwadError):
    """The peer server cannot start; the message says how to fix it."""


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token (a namespace or LAN address counts)."""
    if not is_loopback(host) and not token:
        raise ServeError(
            f"the swarm server would listen on {host}, beyond loopback, without a token; "
            "set TIGHTWAD_TOKEN (or pass --token), or bind 127.0.0.1"
        )


def listen(host: str, port: int) -> socket.socket:
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
    sock.listen(256)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would turn SIGTERM into "stop serving" and let the rest of the process (a puller)
        # run on; a swarm node is crash-safe by design, so the default action (exit) is right.
        yield


class BackgroundServer:
    """uvicorn serving `app` on `host:port` as a task of the running loop."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        self.host = host
        self.port = port
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
        )
        self.server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = listen(self.host, self.port)
        self.port = sock.getsockname()[1]  # port 0 picks a free one
        self._task = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise ServeError(f"the swarm server on {self.host}:{self.port} stopped while starting")
            await asyncio.sleep(0.02)

    async def wait(self) -> None:
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
